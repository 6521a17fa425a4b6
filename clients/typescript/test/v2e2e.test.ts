/**
 * Protocol v2 end to end: the SDK, trusting only the operator's pin, against a real certified
 * `twistd llmrouter` in front of a real certified `twistd inference` node (its v2 gate) on the
 * tiny model, over real sockets; keys and certificates made with `llmrouter-keys` as an operator
 * makes them. Faults are injected only around the router (a recording or replaying fetch).
 */

import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';

import {
  type ChatEvent,
  type ChatRequest,
  type ChatStatus,
  ChatSession,
  KeyDocumentError,
  type KeyDocumentV2,
  KeyRotationError,
  LLMRouterClient,
  type PrepareProgress,
  RateLimitedError,
  RouterError,
} from '@llmrouter/client';
import { createOpenAIFetch } from '@llmrouter/client/openai';

import { recorder, replaying } from './support/faults.js';
import { PersistentMemory } from './support/stores.js';
import { type Inference, makeOperator, type Operator, python, type Router, startInference, startRouter, startRouterV2, TINY, waitFor } from './support/stack.js';

function ask(content: string, max_tokens = 4): ChatRequest {
  return { messages: [{ role: 'user', content }], max_tokens, temperature: 0 };
}

async function collect(events: AsyncIterable<ChatEvent>): Promise<{ text: string; done: ChatEvent | undefined }> {
  let text = '';
  let done: ChatEvent | undefined;
  for await (const event of events) {
    if (event.type === 'delta') text += event.text;
    else done = event;
  }
  return { text, done };
}

const CANARY = 'canary-7f3a a private question';

describe('protocol v2 against a real certified router and node', { timeout: 240000 }, () => {
  let operator: Operator;
  let inference: Inference;
  let router: Router;
  let limited: Router;

  before(async () => {
    operator = await makeOperator();
    inference = await startInference(['--parallel', '2', '--max-tokens', '4000'], { operator, name: 'node-a' });
    [router, limited] = await Promise.all([
      // a device key's first request costs a proof of work, asked for sealed (12 bits: fast tests)
      startRouterV2(operator, [inference], ['node-a'], { NEW_DEVICE_POW_DIFFICULTY: '12' }),
      startRouterV2(operator, [inference], ['node-a'], { NEW_DEVICE_POW_DIFFICULTY: '0', DEVICE_RATE_LIMIT_BURST: '1', DEVICE_RATE_LIMIT_PER_MINUTE: '1' }),
    ]);
  });

  after(async () => {
    await Promise.all([router, limited].map((r) => r?.stop()));
    await inference?.stop();
    operator?.stop();
  });

  it('lists the models the verified node is certified for, and chats anonymously; the prompt never crosses in the clear', async () => {
    const { fetch, calls, chats } = recorder();
    const client = new LLMRouterClient({ url: router.url, operatorPin: operator.pin, fetch });
    assert.equal(client.protocol, '2');
    assert.deepEqual(await client.models(), { protocol: '2', default: TINY, models: [TINY] });
    const { text, done } = await collect(client.chat(ask(CANARY)));
    assert.ok(text.length > 0);
    assert.ok(done?.type === 'done' && done.finish_reason === 'length' && done.usage.completion_tokens === 4);
    assert.deepEqual(calls.map((c) => [c.method, c.path]), [['GET', '/api/v2/keys'], ['POST', '/api/v2/chat']]);
    const [chat] = chats();
    assert.equal(chat?.headers['Content-Type'], 'message/ohttp-req');
    assert.ok(!chat?.body?.includes('canary'));
    assert.equal(chat?.body?.charCodeAt(1), 0x00); // RFC 9458's header: key id, then kem 0x0020
    assert.equal(chat?.body?.charCodeAt(2), 0x20);
  });

  it("a new device's proof of work comes sealed: sealed again, solved for the new request, then admitted; prepare() does it ahead", async () => {
    const statuses: ChatStatus[] = [];
    const { fetch, chats } = recorder();
    const client = new LLMRouterClient({ url: router.url, operatorPin: operator.pin, deviceKey: 'ephemeral', fetch, onStatus: (s) => statuses.push(s) });
    const { done } = await collect(client.chat(ask('hello from a new device')));
    assert.equal(done?.type, 'done');
    assert.deepEqual(statuses.filter((s) => s.type === 'resealing'), [{ type: 'resealing', reason: 'pow_required' }]);
    assert.ok(statuses.some((s) => s.type === 'proof_of_work' && s.difficulty === 12));
    assert.deepEqual(chats().map((c) => [c.status, 'X-LLMRouter-PoW' in c.headers]), [[200, false], [200, true]]);
    // the device is known now: no more work
    statuses.length = 0;
    await collect(client.chat(ask('and again')));
    assert.ok(!statuses.some((s) => s.type === 'proof_of_work' || s.type === 'resealing'));

    const storage = new PersistentMemory(); // the secret store
    const cache = new PersistentMemory(); // public data
    const progress: PrepareProgress[] = [];
    const app = new LLMRouterClient({ url: router.url, operatorPin: operator.pin, deviceKey: 'auto', storage, cache });
    await app.prepare({ onProgress: (p) => progress.push(p) });
    assert.deepEqual([...new Set(progress.map((p) => p.step))], ['keys', 'device_key', 'proof_of_work', 'done']);
    assert.deepEqual(progress.at(-1), { step: 'done', fraction: 1 });
    // the v2 document is cached apart from a v1.1 one; the device key only in the secret store
    const names = ['device-key', 'key-document', 'key-document-v2', 'registered'];
    assert.deepEqual(names.map((n) => storage.getItem(`llmrouter.${n}`) !== null), [true, false, false, false]);
    assert.deepEqual(names.map((n) => cache.getItem(`llmrouter.${n}`) !== null), [false, false, true, true]);
    const counted = recorder();
    const relaunched = new LLMRouterClient({ url: router.url, operatorPin: operator.pin, deviceKey: 'auto', storage, cache, fetch: counted.fetch });
    await relaunched.prepare();
    assert.deepEqual(counted.calls, []); // registered already, and the cached document still fresh: nothing sent
    const { done: after } = await collect(relaunched.chat(ask('no work now')));
    assert.equal(after?.type, 'done');
  });

  it("the router's sealed refusal becomes its typed error with status and retry_after (a 200 carrying one event)", async () => {
    const { fetch, chats } = recorder();
    const deviceKey = new Uint8Array(32).fill(0x42);
    const client = new LLMRouterClient({ url: limited.url, operatorPin: operator.pin, deviceKey, fetch, maxRetries: 0 });
    await collect(client.chat(ask('spend the burst', 1)));
    await assert.rejects(collect(client.chat(ask('one too many', 1))), (e: unknown) => {
      return e instanceof RateLimitedError && e.code === 'device_rate_limited' && e.status === 429 && (e.retryAfter ?? 0) >= 1;
    });
    assert.deepEqual(chats().map((c) => c.status), [200, 200]);
  });

  it('refuses a document under another operator key, and a router without a certificate, before sending anything', async () => {
    const other = await makeOperator();
    try {
      const { fetch, chats } = recorder();
      const client = new LLMRouterClient({ url: router.url, operatorPin: other.pin, fetch });
      await assert.rejects(collect(client.chat(ask('never sent'))), (e: unknown) => e instanceof KeyDocumentError && e.code === 'pin_mismatch');
      assert.deepEqual(chats(), []);
    } finally {
      other.stop();
    }
    // the router's own (v1.1) key given as the operator pin: said so
    const confused = new LLMRouterClient({ url: router.url, operatorPin: router.pin });
    await assert.rejects(confused.keys(), (e: unknown) => e instanceof KeyDocumentError && e.code === 'pin_mismatch' && /router's own signing key/.test(e.message));
    const uncertified = await startRouter(inference);
    try {
      const client = new LLMRouterClient({ url: uncertified.url, operatorPin: operator.pin });
      await assert.rejects(client.keys(), (e: unknown) => e instanceof RouterError && e.code === 'v2_unavailable' && e.status === 503);
      // the same router still speaks v1.1 to an app that pins its own key
      const v11 = new LLMRouterClient({ url: uncertified.url, pin: uncertified.pin });
      assert.equal((await collect(v11.chat(ask('v1.1 still', 1)))).done?.type, 'done');
    } finally {
      await uncertified.stop();
    }
  });

  it('refetches the key document once and seals again when the router rotated its key (key_unknown)', async () => {
    const { fetch, calls, chats } = recorder();
    const client = new LLMRouterClient({ url: router.url, operatorPin: operator.pin, fetch });
    const before = (await client.keys()).current.kid;
    await router.keys('rotate');
    await router.keys('revoke', before);
    router.daemon.signal('SIGHUP');
    await waitFor(
      async () => (await new LLMRouterClient({ url: router.url, operatorPin: operator.pin }).keys({ refresh: true })).current.kid,
      (kid) => kid !== before,
      'rotation seen in the v2 key document',
    );
    const { done } = await collect(client.chat(ask('after rotation', 2)));
    assert.equal(done?.type, 'done');
    const kids = chats().map((c) => [c.body!.charCodeAt(0).toString(16).padStart(2, '0'), c.status]);
    assert.deepEqual(kids, [[before, 400], [(await client.keys()).current.kid, 200]]);
    assert.equal(calls.filter((c) => c.path === '/api/v2/keys').length, 2);
    // a second refusal of the same kind is final
    const stuck = new LLMRouterClient({ url: router.url, operatorPin: operator.pin, fetch: async (url, init) => (init.method === 'POST' ? globalThis.fetch(url, { ...init, body: new Uint8Array([0xee, ...new Uint8Array(init.body as ArrayBuffer).subarray(1)]) }) : globalThis.fetch(url, init)) });
    await assert.rejects(collect(stuck.chat(ask('never', 1))), KeyRotationError);
  });

  it("a clock 90 s behind: the router's sealed stale, the clock corrected from the answer's Date, sealed again once", async () => {
    const statuses: ChatStatus[] = [];
    const { fetch, chats } = recorder();
    const client = new LLMRouterClient({ url: router.url, operatorPin: operator.pin, fetch, now: () => Date.now() - 90_000, onStatus: (s) => statuses.push(s) });
    const { done } = await collect(client.chat(ask('late clock', 1)));
    assert.equal(done?.type, 'done');
    assert.deepEqual(statuses.filter((s) => s.type === 'resealing'), [{ type: 'resealing', reason: 'stale' }]);
    assert.deepEqual(chats().map((c) => c.status), [200, 200]);
    // without the correction allowed, the second stale is final
    const strict = new LLMRouterClient({ url: router.url, operatorPin: operator.pin, now: () => Date.now() - 90_000, maxClockCorrectionSeconds: 10 });
    await assert.rejects(collect(strict.chat(ask('still late', 1))), (e: unknown) => e instanceof RouterError && e.code === 'stale' && e.status === 401);
  });

  it('surfaces a replayed request as the router refuses it (sealed)', async () => {
    const client = new LLMRouterClient({ url: router.url, operatorPin: operator.pin, fetch: replaying, maxRetries: 0 });
    await assert.rejects(collect(client.chat(ask('replayed', 1))), (e: unknown) => e instanceof RouterError && e.code === 'replay' && e.status === 409);
  });

  it('the v1.1 request fields travel sealed to the node: a forced tool call, JSON schema output, logprobs', async () => {
    const client = new LLMRouterClient({ url: router.url, operatorPin: operator.pin });
    const cities = ['Paris', 'Oslo'];
    const parameters = { type: 'object', properties: { city: { type: 'string', enum: cities } }, required: ['city'], additionalProperties: false };
    const streamed: ChatEvent[] = [];
    const tool = await client.complete(
      {
        messages: [{ role: 'user', content: 'Weather in Oslo?' }],
        tools: [{ type: 'function', function: { name: 'get_weather', parameters } }],
        tool_choice: 'required',
        parallel_tool_calls: false,
        temperature: 0,
        max_tokens: 300,
      },
      { onEvent: (e) => streamed.push(e) },
    );
    assert.equal(tool.finish_reason, 'tool_calls');
    assert.equal(tool.tool_calls.length, 1);
    assert.ok(streamed.filter((e) => e.type === 'tool_call').length >= 1);
    assert.ok(cities.includes((JSON.parse(tool.tool_calls[0]!.function.arguments) as { city: string }).city));
    const json = await client.complete({
      messages: [{ role: 'user', content: 'Where?' }],
      response_format: { type: 'json_schema', json_schema: { name: 'place', schema: parameters } },
      logprobs: true,
      top_logprobs: 2,
      temperature: 0,
      max_tokens: 300,
    });
    assert.equal(json.finish_reason, 'stop');
    assert.ok(cities.includes((JSON.parse(json.text) as { city: string }).city));
    assert.ok(json.logprobs.length > 0 && json.logprobs.every((l) => l.top_logprobs.length <= 2));
  });

  it('the OpenAI adapter and ChatSession (what useChat runs) on v2', async () => {
    const client = new LLMRouterClient({ url: router.url, operatorPin: operator.pin });
    const openai = createOpenAIFetch(client);
    const response = await openai('https://llmrouter.invalid/v1/chat/completions', { method: 'POST', body: JSON.stringify({ model: TINY, messages: [{ role: 'user', content: 'hi' }], max_tokens: 3 }) });
    const completion = (await response.json()) as { choices: { message: { content: string } }[]; usage: { completion_tokens: number } };
    assert.equal(response.status, 200);
    assert.equal(completion.usage.completion_tokens, 3);
    const models = (await (await openai('https://llmrouter.invalid/v1/models', { method: 'GET' })).json()) as { data: { id: string }[] };
    assert.ok(models.data.some((m) => m.id === TINY));
    const session = new ChatSession(client, { request: { max_tokens: 3 } });
    await session.send('hello');
    const { messages, error } = session.getState();
    assert.equal(error, undefined);
    assert.deepEqual(messages.map((m) => [m.role, m.state]), [['user', 'complete'], ['assistant', 'complete']]);
  });

  // last: it changes the node's keys under the other tests
  it("a node's revoked key: the router's sealed key_unknown, the document fetched again, the request sealed again once", async () => {
    const statuses: ChatStatus[] = [];
    const { fetch, calls, chats } = recorder();
    const client = new LLMRouterClient({ url: router.url, operatorPin: operator.pin, fetch, onStatus: (s) => statuses.push(s) });
    const before = ((await client.keys()) as KeyDocumentV2).nodes[0]!.current.kid;
    await python('-m', 'llmrouter.ops.keyctl', '--keys-dir', inference.nodeKeysDir!, 'revoke', before);
    await waitFor(
      async () => ((await new LLMRouterClient({ url: router.url, operatorPin: operator.pin }).keys()) as KeyDocumentV2).nodes[0]?.current.kid,
      (kid) => kid !== undefined && kid !== before,
      "the node's new key in the router's document",
    );
    const { done } = await collect(client.chat(ask('after the node rotated', 2)));
    assert.equal(done?.type, 'done');
    assert.deepEqual(statuses.filter((s) => s.type === 'resealing'), [{ type: 'resealing', reason: 'key_unknown' }]);
    assert.deepEqual(chats().map((c) => c.status), [200, 200]); // the first carried the sealed refusal
    assert.equal(calls.filter((c) => c.path === '/api/v2/keys').length, 2);
    assert.notEqual(((await client.keys()) as KeyDocumentV2).nodes[0]!.current.kid, before);
  });
});
