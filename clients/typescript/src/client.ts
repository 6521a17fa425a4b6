/**
 * `LLMRouterClient`: one router, end to end encrypted.
 *
 * It fetches the signed key document and checks it against the pinned signing key (or the one it
 * trusted on first use), seals each request with HPKE to the current key, solves a proof of work
 * when the router asks for one, and yields verified deltas as the sealed stream arrives. Retries
 * are bounded, jittered, honour `Retry-After`, and happen only before the response begins.
 */

import { b64uDecode, b64uEncode, EncodingError } from './bytes.js';
import {
  AbortedError,
  ConfigurationError,
  KeyDocumentError,
  LLMRouterError,
  NetworkError,
  RateLimitedError,
  RouterError,
  TruncatedStreamError,
  routerError,
  type UpstreamRefusal,
} from './errors.js';
import { generateKeyPair, type KeyPair, N_SK, publicKey } from './hpke.js';
import { challengeDifficulty, HEADER as POW_HEADER, solve } from './pow.js';
import { type ChatRequest, type ExpectedChunks, expectedChunks, MODEL_NAME, requestPlaintext } from './chat.js';
import {
  checkKeyDocumentTimes,
  DEFAULT_PAD,
  type ErrorEvent,
  type KeyDocument,
  type RequestState,
  ResponseOpener,
  sealRequest,
  verifyKeyDocument,
} from './protocol.js';
import { type ChatEvent, type Reply, ReplyBuilder } from './reply.js';
import { type KeyStorage, MemoryStorage } from './storage.js';

export type { ChatEvent } from './reply.js';

/** `GET /api/models`: what a request's `model` may be (names only, not signed). */
export interface ModelList {
  /** `'1.1'` (or later); `'1'` for a router that predates the list: send it v1 fields only. */
  protocol: string;
  /** What a request without `model` gets; null when any backend may answer. */
  default: string | null;
  models: string[];
}

/** The part of a `fetch` Response the client reads (global `fetch`, `expo/fetch`, ...). */
export interface FetchResponse {
  readonly status: number;
  readonly headers: { get(name: string): string | null };
  /** A stream of the body; where a platform has none the whole body is read at once. */
  readonly body?: ReadableStream<Uint8Array> | null;
  text(): Promise<string>;
  arrayBuffer(): Promise<ArrayBuffer>;
}

export type Fetch = (
  url: string,
  init: { method: string; headers: Record<string, string>; body?: string; signal?: AbortSignal },
) => Promise<FetchResponse>;

export interface ClientOptions {
  /** The router, `https://host` (or `http://127.0.0.1:8080` in development). */
  url: string;
  /** The router's Ed25519 signing key, base64url (`llmrouter-keys init` prints it). */
  pin?: string;
  /** Instead of `pin`: trust the first signing key seen, keep it in `storage`, refuse any other. */
  trustOnFirstUse?: boolean;
  /** Auth mode: `'auto'` makes a device key on first use and keeps it in `storage`; or the secret key. */
  deviceKey?: Uint8Array | 'auto';
  /** Where the device key, a first-use signing key and the last key document live. */
  storage?: KeyStorage;
  /** Prefix of the storage keys (default `llmrouter`), e.g. one per router. */
  storagePrefix?: string;
  /** The `fetch` to use (default the global one; on React Native `fetch` from `expo/fetch` streams). */
  fetch?: Fetch;
  /** Pad the request plaintext to a multiple of this many bytes (default 64). */
  pad?: number;
  /** Attempts after the first, only before a response begins (default 2). */
  maxRetries?: number;
  /** Exponential backoff: first delay and cap, jittered in [cap/2, cap] (default 500 ms and 8 s). */
  retryBaseDelayMs?: number;
  retryMaxDelayMs?: number;
  /** A `Retry-After` longer than this is not waited for: the error goes to the caller (default 60 s). */
  maxRetryAfterSeconds?: number;
  /** The hardest proof of work the client will solve, in leading zero bits (default 24). */
  maxProofOfWorkDifficulty?: number;
  /** Refetch the key document after this long (default 3600 s); a cached one serves offline. */
  keyRefreshSeconds?: number;
  /** Milliseconds since the epoch (default `Date.now`); for tests. */
  now?: () => number;
}

interface CachedDocument {
  url: string;
  body: string;
  fetched_at: number;
}

const RETRYABLE = new Set(['rate_limited', 'device_rate_limited', 'overloaded', 'no_backend', 'upstream_failed', 'timeout']);
const RETRYABLE_STATUS = new Set([502, 503, 504]);

export class LLMRouterClient {
  readonly url: string;
  private readonly options: ClientOptions;
  private readonly storage: KeyStorage;
  private readonly prefix: string;
  private readonly pin: Uint8Array | undefined;
  private readonly now: () => number;
  private document: KeyDocument | undefined;
  private fetchedAt = 0;
  private device: Promise<KeyPair> | undefined;

  constructor(options: ClientOptions) {
    if (typeof options?.url !== 'string' || !/^https?:\/\/[^/]+/.test(options.url)) {
      throw new ConfigurationError('url must be an http(s) URL');
    }
    if ((options.pin === undefined) === !options.trustOnFirstUse) {
      throw new ConfigurationError('give either pin (the router signing key) or trustOnFirstUse: true');
    }
    if (options.trustOnFirstUse && options.storage === undefined) {
      throw new ConfigurationError('trustOnFirstUse needs a storage to remember the first signing key');
    }
    if (options.pin !== undefined) {
      try {
        this.pin = b64uDecode(options.pin, 'pin', 32);
      } catch {
        throw new ConfigurationError('pin must be a 32-byte Ed25519 public key in base64url');
      }
    }
    const device = options.deviceKey;
    if (device !== undefined && device !== 'auto' && !(device instanceof Uint8Array && device.length === N_SK)) {
      throw new ConfigurationError("deviceKey must be 'auto' or a 32-byte X25519 secret key");
    }
    this.url = options.url.replace(/\/+$/, '');
    this.options = options;
    this.storage = options.storage ?? new MemoryStorage();
    this.prefix = options.storagePrefix ?? 'llmrouter';
    this.now = options.now ?? Date.now;
  }

  private seconds(): number {
    return Math.floor(this.now() / 1000);
  }

  private fetch(path: string, init: Parameters<Fetch>[1]): Promise<FetchResponse> {
    const impl = this.options.fetch ?? (globalThis.fetch as unknown as Fetch | undefined);
    if (impl === undefined) throw new ConfigurationError('no fetch: pass one in the options');
    return impl(this.url + path, init);
  }

  // Keys.

  /**
   * The verified key document: the one in memory or storage while it is fresh, else fetched.
   * When the router cannot be reached a stored document that still passes every check is used.
   */
  async keys(options: { signal?: AbortSignal; refresh?: boolean } = {}): Promise<KeyDocument> {
    const now = this.seconds();
    const cached = this.document ?? (await this.loadDocument(now));
    const usable = cached !== undefined && this.stillValid(cached, now);
    const refreshAfter = this.options.keyRefreshSeconds ?? 3600;
    if (usable && !options.refresh && now - this.fetchedAt < refreshAfter) return cached;
    try {
      return await this.fetchKeys(options.signal);
    } catch (e) {
      if (e instanceof NetworkError && usable && !options.refresh) return cached;
      throw e;
    }
  }

  private stillValid(document: KeyDocument, now: number): boolean {
    try {
      checkKeyDocumentTimes(document, now);
      return true;
    } catch {
      return false;
    }
  }

  private key(name: string): string {
    return `${this.prefix}.${name}`;
  }

  private async trustedKey(): Promise<Uint8Array | null> {
    if (this.pin !== undefined) return this.pin;
    const stored = await this.storage.getItem(this.key('signing-key'));
    if (!stored) return null;
    try {
      return b64uDecode(stored, 'stored signing key', 32);
    } catch {
      throw new ConfigurationError('the stored signing key is not a signing key');
    }
  }

  private async loadDocument(now: number): Promise<KeyDocument | undefined> {
    const stored = await this.storage.getItem(this.key('key-document'));
    if (!stored) return undefined;
    try {
      const cached = JSON.parse(stored) as CachedDocument;
      const pin = await this.trustedKey();
      if (pin === null || cached.url !== this.url) return undefined;
      this.document = verifyKeyDocument(cached.body, pin, now);
      this.fetchedAt = cached.fetched_at;
      return this.document;
    } catch (e) {
      if (e instanceof ConfigurationError) throw e;
      return undefined; // a stale or damaged cache is simply not used
    }
  }

  private async fetchKeys(signal: AbortSignal | undefined): Promise<KeyDocument> {
    const response = await this.guard(signal, () =>
      this.fetch('/api/pubkey', { method: 'GET', headers: { Accept: 'application/json' }, signal }),
    );
    const body = await this.guard(signal, () => response.text());
    if (response.status !== 200) throw refusalError(response.status, body, response);
    const pin = await this.trustedKey();
    let document: KeyDocument;
    try {
      document = verifyKeyDocument(body, pin, this.seconds());
    } catch (e) {
      if (e instanceof KeyDocumentError && e.code === 'pin_mismatch' && this.pin === undefined) {
        throw new KeyDocumentError('pin_mismatch', 'key document is not signed by the key trusted on first use');
      }
      throw e;
    }
    if (pin === null) await this.storage.setItem(this.key('signing-key'), b64uEncode(document.signing_key));
    this.document = document;
    this.fetchedAt = this.seconds();
    const cached: CachedDocument = { url: this.url, body, fetched_at: this.fetchedAt };
    await this.storage.setItem(this.key('key-document'), JSON.stringify(cached));
    return document;
  }

  // Device key (auth mode).

  /** The device's X25519 public key in auth mode (what the router rate-limits by), else null. */
  async devicePublicKey(): Promise<Uint8Array | null> {
    const pair = await this.deviceKeyPair();
    return pair === undefined ? null : pair.pk;
  }

  private deviceKeyPair(): Promise<KeyPair | undefined> {
    const option = this.options.deviceKey;
    if (option === undefined) return Promise.resolve(undefined);
    this.device ??= this.loadDeviceKey(option);
    return this.device;
  }

  private async loadDeviceKey(option: Uint8Array | 'auto'): Promise<KeyPair> {
    if (option instanceof Uint8Array) return { sk: option, pk: publicKey(option) };
    const stored = await this.storage.getItem(this.key('device-key'));
    if (stored) {
      try {
        const sk = b64uDecode(stored, 'device key', N_SK);
        return { sk, pk: publicKey(sk) };
      } catch (e) {
        if (e instanceof EncodingError) throw new ConfigurationError('the stored device key is not a device key');
        throw e;
      }
    }
    const pair = generateKeyPair();
    await this.storage.setItem(this.key('device-key'), b64uEncode(pair.sk));
    return pair;
  }

  // Chat.

  /**
   * The models the router serves (`GET /api/models`), and whether it speaks protocol v1.1: a v1
   * router has no such list (`protocol: '1'`), and refuses every v1.1 field with `bad_payload`.
   */
  async models(options: { signal?: AbortSignal } = {}): Promise<ModelList> {
    const { signal } = options;
    const response = await this.guard(signal, () =>
      this.fetch('/api/models', { method: 'GET', headers: { Accept: 'application/json' }, signal }),
    );
    const body = await this.guard(signal, () => response.text());
    if (response.status !== 200) {
      const error = refusalError(response.status, body, response);
      if (response.status === 404 && error.code === 'not_found') return { protocol: '1', default: null, models: [] };
      throw error;
    }
    const malformed = () => new RouterError('bad_models', 'the model list is malformed');
    let doc: Record<string, unknown>;
    try {
      doc = JSON.parse(body) as Record<string, unknown>;
    } catch {
      throw malformed();
    }
    const name = (value: unknown): value is string => typeof value === 'string' && MODEL_NAME.test(value);
    const entries = doc?.data;
    if (typeof doc?.protocol !== 'string' || !(doc.default === null || name(doc.default)) || !Array.isArray(entries)) throw malformed();
    const models = entries.map((entry: unknown) => (entry as Record<string, unknown> | null)?.id);
    if (!models.every(name)) throw malformed();
    return { protocol: doc.protocol, default: doc.default, models };
  }

  /**
   * Send one request and yield its verified events as they arrive: `delta` (answer text), and
   * for a request that asked for them `reasoning`, `tool_call` fragments and `logprobs`; then a
   * `done` event with the finish reason and usage. Aborting `signal` (or leaving the loop early)
   * closes the connection, and the router stops generating.
   */
  async *chat(request: ChatRequest, options: { signal?: AbortSignal } = {}): AsyncGenerator<ChatEvent, void, undefined> {
    const expects = expectedChunks(requestPlaintext(request)); // a bad request never leaves
    const maxRetries = this.options.maxRetries ?? 2;
    for (let attempt = 0; ; attempt++) {
      const { response, state } = await this.send(request, options.signal);
      let started = false;
      try {
        for await (const event of this.read(response, state, expects, options.signal)) {
          started = true;
          yield event;
        }
        return;
      } catch (e) {
        // A refusal after the router decrypted the request comes sealed, as the stream's only
        // chunk: retried (overloaded, a device rate limit, ...) as its plain form would be.
        if (started || !(e instanceof RouterError || e instanceof RateLimitedError)) throw e;
        const delay = this.retryDelay(e, attempt);
        if (delay === undefined || attempt >= maxRetries) throw e;
        await sleep(delay, options.signal);
      }
    }
  }

  /**
   * Send one request and return the whole reply: text, reasoning, tool calls assembled from
   * their fragments, logprobs, usage, and the assistant message for the history. `onEvent` sees
   * every event as it arrives (to show the text streaming).
   */
  async complete(request: ChatRequest, options: { signal?: AbortSignal; onEvent?: (event: ChatEvent) => void } = {}): Promise<Reply> {
    const builder = new ReplyBuilder();
    for await (const event of this.chat(request, { signal: options.signal })) {
      builder.add(event);
      options.onEvent?.(event);
    }
    return builder.reply();
  }

  private async send(request: ChatRequest, signal: AbortSignal | undefined): Promise<{ response: FetchResponse; state: RequestState }> {
    const maxRetries = this.options.maxRetries ?? 2;
    let resealed = false;
    for (let attempt = 0; ; ) {
      if (signal?.aborted) throw new AbortedError();
      let failure: LLMRouterError;
      try {
        return await this.post(request, signal);
      } catch (e) {
        if (!(e instanceof LLMRouterError) || e instanceof AbortedError) throw e;
        failure = e;
      }
      if ((failure.code === 'key_unknown' || failure.code === 'stale') && !resealed) {
        // Seal again, once: after `key_unknown` (the router rotated its keys) with a refetched
        // document; after `stale` (a router that just restarted refuses earlier timestamps) with
        // a fresh timestamp. A clock that is really wrong gets `stale` again, and that is final.
        resealed = true;
        if (failure.code === 'key_unknown') await this.keys({ signal, refresh: true });
        continue;
      }
      const delay = this.retryDelay(failure, attempt);
      if (delay === undefined || attempt >= maxRetries) throw failure;
      attempt += 1;
      await sleep(delay, signal);
    }
  }

  /** How long to wait before retrying after `failure`, or undefined when it is not retried. */
  private retryDelay(failure: LLMRouterError, attempt: number): number | undefined {
    const retryable =
      failure instanceof NetworkError ||
      RETRYABLE.has(failure.code) ||
      (failure.code === 'http_error' && RETRYABLE_STATUS.has(failure.status ?? 0));
    if (!retryable) return undefined;
    const retryAfter = failure instanceof RateLimitedError ? failure.retryAfter : undefined;
    if (retryAfter !== undefined) {
      if (retryAfter > (this.options.maxRetryAfterSeconds ?? 60)) return undefined;
      return retryAfter * 1000 + Math.random() * 250;
    }
    const cap = Math.min(this.options.retryMaxDelayMs ?? 8000, (this.options.retryBaseDelayMs ?? 500) * 2 ** attempt);
    return cap / 2 + (Math.random() * cap) / 2;
  }

  /** One sealed request (and, if the router asks, once more with a proof of work). */
  private async post(request: ChatRequest, signal: AbortSignal | undefined): Promise<{ response: FetchResponse; state: RequestState }> {
    const document = await this.keys({ signal });
    const deviceKey = await this.deviceKeyPair();
    const { envelope, state } = sealRequest(document.current, request, this.seconds(), {
      deviceKey,
      pad: this.options.pad ?? DEFAULT_PAD,
    });
    const body = JSON.stringify(envelope);
    const headers: Record<string, string> = { 'Content-Type': 'application/json', Accept: 'text/event-stream' };
    for (;;) {
      const response = await this.guard(signal, () => this.fetch('/api/chat', { method: 'POST', headers, body, signal }));
      if (response.status === 200) return { response, state };
      const text = await this.guard(signal, () => response.text());
      const { code, message, retryAfter, challenge, upstream } = refusal(response.status, text, response);
      const error = routerError(code, message, response.status, retryAfter, upstream);
      if (code !== 'pow_required' || POW_HEADER in headers || challenge === undefined) throw error;
      let difficulty: number;
      try {
        difficulty = challengeDifficulty(challenge);
      } catch {
        throw error;
      }
      if (difficulty > (this.options.maxProofOfWorkDifficulty ?? 24)) {
        throw new RouterError('pow_too_hard', 'the proof of work asked for is harder than this client allows', 401);
      }
      headers[POW_HEADER] = await solve(challenge, state.enc, difficulty, signal);
    }
  }

  /** Runs a network step; turns `fetch`'s failures into AbortedError or NetworkError. */
  private async guard<T>(signal: AbortSignal | undefined, step: () => Promise<T>): Promise<T> {
    try {
      return await step();
    } catch (e) {
      if (signal?.aborted) throw new AbortedError();
      if (e instanceof LLMRouterError) throw e;
      throw new NetworkError();
    }
  }

  private async *read(
    response: FetchResponse,
    state: RequestState,
    expects: ExpectedChunks,
    signal: AbortSignal | undefined,
  ): AsyncGenerator<ChatEvent, void, undefined> {
    const opener = new ResponseOpener(state, expects);
    const body = response.body;
    if (body === undefined || body === null) {
      // No streaming body on this platform: the same checks, all at once.
      const data = await this.guard(signal, () => response.arrayBuffer());
      yield* deliver(opener.feed(new Uint8Array(data)));
      const final = opener.close();
      if (final.type === 'error') throw chunkError(final);
      return;
    }
    const reader = body.getReader();
    let finished = false;
    try {
      for (;;) {
        let chunk: ReadableStreamReadResult<Uint8Array>;
        try {
          chunk = await reader.read();
        } catch {
          if (signal?.aborted) throw new AbortedError();
          throw new TruncatedStreamError(); // the connection broke before the final chunk
        }
        if (chunk.done) break;
        for (const event of deliver(opener.feed(chunk.value))) {
          if (signal?.aborted) throw new AbortedError(); // nothing more after an abort
          if (event.type === 'done') finished = true;
          yield event;
          if (finished) return;
        }
      }
      opener.close(); // throws: the stream ended without its final chunk
    } finally {
      // Closing the body closes the connection; the router then cancels generation.
      if (!finished) await reader.cancel().catch(() => undefined);
    }
  }
}

/** Stream items as chat events; the router's sealed error chunk becomes its typed error. */
function* deliver(items: ReturnType<ResponseOpener['feed']>): Generator<ChatEvent, void, undefined> {
  for (const item of items) {
    if (item.type === 'error') throw chunkError(item);
    yield item;
  }
}

/**
 * The sealed final error chunk as the same typed error a plain refusal gives (the router seals
 * every refusal once it has decrypted the request: rate limits, budget, model, backend refusals).
 */
function chunkError(item: ErrorEvent): LLMRouterError {
  let upstream: UpstreamRefusal | undefined;
  if (item.upstream_status !== undefined) {
    upstream = { status: item.upstream_status };
    if (item.upstream_code !== undefined) upstream.code = item.upstream_code;
    if (item.upstream_param !== undefined) upstream.param = item.upstream_param;
  }
  return routerError(item.code, item.message, item.status, item.retry_after, upstream);
}

interface Refusal {
  code: string;
  message: string;
  retryAfter: number | undefined;
  challenge: string | undefined;
  upstream: UpstreamRefusal | undefined;
}

/** The router's JSON refusal `{"error": {"code", "message", ...}}` (or just the status). */
function refusal(status: number, body: string, response: FetchResponse): Refusal {
  const header = response.headers.get('Retry-After')?.trim();
  const retryAfter = header !== undefined && /^\d{1,9}$/.test(header) ? Number(header) : undefined;
  let error: Record<string, unknown> | undefined;
  try {
    const doc = JSON.parse(body) as { error?: unknown };
    if (typeof doc.error === 'object' && doc.error !== null) error = doc.error as Record<string, unknown>;
  } catch {
    error = undefined;
  }
  if (error === undefined || typeof error.code !== 'string' || typeof error.message !== 'string') {
    return { code: 'http_error', message: `the router answered HTTP ${status}`, retryAfter, challenge: undefined, upstream: undefined };
  }
  const challenge = typeof error.challenge === 'string' ? error.challenge : undefined;
  let upstream: UpstreamRefusal | undefined;
  if (Number.isInteger(error.upstream_status)) {
    upstream = { status: error.upstream_status as number };
    if (typeof error.upstream_code === 'string') upstream.code = error.upstream_code;
    if (typeof error.upstream_param === 'string') upstream.param = error.upstream_param;
  }
  return { code: error.code, message: error.message, retryAfter, challenge, upstream };
}

function refusalError(status: number, body: string, response: FetchResponse): LLMRouterError {
  const { code, message, retryAfter, upstream } = refusal(status, body, response);
  return routerError(code, message, status, retryAfter, upstream);
}

function sleep(ms: number, signal: AbortSignal | undefined): Promise<void> {
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
