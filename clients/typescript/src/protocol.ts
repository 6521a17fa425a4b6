/**
 * Wire protocol v1.1, client side (docs/protocol.md): the sealed envelope, the sealed SSE
 * response stream and its chunk types, the signed key document. The request plaintext and its
 * checks are `chat.ts`.
 *
 * Pure functions of bytes and time, no I/O: `client.ts` does the HTTP.
 */

import { equalBytes } from '@noble/ciphers/utils.js';
import { ed25519 } from '@noble/curves/ed25519.js';

import { b64uDecode, b64uEncode, concat, EncodingError, fromUtf8, i2osp, randomBytes, utf8, xor } from './bytes.js';
import { type ChatRequest, type ExpectedChunks, requestPlaintext } from './chat.js';
import { DecryptionError, EncryptionError, KeyDocumentError, TruncatedStreamError } from './errors.js';
import * as hpke from './hpke.js';
import { SSEParser, SSEError } from './sse.js';

export const VERSION = 1;
export const REQUEST_INFO = utf8('llmrouter/v1 request');
export const RESPONSE_LABEL = utf8('llmrouter/v1 response');
export const DEFAULT_PAD = 64;
export const RID_BYTES = 16;
export const RESPONSE_NONCE_BYTES = 32;
export const SUITE = { kem: hpke.KEM_ID, kdf: hpke.KDF_ID, aead: hpke.AEAD_ID } as const;
export const FINAL_AAD = utf8('final');
const EMPTY = new Uint8Array(0);

// The request plaintext: chat.ts (re-exported here, where v1 had it).

export {
  type ChatRequest,
  type Content,
  type ExpectedChunks,
  expectedChunks,
  MAX_STOP_SEQUENCES,
  type Message,
  requestPlaintext,
  type Role,
} from './chat.js';
export { SSEParser } from './sse.js';

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

/** One entry of a signed key set (part I, section 1); `KeyDocumentError` when malformed. */
export function parsePublishedKey(doc: unknown): PublishedKey {
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

/**
 * Part I's rules for any signed key set (`what` names it: the key document, a v2 node key set):
 * unique kids, exactly one `current` and one `next`, then the time rules; returns the current key.
 */
export function checkKeySet(issuedAt: number, keys: PublishedKey[], now: number, what: string): PublishedKey {
  if (new Set(keys.map((k) => k.kid)).size !== keys.length) {
    throw new KeyDocumentError('bad_key_document', `${what} has duplicate key ids`);
  }
  const current = keys.filter((k) => k.status === 'current');
  const next = keys.filter((k) => k.status === 'next');
  if (current.length !== 1 || next.length !== 1) {
    throw new KeyDocumentError('bad_key_document', `${what} must have exactly one current and one next key`);
  }
  checkKeyTimes(issuedAt, current[0]!, now, what);
  return current[0]!;
}

/** The time rules of a signed key set: at most 24 h old, not ahead, the current key valid (300 s skew). */
export function checkKeyTimes(issuedAt: number, current: PublishedKey, now: number, what: string): void {
  if (issuedAt > now + CLOCK_SKEW) {
    throw new KeyDocumentError('stale_key_document', `${what} is issued in the future`);
  }
  if (issuedAt < now - KEY_DOCUMENT_MAX_AGE) {
    throw new KeyDocumentError('stale_key_document', `${what} is more than 24 hours old`);
  }
  if (now < current.not_before - CLOCK_SKEW || now > current.not_after + CLOCK_SKEW) {
    throw new KeyDocumentError('stale_key_document', `the current key of the ${what} is outside its validity window`);
  }
}

/** Ed25519, strict RFC 8032 verification (as libsodium's), not the more permissive ZIP 215 rules. */
export function verifySignature(signature: Uint8Array, message: Uint8Array, key: Uint8Array): boolean {
  try {
    return ed25519.verify(signature, message, key, { zip215: false });
  } catch {
    return false;
  }
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
  if (!verifySignature(signature, payload, signingKey)) throw new KeyDocumentError('bad_key_document', 'key document signature does not verify');

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
  const keys = p.keys.map(parsePublishedKey);
  const current = checkKeySet(p.issued_at as number, keys, now, 'key document');
  return { issued_at: p.issued_at as number, keys, signing_key: signingKey, current };
}

/** The time rules alone, for a document verified earlier and used again later. */
export function checkKeyDocumentTimes(document: KeyDocument, now: number): void {
  checkKeyTimes(document.issued_at, document.current, now, 'key document');
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

/** An alternative token; `logprob` -9999 stands for minus infinity, as OpenAI writes it. */
export interface TopLogprob {
  token: string;
  logprob: number;
  bytes?: number[];
}

/** (1.1) A sampled token's log probability and its most likely alternatives. */
export interface Logprob extends TopLogprob {
  top_logprobs: TopLogprob[];
}

/** Answer text, in order; `logprobs` (1.1) only for a request with `logprobs: true`. */
export interface DeltaEvent {
  type: 'delta';
  text: string;
  logprobs?: Logprob[];
}

/** (1.1) The model's reasoning, apart from the answer; only for `include_reasoning: true`. */
export interface ReasoningEvent {
  type: 'reasoning';
  text: string;
  logprobs?: Logprob[];
}

/**
 * (1.1) One fragment of tool call number `index`, only for a request with `tools`: `id` and
 * `name` come with its first fragment, the `arguments` fragments concatenate to its JSON.
 */
export interface ToolCallEvent {
  type: 'tool_call';
  index: number;
  id?: string;
  name?: string;
  arguments: string;
}

/** `tool_calls` (1.1) only for a request with `tools`: the model stopped to call them. */
export type FinishReason = 'stop' | 'length' | 'cancelled' | 'tool_calls';

export interface DoneEvent {
  type: 'done';
  finish_reason: FinishReason;
  usage: Usage;
}

/**
 * The router's sealed final error chunk: the stream failed, or the router refused the request
 * after decrypting it (a refusal then goes back sealed, with the HTTP status a plain refusal
 * would have had, `Retry-After` seconds and what a backend's own refusal said).
 */
export interface ErrorEvent {
  type: 'error';
  code: string;
  message: string;
  status?: number;
  retry_after?: number;
  upstream_status?: number;
  upstream_code?: string;
  upstream_param?: string;
  /** (v2) A `pow_required` of the router's sealed event: the challenge to solve for the next request. */
  challenge?: string;
  difficulty?: number;
}

export type StreamItem = DeltaEvent | ReasoningEvent | ToolCallEvent | DoneEvent | ErrorEvent;
export type FinalItem = DoneEvent | ErrorEvent;

/** What a v1 request may receive: text deltas only. */
export const V1_CHUNKS: Readonly<ExpectedChunks> = Object.freeze({ reasoning: false, toolCalls: false, logprobs: false });

const MAX_TOOL_INDEX = 63;
const MAX_LOGPROB_ENTRIES = 256;
const MAX_TOP_LOGPROBS = 20;
const MIN_LOGPROB = -9999;
const FINISH_REASONS = new Set<unknown>(['stop', 'length', 'cancelled', 'tool_calls']);

/**
 * RFC 9458 section 4.4 style response keys, with our own export label: the salt is `enc ||
 * response_nonce` (v2's node stream has an empty `enc`, its router event the outer one).
 */
export class ResponseKeys {
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
 * {@link TruncatedStreamError}. What each event means is the subclass's (`event`).
 */
export abstract class EventStreamOpener {
  private readonly parser: SSEParser;
  final: FinalItem | undefined;

  constructor(maxLine: number) {
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
      if (this.final !== undefined) throw badStream('data after the final chunk');
      const item = this.event(event, payload);
      if (item !== undefined) items.push(item);
    }
    return items;
  }

  close(): FinalItem {
    if (this.final === undefined) throw new TruncatedStreamError();
    return this.final;
  }

  /** One parsed SSE event: its verified item, if it carries one; sets `final` on the last. */
  abstract event(name: string, payload: string): StreamItem | undefined;
}

/**
 * Part I's sealed stream (section 3).
 *
 * `expects` says which v1.1 chunk types the request asked for (`expectedChunks`); the router
 * sends no others, so any other one is a broken stream, as is a chunk type this client does not
 * know: code written for text deltas never meets anything else.
 */
export class ResponseOpener extends EventStreamOpener {
  private keys: ResponseKeys | undefined;

  constructor(
    private readonly state: RequestState,
    private readonly expects: ExpectedChunks = V1_CHUNKS,
    maxLine = 1 << 20,
  ) {
    super(maxLine);
  }

  /** One parsed SSE event (v2's opener hands the node's events on here). */
  event(name: string, payload: string): StreamItem | undefined {
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
    const item = parseChunk(plaintext, final, this.expects);
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

function parseChunk(plaintext: Uint8Array, final: boolean, expects: ExpectedChunks): StreamItem {
  let doc: unknown;
  try {
    doc = parseJson(fromUtf8(plaintext)); // trailing padding spaces are JSON whitespace
  } catch {
    doc = undefined;
  }
  if (typeof doc !== 'object' || doc === null || Array.isArray(doc)) throw badStream('malformed chunk JSON');
  const item = final ? finalItem(doc as Record<string, unknown>) : chunkItem(doc as Record<string, unknown>);
  if (item === undefined) throw badStream('unexpected chunk content');
  const asked =
    (item.type !== 'reasoning' || expects.reasoning) &&
    (item.type !== 'tool_call' || expects.toolCalls) &&
    (item.type !== 'done' || item.finish_reason !== 'tool_calls' || expects.toolCalls) &&
    (!('logprobs' in item) || expects.logprobs);
  if (!asked) throw badStream('a chunk the request did not ask for');
  return item;
}

function chunkItem(doc: Record<string, unknown>): StreamItem | undefined {
  if ((doc.type === 'delta' || doc.type === 'reasoning') && typeof doc.text === 'string') {
    if (doc.logprobs === undefined) return { type: doc.type, text: doc.text };
    const logprobs = logprobEntries(doc.logprobs);
    return logprobs === undefined ? undefined : { type: doc.type, text: doc.text, logprobs };
  }
  if (doc.type === 'tool_call') {
    const { index, id, name } = doc;
    const optional = (value: unknown) => value === undefined || value === null || typeof value === 'string';
    if (!Number.isInteger(index) || (index as number) < 0 || (index as number) > MAX_TOOL_INDEX) return undefined;
    if (!optional(id) || !optional(name) || typeof doc.arguments !== 'string') return undefined;
    return {
      type: 'tool_call',
      index: index as number,
      ...(typeof id === 'string' ? { id } : {}),
      ...(typeof name === 'string' ? { name } : {}),
      arguments: doc.arguments,
    };
  }
  return undefined;
}

function finalItem(doc: Record<string, unknown>): FinalItem | undefined {
  if (doc.type === 'done') {
    const usage = doc.usage as Record<string, unknown> | null;
    if (!FINISH_REASONS.has(doc.finish_reason) || typeof usage !== 'object' || usage === null) return undefined;
    const { prompt_tokens, completion_tokens } = usage;
    if (!Number.isSafeInteger(prompt_tokens) || !Number.isSafeInteger(completion_tokens)) return undefined;
    return {
      type: 'done',
      finish_reason: doc.finish_reason as FinishReason,
      usage: { prompt_tokens: prompt_tokens as number, completion_tokens: completion_tokens as number },
    };
  }
  if (doc.type === 'error' && typeof doc.code === 'string' && typeof doc.message === 'string') {
    const error: ErrorEvent = { type: 'error', code: doc.code, message: doc.message };
    const isStatus = (v: unknown) => Number.isSafeInteger(v) && (v as number) >= 100 && (v as number) <= 599;
    const isSeconds = (v: unknown) => Number.isSafeInteger(v) && (v as number) >= 0;
    const isName = (v: unknown) => typeof v === 'string' && ERROR_NAME.test(v);
    const optional = [
      ['status', isStatus],
      ['retry_after', isSeconds],
      ['upstream_status', isStatus],
      ['upstream_code', isName],
      ['upstream_param', isName],
    ] as const;
    for (const [name, valid] of optional) {
      const value = doc[name];
      if (value === undefined || value === null) continue;
      if (!valid(value)) return undefined;
      (error as unknown as Record<string, unknown>)[name] = value;
    }
    return error;
  }
  return undefined;
}

/** A code or a parameter's name in an error chunk (never a sentence or a value). */
const ERROR_NAME = /^[A-Za-z][A-Za-z0-9_.[\]-]{0,63}$/;

/** The `logprobs` of a chunk, bounded and checked as the router checked them; undefined if bad. */
function logprobEntries(raw: unknown): Logprob[] | undefined {
  if (!Array.isArray(raw) || raw.length > MAX_LOGPROB_ENTRIES) return undefined;
  const out: Logprob[] = [];
  for (const entry of raw) {
    const top = logprobEntry(entry);
    const alternatives = (entry as Record<string, unknown> | null)?.top_logprobs ?? [];
    if (top === undefined || !Array.isArray(alternatives) || alternatives.length > MAX_TOP_LOGPROBS) return undefined;
    const parsed = alternatives.map(logprobEntry);
    if (parsed.some((alt) => alt === undefined)) return undefined;
    out.push({ ...top, top_logprobs: parsed as TopLogprob[] });
  }
  return out;
}

function logprobEntry(raw: unknown): TopLogprob | undefined {
  if (typeof raw !== 'object' || raw === null || Array.isArray(raw)) return undefined;
  const { token, bytes } = raw as Record<string, unknown>;
  const logprob = (raw as Record<string, unknown>).logprob ?? MIN_LOGPROB;
  if (typeof token !== 'string' || typeof logprob !== 'number') return undefined;
  if (bytes === undefined || bytes === null) return { token, logprob };
  if (!Array.isArray(bytes) || !bytes.every((b) => Number.isInteger(b) && b >= 0 && b <= 255)) return undefined;
  return { token, logprob, bytes: [...(bytes as number[])] };
}
