/**
 * Protocol v2 without a network: the worked examples of docs/protocol.md section 16 recomputed
 * from the page's fixed inputs (a client written from the page interoperates with the Python one
 * that made them), then every check of section 9.4 broken one at a time, the sealed request's
 * shape, and the answer's opener (node events, the router's event, truncation).
 */

import assert from 'node:assert/strict';
import { describe, it } from 'node:test';

import { type ChatEvent, KeyDocumentError, ReplyBuilder, TruncatedStreamError } from '@llmrouter/client';
import * as hpke from '@llmrouter/client/hpke';
import { ResponseKeys } from '@llmrouter/client/protocol';
import {
  binding,
  contentKeys,
  JsonError,
  openRouterEvent,
  parseStrict,
  type Random,
  ResponseOpenerV2,
  SECURE_RANDOM,
  sealRequestV2,
  stillValidV2,
  verifyKeyDocumentV2,
} from '@llmrouter/client/v2';

import { DOC, fenced } from './support/docs.js';
import {
  DAY,
  EXAMPLE,
  exampleDocument,
  exampleNode,
  exampleRouterCertificate,
  ISSUED_AT,
  keyDocument,
  keyPair,
  publicKey,
  repeated,
  seed,
  TS,
} from './support/v2docs.js';

const hex = (data: Uint8Array) => Buffer.from(data).toString('hex');
const b64u = (data: Uint8Array) => Buffer.from(data).toString('base64url');
const fromB64u = (text: string) => new Uint8Array(Buffer.from(text, 'base64url'));
const text = (data: Uint8Array) => new TextDecoder().decode(data);
const utf8 = (value: string) => new TextEncoder().encode(value);

/** A value of section 16 given in backquotes after `label`. */
function quoted(label: string): string {
  const match = new RegExp(`${label}[^\`]*\`([^\`]+)\``).exec(DOC.slice(DOC.indexOf('## 16. Worked examples')));
  assert.ok(match, `section 16 has no ${label}`);
  return match[1]!;
}

/** The first line of section `section`'s block that starts with `first`. */
const line = (section: string, first: string) => fenced(section, first).split('\n')[0]!;

/** Hands out the page's "random" values in the order a request draws them. */
function given(...values: Uint8Array[]): Random {
  return {
    bytes(length) {
      const value = values.shift();
      assert.equal(value?.length, length);
      return value!;
    },
    below() {
      throw new Error('k covers every node: nothing to choose');
    },
  };
}

const PIN = fromB64u(quoted('its pin'));
const DOCUMENT = fenced('16.1', '{\n  "payload"');
const REQUEST = { messages: [{ role: 'user' as const, content: 'Hello!' }], max_tokens: 16 };

function exampleRequest() {
  const document = verifyKeyDocumentV2(DOCUMENT, PIN, TS);
  const random = given(seed(0x30), repeated(0xe1), repeated(0xe2), repeated(0xe3), repeated(0xe4));
  return { document, ...sealRequestV2(document, REQUEST, TS, { deviceKey: EXAMPLE.device, random }) };
}

describe('the worked example of docs/protocol.md section 16 (v2)', () => {
  it('16.1: the fixed keys and the signed claims, byte for byte', () => {
    assert.equal(b64u(publicKey(EXAMPLE.operator)), quoted('its pin'));
    assert.equal(b64u(publicKey(EXAMPLE.router)), quoted('router signing key: seed `80 81 ... 9f`; public key'));
    assert.equal(b64u(EXAMPLE.routerKeys[0].pk), quoted("part I's router key, `pk`"));
    assert.equal(b64u(EXAMPLE.nodeKeys['node-a']![0].pk), quoted('current \\(`pk`'));
    assert.equal(hex(EXAMPLE.device.sk), quoted('secret key'));
    assert.equal(b64u(EXAMPLE.device.pk), quoted('secret key\n?[^`]*`[0-9a-f]+`, public key'));
    const served = JSON.parse(DOCUMENT) as { certificate: { payload: string }; payload: string };
    const claims = fenced('16.1', '{"v":2,"type":"router"').trim().split('\n');
    assert.equal(text(fromB64u(served.certificate.payload)), claims[0]);
    const nodeA = (JSON.parse(text(fromB64u(served.payload))) as { nodes: { certificate: { payload: string }; keys: { payload: string } }[] }).nodes[0]!;
    assert.equal(text(fromB64u(nodeA.certificate.payload)), claims[1]);
    assert.equal(text(fromB64u(nodeA.keys.payload)), claims[2]);
  });

  it('16.1: the document as the page serves it is what the TS builder signs (Ed25519 is deterministic)', () => {
    assert.deepEqual(JSON.parse(exampleDocument()), JSON.parse(DOCUMENT));
  });

  it('16.1: a client with the pin accepts it at ts, and until the document is 24 hours old', () => {
    const document = verifyKeyDocumentV2(DOCUMENT, PIN, TS);
    assert.equal(document.default_model, 'm1');
    assert.equal(document.router.name, 'router-1');
    assert.deepEqual(document.current.kid, '01');
    assert.deepEqual(document.nodes.map((n) => [n.name, n.models, n.current.kid]), [['node-a', ['m1'], '0a'], ['node-b', ['m1', 'm2'], '1a']]);
    assert.ok(verifyKeyDocumentV2(DOCUMENT, PIN, ISSUED_AT + DAY));
    assert.throws(() => verifyKeyDocumentV2(DOCUMENT, PIN, ISSUED_AT + DAY + 1), (e: unknown) => e instanceof KeyDocumentError && e.code === 'stale_key_document');
  });

  it('16.2: the binding, the content keys, the padded plaintexts and the whole body', () => {
    const { body, state } = exampleRequest();
    assert.equal(text(binding(TS, 'm1', EXAMPLE.device.pk)), line('16.2', 'llmrouter/v2|'));
    const [key, nonce, secret] = contentKeys(seed(0x30));
    assert.equal(`key             ${hex(key)}`, line('16.2', 'key '));
    assert.equal(`nonce           ${hex(nonce)}`, line('16.2', 'nonce '));
    assert.equal(`response secret ${hex(secret)}`, line('16.2', 'response secret'));
    assert.equal(hex(state.responseSecret), hex(secret));
    assert.equal(b64u(state.enc), quoted('the outer `enc`'));
    assert.equal(hex(body.subarray(0, 7)), quoted('The header'));
    assert.equal(body.length, 759);
    assert.equal(b64u(body), line('16.2', 'AQAgAAEAAw'));
    assert.equal(hex(state.routerSecret), quoted('The router secret both sides hold:'));
    // the router's side: the outer plaintext the page shows, padded to 704
    const outer = hpke.setupBaseR(body.subarray(7, 39), EXAMPLE.routerKeys[0].sk, new Uint8Array([...utf8('llmrouter/v2 request'), 0, ...body.subarray(0, 7)]));
    const plaintext = outer.open(new Uint8Array(0), body.subarray(39));
    assert.equal(plaintext.length, 704);
    assert.equal(text(plaintext).trimEnd(), line('16.2', '{"v":2,"ts"'));
    // the node's side: its wrap opens (auth mode, the device key) to K, and K opens the request
    const wrap = (JSON.parse(text(plaintext)) as { wraps: { enc: string; key: string }[]; ct: string });
    const ctx = hpke.setupAuthR(fromB64u(wrap.wraps[0]!.enc), EXAMPLE.nodeKeys['node-a']![0].sk, utf8('llmrouter/v2 wrap'), EXAMPLE.device.pk);
    assert.equal(hex(ctx.open(binding(TS, 'm1', EXAMPLE.device.pk), fromB64u(wrap.wraps[0]!.key))), hex(seed(0x30)));
    const inner = hpke.aeadOpen(key, nonce, binding(TS, 'm1', EXAMPLE.device.pk), fromB64u(wrap.ct));
    assert.equal(inner.length, 128);
    assert.equal(text(inner).trimEnd(), line('16.2', '{"messages"'));
  });

  it('16.3: the node stream opens to "Hi there" with its usage', () => {
    const { state, expects } = exampleRequest();
    const opener = new ResponseOpenerV2(state, expects);
    const builder = new ReplyBuilder();
    for (const item of opener.feed(utf8(fenced('16.3', 'event: init')))) builder.add(item as ChatEvent);
    const reply = builder.reply();
    assert.equal(reply.text, 'Hi there');
    assert.deepEqual(reply.usage, { prompt_tokens: 9, completion_tokens: 2 });
    assert.equal(opener.close().type, 'done');
    assert.ok(DOC.includes(b64u(seed(0x40))));
  });

  it("16.3: the router's event opens to its refusal, with status and retry_after", () => {
    const { state, expects } = exampleRequest();
    const opener = new ResponseOpenerV2(state, expects);
    const items = opener.feed(utf8(fenced('16.3', 'event: router')));
    const expected = { type: 'error', code: 'device_rate_limited', message: 'too many requests from this device', status: 429, retry_after: 30 };
    assert.deepEqual(items, [expected]);
    assert.ok(DOC.includes(JSON.stringify({ type: 'error', code: 'device_rate_limited', message: 'too many requests from this device', status: 429, retry_after: 30 })));
    // its plaintext is padded to 256 bytes
    const data = JSON.parse(fenced('16.3', 'event: router').split('\n')[1]!.slice('data: '.length)) as { response_nonce: string; sealed: string };
    const keys = new ResponseKeys({ enc: state.enc, secret: state.routerSecret }, fromB64u(data.response_nonce));
    assert.equal(keys.open(utf8('final'), fromB64u(data.sealed)).length, 256);
  });
});

describe('strict JSON', () => {
  it('refuses a duplicate key at any depth, escapes decoded; accepts the same key in sibling objects', () => {
    assert.deepEqual(parseStrict('{"a":{"b":1},"c":[{"b":2},{"b":3}]}'), { a: { b: 1 }, c: [{ b: 2 }, { b: 3 }] });
    assert.deepEqual(parseStrict('["a","a",{"x":"\\"a\\":"}]'), ['a', 'a', { x: '"a":' }]);
    assert.throws(() => parseStrict('{"a":1,"a":2}'), JsonError);
    assert.throws(() => parseStrict('{"a":1,"\\u0061":2}'), JsonError);
    assert.throws(() => parseStrict('[{"k":{"z":1,"z" : 1}}]'), JsonError);
    assert.throws(() => parseStrict('{"a":1'), JsonError);
  });
});

describe('the checks of section 9.4, one at a time', () => {
  const refused = (body: string, code: string, message: RegExp, now = TS) =>
    assert.throws(() => verifyKeyDocumentV2(body, PIN, now), (e: unknown) => e instanceof KeyDocumentError && e.code === code && message.test(e.message));
  const names = (body: string, now = TS) => verifyKeyDocumentV2(body, PIN, now).nodes.map((n) => n.name);
  const other = seed(0x10);

  it('0: size, strict JSON, exactly the four fields', () => {
    refused(' '.repeat((1 << 20) + 1), 'bad_key_document', /larger than 1 MiB/);
    refused('{"payload": 1', 'bad_key_document', /malformed/);
    const doc = JSON.parse(exampleDocument()) as Record<string, unknown>;
    refused(JSON.stringify({ ...doc, extra: 1 }), 'bad_key_document', /exactly the fields/);
    const { certificate: _, ...three } = doc;
    refused(JSON.stringify(three), 'bad_key_document', /exactly the fields/);
    // a duplicate signing_key: JSON.parse would keep the last one silently
    refused(exampleDocument().replace('"signing_key":', `"signing_key":"${b64u(publicKey(other))}","signing_key":`), 'bad_key_document', /malformed/);
  });

  it("1: the router's certificate under the pinned operator key, of type router, valid now, for the signing key", () => {
    assert.throws(() => verifyKeyDocumentV2(exampleDocument(), publicKey(other), TS), (e: unknown) => e instanceof KeyDocumentError && e.code === 'pin_mismatch');
    refused(exampleDocument({ certificate: exampleRouterCertificate({}, other) }), 'pin_mismatch', /pinned operator key/);
    const tampered = exampleRouterCertificate();
    refused(exampleDocument({ certificate: { ...tampered, signature: b64u(fromB64u(tampered.signature).map((b, i) => (i === 0 ? b ^ 1 : b))) } }), 'pin_mismatch', /does not verify/);
    refused(exampleDocument({ certificate: exampleRouterCertificate({ type: 'node', models: ['m1'] }) }), 'bad_key_document', /router certificate/);
    const expired = exampleRouterCertificate({ not_before: ISSUED_AT - 31 * DAY, not_after: TS - 301 });
    refused(exampleDocument({ certificate: expired }), 'stale_key_document', /expired/);
    refused(exampleDocument({ certificate: exampleRouterCertificate({ not_before: TS + 301 }) }), 'stale_key_document', /not valid yet/);
    refused(exampleDocument({ certificate: exampleRouterCertificate({ not_after: ISSUED_AT + 367 * DAY }) }), 'bad_key_document', /366 days/);
    refused(exampleDocument({ certificate: exampleRouterCertificate({ name: 'Router' }) }), 'bad_key_document', /name/);
    // a genuine router certificate, but the document signed by another key
    refused(exampleDocument({ router: other }), 'bad_key_document', /not the certified router key/);
  });

  it("2: the router's signature over the exact payload bytes", () => {
    const doc = JSON.parse(exampleDocument()) as Record<string, string>;
    const signature = fromB64u(doc.signature!);
    signature[10]! ^= 0x40;
    refused(JSON.stringify({ ...doc, signature: b64u(signature) }), 'bad_key_document', /signature of the key document/);
    // the same claims re-serialized (a space added) are other bytes: not what was signed
    const payload = text(fromB64u(doc.payload!)).replace('"v":2,', '"v": 2,');
    refused(JSON.stringify({ ...doc, payload: b64u(utf8(payload)) }), 'bad_key_document', /signature of the key document/);
  });

  it('3: the payload: its fields, version, suite, freshness, default model and outer keys', () => {
    const [current, next] = EXAMPLE.routerKeys;
    const keys = keyPair('01', current.pk, '02', next.pk);
    const payload = { v: 2, suite: { kem: 32, kdf: 1, aead: 3 }, issued_at: ISSUED_AT, default_model: 'm1', keys, nodes: [] };
    const signedAs = (p: unknown) => keyDocument(EXAMPLE.router, exampleRouterCertificate(), typeof p === 'string' ? p : JSON.stringify(p));
    assert.deepEqual(names(signedAs(payload)), []);
    refused(signedAs({ ...payload, extra: 1 }), 'bad_key_document', /not protocol v2/);
    refused(signedAs({ ...payload, v: 1 }), 'bad_key_document', /not protocol v2/);
    refused(signedAs({ ...payload, suite: { kem: 32, kdf: 1, aead: 1 } }), 'bad_key_document', /not protocol v2/);
    refused(signedAs(JSON.stringify(payload).replace('"v":2,', '"v":2,"v":2,')), 'bad_key_document', /strict/);
    refused(signedAs({ ...payload, default_model: 'a b' }), 'bad_key_document', /default_model/);
    assert.equal(verifyKeyDocumentV2(signedAs({ ...payload, default_model: null }), PIN, TS).default_model, null);
    refused(signedAs({ ...payload, issued_at: TS - DAY - 1 }), 'stale_key_document', /24 hours/);
    refused(signedAs({ ...payload, issued_at: TS + 301 }), 'stale_key_document', /future/);
    refused(signedAs({ ...payload, keys: [keys[0]] }), 'bad_key_document', /exactly one current and one next/);
    refused(signedAs({ ...payload, keys: [keys[0], { ...keys[1], kid: '01' }] }), 'bad_key_document', /duplicate key ids/);
    refused(signedAs({ ...payload, keys: [{ ...keys[0], extra: 1 }, keys[1]] }), 'bad_key_document', /exactly the fields/);
    refused(signedAs({ ...payload, nodes: Array.from({ length: 257 }, () => ({})) }), 'bad_key_document', /at most 256/);
  });

  it('4: a node entry that fails is dropped, the others stay usable', () => {
    const withB = (nodeB: unknown) => exampleDocument({ nodes: [exampleNode('node-a'), nodeB] });
    assert.deepEqual(names(withB(exampleNode('node-b'))), ['node-a', 'node-b']);
    const dropped = (nodeB: unknown) => assert.deepEqual(names(withB(nodeB)), ['node-a']);
    dropped(exampleNode('node-b', { operator: other })); // not certified by the operator
    dropped(exampleNode('node-b', { signer: other })); // key set signed by another key than the certified one
    dropped({ ...exampleNode('node-b'), attestations: [{ nope: 1 }] });
    dropped({ ...exampleNode('node-b'), extra: 1 });
    dropped(exampleNode('node-b', { claims: { not_before: ISSUED_AT - 40 * DAY, not_after: TS - 301 } })); // expired certificate
    dropped(exampleNode('node-b', { issuedAt: TS - DAY - 1 })); // a stale key set
    dropped(exampleNode('node-b', { claims: { models: [] } }));
    const keySet = exampleNode('node-b').keys as Record<string, string>;
    dropped({ ...exampleNode('node-b'), keys: { ...keySet, signature: b64u(new Uint8Array(64)) } });
    const [first, next] = EXAMPLE.nodeKeys['node-b']!;
    dropped(exampleNode('node-b', { keys: keyPair('1a', first.pk, '1a', next.pk) }));
    // a router certificate where a node's is due is no node certificate
    dropped({ ...exampleNode('node-b'), certificate: exampleRouterCertificate() });
    // unknown attestation formats are kept and ignored
    const attested = verifyKeyDocumentV2(withB({ ...exampleNode('node-b'), attestations: [{ format: 'some-tee', report: 'x' }] }), PIN, TS);
    assert.deepEqual(attested.nodes[1]!.attestations, [{ format: 'some-tee', report: 'x' }]);
  });

  it('4: two verified entries with one name refuse the whole document', () => {
    const twin = exampleNode('node-a', { signer: seed(0xe0), claims: { key: publicKey(seed(0xe0)) } });
    refused(exampleDocument({ nodes: [exampleNode('node-a'), twin] }), 'bad_key_document', /share a name/);
    // a failing twin is dropped first, and is no duplicate
    assert.deepEqual(names(exampleDocument({ nodes: [exampleNode('node-a'), exampleNode('node-a', { operator: other })] })), ['node-a']);
  });

  it("checked again before each seal at that moment's now: expired entries dropped, then the whole document", () => {
    const later = exampleNode('node-b', { claims: { not_after: TS + 1000 } });
    const document = verifyKeyDocumentV2(exampleDocument({ nodes: [exampleNode('node-a'), later] }), PIN, TS);
    assert.equal(stillValidV2(document, TS + 1000), document);
    assert.deepEqual(stillValidV2(document, TS + 1301).nodes.map((n) => n.name), ['node-a']);
    assert.throws(() => stillValidV2(document, ISSUED_AT + DAY + 1), (e: unknown) => e instanceof KeyDocumentError && e.code === 'stale_key_document');
  });
});

describe('sealing a v2 request', () => {
  const document = verifyKeyDocumentV2(
    exampleDocument({ nodes: ['n0', 'n1', 'n2', 'n3', 'n4'].map((name) => exampleNode(name, { claims: { key: publicKey(seed(name.charCodeAt(1))) }, signer: seed(name.charCodeAt(1)) })) }),
    PIN,
    TS,
  );
  const outerOf = (body: Uint8Array) => {
    const ctx = hpke.setupBaseR(body.subarray(7, 39), EXAMPLE.routerKeys[0].sk, new Uint8Array([...utf8('llmrouter/v2 request'), 0, ...body.subarray(0, 7)]));
    return JSON.parse(text(ctx.open(new Uint8Array(0), body.subarray(39)))) as { model: string; device?: unknown; wraps: { node: string }[] };
  };

  it('wraps to k random candidates, in document order; all of them when there are k or fewer', () => {
    const seen = new Set<string>();
    for (let i = 0; i < 20; i++) {
      const wraps = outerOf(sealRequestV2(document, REQUEST, TS).body).wraps.map((w) => w.node);
      assert.equal(wraps.length, 3);
      assert.deepEqual(wraps, [...wraps].sort());
      wraps.forEach((name) => seen.add(name));
    }
    assert.equal(seen.size, 5); // 20 draws of 3 of 5 miss a node with probability < 1e-7
    assert.equal(outerOf(sealRequestV2(document, REQUEST, TS, { k: 16 }).body).wraps.length, 5);
    assert.equal(outerOf(sealRequestV2(document, REQUEST, TS, { k: 1 }).body).wraps.length, 1);
    assert.throws(() => sealRequestV2(document, REQUEST, TS, { k: 17 }), RangeError);
  });

  it('the model named, else the default; none, or no node for it, and nothing is sealed', () => {
    const sealed = sealRequestV2(document, REQUEST, TS);
    assert.equal(sealed.model, 'm1');
    assert.equal(outerOf(sealed.body).device, undefined); // anonymous: no device field
    const none = { ...document, default_model: null };
    assert.throws(() => sealRequestV2(none, REQUEST, TS), (e: unknown) => (e as { code?: string }).code === 'model_required');
    assert.throws(() => sealRequestV2(document, { ...REQUEST, model: 'm2' }, TS), (e: unknown) => (e as { code?: string }).code === 'model_unknown');
  });

  it('uniform integers from the CSPRNG stay in range', () => {
    const counts = [0, 0, 0];
    for (let i = 0; i < 300; i++) counts[SECURE_RANDOM.below(3)]! += 1;
    assert.ok(counts.every((c) => c > 0));
  });
});

describe('opening a v2 answer', () => {
  const { state, expects } = exampleRequest();
  const stream = fenced('16.3', 'event: init');
  const routerEvent = fenced('16.3', 'event: router');

  it('is complete only with a verified terminal event; anything after it is a broken stream', () => {
    const cut = new ResponseOpenerV2(state, expects);
    cut.feed(utf8(stream.slice(0, stream.indexOf('event: final'))));
    assert.throws(() => cut.close(), TruncatedStreamError);
    const after = new ResponseOpenerV2(state, expects);
    assert.throws(() => after.feed(utf8(stream + routerEvent)), (e: unknown) => (e as { code?: string }).code === 'bad_stream');
  });

  it('refuses a router event that does not authenticate or is malformed', () => {
    const data = JSON.parse(routerEvent.split('\n')[1]!.slice('data: '.length)) as { response_nonce: string; sealed: string };
    const sealed = fromB64u(data.sealed);
    sealed[0]! ^= 1;
    assert.throws(() => openRouterEvent(state, JSON.stringify({ ...data, sealed: b64u(sealed) })), (e: unknown) => (e as { code?: string }).code === 'decryption_failed');
    assert.throws(() => openRouterEvent(state, JSON.stringify({ ...data, extra: 1 })), (e: unknown) => (e as { code?: string }).code === 'bad_stream');
    assert.throws(() => openRouterEvent({ ...state, enc: new Uint8Array(32) }, JSON.stringify(data)), (e: unknown) => (e as { code?: string }).code === 'decryption_failed');
  });
});
