/**
 * Typed errors a UI can act on. Every error has a stable `code`; the class says what kind of
 * problem it is (and so what to do), the code says exactly which.
 *
 * Messages are fixed sentences chosen here or by the router (whose messages never repeat what a
 * client sent): no error ever carries prompt or response text, key bytes or device identifiers.
 */

/** Every code the router answers with (docs/protocol.md), for exhaustive `switch`es. */
export type RouterErrorCode =
  | 'body_too_large'
  | 'unsupported_media_type'
  | 'bad_json'
  | 'unknown_field'
  | 'missing_field'
  | 'bad_type'
  | 'bad_base64'
  | 'bad_length'
  | 'bad_version'
  | 'bad_mode'
  | 'device_auth_required'
  | 'rate_limited'
  | 'pow_required'
  | 'pow_invalid'
  | 'stale'
  | 'key_unknown'
  | 'replay'
  | 'decrypt_failed'
  | 'bad_payload'
  | 'model_unknown'
  | 'unsupported_field'
  | 'upstream_refused'
  | 'device_rate_limited'
  | 'budget_exhausted'
  | 'device_streams'
  | 'overloaded'
  | 'no_backend'
  | 'upstream_failed'
  | 'timeout'
  | 'not_found'
  | 'method_not_allowed'
  | 'internal'
  // protocol v2 (docs/protocol.md sections 11 and 13)
  | 'v2_unavailable'
  | 'bad_request'
  | 'bad_pow_header'
  | 'device_proof_failed'
  | 'new_device_rate_limited';

/** The SDK's own codes. */
export type ClientErrorCode =
  | 'configuration'
  | 'invalid_request'
  | 'model_required'
  | 'unsupported_field'
  | 'network'
  | 'http_error'
  | 'aborted'
  | 'encryption_failed'
  | 'decryption_failed'
  | 'bad_stream'
  | 'truncated'
  | 'bad_key_document'
  | 'pin_mismatch'
  | 'stale_key_document'
  | 'pow_too_hard'
  | 'bad_models'
  | 'first_token_timeout'
  | 'idle_timeout'
  | 'storage';

export type ErrorCode = RouterErrorCode | ClientErrorCode;

/**
 * Codes worth sending the same request again for, later and unchanged: the network, a busy or
 * restarting router, a backend that failed before answering, a stream cut or stalled.
 */
const RETRYABLE = new Set<string>([
  'network',
  'truncated',
  'first_token_timeout',
  'idle_timeout',
  'rate_limited',
  'device_rate_limited',
  'new_device_rate_limited',
  'device_streams',
  'overloaded',
  'no_backend',
  'upstream_failed',
  'timeout',
]);
const RETRYABLE_STATUS = new Set([502, 503, 504]);

export interface ErrorOptions {
  /** What went wrong underneath (a `fetch` failure, a storage exception): for logs, never shown to users. */
  cause?: unknown;
}

export class LLMRouterError extends Error {
  /** Stable and machine-readable; a router code may be one this SDK version does not list. */
  readonly code: ErrorCode | (string & {});
  /** The HTTP status, when the router answered with one. */
  readonly status: number | undefined;
  /**
   * True when the same request may succeed if sent again later, unchanged (offline, a busy
   * router, a cut stream); false when something must change first (the request, the
   * configuration, the clock, the user's patience). The client itself retries only before a
   * response begins; after that it is the app's call.
   */
  readonly retryable: boolean;
  declare readonly cause?: unknown;

  constructor(code: ErrorCode | (string & {}), message: string, status?: number, options: ErrorOptions = {}) {
    super(message);
    this.name = new.target.name;
    this.code = code;
    this.status = status;
    this.retryable = RETRYABLE.has(code) || (code === 'http_error' && RETRYABLE_STATUS.has(status ?? 0));
    // Set by hand: ES2022's Error(message, { cause }) is not in every engine an app runs on.
    if (options.cause !== undefined) Object.defineProperty(this, 'cause', { value: options.cause, writable: true, configurable: true });
  }
}

/** Options given to the client are unusable (missing pin, bad key, ...). */
export class ConfigurationError extends LLMRouterError {
  constructor(message: string) {
    super('configuration', message);
  }
}

/**
 * The request cannot be sent: `field` names the offending field (`model_required`: protocol v2,
 * the request names no model and the router's key document names no default).
 */
export class InvalidRequestError extends LLMRouterError {
  constructor(
    code: 'invalid_request' | 'unsupported_field' | 'model_required',
    message: string,
    readonly field: string,
  ) {
    super(code, message);
  }
}

/** The router could not be reached, or the connection broke before the response began. */
export class NetworkError extends LLMRouterError {
  constructor(message = 'cannot reach the router', options: ErrorOptions = {}) {
    super('network', message, undefined, options);
  }
}

/**
 * The stream stalled: no verified event within `firstTokenTimeoutMs` of sending
 * (`first_token_timeout`), or no bytes at all, not even keep-alives, for `idleTimeoutMs`
 * (`idle_timeout`, typically a connection lost when the phone changed networks).
 */
export class TimeoutError extends LLMRouterError {
  constructor(code: 'first_token_timeout' | 'idle_timeout') {
    super(code, code === 'idle_timeout' ? 'the stream went silent (idle timeout)' : 'no answer began in time (first-token timeout)');
  }
}

/** The app's storage failed (a Keychain item that biometrics no longer open, a full disk): see `cause`. */
export class StorageError extends LLMRouterError {
  constructor(message: string, options: ErrorOptions = {}) {
    super('storage', message, undefined, options);
  }
}

/** The caller's `AbortSignal` fired; `name` is `AbortError` as for `fetch`. */
export class AbortedError extends LLMRouterError {
  constructor() {
    super('aborted', 'the request was aborted');
    this.name = 'AbortError';
  }
}

/** Sealing the request failed (for example a key of the wrong size). */
export class EncryptionError extends LLMRouterError {
  constructor(message = 'the request could not be encrypted') {
    super('encryption_failed', message);
  }
}

/** A response chunk failed authentication, or the stream is malformed: nothing of it is trusted. */
export class DecryptionError extends LLMRouterError {
  constructor(code: 'decryption_failed' | 'bad_stream' | 'truncated', message: string, options: ErrorOptions = {}) {
    super(code, message, undefined, options);
  }
}

/** The stream ended without its verified final chunk: the answer is incomplete, never silently. */
export class TruncatedStreamError extends DecryptionError {
  constructor(options: ErrorOptions = {}) {
    super('truncated', 'the stream ended without a verified final chunk (truncated)', options);
  }
}

/** The key document is malformed, not signed by the pinned key, too old, or inconsistent. */
export class KeyDocumentError extends LLMRouterError {
  constructor(code: 'bad_key_document' | 'pin_mismatch' | 'stale_key_document', message: string) {
    super(code, message);
  }
}

/** The router refused the key the request was sealed to even after refetching its keys once. */
export class KeyRotationError extends LLMRouterError {
  constructor(message = 'the router refused the current key after a refetch', status?: number) {
    super('key_unknown', message, status);
  }
}

/** Too many requests; `retryAfter` (seconds) says when to try again, when the router said. */
export class RateLimitedError extends LLMRouterError {
  constructor(
    code: string,
    message: string,
    status: number | undefined,
    readonly retryAfter: number | undefined,
  ) {
    super(code, message, status);
  }
}

/** What the router says of a backend's own refusal (`upstream_refused`): never its message. */
export interface UpstreamRefusal {
  /** The backend's HTTP status. */
  status: number;
  /** The backend's error code, when it gave one. */
  code?: string;
  /** The request parameter the backend named, when it gave one. */
  param?: string;
}

/**
 * Any other refusal (`replay`, `stale`, `overloaded`, `model_unknown`, `unsupported_field`,
 * `upstream_refused`, ...), or a stream that ended with the router's sealed error chunk
 * (`upstream_failed`, `timeout`, ...).
 */
export class RouterError extends LLMRouterError {
  constructor(
    code: string,
    message: string,
    status?: number,
    /** For `upstream_refused`: what the backend answered. */
    readonly upstream?: UpstreamRefusal,
    /** For a `pow_required` (protocol v2, sealed): the challenge the next request solves. */
    readonly challenge?: string,
  ) {
    super(code, message, status);
  }
}

const RATE_LIMIT_CODES = new Set(['rate_limited', 'device_rate_limited', 'new_device_rate_limited', 'budget_exhausted', 'device_streams']);

/** The typed error for a router refusal with `code` (HTTP `status`, `Retry-After` seconds). */
export function routerError(code: string, message: string, status?: number, retryAfter?: number, upstream?: UpstreamRefusal, challenge?: string): LLMRouterError {
  if (RATE_LIMIT_CODES.has(code)) return new RateLimitedError(code, message, status, retryAfter);
  if (code === 'key_unknown') return new KeyRotationError(message, status);
  return new RouterError(code, message, status, upstream, challenge);
}
