/**
 * The client's protocol v2 choices without a router: its options, and how it holds the key
 * document over time (section 9.4, "Which keys"): refetched hourly and when what it holds no
 * longer passes, checked again before each seal, never replaced by an older one. The documents
 * are signed here as section 16's; the fetch that serves them is the fault (a replaying or
 * withholding network), the client is real.
 */

import assert from 'node:assert/strict';
import { describe, it } from 'node:test';

import { ConfigurationError, type Fetch, KeyDocumentError, type KeyDocumentV2, LLMRouterClient, MemoryStorage, RouterError } from '@llmrouter/client';

import { DAY, EXAMPLE, exampleDocument, exampleNode, ISSUED_AT, keyPair, publicKey, TS } from './support/v2docs.js';

const URL = 'https://router.example';
const OPERATOR = Buffer.from(publicKey(EXAMPLE.operator)).toString('base64url');
const HOUR = 3600;

/** Serves `current()` at /api/v2/keys (or `status`), counts the fetches, refuses to send chats. */
function serving(current: () => string, status = () => 200) {
  const paths: string[] = [];
  const fetch: Fetch = async (url, init) => {
    const path = new globalThis.URL(url).pathname;
    paths.push(path);
    if (init.method !== 'GET') throw new Error('no chat may be sent');
    const body = current();
    return { status: status(), headers: new Headers(), body: null, text: async () => body };
  };
  return { fetch, paths };
}

/** The example document re-signed at `issuedAt` (router keys valid from then on, for two days). */
function documentAt(issuedAt: number, nodes = [exampleNode('node-a'), exampleNode('node-b')]): string {
  const [current, next] = EXAMPLE.routerKeys;
  return exampleDocument({ issued_at: issuedAt, keys: keyPair('01', current.pk, '02', next.pk, issuedAt), nodes });
}

describe('protocol v2 options', () => {
  it('an operator pin chooses v2; a router pin or trust on first use, v1.1; never two of them', () => {
    assert.equal(new LLMRouterClient({ url: URL, operatorPin: OPERATOR }).protocol, '2');
    assert.equal(new LLMRouterClient({ url: URL, operatorPin: OPERATOR, protocol: '2', k: 16 }).protocol, '2');
    assert.equal(new LLMRouterClient({ url: URL, pin: OPERATOR }).protocol, '1.1');
    assert.throws(() => new LLMRouterClient({ url: URL, operatorPin: OPERATOR, pin: OPERATOR }), ConfigurationError);
    assert.throws(() => new LLMRouterClient({ url: URL, operatorPin: OPERATOR, trustOnFirstUse: true }), ConfigurationError);
    assert.throws(() => new LLMRouterClient({ url: URL, pin: OPERATOR, protocol: '2' }), /operatorPin/);
    assert.throws(() => new LLMRouterClient({ url: URL, operatorPin: OPERATOR, protocol: '1.1' }), /not operatorPin/);
    assert.throws(() => new LLMRouterClient({ url: URL, operatorPin: 'short' }), /operatorPin must be/);
    for (const k of [0, 17, 2.5]) assert.throws(() => new LLMRouterClient({ url: URL, operatorPin: OPERATOR, k }), /k is an integer/);
  });
});

describe('holding the v2 key document', () => {
  it('refetches it hourly, and never replaces it with an older one (a replay)', async () => {
    let now = ISSUED_AT + HOUR + 60;
    let served = documentAt(ISSUED_AT + HOUR);
    const { fetch, paths } = serving(() => served);
    const client = new LLMRouterClient({ url: URL, operatorPin: OPERATOR, fetch, now: () => now * 1000 });
    assert.equal((await client.keys()).issued_at, ISSUED_AT + HOUR);
    assert.equal((await client.keys()).issued_at, ISSUED_AT + HOUR);
    assert.equal(paths.length, 1);
    served = documentAt(ISSUED_AT); // genuine, still fresh, but older than the one held
    now += HOUR + 1;
    assert.equal((await client.keys()).issued_at, ISSUED_AT + HOUR);
    assert.equal(paths.length, 2);
    served = documentAt(ISSUED_AT + 2 * HOUR);
    assert.equal((await client.keys({ refresh: true })).issued_at, ISSUED_AT + 2 * HOUR);
  });

  it("checks it again before each seal at that moment's now: a node whose certificate expired is no longer sealed to", async () => {
    let now = TS;
    const shortLived = exampleNode('node-b', { claims: { not_after: TS + 1000 } });
    const { fetch, paths } = serving(() => documentAt(ISSUED_AT, [exampleNode('node-a'), shortLived]));
    const client = new LLMRouterClient({ url: URL, operatorPin: OPERATOR, fetch, now: () => now * 1000 });
    assert.deepEqual((await client.models()).models, ['m1', 'm2']);
    now = TS + 1301; // node-b's certificate has expired (300 s of skew): m2 is served by no one now
    assert.deepEqual((await client.models()).models, ['m1']);
    await assert.rejects(client.complete({ model: 'm2', messages: [{ role: 'user', content: 'hi' }] }), (e: unknown) => e instanceof RouterError && e.code === 'model_unknown');
    assert.deepEqual(paths, ['/api/v2/keys']); // nothing sent, nothing refetched: the router's part still holds
  });

  it('fetches it again once the router part no longer holds, and refuses to seal with a stale one', async () => {
    let now = TS;
    const { fetch, paths } = serving(() => documentAt(ISSUED_AT));
    const client = new LLMRouterClient({ url: URL, operatorPin: OPERATOR, fetch, now: () => now * 1000 });
    await client.keys();
    now = ISSUED_AT + DAY + 1; // 24 h old: fetched again, and the router serves the same stale one
    await assert.rejects(client.keys(), (e: unknown) => e instanceof KeyDocumentError && e.code === 'stale_key_document');
    assert.equal(paths.length, 2);
  });

  it('starts offline from the cached v2 document while it still passes, and only under the same pin', async () => {
    const cache = new MemoryStorage();
    const online = serving(() => documentAt(ISSUED_AT));
    await new LLMRouterClient({ url: URL, operatorPin: OPERATOR, fetch: online.fetch, cache, now: () => TS * 1000 }).keys();
    const offline: Fetch = async () => {
      throw new TypeError('network down');
    };
    const restarted = new LLMRouterClient({ url: URL, operatorPin: OPERATOR, fetch: offline, cache, now: () => (TS + 2 * HOUR) * 1000 });
    assert.equal(((await restarted.keys()) as KeyDocumentV2).nodes.length, 2);
    const other = Buffer.from(publicKey(new Uint8Array(32).fill(9))).toString('base64url');
    await assert.rejects(new LLMRouterClient({ url: URL, operatorPin: other, fetch: offline, cache, now: () => TS * 1000 }).keys(), (e: unknown) => (e as { code?: string }).code === 'network');
  });

  it('a router from before v2 (404) says v2_unavailable', async () => {
    const { fetch } = serving(() => '{"error": {"code": "not_found", "message": "not found"}}', () => 404);
    await assert.rejects(new LLMRouterClient({ url: URL, operatorPin: OPERATOR, fetch }).keys(), (e: unknown) => e instanceof RouterError && e.code === 'v2_unavailable');
  });
});
