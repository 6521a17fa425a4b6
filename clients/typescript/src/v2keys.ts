/**
 * Protocol v2's chain of trust, client side (docs/protocol.md section 9): the pinned operator key
 * certifies the router's signing key and each node's; the router signs the key document that
 * carries its own HPKE keys and every node's certificate and key set. A node key is sealed to
 * only after `verifyKeyDocumentV2` accepted it, so whoever controls the router cannot make this
 * client seal to a key the operator did not certify.
 *
 * Every signature covers `context || 0x00 || payload`, checked over the exact payload bytes
 * received before the payload is parsed (strict JSON, exact field sets). Pure functions of bytes
 * and time, as protocol.ts.
 */

import { equalBytes } from '@noble/ciphers/utils.js';

import { b64uDecode, concat, fromUtf8, utf8 } from './bytes.js';
import { MODEL_NAME } from './chat.js';
import { KeyDocumentError } from './errors.js';
import { codePoints, hasExactly, isObject, type JsonObject, parseStrict } from './json.js';
import { checkKeySet, checkKeyTimes, CLOCK_SKEW, parsePublishedKey, type PublishedKey, SUITE, verifySignature } from './protocol.js';

export const VERSION_2 = 2;
export const CERTIFICATE_CONTEXT = utf8('llmrouter/v2 certificate');
export const NODE_KEYS_CONTEXT = utf8('llmrouter/v2 node keys');
export const KEY_DOCUMENT_CONTEXT = utf8('llmrouter/v2 key document');
/** A node's (or router's) name in its certificate; wraps name their node by it. */
export const NODE_NAME = /^[a-z0-9][a-z0-9.-]{0,62}$/;
export const MAX_MODELS = 64;
export const MAX_VALIDITY = 366 * 86400;
export const MAX_ATTESTATIONS = 8;
export const MAX_ATTESTATION_FORMAT = 64;
export const MAX_NODES = 256;
export const MAX_KEYS = 16;
export const MAX_KEY_DOCUMENT = 1 << 20;

/** A verified operator certificate. */
export interface Certificate {
  type: 'router' | 'node';
  name: string;
  key: Uint8Array;
  models: readonly string[];
  not_before: number;
  not_after: number;
}

/** One verified node of a key document: seal only to `current`. */
export interface NodeEntry {
  name: string;
  models: readonly string[];
  current: PublishedKey;
  keys: PublishedKey[];
  /** Kept as received; formats this client does not know are ignored (section 9.2). */
  attestations: readonly JsonObject[];
  certificate: Certificate;
  /** The node key set's. */
  issued_at: number;
}

/** A verified v2 key document: the router's (outer) keys and the nodes that passed check 4. */
export interface KeyDocumentV2 {
  version: 2;
  issued_at: number;
  keys: PublishedKey[];
  /** The router key the outer layer is sealed to. */
  current: PublishedKey;
  default_model: string | null;
  nodes: NodeEntry[];
  router: Certificate;
  signing_key: Uint8Array;
}

function bad(message: string): KeyDocumentError {
  return new KeyDocumentError('bad_key_document', message);
}

function isInt(value: unknown): value is number {
  return Number.isSafeInteger(value) && (value as number) >= 0;
}

function parse(payload: Uint8Array, what: string): unknown {
  try {
    return parseStrict(fromUtf8(payload));
  } catch {
    throw bad(`the ${what} payload is not strict UTF-8 JSON`);
  }
}

/** Decode `payload` and `signature`, verify under `key` with `context` over the exact bytes, then parse. */
function signedPayload(doc: JsonObject, key: Uint8Array, context: Uint8Array, what: string, unsigned: (message: string) => KeyDocumentError = bad): unknown {
  let payload: Uint8Array, signature: Uint8Array;
  try {
    payload = b64uDecode(doc.payload, 'payload');
    signature = b64uDecode(doc.signature, 'signature', 64);
  } catch {
    throw bad(`the ${what} is not base64url where it must be`);
  }
  if (!verifySignature(signature, concat(context, Uint8Array.of(0), payload), key)) {
    throw unsigned(`the signature of the ${what} does not verify`);
  }
  return parse(payload, what);
}

const CERTIFICATE = ['payload', 'signature'] as const;
const CLAIMS = {
  router: ['v', 'type', 'name', 'key', 'not_before', 'not_after'],
  node: ['v', 'type', 'name', 'key', 'models', 'not_before', 'not_after'],
} as const;

/** Section 9.1's rules for a certificate's claims (not its validity now). */
function certificateClaims(claims: unknown, type: 'router' | 'node'): Certificate {
  if (!isObject(claims) || claims.v !== VERSION_2 || claims.type !== type || !hasExactly(claims, CLAIMS[type])) {
    throw bad(`the certificate is not a protocol v2 ${type} certificate`);
  }
  const { name, not_before, not_after } = claims;
  if (typeof name !== 'string' || !NODE_NAME.test(name)) throw bad("a certificate's name is [a-z0-9][a-z0-9.-]{0,62}");
  const models = type === 'node' ? claims.models : [];
  if (!Array.isArray(models) || !models.every((m): m is string => typeof m === 'string' && MODEL_NAME.test(m))) {
    throw bad("a certificate's models are a list of model names");
  }
  if (type === 'node' && (models.length < 1 || models.length > MAX_MODELS || new Set(models).size !== models.length)) {
    throw bad(`a node certificate lists 1 to ${MAX_MODELS} distinct models`);
  }
  if (!isInt(not_before) || !isInt(not_after) || !(not_before < not_after && not_after <= not_before + MAX_VALIDITY)) {
    throw bad('a certificate is valid for at most 366 days');
  }
  let key: Uint8Array;
  try {
    key = b64uDecode(claims.key, 'key', 32);
  } catch {
    throw bad('the certified key is not a 32-byte key in base64url');
  }
  return { type, name, key, models: Object.freeze([...models]), not_before, not_after };
}

/** A certificate is valid at `now`, with 300 s of skew. */
export function checkCertificateTimes(certificate: Certificate, now: number): void {
  if (now < certificate.not_before - CLOCK_SKEW) {
    throw new KeyDocumentError('stale_key_document', `the ${certificate.type} certificate is not valid yet (check the clock)`);
  }
  if (now > certificate.not_after + CLOCK_SKEW) {
    throw new KeyDocumentError('stale_key_document', `the ${certificate.type} certificate has expired`);
  }
}

/**
 * One certificate: the operator's signature (a router certificate that does not verify under
 * the pin is `pin_mismatch`), the type, the claims, validity at `now`.
 */
export function verifyCertificate(doc: unknown, operatorKey: Uint8Array, now: number, type: 'router' | 'node'): Certificate {
  if (!hasExactly(doc, CERTIFICATE)) throw bad('a certificate does not have exactly payload and signature');
  const unsigned = type === 'router' ? (m: string) => new KeyDocumentError('pin_mismatch', `${m} under the pinned operator key`) : bad;
  const certificate = certificateClaims(signedPayload(doc, operatorKey, CERTIFICATE_CONTEXT, `${type} certificate`, unsigned), type);
  checkCertificateTimes(certificate, now);
  return certificate;
}

const KEY_FIELDS = ['kid', 'pk', 'status', 'not_before', 'not_after'] as const;

function keyList(raw: unknown, what: string): PublishedKey[] {
  if (!Array.isArray(raw) || raw.length < 1 || raw.length > MAX_KEYS) throw bad(`the ${what} has no valid list of keys`);
  return raw.map((entry: unknown) => {
    if (!hasExactly(entry, KEY_FIELDS)) throw bad(`a key of the ${what} does not have exactly the fields of part I`);
    return parsePublishedKey(entry);
  });
}

function sameSuite(suite: unknown): boolean {
  return hasExactly(suite, ['kem', 'kdf', 'aead']) && suite.kem === SUITE.kem && suite.kdf === SUITE.kdf && suite.aead === SUITE.aead;
}

const SIGNED = ['payload', 'signature', 'signing_key'] as const;
const NODE_KEYS = ['v', 'type', 'suite', 'issued_at', 'keys'] as const;

/** A node key set signed by `nodeKey` (its certificate's key): `[issued_at, keys, current]`. */
function nodeKeys(doc: unknown, nodeKey: Uint8Array, now: number): [number, PublishedKey[], PublishedKey] {
  if (!hasExactly(doc, SIGNED)) throw bad('a node key set does not have exactly payload, signature, signing_key');
  let signingKey: Uint8Array;
  try {
    signingKey = b64uDecode(doc.signing_key, 'signing_key', 32);
  } catch {
    throw bad("the node key set's signing_key is not a 32-byte key");
  }
  if (!equalBytes(signingKey, nodeKey)) throw bad('the node key set is not signed by the certified node key');
  const p = signedPayload(doc, nodeKey, NODE_KEYS_CONTEXT, 'node key set');
  if (!hasExactly(p, NODE_KEYS) || p.v !== VERSION_2 || p.type !== 'node-keys' || !sameSuite(p.suite) || !isInt(p.issued_at)) {
    throw bad('the node key set is not a protocol v2 node-keys set');
  }
  const keys = keyList(p.keys, 'node key set');
  return [p.issued_at, keys, checkKeySet(p.issued_at, keys, now, 'node key set')];
}

function attestations(raw: unknown): JsonObject[] {
  if (!Array.isArray(raw) || raw.length > MAX_ATTESTATIONS) throw bad(`a node's attestations are a list of at most ${MAX_ATTESTATIONS}`);
  for (const item of raw) {
    const format = isObject(item) ? item.format : undefined;
    if (typeof format !== 'string' || format.length < 1 || codePoints(format) > MAX_ATTESTATION_FORMAT) {
      throw bad('an attestation is an object with a string format');
    }
  }
  return raw as JsonObject[];
}

const ENTRY = ['certificate', 'keys', 'attestations'] as const;

/** Check 4 for one node entry (what a node serves at `GET /v2/keys`). */
export function verifyNodeEntry(entry: unknown, operatorKey: Uint8Array, now: number): NodeEntry {
  if (!hasExactly(entry, ENTRY)) throw bad('a node entry does not have exactly certificate, keys, attestations');
  const certificate = verifyCertificate(entry.certificate, operatorKey, now, 'node');
  const [issuedAt, keys, current] = nodeKeys(entry.keys, certificate.key, now);
  return { name: certificate.name, models: certificate.models, current, keys, attestations: attestations(entry.attestations), certificate, issued_at: issuedAt };
}

const DOCUMENT = ['payload', 'signature', 'signing_key', 'certificate'] as const;
const PAYLOAD = ['v', 'suite', 'issued_at', 'default_model', 'keys', 'nodes'] as const;

/**
 * Every check of docs/protocol.md section 9.4, in order, on a `GET /api/v2/keys` body at `now`
 * (Unix seconds). A node entry that fails check 4 is dropped; two verified entries with one name
 * refuse the whole document.
 */
export function verifyKeyDocumentV2(body: string | Uint8Array, operatorPin: Uint8Array, now: number): KeyDocumentV2 {
  if (operatorPin.length !== 32) throw new KeyDocumentError('pin_mismatch', 'the operator pin is a 32-byte Ed25519 public key');
  // 0. size and shape
  const bytes = typeof body === 'string' ? utf8(body) : body;
  if (bytes.length > MAX_KEY_DOCUMENT) throw bad('the key document is larger than 1 MiB');
  let doc: unknown;
  try {
    doc = parseStrict(fromUtf8(bytes));
  } catch {
    throw bad('malformed key document');
  }
  if (!hasExactly(doc, DOCUMENT)) throw bad('the key document does not have exactly the fields protocol v2 defines');
  // 1. the router's certificate, under the pinned operator key
  const router = verifyCertificate(doc.certificate, operatorPin, now, 'router');
  let signingKey: Uint8Array;
  try {
    signingKey = b64uDecode(doc.signing_key, 'signing_key', 32);
  } catch {
    throw bad("the key document's signing_key is not a 32-byte key");
  }
  if (!equalBytes(signingKey, router.key)) throw bad("the key document's signing key is not the certified router key");
  // 2. the router's signature over the exact payload bytes
  const p = signedPayload(doc, router.key, KEY_DOCUMENT_CONTEXT, 'key document');
  // 3. the payload, and the router's (outer) keys as part I checks them
  if (!hasExactly(p, PAYLOAD) || p.v !== VERSION_2 || !sameSuite(p.suite) || !isInt(p.issued_at)) {
    throw bad('the key document payload is not protocol v2');
  }
  const defaultModel = p.default_model;
  if (defaultModel !== null && (typeof defaultModel !== 'string' || !MODEL_NAME.test(defaultModel))) {
    throw bad("the key document's default_model is not a model name");
  }
  const keys = keyList(p.keys, 'key document');
  const current = checkKeySet(p.issued_at, keys, now, 'key document');
  // 4. each node entry, dropped alone when it fails
  if (!Array.isArray(p.nodes) || p.nodes.length > MAX_NODES) throw bad(`the key document's nodes are a list of at most ${MAX_NODES}`);
  const nodes: NodeEntry[] = [];
  for (const entry of p.nodes) {
    try {
      nodes.push(verifyNodeEntry(entry, operatorPin, now));
    } catch (e) {
      if (!(e instanceof KeyDocumentError)) throw e;
    }
  }
  if (new Set(nodes.map((node) => node.name)).size !== nodes.length) throw bad('two verified nodes of the key document share a name');
  return { version: 2, issued_at: p.issued_at, keys, current, default_model: defaultModel, nodes, router, signing_key: signingKey };
}

/**
 * The document as it would verify at `now` (its signatures were checked when it was received;
 * only time has passed): `KeyDocumentError` when the router's part no longer holds (its
 * certificate, `issued_at` within 24 hours, the current outer key), else the document without
 * the node entries that no longer pass check 4. Called before each seal.
 */
export function stillValidV2(document: KeyDocumentV2, now: number): KeyDocumentV2 {
  checkCertificateTimes(document.router, now);
  checkKeyTimes(document.issued_at, document.current, now, 'key document');
  const nodes = document.nodes.filter((node) => {
    try {
      checkCertificateTimes(node.certificate, now);
      checkKeyTimes(node.issued_at, node.current, now, 'node key set');
      return true;
    } catch {
      return false;
    }
  });
  return nodes.length === document.nodes.length ? document : { ...document, nodes };
}

/** The verified nodes whose certificate lists `model`, in document order. */
export function nodesFor(document: KeyDocumentV2, model: string): NodeEntry[] {
  return document.nodes.filter((node) => node.models.includes(model));
}

/** Every model some verified node serves, in document order. */
export function documentModels(document: KeyDocumentV2): string[] {
  return [...new Set(document.nodes.flatMap((node) => node.models))];
}
