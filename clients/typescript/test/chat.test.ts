/**
 * The request checks (protocol v1.1, docs/protocol.md section 2.2), held against the router's
 * own: every case below goes through the SDK's `requestPlaintext` and through the router's
 * `llmrouter.chat.parse_request` (run with the repository's Python), and both must accept the
 * same requests, with byte-identical plaintexts, and refuse the same ones.
 */

import assert from 'node:assert/strict';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { before, describe, it } from 'node:test';

import { type ChatRequest, InvalidRequestError } from '@llmrouter/client';
import * as hpke from '@llmrouter/client/hpke';
import { type PublishedKey, requestPlaintext, sealRequest } from '@llmrouter/client/protocol';

import { python } from './support/stack.js';

type Doc = Record<string, unknown>;

const SECRET = 'secret words';
const user = { role: 'user', content: SECRET };
const ok: Doc = { messages: [user] };
const fn = (name: string, extra: Doc = {}) => ({ type: 'function', function: { name, ...extra } });
const call = (id: string, name = 'get_weather', args = '{}') => ({ id, type: 'function', function: { name, arguments: args } });
const object = { type: 'object', properties: { city: { type: 'string' } }, required: ['city'] };
const weather = fn('get_weather', { description: 'Weather', parameters: object, strict: true });
const schema = (inner: Doc) => ({ type: 'json_schema', json_schema: { name: 'out', ...inner } });

function nested(depth: number): Doc {
  let node: Doc = { type: 'string' };
  for (let i = 1; i < depth; i++) node = { type: 'array', items: node };
  return node;
}

/** Every case: a name and a request plaintext, as JSON. */
const CASES: [string, Doc][] = [
  ['minimal', ok],
  ['v1 fields', { ...ok, max_tokens: 16, temperature: 0.5, top_p: 0.9, stop: ['\n', 'x'.repeat(128)] }],
  ['every v1.1 field', {
    messages: [{ role: 'system', content: [{ type: 'text', text: 'a' }, { type: 'text', text: 'b' }] }, user],
    max_completion_tokens: 5, model: 'org/model-7b:q4@v1+x', seed: 2 ** 32 - 1, presence_penalty: -2, frequency_penalty: 2,
    response_format: schema({ schema: object, strict: true, description: 'd' }), tools: [weather, fn('other')],
    tool_choice: { type: 'function', function: { name: 'other' } }, parallel_tool_calls: false, logprobs: true,
    top_logprobs: 20, reasoning_effort: 'high', include_reasoning: true,
  }],
  ['null counts as absent', { ...ok, max_tokens: null, model: null, tools: null, seed: null }],
  ['a tool call round trip', {
    messages: [user, { role: 'assistant', content: null, tool_calls: [call('a'), call('b')] },
      { role: 'tool', tool_call_id: 'b', content: '1' }, { role: 'tool', tool_call_id: 'a', content: [{ type: 'text', text: '2' }] },
      { role: 'assistant', content: 'done', tool_calls: null }, user],
    tools: [weather], tool_choice: 'none',
  }],
  ['assistant text with tool calls', { messages: [user, { role: 'assistant', content: 'calling', tool_calls: [call('a')] }] }],
  ['json_object', { ...ok, response_format: { type: 'json_object' } }],
  ['text format', { ...ok, response_format: { type: 'text' } }],
  ['schema without a name', { ...ok, response_format: { type: 'json_schema', json_schema: { schema: object } } }],
  ['local $ref and bounded counts', { ...ok, response_format: schema({ schema: { $defs: { a: { type: 'string', maxLength: 1024, pattern: 'a{2,1024}' } }, $ref: '#/$defs/a' } }) }],
  ['schema nested 32 deep', { ...ok, response_format: schema({ schema: nested(32) }) }],
  ['64 tools', { ...ok, tools: Array.from({ length: 64 }, (_, i) => fn(`t${i}`)) }],
  ['top_logprobs 0', { ...ok, logprobs: true, top_logprobs: 0 }],
  ['1024 messages', { messages: Array.from({ length: 1024 }, () => user) }],

  ['no messages', { max_tokens: 1 }],
  ['empty messages', { messages: [] }],
  ['1025 messages', { messages: Array.from({ length: 1025 }, () => user) }],
  ['message not an object', { messages: ['hi'] }],
  ['unknown role', { messages: [{ role: 'function', content: SECRET }] }],
  ['message name', { messages: [{ ...user, name: 'bob' }] }],
  ['tool_calls on a user message', { messages: [{ ...user, tool_calls: [call('a')] }] }],
  ['content a number', { messages: [{ role: 'user', content: 42 }] }],
  ['content null', { messages: [{ role: 'user', content: null }] }],
  ['assistant content null without calls', { messages: [user, { role: 'assistant', content: null }] }],
  ['empty parts', { messages: [{ role: 'user', content: [] }] }],
  ['image part', { messages: [{ role: 'user', content: [{ type: 'image_url', image_url: { url: 'x' } }] }] }],
  ['part with extra key', { messages: [{ role: 'user', content: [{ type: 'text', text: SECRET, x: 1 }] }] }],
  ['65 parts', { messages: [{ role: 'user', content: Array.from({ length: 65 }, () => ({ type: 'text', text: 'a' })) }] }],
  ['tool message first', { messages: [{ role: 'tool', tool_call_id: 'a', content: SECRET }] }],
  ['tool message after a user turn', { messages: [{ role: 'assistant', content: null, tool_calls: [call('a')] }, user, { role: 'tool', tool_call_id: 'a', content: SECRET }] }],
  ['tool message answering twice', { messages: [user, { role: 'assistant', content: null, tool_calls: [call('a')] }, { role: 'tool', tool_call_id: 'a', content: '1' }, { role: 'tool', tool_call_id: 'a', content: '1' }] }],
  ['tool message without id', { messages: [user, { role: 'assistant', content: null, tool_calls: [call('a')] }, { role: 'tool', content: '1' }] }],
  ['empty tool_calls', { messages: [user, { role: 'assistant', content: null, tool_calls: [] }] }],
  ['duplicate call ids', { messages: [user, { role: 'assistant', content: null, tool_calls: [call('a'), call('a')] }] }],
  ['call id too long', { messages: [user, { role: 'assistant', content: null, tool_calls: [call('a'.repeat(257))] }] }],
  ['call with a bad name', { messages: [user, { role: 'assistant', content: null, tool_calls: [call('a', 'bad name')] }] }],
  ['call with object arguments', { messages: [user, { role: 'assistant', content: null, tool_calls: [{ id: 'a', type: 'function', function: { name: 'f', arguments: {} } }] }] }],
  ['call without type', { messages: [user, { role: 'assistant', content: null, tool_calls: [{ id: 'a', function: { name: 'f', arguments: '' } }] }] }],
  ['unknown field', { ...ok, foo: 1 }],
  ['n', { ...ok, n: 2 }],
  ['stream', { ...ok, stream: true }],
  ['user', { ...ok, user: 'u1' }],
  ['max_tokens 0', { ...ok, max_tokens: 0 }],
  ['max_tokens 2^31', { ...ok, max_tokens: 2 ** 31 }],
  ['max_tokens 1.5', { ...ok, max_tokens: 1.5 }],
  ['max_tokens a string', { ...ok, max_tokens: '5' }],
  ['both max_tokens', { ...ok, max_tokens: 5, max_completion_tokens: 5 }],
  ['temperature 2.5', { ...ok, temperature: 2.5 }],
  ['temperature true', { ...ok, temperature: true }],
  ['top_p 0', { ...ok, top_p: 0 }],
  ['5 stops', { ...ok, stop: ['a', 'b', 'c', 'd', 'e'] }],
  ['empty stop', { ...ok, stop: [''] }],
  ['long stop', { ...ok, stop: ['x'.repeat(129)] }],
  ['stop a string', { ...ok, stop: 'x' }],
  ['model with a space', { ...ok, model: 'bad name' }],
  ['model too long', { ...ok, model: 'm'.repeat(129) }],
  ['model empty', { ...ok, model: '' }],
  ['seed -1', { ...ok, seed: -1 }],
  ['seed 2^32', { ...ok, seed: 2 ** 32 }],
  ['penalty 2.5', { ...ok, presence_penalty: 2.5 }],
  ['penalty a string', { ...ok, frequency_penalty: '1' }],
  ['format xml', { ...ok, response_format: { type: 'xml' } }],
  ['format text with extra', { ...ok, response_format: { type: 'text', json_schema: {} } }],
  ['json_schema without schema', { ...ok, response_format: schema({}) }],
  ['json_schema with a bad name', { ...ok, response_format: schema({ name: 'a b', schema: object }) }],
  ['json_schema with an extra key', { ...ok, response_format: schema({ schema: object, x: 1 }) }],
  ['json_schema strict a string', { ...ok, response_format: schema({ schema: object, strict: 'yes' }) }],
  ['schema a list', { ...ok, response_format: schema({ schema: [] }) }],
  ['schema nested 33 deep', { ...ok, response_format: schema({ schema: nested(33) }) }],
  ['schema maxItems 1025', { ...ok, response_format: schema({ schema: { type: 'array', maxItems: 1025 } }) }],
  ['schema minLength -1', { ...ok, response_format: schema({ schema: { type: 'string', minLength: -1 } }) }],
  ['schema pattern a{1025}', { ...ok, response_format: schema({ schema: { type: 'string', pattern: 'a{1,1025}' } }) }],
  ['schema pattern 513 chars', { ...ok, response_format: schema({ schema: { type: 'string', pattern: 'a'.repeat(513) } }) }],
  ['patternProperties key a{2000}', { ...ok, response_format: schema({ schema: { type: 'object', patternProperties: { 'a{2000}': {} } } }) }],
  ['remote $ref', { ...ok, response_format: schema({ schema: { $ref: 'https://example.com/s.json' } }) }],
  ['schema over 16 KiB', { ...ok, response_format: schema({ schema: { description: 'é'.repeat(8200) } }) }],
  ['schema description too long', { ...ok, response_format: schema({ schema: object, description: 'd'.repeat(4097) }) }],
  ['no tools', { ...ok, tools: [] }],
  ['65 tools', { ...ok, tools: Array.from({ length: 65 }, (_, i) => fn(`t${i}`)) }],
  ['tools over 64 KiB', { ...ok, tools: Array.from({ length: 20 }, (_, i) => fn(`t${i}`, { description: 'd'.repeat(4000) })) }],
  ['duplicate tools', { ...ok, tools: [fn('a'), fn('a')] }],
  ['tool with a bad name', { ...ok, tools: [fn('a.b')] }],
  ['tool with an extra key', { ...ok, tools: [{ ...fn('a'), x: 1 }] }],
  ['tool function with an extra key', { ...ok, tools: [fn('a', { x: 1 })] }],
  ['tool of another type', { ...ok, tools: [{ type: 'retrieval', function: { name: 'a' } }] }],
  ['tool parameters a list', { ...ok, tools: [fn('a', { parameters: [] })] }],
  ['tool parameters with a remote $ref', { ...ok, tools: [fn('a', { parameters: { $ref: 'http://x' } })] }],
  ['tool strict a string', { ...ok, tools: [fn('a', { strict: 'no' })] }],
  ['tool_choice without tools', { ...ok, tool_choice: 'auto' }],
  ['tool_choice sometimes', { ...ok, tools: [weather], tool_choice: 'sometimes' }],
  ['tool_choice of an unknown function', { ...ok, tools: [weather], tool_choice: { type: 'function', function: { name: 'x' } } }],
  ['tool_choice naming a tool auto', { ...ok, tools: [fn('auto')], tool_choice: { type: 'function', function: { name: 'auto' } } }],
  ['parallel_tool_calls without tools', { ...ok, parallel_tool_calls: true }],
  ['parallel_tool_calls a string', { ...ok, tools: [weather], parallel_tool_calls: 'yes' }],
  ['logprobs a number', { ...ok, logprobs: 1 }],
  ['top_logprobs 21', { ...ok, logprobs: true, top_logprobs: 21 }],
  ['top_logprobs without logprobs', { ...ok, top_logprobs: 2 }],
  ['top_logprobs with logprobs false', { ...ok, logprobs: false, top_logprobs: 2 }],
  ['reasoning_effort minimal', { ...ok, reasoning_effort: 'minimal' }],
  ['include_reasoning 1', { ...ok, include_reasoning: 1 }],
];

/** The router's verdict on every case: its plaintext (compact JSON), or null when refused. */
async function routerVerdicts(): Promise<(string | null)[]> {
  const directory = mkdtempSync(join(tmpdir(), 'llmr-ts-chat-'));
  try {
    const file = join(directory, 'cases.json');
    writeFileSync(file, JSON.stringify(CASES.map(([, doc]) => doc)));
    const script = [
      'import json, sys',
      'from llmrouter.chat import RequestError, parse_request',
      'out = []',
      'for doc in json.load(open(sys.argv[1])):',
      '    try:',
      '        out.append(json.dumps(parse_request(doc).to_plaintext(), separators=(",", ":"), ensure_ascii=False))',
      '    except RequestError:',
      '        out.append(None)',
      'print(json.dumps(out))',
    ].join('\n');
    return JSON.parse(await python('-c', script, file)) as (string | null)[];
  } finally {
    rmSync(directory, { recursive: true, force: true });
  }
}

describe('request checks', () => {
  let verdicts: (string | null)[];
  before(async () => {
    verdicts = await routerVerdicts();
  });

  it('agree with the router on every case: the same plaintext, or a refusal naming the field', () => {
    assert.equal(verdicts.length, CASES.length);
    CASES.forEach(([name, doc], i) => {
      let ours: string | null;
      try {
        ours = JSON.stringify(requestPlaintext(doc as unknown as ChatRequest));
      } catch (e) {
        assert.ok(e instanceof InvalidRequestError, `${name}: ${String(e)}`);
        assert.ok(e.field in doc || e.field === 'messages', `${name}: field ${e.field}`);
        assert.ok(!e.message.includes(SECRET) && !e.message.includes('secret'), `${name}: ${e.message}`);
        ours = null;
      }
      assert.equal(ours, verdicts[i], `${name}: the SDK ${ours === null ? 'refuses' : 'accepts'} it, the router does not`);
    });
    assert.ok(verdicts.filter((v) => v !== null).length >= 10 && verdicts.filter((v) => v === null).length >= 60);
  });

  it('refuses unknown fields by name', () => {
    for (const field of ['n', 'logit_bias', 'stream', 'functions', 'toString']) {
      assert.throws(
        () => requestPlaintext({ ...ok, [field]: 1 } as unknown as ChatRequest),
        (e: unknown) => e instanceof InvalidRequestError && e.code === 'unsupported_field' && e.field === field && e.message.includes(field),
      );
    }
    assert.throws(() => requestPlaintext({ messages: [{ ...user, name: 'n' }] } as unknown as ChatRequest), /message field name/);
  });

  it('keeps the wire order, sends max_completion_tokens as max_tokens and drops undefined values', () => {
    const plaintext = requestPlaintext({ include_reasoning: true, stop: ['\n'], model: 'm', temperature: 0.5, max_completion_tokens: 3, top_p: undefined, ...(ok as unknown as ChatRequest) });
    assert.deepEqual(Object.keys(plaintext), ['messages', 'max_tokens', 'temperature', 'stop', 'model', 'include_reasoning']);
    const v1 = { messages: [{ role: 'user' as const, content: 'Hello!' }], max_tokens: 16 };
    assert.equal(JSON.stringify(requestPlaintext(v1)), '{"messages":[{"role":"user","content":"Hello!"}],"max_tokens":16}');
  });

  it('bounds schemas JSON cannot express: shared, looping and BigInt-valued object graphs', () => {
    let shared: Doc = { type: 'string' };
    for (let i = 0; i < 30; i++) shared = { anyOf: [shared, shared] }; // 2^30 nodes as JSON
    const loop: Doc = { type: 'object' };
    loop.properties = { self: loop };
    for (const bad of [shared, loop, { maxLength: 10n }]) {
      assert.throws(
        () => requestPlaintext({ ...(ok as unknown as ChatRequest), response_format: { type: 'json_schema', json_schema: { schema: bad } } }),
        (e: unknown) => e instanceof InvalidRequestError && e.field === 'response_format',
      );
    }
  });

  it('counts characters as the router does (code points, not UTF-16 units)', () => {
    const stop = '😀'.repeat(128); // 256 UTF-16 units, 128 characters
    assert.deepEqual(requestPlaintext({ ...(ok as unknown as ChatRequest), stop: [stop] }).stop, [stop]);
  });

  it('pads the plaintext to a multiple of 64 bytes', () => {
    const key: PublishedKey = { kid: '00', pk: hpke.generateKeyPair().pk, status: 'current', not_before: 0, not_after: 1 };
    for (const content of ['', 'a'.repeat(100)]) {
      const { envelope } = sealRequest(key, { messages: [{ role: 'user', content }] }, 0);
      assert.equal((Buffer.from(envelope.ct, 'base64url').length - 16) % 64, 0);
    }
  });
});
