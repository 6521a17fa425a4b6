/**
 * A protocol v2 answer, client side (docs/protocol.md sections 12 and 13): the node's sealed
 * stream (part I's events, keyed by the response secret, no `enc` in the salt) relayed by the
 * router byte for byte, or one terminal `event: router`, sealed under the router secret, with
 * the router's own refusal. A stream is complete only with a verified node `final` or a verified
 * router event; anything after either, or an event that fails authentication, is a broken stream.
 */

import { b64uDecode, fromUtf8 } from './bytes.js';
import { DecryptionError } from './errors.js';
import { codePoints, hasExactly, isObject, parseStrict } from './json.js';
import { type ExpectedChunks } from './chat.js';
import { type ErrorEvent, EventStreamOpener, FINAL_AAD, RESPONSE_NONCE_BYTES, ResponseKeys, ResponseOpener, type StreamItem } from './protocol.js';
import type { ClientStateV2 } from './v2request.js';

export const ROUTER_EVENT = 'router';
const CODE = /^[a-z0-9_]{1,64}$/;
const MAX_MESSAGE = 1024;
const MAX_CHALLENGE = 256;
const ROUTER_MESSAGE_FIELDS = new Set(['type', 'code', 'message', 'status', 'retry_after', 'challenge', 'difficulty']);

/**
 * The HTTP status a v2 refusal stands for when its sealed event carries none (section 13): it
 * travels sealed inside a `200` stream.
 */
const REFUSAL_STATUS: Record<string, number> = {
  body_too_large: 413,
  unsupported_media_type: 415,
  rate_limited: 429,
  pow_required: 401,
  pow_invalid: 401,
  stale: 401,
  replay: 409,
  device_rate_limited: 429,
  new_device_rate_limited: 429,
  budget_exhausted: 429,
  device_streams: 429,
  model_unknown: 404,
  overloaded: 503,
  no_backend: 503,
  upstream_failed: 502,
  timeout: 504,
  internal: 500,
};

export function refusalStatus(code: string): number {
  return REFUSAL_STATUS[code] ?? 400;
}

function broken(message: string): DecryptionError {
  return new DecryptionError('bad_stream', message);
}

function optionalInt(doc: Record<string, unknown>, name: string): number | undefined {
  const value = doc[name];
  if (value === undefined || value === null) return undefined;
  if (!Number.isSafeInteger(value) || (value as number) < 0) throw broken('malformed router event');
  return value as number;
}

/** Verify and read the data of an `event: router` (counter 0, aad `final`, salt `outer enc || nonce`). */
export function openRouterEvent(state: ClientStateV2, payload: string): ErrorEvent {
  let doc: unknown;
  try {
    doc = parseStrict(payload);
  } catch {
    throw broken('malformed router event');
  }
  if (!hasExactly(doc, ['response_nonce', 'sealed'])) throw broken('malformed router event');
  let nonce: Uint8Array, sealed: Uint8Array;
  try {
    nonce = b64uDecode(doc.response_nonce, 'response_nonce', RESPONSE_NONCE_BYTES);
    sealed = b64uDecode(doc.sealed, 'sealed');
  } catch {
    throw broken('malformed router event');
  }
  let plaintext: Uint8Array;
  try {
    plaintext = new ResponseKeys({ enc: state.enc, secret: state.routerSecret }, nonce).open(FINAL_AAD, sealed);
  } catch {
    throw new DecryptionError('decryption_failed', 'the router event failed authentication');
  }
  let message: unknown;
  try {
    message = parseStrict(fromUtf8(plaintext)); // trailing padding spaces are JSON whitespace
  } catch {
    throw broken('malformed router event');
  }
  if (!isObject(message) || message.type !== 'error' || !Object.keys(message).every((k) => ROUTER_MESSAGE_FIELDS.has(k))) {
    throw broken('malformed router event');
  }
  const { code, message: text, challenge } = message;
  if (typeof code !== 'string' || !CODE.test(code) || typeof text !== 'string' || codePoints(text) > MAX_MESSAGE) throw broken('malformed router event');
  if (challenge !== undefined && challenge !== null && (typeof challenge !== 'string' || codePoints(challenge) > MAX_CHALLENGE)) throw broken('malformed router event');
  const status = optionalInt(message, 'status');
  if (status !== undefined && (status < 100 || status > 599)) throw broken('malformed router event');
  const event: ErrorEvent = { type: 'error', code, message: text, status: status ?? refusalStatus(code) };
  const retryAfter = optionalInt(message, 'retry_after');
  const difficulty = optionalInt(message, 'difficulty');
  if (retryAfter !== undefined) event.retry_after = retryAfter;
  if (typeof challenge === 'string') event.challenge = challenge;
  if (difficulty !== undefined) event.difficulty = difficulty;
  return event;
}

/**
 * Feed raw SSE bytes, get verified items back, in order: node events through part I's opener
 * (with the response secret), a router event through `openRouterEvent`. `close()` on a stream
 * without a verified terminal event throws {@link TruncatedStreamError}.
 */
export class ResponseOpenerV2 extends EventStreamOpener {
  private readonly node: ResponseOpener;

  constructor(
    private readonly state: ClientStateV2,
    expects: ExpectedChunks,
    maxLine = 1 << 20,
  ) {
    super(maxLine);
    this.node = new ResponseOpener({ enc: new Uint8Array(0), secret: state.responseSecret }, expects, maxLine);
  }

  event(name: string, payload: string): StreamItem | undefined {
    if (name === ROUTER_EVENT) {
      this.final = openRouterEvent(this.state, payload);
      return this.final;
    }
    const item = this.node.event(name, payload);
    const final = this.node.final;
    if (final === undefined) return item;
    // A node's sealed refusal without a status (an older node) is taken by its code.
    this.final = final.type === 'error' && final.status === undefined ? { ...final, status: refusalStatus(final.code) } : final;
    return this.final;
  }
}
