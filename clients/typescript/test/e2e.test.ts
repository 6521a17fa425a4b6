/**
 * End to end: the SDK against a real `twistd llmrouter` in front of a real `twistd inference` on
 * the tiny test model, over real sockets. Faults are injected only around the router (a replaying
 * or failing fetch, a TCP proxy that cuts the stream); observations of the servers go through
 * their own metrics.
 */

import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';

import {
  AbortedError,
  type ChatEvent,
  type ChatStatus,
  type PrepareProgress,
  type ChatRequest,
  KeyDocumentError,
  LLMRouterClient,
  MemoryStorage,
  NetworkError,
  RateLimitedError,
  RouterError,
  TimeoutError,
  TruncatedStreamError,
} from '@llmrouter/client';

import { cuttingProxy, recorder, replaying, stalled, unreachable, unstreamed } from './support/faults.js';
import { PersistentMemory } from './support/stores.js';
import { type Inference, metric, type Router, startInference, startRouter, waitFor } from './support/stack.js';

function ask(content: string, max_tokens = 8): ChatRequest {
  return { messages: [{ role: 'user', content }], max_tokens, temperature: 0 };
}

async function collect(events: AsyncIterable<ChatEvent>): Promise<{ text: string; deltas: number; done: ChatEvent | undefined }> {
  let text = '';
  let deltas = 0;
  let done: ChatEvent | undefined;
  for await (const event of events) {
    if (event.type === 'delta') {
      text += event.text;
      deltas += 1;
    } else {
      done = event;
    }
  }
  return { text, deltas, done };
}

const b64u = (data: Uint8Array) => Buffer.from(data).toString('base64url');

describe('against a real router and inference daemon', { timeout: 240000 }, () => {
  let inference: Inference;
  let router: Router;
  let powRouter: Router;
  let limitedRouter: Router;

  before(async () => {
    inference = await startInference(['--parallel', '2', '--max-tokens', '4000']);
    [router, powRouter, limitedRouter] = await Promise.all([
      // a device key's first request costs a proof of work (12 bits here: fast tests; 16 by default)
      startRouter(inference, { NEW_DEVICE_POW_DIFFICULTY: '12' }),
      startRouter(inference, { POW_THRESHOLD_RPS: '0.001', POW_DIFFICULTY: '8' }),
      startRouter(inference, { RATE_LIMIT_BURST: '1', RATE_LIMIT_PER_MINUTE: '60' }),
    ]);
  });

  after(async () => {
    await Promise.all([router, powRouter, limitedRouter].map((r) => r?.stop()));
    await inference?.stop();
  });

  it('chats in base mode: verified deltas, then usage; the prompt never crosses in the clear', async () => {
    const { fetch, chats } = recorder();
    const client = new LLMRouterClient({ url: router.url, pin: router.pin, fetch });
    const { text, deltas, done } = await collect(client.chat(ask('Hello there, a private question')));
    assert.ok(text.length > 0);
    assert.ok(deltas >= 1);
    assert.deepEqual(done && done.type === 'done' && [done.finish_reason, done.usage.completion_tokens], ['length', 8]);
    assert.ok(done?.type === 'done' && done.usage.prompt_tokens > 0);
    const [call] = chats();
    const envelope = JSON.parse(call!.body!) as Record<string, unknown>;
    assert.equal(envelope.mode, 'base');
    assert.equal(envelope.device_pubkey, undefined);
    assert.ok(!call!.body!.includes('private question'));
  });

  it('chats in auth mode with a device key made on first use and kept in storage', async () => {
    const storage = new PersistentMemory();
    const { fetch, chats } = recorder();
    const client = new LLMRouterClient({ url: router.url, pin: router.pin, deviceKey: 'auto', storage, fetch });
    const { done } = await collect(client.chat(ask('Hello in auth mode', 4)));
    assert.ok(done?.type === 'done' && done.usage.completion_tokens === 4);
    const device = await client.devicePublicKey();
    assert.ok(device !== null && storage.getItem('llmrouter.device-key') !== null);
    const again = new LLMRouterClient({ url: router.url, pin: router.pin, deviceKey: 'auto', storage, fetch });
    await collect(again.chat(ask('and again', 2)));
    for (const call of chats()) {
      const envelope = JSON.parse(call.body!) as Record<string, unknown>;
      assert.equal(envelope.mode, 'auth');
      assert.equal(envelope.device_pubkey, b64u(device!));
    }
    // a new device pays one proof of work on its first request; the router remembers it after
    assert.deepEqual(chats().map((c) => c.status), [401, 200, 200]);
    assert.deepEqual(chats().map((c) => c.headers['X-LLMRouter-PoW'] !== undefined), [false, true, false]);
  });

  it('prepare(): keys, device key and the new-device proof of work ahead, with progress; then chats pay nothing, nor does the next launch', async () => {
    const storage = new PersistentMemory(); // the secret store
    const cache = new PersistentMemory(); // public data
    const { fetch, chats } = recorder();
    const progress: PrepareProgress[] = [];
    const client = new LLMRouterClient({ url: router.url, pin: router.pin, deviceKey: 'auto', storage, cache, fetch });
    await client.prepare({ onProgress: (p) => progress.push(p) });
    const steps = [...new Set(progress.map((p) => p.step))];
    assert.deepEqual(steps, ['keys', 'device_key', 'proof_of_work', 'done']);
    assert.ok(progress.every((p, i) => i === 0 || p.fraction >= progress[i - 1]!.fraction) && progress.at(-1)!.fraction === 1);
    assert.deepEqual(chats().map((c) => [c.status, c.headers['X-LLMRouter-PoW'] !== undefined]), [[401, false], [200, true]]);
    await collect(client.chat(ask('prepared', 2)));
    assert.deepEqual(chats().map((c) => c.status), [401, 200, 200]); // no proof of work for the chat
    // the next launch: same stores, nothing to do
    const relaunch = new LLMRouterClient({ url: router.url, pin: router.pin, deviceKey: 'auto', storage, cache, fetch });
    await relaunch.prepare();
    assert.equal(chats().length, 3);
    // the secret stays in the secret store, the public data in the cache, and neither holds the other's
    const device = b64u((await client.devicePublicKey())!);
    const secret = storage.getItem('llmrouter.device-key')!;
    const names = ['device-key', 'signing-key', 'key-document', 'registered'];
    assert.deepEqual(names.map((n) => storage.getItem(`llmrouter.${n}`) !== null), [true, false, false, false]);
    assert.deepEqual(names.map((n) => cache.getItem(`llmrouter.${n}`) !== null), [false, false, true, true]);
    for (const n of names) {
      const value = cache.getItem(`llmrouter.${n}`) ?? '';
      assert.ok(!value.includes(secret) && !value.includes(device), `the cache's ${n} holds no device key`);
    }
    // a router that forgot the device: the next chat pays again, inline, and says so
    const statuses: string[] = [];
    const fresh = new LLMRouterClient({ url: router.url, pin: router.pin, deviceKey: 'ephemeral', fetch, onStatus: (s) => statuses.push(s.type) });
    await collect(fresh.chat(ask('new device', 2)));
    assert.ok(statuses.includes('proof_of_work') && statuses.at(-1) === 'response');
  });

  it('works with a fetch that has no response streams and no arrayBuffer (read with text(), verified all at once), and says so', async () => {
    const statuses: ChatStatus[] = [];
    const client = new LLMRouterClient({ url: router.url, pin: router.pin, fetch: unstreamed, onStatus: (status) => statuses.push(status) });
    const { deltas, done } = await collect(client.chat(ask('no streams here', 5)));
    assert.ok(deltas >= 1);
    assert.ok(done?.type === 'done' && done.usage.completion_tokens === 5);
    assert.deepEqual(statuses, [{ type: 'response', streaming: false }]);
    const streamed: ChatStatus[] = [];
    await collect(new LLMRouterClient({ url: router.url, pin: router.pin }).chat(ask('streams', 2), { onStatus: (s) => streamed.push(s) }));
    assert.deepEqual(streamed, [{ type: 'response', streaming: true }]);
  });

  it('refuses a key document not signed by the pinned key, before sending anything', async () => {
    const { fetch, chats } = recorder();
    const client = new LLMRouterClient({ url: router.url, pin: powRouter.pin, fetch });
    await assert.rejects(client.keys(), (e: unknown) => e instanceof KeyDocumentError && e.code === 'pin_mismatch');
    await assert.rejects(collect(client.chat(ask('secret'))), KeyDocumentError);
    assert.equal(chats().length, 0);
  });

  it('trusts the first signing key on first use, and refuses another one after', async () => {
    const storage = new PersistentMemory();
    const first = new LLMRouterClient({ url: router.url, trustOnFirstUse: true, storage });
    await collect(first.chat(ask('first use', 2)));
    assert.equal(storage.getItem('llmrouter.signing-key'), router.pin);
    const impostor = new LLMRouterClient({ url: powRouter.url, trustOnFirstUse: true, storage });
    await assert.rejects(impostor.keys(), (e: unknown) => e instanceof KeyDocumentError && e.code === 'pin_mismatch');
  });

  it('starts from the stored key document when the key endpoint cannot be reached', async () => {
    const cache = new MemoryStorage();
    await new LLMRouterClient({ url: router.url, pin: router.pin, cache }).keys();
    const offline = new LLMRouterClient({ url: router.url, pin: router.pin, cache, fetch: unreachable('/api/pubkey'), keyRefreshSeconds: 0 });
    const { done } = await collect(offline.chat(ask('offline start', 2)));
    assert.equal(done?.type, 'done');
    const empty = new LLMRouterClient({ url: router.url, pin: router.pin, fetch: unreachable('/api/pubkey'), maxRetries: 0 });
    await assert.rejects(empty.keys(), (e: unknown) => e instanceof NetworkError && e.retryable && e.cause instanceof TypeError);
  });

  it('solves the proof of work when the router asks for it', async () => {
    const { fetch, chats } = recorder();
    const client = new LLMRouterClient({ url: powRouter.url, pin: powRouter.pin, fetch });
    const { done } = await collect(client.chat(ask('under load', 2)));
    assert.equal(done?.type, 'done');
    const [asked, solved] = chats();
    assert.equal(asked!.status, 401);
    assert.equal(asked!.headers['X-LLMRouter-PoW'], undefined);
    assert.match(solved!.headers['X-LLMRouter-PoW']!, /^[A-Za-z0-9_-]+:\d+$/);
    assert.equal(solved!.status, 200);
    assert.equal(solved!.body, asked!.body); // the work is bound to this envelope's enc
  });

  it('honours Retry-After when rate limited, or hands it to the caller', async () => {
    const { fetch, chats } = recorder();
    const statuses: ChatStatus[] = [];
    const client = new LLMRouterClient({ url: limitedRouter.url, pin: limitedRouter.pin, fetch });
    await collect(client.chat(ask('one', 1)));
    const { done } = await collect(client.chat(ask('two', 1), { onStatus: (s) => statuses.push(s) }));
    assert.equal(done?.type, 'done');
    // the app heard of the wait, and why
    const [retrying] = statuses;
    assert.ok(retrying?.type === 'retrying' && retrying.attempt === 1 && retrying.error instanceof RateLimitedError);
    assert.ok(retrying.delayMs >= (retrying.error.retryAfter ?? 0) * 1000);
    // One refusal, then one retry after Retry-After (the bucket refills one token a second): a
    // retry on the backoff schedule alone would have come too early and been refused again.
    assert.deepEqual(chats().map((c) => c.status), [200, 429, 200]);
    const impatient = new LLMRouterClient({ url: limitedRouter.url, pin: limitedRouter.pin, maxRetries: 0 });
    await assert.rejects(collect(impatient.chat(ask('three', 1))), (e: unknown) => {
      return e instanceof RateLimitedError && e.code === 'rate_limited' && e.status === 429 && (e.retryAfter ?? 0) >= 1;
    });
  });

  it('refetches the keys once and resends when the router rotated them', async () => {
    const { fetch, calls, chats } = recorder();
    const client = new LLMRouterClient({ url: router.url, pin: router.pin, fetch });
    const before = (await client.keys()).current.kid;
    await router.keys('rotate');
    await router.keys('revoke', before); // the old key is gone at once, overlap or not
    router.daemon.signal('SIGHUP');
    await waitFor(
      async () => (await new LLMRouterClient({ url: router.url, pin: router.pin }).keys()).current.kid,
      (kid) => kid !== before,
      'rotation seen by the router',
    );
    const { done } = await collect(client.chat(ask('after rotation', 2)));
    assert.equal(done?.type, 'done');
    assert.deepEqual(chats().map((c) => [JSON.parse(c.body!).kid, c.status]), [
      [before, 400],
      [(await client.keys()).current.kid, 200],
    ]);
    assert.equal(calls.filter((c) => c.path === '/api/pubkey').length, 2);
  });

  it('seals again once when a router that just started refuses an earlier timestamp', async () => {
    const fresh = await startRouter(inference);
    try {
      // The device clock runs 40 s behind (within the router's 60 s skew) until the first refusal,
      // so the first request is timed before this router's start: `stale`.
      let lag = 40000;
      const { fetch, chats } = recorder(async (url, init) => {
        const response = await globalThis.fetch(url, init);
        if (new URL(url).pathname === '/api/chat') lag = 0;
        return response;
      });
      const client = new LLMRouterClient({ url: fresh.url, pin: fresh.pin, fetch, now: () => Date.now() - lag });
      const { done } = await collect(client.chat(ask('after a restart', 2)));
      assert.equal(done?.type, 'done');
      assert.deepEqual(chats().map((c) => c.status), [401, 200]);
      const [first, second] = chats().map((c) => JSON.parse(c.body!).ts as number);
      assert.ok(second! >= first! + 39, 'the second request carries a fresh timestamp');

      // a clock that stays behind is corrected by the router's Date header, within the bound
      const statuses: string[] = [];
      const { fetch: behindFetch, chats: behindChats } = recorder();
      const behind = new LLMRouterClient({
        url: fresh.url,
        pin: fresh.pin,
        fetch: behindFetch,
        now: () => Date.now() - 180000, // beyond the router's 60 s, within the key document's 300 s
        onStatus: (status) => statuses.push(status.type === 'resealing' ? `resealing:${status.reason}` : status.type),
      });
      assert.equal((await collect(behind.chat(ask('late', 2)))).done?.type, 'done');
      assert.deepEqual(behindChats().map((c) => c.status), [401, 200]);
      assert.deepEqual(statuses, ['resealing:stale', 'response']);
      const [late, corrected] = behindChats().map((c) => JSON.parse(c.body!).ts as number);
      assert.ok(Math.abs(corrected! - Date.now() / 1000) < 10 && late! < corrected! - 170, 'the second request is timed by the router clock');
      await collect(behind.chat(ask('and later', 2))); // the correction stays: no second refusal
      assert.deepEqual(behindChats().map((c) => c.status), [401, 200, 200]);

      // ... and a clock off by more than maxClockCorrectionSeconds stays an error
      const { fetch: offFetch, chats: offChats } = recorder();
      const off = new LLMRouterClient({ url: fresh.url, pin: fresh.pin, fetch: offFetch, now: () => Date.now() - 180000, maxClockCorrectionSeconds: 120 });
      await assert.rejects(collect(off.chat(ask('late', 2))), (e: unknown) => e instanceof RouterError && e.code === 'stale' && !e.retryable);
      assert.deepEqual(offChats().map((c) => c.status), [401, 401]);
    } finally {
      await fresh.stop();
    }
  });

  it('surfaces a replayed request as the router refuses it', async () => {
    const client = new LLMRouterClient({ url: router.url, pin: router.pin, fetch: replaying });
    await assert.rejects(collect(client.chat(ask('say it twice', 2))), (e: unknown) => e instanceof RouterError && e.code === 'replay' && e.status === 409);
  });

  const cancelledCount = async () => metric(await inference.metrics(), 'inference_requests_total', 'outcome="cancelled"');

  it('detects a stream cut short, whatever arrived before', async () => {
    const cancelled = await cancelledCount();
    const proxy = await cuttingProxy(router.url, 2);
    try {
      const client = new LLMRouterClient({ url: proxy.url, pin: router.pin });
      let deltas = 0;
      await assert.rejects(
        (async () => {
          for await (const event of client.chat(ask('a long answer please', 4000))) if (event.type === 'delta') deltas += 1;
        })(),
        TruncatedStreamError,
      );
      assert.ok(deltas >= 1 && deltas <= 2, String(deltas));
    } finally {
      await proxy.close();
    }
    // the router saw the connection go and cancelled the generation (4000 tokens: the tiny model
    // cannot finish them before the cut is noticed, which 200 sometimes did on a busy machine)
    await waitFor(cancelledCount, (v) => v === cancelled + 1, 'inference cancelled');
  });

  it('gives up on a stream that went silent (idle timeout), and on one that never began (first-token timeout)', async () => {
    const cancelled = await cancelledCount();
    const silent = await cuttingProxy(router.url, 1, true); // the first chunk, then nothing, the connection left open
    try {
      const client = new LLMRouterClient({ url: silent.url, pin: router.pin, idleTimeoutMs: 500 });
      let deltas = 0;
      await assert.rejects(
        (async () => {
          for await (const event of client.chat(ask('a long answer please', 4000))) if (event.type === 'delta') deltas += 1;
        })(),
        (e: unknown) => e instanceof TimeoutError && e.code === 'idle_timeout' && e.retryable,
      );
      assert.equal(deltas, 1);
    } finally {
      await silent.close();
    }
    await waitFor(cancelledCount, (v) => v === cancelled + 1, 'inference cancelled'); // the client closed it

    const { fetch, chats } = recorder(stalled('/api/chat')); // the request goes out, no answer ever comes
    const client = new LLMRouterClient({ url: router.url, pin: router.pin, fetch, firstTokenTimeoutMs: 500 });
    await assert.rejects(collect(client.chat(ask('hello', 2))), (e: unknown) => e instanceof TimeoutError && e.code === 'first_token_timeout');
    assert.equal(chats().length, 1, 'a timeout is not retried by the client: the app decides');
  });

  for (const how of ['abort', 'break'] as const) {
    it(`${how === 'abort' ? 'an AbortSignal' : 'leaving the loop'} mid-stream closes the connection and frees the server's stream`, async () => {
      const cancelled = await cancelledCount();
      const client = new LLMRouterClient({ url: router.url, pin: router.pin });
      const controller = new AbortController();
      let deltas = 0;
      const reading = (async () => {
        for await (const event of client.chat(ask('a very long story', 4000), { signal: controller.signal })) {
          if (event.type !== 'delta') continue;
          deltas += 1;
          if (how === 'break') break;
          controller.abort();
        }
      })();
      if (how === 'abort') await assert.rejects(reading, AbortedError);
      else await reading;
      assert.equal(deltas, 1);
      await waitFor(async () => metric(await router.metrics(), 'llmrouter_active_streams'), (v) => v === 0, 'router streams');
      await waitFor(cancelledCount, (v) => v === cancelled + 1, 'inference cancelled');
    });
  }
});
