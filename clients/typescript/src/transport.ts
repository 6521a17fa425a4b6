/**
 * HTTP as a phone sees it: a `fetch` that may or may not stream (React Native's own delivers the
 * whole body at once, `expo/fetch` streams), connections that go silent when the phone changes
 * networks, refusals to parse, waits that a user may cancel. Nothing here knows what is sealed.
 */

import { AbortedError, LLMRouterError, NetworkError, TimeoutError, type UpstreamRefusal } from './errors.js';
import { utf8 } from './bytes.js';

/** A response body stream, as much of WHATWG's `ReadableStream` as the client uses. */
export interface BodyStream {
  getReader(): {
    read(): Promise<{ done: boolean; value?: Uint8Array | undefined }>;
    cancel(reason?: unknown): Promise<void>;
  };
}

/** The part of a `fetch` Response the client reads (global `fetch`, `expo/fetch`, React Native's). */
export interface FetchResponse {
  readonly status: number;
  readonly headers: { get(name: string): string | null };
  /** A stream of the body; where a platform has none the whole body is read at once. */
  readonly body?: BodyStream | null;
  text(): Promise<string>;
}

export interface FetchInit {
  method: string;
  headers: Record<string, string>;
  /**
   * Protocol v1.1's JSON envelope, or protocol v2's binary `message/ohttp-req` body (an
   * `ArrayBuffer`: what every `fetch` and `XMLHttpRequest` sends as it is, in every TypeScript).
   */
  body?: string | ArrayBuffer;
  signal?: AbortSignal;
}

/** Any `fetch`: the global one, `fetch` from `expo/fetch`, a test's. */
export type Fetch = (url: string, init: FetchInit) => Promise<FetchResponse>;

/** The router's JSON refusal `{"error": {"code", "message", ...}}`, or just the status. */
export interface Refusal {
  code: string;
  message: string;
  retryAfter: number | undefined;
  challenge: string | undefined;
  upstream: UpstreamRefusal | undefined;
  /** The `Date` header, in milliseconds since the epoch, when there was a valid one. */
  date: number | undefined;
}

/** The `Date` header, in milliseconds since the epoch, when there is a valid one. */
export function responseDate(response: FetchResponse): number | undefined {
  const header = response.headers.get('Date');
  const parsed = header === null ? NaN : Date.parse(header);
  return Number.isFinite(parsed) ? parsed : undefined;
}

export function parseRefusal(status: number, body: string, response: FetchResponse): Refusal {
  const header = response.headers.get('Retry-After')?.trim();
  const retryAfter = header !== undefined && /^\d{1,9}$/.test(header) ? Number(header) : undefined;
  const date = responseDate(response);
  let error: Record<string, unknown> | undefined;
  try {
    const doc = JSON.parse(body) as { error?: unknown };
    if (typeof doc.error === 'object' && doc.error !== null) error = doc.error as Record<string, unknown>;
  } catch {
    error = undefined;
  }
  if (error === undefined || typeof error.code !== 'string' || typeof error.message !== 'string') {
    return { code: 'http_error', message: `the router answered HTTP ${status}`, retryAfter, challenge: undefined, upstream: undefined, date };
  }
  const challenge = typeof error.challenge === 'string' ? error.challenge : undefined;
  let upstream: UpstreamRefusal | undefined;
  if (Number.isInteger(error.upstream_status)) {
    upstream = { status: error.upstream_status as number };
    if (typeof error.upstream_code === 'string') upstream.code = error.upstream_code;
    if (typeof error.upstream_param === 'string') upstream.param = error.upstream_param;
  }
  return { code: error.code, message: error.message, retryAfter, challenge, upstream, date };
}

/**
 * One request's cancellation: the caller's signal, and the client's own timeouts, both abort the
 * same controller; `failure()` says which one it was, as the error to throw.
 */
export class RequestControl {
  private readonly controller = new AbortController();
  private readonly timers = new Map<string, ReturnType<typeof setTimeout>>();
  private timedOut: TimeoutError | undefined;
  private readonly unlink: () => void;

  constructor(private readonly caller: AbortSignal | undefined) {
    const onAbort = () => this.controller.abort();
    caller?.addEventListener('abort', onAbort, { once: true });
    if (caller?.aborted) this.controller.abort();
    this.unlink = () => caller?.removeEventListener('abort', onAbort);
  }

  /** What to hand to `fetch`. */
  get signal(): AbortSignal {
    return this.controller.signal;
  }

  get aborted(): boolean {
    return this.controller.signal.aborted;
  }

  /** Start (or restart) the timer `code`: when it runs out the request is aborted with that timeout. */
  arm(code: 'first_token_timeout' | 'idle_timeout', ms: number): void {
    if (!(ms > 0)) return;
    this.disarm(code);
    this.timers.set(
      code,
      setTimeout(() => {
        this.timedOut ??= new TimeoutError(code);
        this.controller.abort();
      }, ms),
    );
  }

  disarm(code: 'first_token_timeout' | 'idle_timeout'): void {
    const timer = this.timers.get(code);
    if (timer !== undefined) clearTimeout(timer);
    this.timers.delete(code);
  }

  /** The error for an aborted request: the caller's abort, or the timeout that fired. */
  failure(): LLMRouterError {
    return this.caller?.aborted ? new AbortedError() : (this.timedOut ?? new AbortedError());
  }

  /** Stop every timer and forget the caller's signal. */
  dispose(): void {
    for (const code of [...this.timers.keys()] as ('first_token_timeout' | 'idle_timeout')[]) this.disarm(code);
    this.unlink();
  }

  /** Runs a network step; `fetch`'s own failures become NetworkError (cause kept) or the abort's error. */
  async guard<T>(step: () => Promise<T>): Promise<T> {
    try {
      return await step();
    } catch (e) {
      if (this.aborted) throw this.failure();
      if (e instanceof LLMRouterError) throw e;
      throw new NetworkError('cannot reach the router', { cause: e });
    }
  }
}

/**
 * The whole body of a response without a stream, read with `text()`: React Native's `fetch`
 * before 0.73.1 has an `arrayBuffer()` that throws, and an event stream is ASCII, so nothing is
 * lost (a byte that is not UTF-8 turns into U+FFFD, which fails the stream's checks as it should).
 */
export async function wholeBody(response: FetchResponse): Promise<Uint8Array> {
  return utf8(await response.text());
}

export function sleep(ms: number, signal: AbortSignal | undefined): Promise<void> {
  return new Promise((resolve, reject) => {
    if (signal?.aborted) return reject(new AbortedError());
    const onAbort = () => {
      clearTimeout(timer);
      reject(new AbortedError());
    };
    const timer = setTimeout(() => {
      signal?.removeEventListener('abort', onAbort);
      resolve();
    }, ms);
    signal?.addEventListener('abort', onAbort, { once: true });
  });
}
