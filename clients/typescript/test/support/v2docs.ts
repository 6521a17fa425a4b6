/**
 * Protocol v2's signed objects made the way docs/protocol.md section 9 describes them (and
 * llmrouter/v2/certs.py makes them): for the worked example of section 16, which this builder
 * reproduces byte for byte, and for documents that break one rule at a time.
 */

import { ed25519 } from '@noble/curves/ed25519.js';

import * as hpke from '@llmrouter/client/hpke';

const b64u = (data: Uint8Array) => Buffer.from(data).toString('base64url');
const utf8 = (text: string) => new TextEncoder().encode(text);

export const DAY = 86400;
export const ISSUED_AT = 1767225600;
export const TS = 1767225660;

export const seed = (first: number) => Uint8Array.from({ length: 32 }, (_, i) => first + i);
export const repeated = (byte: number) => new Uint8Array(32).fill(byte);
export const publicKey = (secret: Uint8Array) => ed25519.getPublicKey(secret);

export function sign(context: string, payload: Uint8Array, secret: Uint8Array): string {
  return b64u(ed25519.sign(new Uint8Array([...utf8(context), 0, ...payload]), secret));
}

export interface Claims {
  type: 'router' | 'node';
  name: string;
  key: Uint8Array;
  models?: string[];
  not_before?: number;
  not_after?: number;
}

/** The operator's certificate (section 9.1), claims in the order of the page. */
export function certificate(operator: Uint8Array, claims: Claims, extra: Record<string, unknown> = {}): { payload: string; signature: string } {
  const body: Record<string, unknown> = { v: 2, type: claims.type, name: claims.name, key: b64u(claims.key) };
  if (claims.type === 'node') body.models = claims.models ?? ['m1'];
  body.not_before = claims.not_before ?? ISSUED_AT;
  body.not_after = claims.not_after ?? ISSUED_AT + 30 * DAY;
  const payload = utf8(JSON.stringify({ ...body, ...extra }));
  return { payload: b64u(payload), signature: sign('llmrouter/v2 certificate', payload, operator) };
}

export interface KeyEntry {
  kid: string;
  pk: string;
  status: 'current' | 'next';
  not_before: number;
  not_after: number;
}

/** Part I's key entries: `first` current (from `from`, for a day), the next one the day after. */
export function keyPair(firstKid: string, first: Uint8Array, nextKid: string, next: Uint8Array, from = ISSUED_AT): KeyEntry[] {
  return [
    { kid: firstKid, pk: b64u(first), status: 'current', not_before: from, not_after: from + DAY },
    { kid: nextKid, pk: b64u(next), status: 'next', not_before: from + DAY, not_after: from + 2 * DAY },
  ];
}

/** A node key set (section 9.2), signed by `node`. */
export function nodeKeys(node: Uint8Array, keys: KeyEntry[], issuedAt = ISSUED_AT): { payload: string; signature: string; signing_key: string } {
  const payload = utf8(JSON.stringify({ v: 2, type: 'node-keys', suite: { kem: 32, kdf: 1, aead: 3 }, issued_at: issuedAt, keys }));
  return { payload: b64u(payload), signature: sign('llmrouter/v2 node keys', payload, node), signing_key: b64u(publicKey(node)) };
}

export interface DocumentParts {
  issued_at?: number;
  default_model?: string | null;
  keys: KeyEntry[];
  nodes: unknown[];
}

/** The body of `GET /api/v2/keys` (section 9.3), signed by `router` (payload text as given, when it is). */
export function keyDocument(router: Uint8Array, routerCertificate: unknown, parts: DocumentParts | string): string {
  const text =
    typeof parts === 'string'
      ? parts
      : JSON.stringify({ v: 2, suite: { kem: 32, kdf: 1, aead: 3 }, issued_at: parts.issued_at ?? ISSUED_AT, default_model: parts.default_model === undefined ? 'm1' : parts.default_model, keys: parts.keys, nodes: parts.nodes });
  const payload = utf8(text);
  return JSON.stringify({ payload: b64u(payload), signature: sign('llmrouter/v2 key document', payload, router), signing_key: b64u(publicKey(router)), certificate: routerCertificate });
}

/** The worked example's keys (section 16): Ed25519 seeds, HPKE keys by DeriveKeyPair. */
export const EXAMPLE = {
  operator: seed(0x60),
  router: seed(0x80),
  nodes: { 'node-a': seed(0xa0), 'node-b': seed(0xc0) } as Record<string, Uint8Array>,
  models: { 'node-a': ['m1'], 'node-b': ['m1', 'm2'] } as Record<string, string[]>,
  routerKeys: [hpke.deriveKeyPair(seed(0x00)), hpke.deriveKeyPair(repeated(0x02))] as const,
  nodeKeys: {
    'node-a': [hpke.deriveKeyPair(repeated(0x0a)), hpke.deriveKeyPair(repeated(0x0b))],
    'node-b': [hpke.deriveKeyPair(repeated(0x1a)), hpke.deriveKeyPair(repeated(0x1b))],
  } as Record<string, [hpke.KeyPair, hpke.KeyPair]>,
  kids: { 'node-a': ['0a', '0b'], 'node-b': ['1a', '1b'] } as Record<string, [string, string]>,
  device: hpke.deriveKeyPair(repeated(0xde)),
};

/** One node entry of the example (what the node serves at GET /v2/keys), with changes for a test. */
export function exampleNode(name: string, change: { claims?: Partial<Claims>; keys?: KeyEntry[]; issuedAt?: number; signer?: Uint8Array; operator?: Uint8Array } = {}): Record<string, unknown> {
  const signing = EXAMPLE.nodes[name] ?? seed(0xe0);
  const [first, next] = EXAMPLE.nodeKeys[name] ?? [hpke.deriveKeyPair(repeated(0x2a)), hpke.deriveKeyPair(repeated(0x2b))];
  const [firstKid, nextKid] = EXAMPLE.kids[name] ?? ['2a', '2b'];
  const claims: Claims = { type: 'node', name, key: publicKey(signing), models: EXAMPLE.models[name] ?? ['m1'], ...change.claims };
  return {
    certificate: certificate(change.operator ?? EXAMPLE.operator, claims),
    keys: nodeKeys(change.signer ?? signing, change.keys ?? keyPair(firstKid, first.pk, nextKid, next.pk), change.issuedAt),
    attestations: [],
  };
}

export function exampleRouterCertificate(change: Partial<Claims> = {}, operator = EXAMPLE.operator): { payload: string; signature: string } {
  return certificate(operator, { type: 'router', name: 'router-1', key: publicKey(EXAMPLE.router), ...change });
}

/** The example's key document, or one with its parts changed. */
export function exampleDocument(change: Partial<DocumentParts> & { certificate?: unknown; router?: Uint8Array } = {}): string {
  const [current, next] = EXAMPLE.routerKeys;
  return keyDocument(change.router ?? EXAMPLE.router, change.certificate ?? exampleRouterCertificate(), {
    keys: keyPair('01', current.pk, '02', next.pk),
    nodes: [exampleNode('node-a'), exampleNode('node-b')],
    ...change,
  });
}
