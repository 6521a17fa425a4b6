/**
 * Protocol v1.1 without a network: the worked examples of docs/protocol.md recomputed, strict
 * base64url, the SSE parser, the key-document rules and the response opener with every chunk
 * type. The request checks are chat.test.ts.
 */

import assert from 'node:assert/strict';
import { describe, it } from 'node:test';

import { ed25519 } from '@noble/curves/ed25519.js';

import { type ChatEvent, KeyDocumentError, type Message, ReplyBuilder, TruncatedStreamError } from '@llmrouter/client';
import * as hpke from '@llmrouter/client/hpke';
import {
  type ChatRequest,
  expectedChunks,
  type PublishedKey,
  requestAad,
  requestPlaintext,
  ResponseOpener,
  sealRequest,
  SSEParser,
  type StreamItem,
  verifyKeyDocument,
} from '@llmrouter/client/protocol';

import { DOC, fenced } from './support/docs.js';

const utf8 = (text: string) => new TextEncoder().encode(text);
const range = (from: number, to: number) => Uint8Array.from({ length: to - from }, (_, i) => from + i);
const hex = (data: Uint8Array) => Buffer.from(data).toString('hex');
const b64u = (data: Uint8Array) => Buffer.from(data).toString('base64url');

const router = hpke.deriveKeyPair(range(0, 32));
const routerKey: PublishedKey = { kid: '01', pk: router.pk, status: 'current', not_before: 1767225600, not_after: 1767312000 };

/** The example's fixed inputs, `first` bytes apart (RFC 9180 DeriveKeyPair on fixed ikm). */
function example(request: ChatRequest, first: number) {
  const ephemeral = hpke.deriveKeyPair(range(32 + first, 64 + first));
  const sealed = sealRequest(routerKey, request, 1767225660, { ephemeral, rid: range(first, 16 + first) });
  return { ephemeral, ...sealed };
}

function recomputed(request: ChatRequest, first: number, ctBytes: number): void {
  const { ephemeral, envelope, state } = example(request, first);
  assert.ok(DOC.includes(hex(router.sk)));
  assert.ok(DOC.includes(b64u(router.pk)));
  assert.ok(DOC.includes(hex(ephemeral.sk)));
  assert.ok(DOC.includes(JSON.stringify(requestPlaintext(request))));
  assert.ok(DOC.includes(new TextDecoder().decode(requestAad(envelope))));
  for (const line of JSON.stringify(envelope, null, 2).split('\n')) {
    assert.ok(DOC.includes(line.trim()), `docs/protocol.md lacks ${line.trim()}`);
  }
  assert.equal(Buffer.from(envelope.ct, 'base64url').length, ctBytes);
  assert.ok(DOC.includes(hex(state.secret)));
}

describe('the worked example of docs/protocol.md: a text answer', () => {
  const request: ChatRequest = { messages: [{ role: 'user', content: 'Hello!' }], max_tokens: 16 };
  const { state } = example(request, 0);

  it('recomputes every value the page shows', () => recomputed(request, 0, 144));

  it('opens the example stream', () => {
    const opener = new ResponseOpener(state);
    const items = opener.feed(utf8(fenced('7.1', 'event: init')));
    assert.deepEqual(items.filter((i) => i.type === 'delta').map((i) => (i.type === 'delta' ? i.text : '')), ['Hi', ' there']);
    assert.deepEqual(opener.close(), { type: 'done', finish_reason: 'stop', usage: { prompt_tokens: 9, completion_tokens: 2 } });
  });

  it('opens it fed one byte at a time, and refuses it with the wrong secret', () => {
    const stream = utf8(fenced('7.1', 'event: init'));
    const opener = new ResponseOpener(state);
    const texts: string[] = [];
    for (let i = 0; i < stream.length; i++) {
      for (const item of opener.feed(stream.subarray(i, i + 1))) if (item.type === 'delta') texts.push(item.text);
    }
    assert.deepEqual(texts, ['Hi', ' there']);
    const wrong = new ResponseOpener({ enc: state.enc, secret: new Uint8Array(32) });
    assert.throws(() => wrong.feed(stream), { code: 'decryption_failed' });
  });
});

describe('the worked example of docs/protocol.md: a tool call', () => {
  const weather = {
    type: 'function' as const,
    function: {
      name: 'get_weather',
      description: 'Current weather in a city',
      parameters: { type: 'object', properties: { city: { type: 'string' } }, required: ['city'] },
    },
  };
  const question: Message = { role: 'user', content: 'Weather in Oslo?' };
  const request: ChatRequest = { messages: [question], model: 'gpt-oss-20b', tools: [weather], tool_choice: 'required' };
  const { state } = example(request, 128);
  const stream = () => utf8(fenced('7.2', 'event: init'));

  it('recomputes every value the page shows', () => recomputed(request, 128, 336));

  it('opens the stream, assembles the call and sends its result back as the page shows', () => {
    const opener = new ResponseOpener(state, expectedChunks(requestPlaintext(request)));
    const items = opener.feed(stream());
    assert.deepEqual(items.map((i) => i.type), ['tool_call', 'tool_call', 'tool_call', 'done']);
    assert.deepEqual(items[0], { type: 'tool_call', index: 0, id: 'call_1', name: 'get_weather', arguments: '' });
    const builder = new ReplyBuilder();
    for (const item of items) builder.add(item as ChatEvent);
    const reply = builder.reply();
    assert.deepEqual(reply.tool_calls, [{ id: 'call_1', type: 'function', function: { name: 'get_weather', arguments: '{"city":"Oslo"}' } }]);
    assert.deepEqual([reply.finish_reason, reply.usage, reply.text], ['tool_calls', { prompt_tokens: 71, completion_tokens: 12 }, '']);
    assert.deepEqual(reply.message, { role: 'assistant', content: null, tool_calls: reply.tool_calls });

    const result: Message = { role: 'tool', tool_call_id: reply.tool_calls[0]!.id, content: '{"temperature": 3}' };
    const next = requestPlaintext({ ...request, tool_choice: undefined, messages: [question, reply.message, result] });
    const shown = JSON.parse(fenced('7.2', '{"messages": [').replace('[...]', 'null')) as Record<string, unknown>;
    assert.deepEqual(next.messages, shown.messages);
  });

  it('is a broken stream for a request that offered no tools', () => {
    assert.throws(() => new ResponseOpener(state).feed(stream()), { code: 'bad_stream', message: /did not ask for/ });
  });
});

describe('base64url', () => {
  // The SDK's codec is internal; the key document path shows its strictness.
  const signer = ed25519.utils.randomPrivateKey();
  const signingKey = ed25519.getPublicKey(signer);
  it('refuses padding, the standard alphabet and stray bits', () => {
    const payload = utf8('{}');
    const signature = ed25519.sign(payload, signer);
    for (const bad of [b64u(payload) + '=', Buffer.from(payload).toString('base64').replace(/=+$/, '') + '+', 'e31']) {
      const body = JSON.stringify({ payload: bad, signature: b64u(signature), signing_key: b64u(signingKey) });
      assert.throws(() => verifyKeyDocument(body, signingKey, 0), { code: 'bad_key_document', message: 'malformed key document' });
    }
  });
});

describe('key document rules', () => {
  const signer = ed25519.utils.randomPrivateKey();
  const pin = ed25519.getPublicKey(signer);
  const NOW = 1_800_000_000;
  const pk = b64u(hpke.generateKeyPair().pk);
  const pk2 = b64u(hpke.generateKeyPair().pk);
  const goodKeys = [
    { kid: '07', pk, status: 'current', not_before: NOW - 3600, not_after: NOW + 86400 },
    { kid: '08', pk: pk2, status: 'next', not_before: NOW + 82800, not_after: NOW + 172800 },
  ];
  function document(changes: Record<string, unknown> = {}, key = signer): string {
    const payload = utf8(JSON.stringify({ v: 1, suite: { kem: 32, kdf: 1, aead: 3 }, issued_at: NOW - 60, keys: goodKeys, ...changes }));
    return JSON.stringify({ payload: b64u(payload), signature: b64u(ed25519.sign(payload, key)), signing_key: b64u(ed25519.getPublicKey(key)) });
  }
  const refused = (body: string, code: string, message: RegExp, at = NOW) =>
    assert.throws(() => verifyKeyDocument(body, pin, at), (e: unknown) => e instanceof KeyDocumentError && e.code === code && message.test(e.message));

  it('accepts a good document and seals only to the current key', () => {
    const doc = verifyKeyDocument(document(), pin, NOW);
    assert.equal(doc.current.kid, '07');
    assert.equal(doc.keys.length, 2);
    assert.deepEqual(doc.signing_key, pin);
  });
  it('refuses another signing key, and a bad signature', () => {
    refused(document({}, ed25519.utils.randomPrivateKey()), 'pin_mismatch', /pinned/);
    const body = JSON.parse(document()) as Record<string, string>;
    const forged = JSON.stringify({ ...body, payload: b64u(utf8(JSON.stringify({ v: 1 }))) });
    refused(forged, 'bad_key_document', /signature/);
  });
  it('refuses a document more than 24 h old or more than 300 s ahead', () => {
    refused(document({ issued_at: NOW - 86401 }), 'stale_key_document', /24 hours/);
    assert.ok(verifyKeyDocument(document({ issued_at: NOW - 86400 }), pin, NOW));
    refused(document({ issued_at: NOW + 301 }), 'stale_key_document', /future/);
    assert.ok(verifyKeyDocument(document({ issued_at: NOW + 300 }), pin, NOW));
  });
  it('refuses a current key outside its validity window (300 s of skew allowed)', () => {
    const early = [{ ...goodKeys[0], not_before: NOW + 301 }, goodKeys[1]];
    refused(document({ keys: early }), 'stale_key_document', /validity/);
    const late = [{ ...goodKeys[0], not_after: NOW - 301 }, goodKeys[1]];
    refused(document({ keys: late }), 'stale_key_document', /validity/);
    assert.ok(verifyKeyDocument(document({ keys: [{ ...goodKeys[0], not_before: NOW + 300 }, goodKeys[1]] }), pin, NOW));
  });
  it('refuses duplicate ids and anything but one current and one next key', () => {
    refused(document({ keys: [goodKeys[0], { ...goodKeys[1], kid: '07' }] }), 'bad_key_document', /duplicate/);
    refused(document({ keys: [goodKeys[0]] }), 'bad_key_document', /exactly one current and one next/);
    refused(document({ keys: [goodKeys[0], { ...goodKeys[1], status: 'current' }] }), 'bad_key_document', /exactly one/);
    refused(document({ keys: [...goodKeys, { ...goodKeys[1], kid: '09' }] }), 'bad_key_document', /exactly one/);
    refused(document({ keys: [goodKeys[0], { ...goodKeys[1], status: 'retired' }] }), 'bad_key_document', /protocol v1/);
  });
  it('refuses another version or suite', () => {
    refused(document({ v: 2 }), 'bad_key_document', /protocol v1/);
    refused(document({ suite: { kem: 32, kdf: 1, aead: 1 } }), 'bad_key_document', /protocol v1/);
    refused(document({ suite: { kem: 32, kdf: 1, aead: 3, x: 1 } }), 'bad_key_document', /protocol v1/);
  });
});

describe('response stream', () => {
  // A router-side sealer, built from the same primitives, to produce streams to tamper with.
  const state = { enc: hpke.generateKeyPair().pk, secret: range(100, 132) };
  const nonce = range(0, 32);
  const prk = hpke.hkdfExtract(new Uint8Array([...state.enc, ...nonce]), state.secret);
  const key = hpke.hkdfExpand(prk, utf8('key'), 32);
  const baseNonce = hpke.hkdfExpand(prk, utf8('nonce'), 12);
  function sealed(i: number, doc: unknown, final = false, padTo = 64): string {
    const n = baseNonce.slice();
    n[11]! ^= i;
    let pt = utf8(JSON.stringify(doc));
    pt = new Uint8Array([...pt, ...new Array((padTo - (pt.length % padTo)) % padTo).fill(0x20)]);
    return b64u(hpke.aeadSeal(key, n, final ? utf8('final') : new Uint8Array(0), pt));
  }
  const init = `event: init\ndata: {"response_nonce": "${b64u(nonce)}"}\n\n`;
  const chunk = (i: number, text: string) => `event: chunk\ndata: ${sealed(i, { type: 'delta', text })}\n\n`;
  const done = (i: number) => `event: final\ndata: ${sealed(i, { type: 'done', finish_reason: 'length', usage: { prompt_tokens: 3, completion_tokens: 2 } }, true)}\n\n`;
  const open = (text: string) => {
    const opener = new ResponseOpener(state);
    const items = opener.feed(utf8(text));
    return { opener, items };
  };

  it('delivers deltas, ignores keep-alives, CRLF, padding and unknown events', () => {
    const text = init + ': keepalive\n\n' + chunk(0, 'a') + 'event: other\ndata: x\n\n' + chunk(1, 'b').replace(/\n/g, '\r\n') + done(2);
    const { opener, items } = open(text);
    assert.deepEqual(items.map((i) => i.type), ['delta', 'delta', 'done']);
    assert.equal(opener.close().type, 'done');
  });
  it('detects truncation, reordering, replay, forgery and data after the end', () => {
    assert.throws(() => open(init + chunk(0, 'a')).opener.close(), TruncatedStreamError);
    assert.throws(() => open(init + chunk(1, 'b') + chunk(0, 'a')), { code: 'decryption_failed' });
    assert.throws(() => open(init + chunk(0, 'a') + chunk(0, 'a')), { code: 'decryption_failed' });
    // a delta dressed as the final chunk fails its AAD, and the reverse
    assert.throws(() => open(init + chunk(0, 'a').replace('event: chunk', 'event: final')), { code: 'decryption_failed' });
    assert.throws(() => open(init + done(0).replace('event: final', 'event: chunk')), { code: 'decryption_failed' });
    assert.throws(() => open(init + done(0) + chunk(1, 'late')), { code: 'bad_stream' });
    assert.throws(() => open(chunk(0, 'a')), { code: 'bad_stream', message: /before init/ });
    assert.throws(() => open(init + init), { code: 'bad_stream' });
    assert.throws(() => open(init + 'event: chunk\ndata: !!\n\n'), { code: 'bad_stream' });
    assert.throws(() => open(init + `event: chunk\ndata: ${sealed(0, { type: 'delta', text: 1 })}\n\n`), { code: 'bad_stream' });
    assert.throws(() => open(init + `event: chunk\ndata: ${sealed(0, { type: 'done' })}\n\n`), { code: 'bad_stream' });
  });
  it('bounds lines and events', () => {
    const opener = new ResponseOpener(state, undefined, 1024);
    assert.throws(() => opener.feed(utf8('data: ' + 'x'.repeat(2000))), { code: 'bad_stream' });
    const many = new ResponseOpener(state, undefined, 1024);
    assert.throws(() => many.feed(utf8('data: xxxxxxxxxx\n'.repeat(200))), { code: 'bad_stream' });
    assert.throws(() => new ResponseOpener(state).feed(new Uint8Array([0x64, 0x61, 0xff, 0x0a])), { code: 'bad_stream' });
  });
  it('parses a 1 MiB line fed one byte at a time with linear work (bytes examined, not seconds)', () => {
    // A hostile hop trickles a long line: each byte must not rescan the line from its start.
    const size = (1 << 20) - 6;
    const parser = new SSEParser(1 << 20, 1 << 20);
    const line = utf8('data: ' + 'x'.repeat(size));
    const bound = 4 * (line.length + 2);
    for (let i = 0; i < line.length; i++) {
      assert.deepEqual(parser.feed(line.subarray(i, i + 1)), []);
      if (parser.scanned > bound) assert.fail(`${parser.scanned} bytes examined after ${i + 1} bytes fed`);
    }
    assert.deepEqual(parser.feed(utf8('\n\n')), [{ event: 'message', data: 'x'.repeat(size) }]);
    assert.ok(parser.scanned <= bound);
  });
  it('delivers v1.1 chunks to a request that asked for them, and only to it', () => {
    const asked = { reasoning: true, toolCalls: true, logprobs: true };
    const logprobs = [{ token: 'a', logprob: -0.5, bytes: [97], top_logprobs: [{ token: 'b', logprob: null }] }];
    const chunks = [
      { type: 'reasoning', text: 'hmm' },
      { type: 'delta', text: 'a', logprobs },
      { type: 'tool_call', index: 1, id: 'c', name: 'f', arguments: '{' },
      { type: 'tool_call', index: 1, id: null, arguments: '}' },
    ];
    const event = (i: number, doc: unknown) => `event: chunk\ndata: ${sealed(i, doc, false, 128)}\n\n`;
    const finish = (i: number, reason: string) =>
      `event: final\ndata: ${sealed(i, { type: 'done', finish_reason: reason, usage: { prompt_tokens: 1, completion_tokens: 4 } }, true)}\n\n`;
    const opener = new ResponseOpener(state, asked);
    const items: StreamItem[] = opener.feed(utf8(init + chunks.map((c, i) => event(i, c)).join('') + finish(4, 'tool_calls')));
    assert.deepEqual(items, [
      { type: 'reasoning', text: 'hmm' },
      { type: 'delta', text: 'a', logprobs: [{ token: 'a', logprob: -0.5, bytes: [97], top_logprobs: [{ token: 'b', logprob: -9999 }] }] },
      { type: 'tool_call', index: 1, id: 'c', name: 'f', arguments: '{' },
      { type: 'tool_call', index: 1, arguments: '}' },
      { type: 'done', finish_reason: 'tool_calls', usage: { prompt_tokens: 1, completion_tokens: 4 } },
    ]);
    const unasked: [unknown, keyof typeof asked][] = [[chunks[0], 'reasoning'], [chunks[1], 'logprobs'], [chunks[2], 'toolCalls']];
    for (const [chunk, missing] of unasked) {
      assert.throws(() => new ResponseOpener(state, { ...asked, [missing]: false }).feed(utf8(init + event(0, chunk))), {
        code: 'bad_stream',
        message: /did not ask for/,
      });
    }
    assert.throws(() => new ResponseOpener(state, { ...asked, toolCalls: false }).feed(utf8(init + finish(0, 'tool_calls'))), { code: 'bad_stream' });
    assert.throws(() => new ResponseOpener(state).feed(utf8(init + event(0, chunks[0]))), { code: 'bad_stream' }); // a v1 request
  });
  it('refuses malformed v1.1 chunks and chunk types it does not know', () => {
    const all = { reasoning: true, toolCalls: true, logprobs: true };
    const entry = { token: 'a', logprob: -1, top_logprobs: [] };
    const bad = [
      { type: 'tool_call', index: 64, arguments: '' },
      { type: 'tool_call', index: -1, arguments: '' },
      { type: 'tool_call', index: '0', arguments: '' },
      { type: 'tool_call', index: 0 },
      { type: 'tool_call', index: 0, id: 5, arguments: '' },
      { type: 'delta', text: 'a', logprobs: Array.from({ length: 257 }, () => entry) },
      { type: 'delta', text: 'a', logprobs: [{ ...entry, top_logprobs: Array.from({ length: 21 }, () => entry) }] },
      { type: 'delta', text: 'a', logprobs: [{ logprob: -1 }] },
      { type: 'reasoning', text: 'a', logprobs: [{ ...entry, bytes: [256] }] },
      { type: 'delta', text: 'a', logprobs: {} },
      { type: 'image', url: 'x' },
    ];
    for (const doc of bad) {
      assert.throws(() => new ResponseOpener(state, all).feed(utf8(init + `event: chunk\ndata: ${sealed(0, doc, false, 64)}\n\n`)), {
        code: 'bad_stream',
        message: 'unexpected chunk content',
      });
    }
  });
  it('turns the router error chunk into an error item', () => {
    const error = `event: final\ndata: ${sealed(1, { type: 'error', code: 'upstream_failed', message: 'the backend failed' }, true)}\n\n`;
    const { opener } = open(init + chunk(0, 'a') + error);
    assert.deepEqual(opener.close(), { type: 'error', code: 'upstream_failed', message: 'the backend failed' });
  });
  it('reads a sealed refusal: the status, Retry-After and backend reason a plain one had', () => {
    const final = (doc: unknown) => `event: final\ndata: ${sealed(0, doc, true)}\n\n`;
    const budget = { type: 'error', code: 'budget_exhausted', message: 'm', status: 429, retry_after: 86400 };
    const { opener } = open(init + final(budget));
    assert.deepEqual(opener.close(), budget);
    const refused = { type: 'error', code: 'upstream_refused', message: 'm', status: 400, upstream_status: 400, upstream_code: 'max_tokens_exceeded', upstream_param: 'max_tokens' };
    assert.deepEqual(open(init + final(refused)).opener.close(), refused);
    for (const bad of [{ status: '429' }, { status: 99 }, { retry_after: -1 }, { upstream_code: 'a sentence' }]) {
      assert.throws(() => open(init + final({ ...budget, ...bad })), { code: 'bad_stream' });
    }
  });
});
