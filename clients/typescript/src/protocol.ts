/**
 * Wire protocol v1, client side (docs/protocol.md): the request plaintext and its checks, the
 * sealed envelope, the sealed SSE response stream, the signed key document.
 *
 * Pure functions of bytes and time, no I/O: `client.ts` does the HTTP. The tables of request
 * fields and chunk types are where later protocol versions add theirs.
 */

import { equalBytes } from '@noble/ciphers/utils.js';
import { ed25519 } from '@noble/curves/ed25519.js';

import { b64uDecode, b64uEncode, concat, EncodingError, fromUtf8, i2osp, randomBytes, utf8, xor } from './bytes.js';
import { DecryptionError, EncryptionError, InvalidRequestError, KeyDocumentError, TruncatedStreamError } from './errors.js';
import * as hpke from './hpke.js';
import { SSEParser, SSEError } from './sse.js';

export const VERSION = 1;
export const REQUEST_INFO = utf8('llmrouter/v1 request');
export const RESPONSE_LABEL = utf8('llmrouter/v1 response');
export const DEFAULT_PAD = 64;
export const RID_BYTES = 16;
export const RESPONSE_NONCE_BYTES = 32;
export const SUITE = { kem: hpke.KEM_ID, kdf: hpke.KDF_ID, aead: hpke.AEAD_ID } as const;
export const MAX_STOP_SEQUENCES = 4;
const FINAL_AAD = utf8('final');
const EMPTY = new Uint8Array(0);

// The request.

export type Role = 'system' | 'user' | 'assistant';

export interface Message {
  role: Role;
  content: string;
}

/** A chat request as protocol v1 carries it; the names are the wire's (and OpenAI's). */
export interface ChatRequest {
  messages: Message[];
  max_tokens?: number;
  temperature?: number;
  top_p?: number;
  stop?: string[];
}

type FieldCheck = (value: unknown) => string | undefined;

const ROLES = new Set<unknown>(['system', 'user', 'assistant']);

function isNumber(value: unknown): value is number {
  return typeof value === 'number' && Number.isFinite(value);
}

/**
 * Every request field v1 defines, with its check (an error message, or undefined when fine).
 * A later version adds its fields here; anything not listed is refused by name, never dropped.
 */
export const REQUEST_FIELDS: Readonly<Record<string, FieldCheck>> = {
  messages: (value) => {
    if (!Array.isArray(value) || value.length === 0) return 'messages must be a non-empty list';
    for (const item of value) {
      if (typeof item !== 'object' || item === null || Array.isArray(item)) {
        return 'each message must be an object with role and content';
      }
      for (const key of Object.keys(item)) {
        if (key !== 'role' && key !== 'content') return `message field ${safeName(key)} is not supported by protocol v1`;
      }
      const message = item as Record<string, unknown>;
      if (!ROLES.has(message.role)) return 'message role must be system, user or assistant';
      if (typeof message.content !== 'string') return 'message content must be a string';
    }
    return undefined;
  },
  max_tokens: (value) =>
    Number.isSafeInteger(value) && (value as number) >= 1 ? undefined : 'max_tokens must be a positive integer',
  temperature: (value) =>
    isNumber(value) && value >= 0 && value <= 2 ? undefined : 'temperature must be a number from 0 to 2',
  top_p: (value) =>
    isNumber(value) && value > 0 && value <= 1 ? undefined : 'top_p must be a number above 0 and at most 1',
  stop: (value) =>
    Array.isArray(value) &&
    value.length <= MAX_STOP_SEQUENCES &&
    value.every((s) => typeof s === 'string' && s.length > 0)
      ? undefined
      : `stop must be a list of at most ${MAX_STOP_SEQUENCES} non-empty strings`,
};

function hasOwn(object: object, name: string): boolean {
  return Object.prototype.hasOwnProperty.call(object, name);
}

/** A field name for a message: names are the caller's code, not user content, but keep them short. */
function safeName(name: string): string {
  return /^[A-Za-z0-9_]{1,64}$/.test(name) ? name : '(unnamed)';
}

/**
 * Check `request` and return the plaintext object, fields in the wire's order. Unknown fields are
 * refused by name (`unsupported_field`); `undefined` values count as absent.
 */
export function requestPlaintext(request: ChatRequest): Record<string, unknown> {
  if (typeof request !== 'object' || request === null) {
    throw new InvalidRequestError('invalid_request', 'the request must be an object', '');
  }
  const source = request as unknown as Record<string, unknown>;
  const out: Record<string, unknown> = {};
  for (const [name, value] of Object.entries(source)) {
    if (value !== undefined && !hasOwn(REQUEST_FIELDS, name)) {
      throw new InvalidRequestError(
        'unsupported_field',
        `${safeName(name)} is not supported by protocol v1`,
        safeName(name),
      );
    }
  }
  if (source.messages === undefined) {
    throw new InvalidRequestError('invalid_request', 'messages must be a non-empty list', 'messages');
  }
  for (const [name, check] of Object.entries(REQUEST_FIELDS)) {
    const value = source[name];
    if (value === undefined) continue;
    const problem = check(value);
    if (problem !== undefined) throw new InvalidRequestError('invalid_request', problem, name);
    out[name] = name === 'messages' ? (value as Message[]).map((m) => ({ role: m.role, content: m.content })) : value;
  }
  return out;
}

/** UTF-8 JSON followed by ASCII spaces up to a multiple of `size` (JSON ignores them). */
export function pad(data: Uint8Array, size: number): Uint8Array {
  if (size <= 1 || data.length % size === 0) return data;
  const out = new Uint8Array(data.length + (size - (data.length % size)));
  out.set(data);
  out.fill(0x20, data.length);
  return out;
}

// The signed key document.

export interface PublishedKey {
  kid: string;
  pk: Uint8Array;
  status: 'current' | 'next';
  not_before: number;
  not_after: number;
}

export interface KeyDocument {
  issued_at: number;
  keys: PublishedKey[];
  /** The Ed25519 key that signed the document (what a client pins). */
  signing_key: Uint8Array;
  /** The key to seal to. */
  current: PublishedKey;
}

/** How old a key document may be (the router re-signs hourly) and how far clocks may disagree. */
export const KEY_DOCUMENT_MAX_AGE = 24 * 3600;
export const CLOCK_SKEW = 300;

const KID = /^[0-9a-f]{2}$/;

function invalidDocument(): KeyDocumentError {
  return new KeyDocumentError('bad_key_document', 'key document payload is not protocol v1');
}

function parseKey(doc: unknown): PublishedKey {
  if (typeof doc !== 'object' || doc === null) throw invalidDocument();
  const key = doc as Record<string, unknown>;
  const { kid, status, not_before, not_after } = key;
  if (typeof kid !== 'string' || !KID.test(kid)) throw invalidDocument();
  if (status !== 'current' && status !== 'next') throw invalidDocument();
  if (!Number.isSafeInteger(not_before) || !Number.isSafeInteger(not_after)) throw invalidDocument();
  let pk: Uint8Array;
  try {
    pk = b64uDecode(key.pk, 'pk', hpke.N_PK);
  } catch {
    throw invalidDocument();
  }
  return { kid, pk, status, not_before: not_before as number, not_after: not_after as number };
}

function parseJson(text: string): unknown {
  try {
    return JSON.parse(text);
  } catch {
    return undefined;
  }
}

/**
 * Verify a `GET /api/pubkey` body at time `now` (Unix seconds).
 *
 * The signature is checked over the exact payload bytes, against `pin` when given (a
 * trust-on-first-use client passes `null` only the very first time). Then the rules every client
 * of this router applies: `issued_at` at most 24 h old and at most 300 s ahead; exactly one
 * `current` and one `next` key with distinct ids; the current key inside its validity window
 * (300 s of clock skew allowed).
 */
export function verifyKeyDocument(body: string | Uint8Array, pin: Uint8Array | null, now: number): KeyDocument {
  const malformed = () => new KeyDocumentError('bad_key_document', 'malformed key document');
  let text: string;
  try {
    text = typeof body === 'string' ? body : fromUtf8(body);
  } catch {
    throw malformed();
  }
  const outer = parseJson(text);
  if (typeof outer !== 'object' || outer === null) throw malformed();
  const doc = outer as Record<string, unknown>;
  let signingKey: Uint8Array, signature: Uint8Array, payload: Uint8Array;
  try {
    signingKey = b64uDecode(doc.signing_key, 'signing_key', 32);
    signature = b64uDecode(doc.signature, 'signature', 64);
    payload = b64uDecode(doc.payload, 'payload');
  } catch {
    throw malformed();
  }
  if (pin !== null && !equalBytes(pin, signingKey)) {
    throw new KeyDocumentError('pin_mismatch', 'key document is not signed by the pinned key');
  }
  let valid = false;
  try {
    // Strict RFC 8032 verification (as libsodium's), not the more permissive ZIP 215 rules.
    valid = ed25519.verify(signature, payload, signingKey, { zip215: false });
  } catch {
    valid = false;
  }
  if (!valid) throw new KeyDocumentError('bad_key_document', 'key document signature does not verify');

  let inner: unknown;
  try {
    inner = parseJson(fromUtf8(payload));
  } catch {
    throw invalidDocument();
  }
  if (typeof inner !== 'object' || inner === null) throw invalidDocument();
  const p = inner as Record<string, unknown>;
  const suite = p.suite as Record<string, unknown> | null;
  if (
    p.v !== VERSION ||
    typeof suite !== 'object' ||
    suite === null ||
    Object.keys(suite).length !== 3 ||
    suite.kem !== SUITE.kem ||
    suite.kdf !== SUITE.kdf ||
    suite.aead !== SUITE.aead ||
    !Number.isSafeInteger(p.issued_at) ||
    !Array.isArray(p.keys)
  ) {
    throw invalidDocument();
  }
  const keys = p.keys.map(parseKey);
  if (new Set(keys.map((k) => k.kid)).size !== keys.length) {
    throw new KeyDocumentError('bad_key_document', 'key document has duplicate key ids');
  }
  const current = keys.filter((k) => k.status === 'current');
  const next = keys.filter((k) => k.status === 'next');
  if (current.length !== 1 || next.length !== 1) {
    throw new KeyDocumentError('bad_key_document', 'key document must have exactly one current and one next key');
  }
  const document = { issued_at: p.issued_at as number, keys, signing_key: signingKey, current: current[0]! };
  checkKeyDocumentTimes(document, now);
  return document;
}

/** The time rules alone, for a document verified earlier and used again later. */
export function checkKeyDocumentTimes(document: KeyDocument, now: number): void {
  if (document.issued_at > now + CLOCK_SKEW) {
    throw new KeyDocumentError('stale_key_document', 'key document is issued in the future');
  }
  if (document.issued_at < now - KEY_DOCUMENT_MAX_AGE) {
    throw new KeyDocumentError('stale_key_document', 'key document is more than 24 hours old');
  }
  const key = document.current;
  if (now < key.not_before - CLOCK_SKEW || now > key.not_after + CLOCK_SKEW) {
    throw new KeyDocumentError('stale_key_document', 'the current key is outside its validity window');
  }
}

// The sealed request.

export interface Envelope {
  v: number;
  kid: string;
  mode: 'base' | 'auth';
  enc: string;
  ts: number;
  rid: string;
  device_pubkey?: string;
  ct: string;
}

/** What the client keeps to open the response. */
export interface RequestState {
  enc: Uint8Array;
  secret: Uint8Array;
}

export interface SealOptions {
  /** Auth mode with this device key pair; base mode without. */
  deviceKey?: hpke.KeyPair;
  pad?: number;
  /** Only to reproduce the worked example of docs/protocol.md: leave unset. */
  ephemeral?: hpke.KeyPair;
  /** Only to reproduce the worked example of docs/protocol.md: leave unset. */
  rid?: Uint8Array;
}

export function requestAad(envelope: Pick<Envelope, 'kid' | 'mode' | 'ts' | 'rid' | 'device_pubkey'>): Uint8Array {
  const parts = ['llmrouter/v1', envelope.kid, envelope.mode, String(envelope.ts), envelope.rid, envelope.device_pubkey ?? ''];
  return utf8(parts.join('|'));
}

/** Seal `request` to `key` at time `ts` (Unix seconds). */
export function sealRequest(
  key: PublishedKey,
  request: ChatRequest,
  ts: number,
  options: SealOptions = {},
): { envelope: Envelope; state: RequestState } {
  const plaintext = pad(utf8(JSON.stringify(requestPlaintext(request))), options.pad ?? DEFAULT_PAD);
  const device = options.deviceKey;
  const kid = key.kid;
  const mode = device === undefined ? 'base' : 'auth';
  const rid = b64uEncode(options.rid ?? randomBytes(RID_BYTES));
  const devicePubkey = device === undefined ? undefined : b64uEncode(device.pk);
  let enc: Uint8Array, ct: Uint8Array, secret: Uint8Array;
  try {
    const setup =
      device === undefined
        ? hpke.setupBaseS(key.pk, REQUEST_INFO, { ephemeral: options.ephemeral })
        : hpke.setupAuthS(key.pk, REQUEST_INFO, device.sk, { ephemeral: options.ephemeral });
    enc = setup.enc;
    ct = setup.ctx.seal(requestAad({ kid, mode, ts, rid, device_pubkey: devicePubkey }), plaintext);
    secret = setup.ctx.export(RESPONSE_LABEL, 32);
  } catch {
    throw new EncryptionError();
  }
  // Fields in the order of docs/protocol.md; device_pubkey only in mode auth.
  const envelope: Envelope = {
    v: VERSION,
    kid,
    mode,
    enc: b64uEncode(enc),
    ts,
    rid,
    ...(devicePubkey === undefined ? {} : { device_pubkey: devicePubkey }),
    ct: b64uEncode(ct),
  };
  return { envelope, state: { enc, secret } };
}

// The sealed response stream.

export interface Usage {
  prompt_tokens: number;
  completion_tokens: number;
}

export interface DeltaEvent {
  type: 'delta';
  text: string;
}

export interface DoneEvent {
  type: 'done';
  finish_reason: 'stop' | 'length' | 'cancelled';
  usage: Usage;
}

/** The router's sealed final error chunk (the stream failed after it began). */
export interface ErrorEvent {
  type: 'error';
  code: string;
  message: string;
}

export type StreamItem = DeltaEvent | DoneEvent | ErrorEvent;
export type FinalItem = DoneEvent | ErrorEvent;

type ChunkParser = (doc: Record<string, unknown>) => StreamItem | undefined;

/** Chunk types inside `chunk` events: a later version adds its own (tool calls, reasoning). */
export const CHUNK_TYPES: Readonly<Record<string, ChunkParser>> = {
  delta: (doc) => (typeof doc.text === 'string' ? { type: 'delta', text: doc.text } : undefined),
};

const FINISH_REASONS = new Set<unknown>(['stop', 'length', 'cancelled']);

/** Chunk types inside the `final` event. */
export const FINAL_TYPES: Readonly<Record<string, ChunkParser>> = {
  done: (doc) => {
    const usage = doc.usage as Record<string, unknown> | null;
    if (!FINISH_REASONS.has(doc.finish_reason) || typeof usage !== 'object' || usage === null) return undefined;
    const { prompt_tokens, completion_tokens } = usage;
    if (!Number.isSafeInteger(prompt_tokens) || !Number.isSafeInteger(completion_tokens)) return undefined;
    return {
      type: 'done',
      finish_reason: doc.finish_reason as DoneEvent['finish_reason'],
      usage: { prompt_tokens: prompt_tokens as number, completion_tokens: completion_tokens as number },
    };
  },
  error: (doc) =>
    typeof doc.code === 'string' && typeof doc.message === 'string'
      ? { type: 'error', code: doc.code, message: doc.message }
      : undefined,
};

/** RFC 9458 section 4.4 style response keys, with our own export label. */
class ResponseKeys {
  private readonly key: Uint8Array;
  private readonly nonce: Uint8Array;
  private counter = 0;

  constructor(state: RequestState, responseNonce: Uint8Array) {
    const prk = hpke.hkdfExtract(concat(state.enc, responseNonce), state.secret);
    this.key = hpke.hkdfExpand(prk, utf8('key'), hpke.N_K);
    this.nonce = hpke.hkdfExpand(prk, utf8('nonce'), hpke.N_N);
  }

  open(aad: Uint8Array, sealed: Uint8Array): Uint8Array {
    const nonce = xor(this.nonce, i2osp(this.counter, hpke.N_N));
    const plaintext = hpke.aeadOpen(this.key, nonce, aad, sealed);
    this.counter += 1;
    return plaintext;
  }
}

function badStream(message: string): DecryptionError {
  return new DecryptionError('bad_stream', message);
}

/**
 * Feed raw SSE bytes, get verified stream items back, in order. The stream is complete only once
 * `final` is set; `close()` on a stream without its verified final chunk throws
 * {@link TruncatedStreamError}.
 */
export class ResponseOpener {
  private readonly parser: SSEParser;
  private keys: ResponseKeys | undefined;
  final: FinalItem | undefined;

  constructor(
    private readonly state: RequestState,
    maxLine = 1 << 20,
  ) {
    this.parser = new SSEParser(maxLine, maxLine);
  }

  feed(data: Uint8Array): StreamItem[] {
    let events;
    try {
      events = this.parser.feed(data);
    } catch (e) {
      if (e instanceof SSEError) throw badStream('malformed event stream');
      throw e;
    }
    const items: StreamItem[] = [];
    for (const { event, data: payload } of events) {
      const item = this.event(event, payload);
      if (item !== undefined) items.push(item);
    }
    return items;
  }

  close(): FinalItem {
    if (this.final === undefined) throw new TruncatedStreamError();
    return this.final;
  }

  private event(name: string, payload: string): StreamItem | undefined {
    if (this.final !== undefined) throw badStream('data after the final chunk');
    if (name === 'init') {
      if (this.keys !== undefined) throw badStream('duplicate init event');
      const doc = parseJson(payload) as Record<string, unknown> | undefined;
      this.keys = new ResponseKeys(this.state, decodeChunk(doc?.response_nonce, RESPONSE_NONCE_BYTES));
      return undefined;
    }
    if (name !== 'chunk' && name !== 'final') return undefined; // unknown events are ignored, as SSE does
    if (this.keys === undefined) throw badStream('chunk before init');
    const final = name === 'final';
    let plaintext: Uint8Array;
    try {
      plaintext = this.keys.open(final ? FINAL_AAD : EMPTY, decodeChunk(payload));
    } catch (e) {
      if (e instanceof DecryptionError) throw e;
      throw new DecryptionError('decryption_failed', 'a response chunk failed authentication');
    }
    const item = parseChunk(plaintext, final ? FINAL_TYPES : CHUNK_TYPES);
    if (final) this.final = item as FinalItem;
    return item;
  }
}

function decodeChunk(text: unknown, length?: number): Uint8Array {
  try {
    return b64uDecode(text, 'chunk', length);
  } catch (e) {
    if (e instanceof EncodingError) throw badStream('malformed chunk encoding');
    throw e;
  }
}

function parseChunk(plaintext: Uint8Array, types: Readonly<Record<string, ChunkParser>>): StreamItem {
  let doc: unknown;
  try {
    doc = parseJson(fromUtf8(plaintext)); // trailing padding spaces are JSON whitespace
  } catch {
    doc = undefined;
  }
  if (typeof doc !== 'object' || doc === null || Array.isArray(doc)) throw badStream('malformed chunk JSON');
  const record = doc as Record<string, unknown>;
  const parser = typeof record.type === 'string' && hasOwn(types, record.type) ? types[record.type] : undefined;
  const item = parser?.(record);
  if (item === undefined) throw badStream('unexpected chunk content');
  return item;
}
