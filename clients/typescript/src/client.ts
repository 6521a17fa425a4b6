/**
 * `LLMRouterClient`: one router, end to end encrypted.
 *
 * Protocol v2 (the blind router) with an operator pin: it fetches the key document, checks the
 * chain from the pinned operator key down to each node key, and seals each request to k
 * certified inference nodes, around which the router opens only an outer layer. Protocol v1.1
 * with the router's own pin (or the key it trusted on first use): it seals to the router's
 * current key. Either way it solves a proof of work when the router asks for one, and yields
 * verified deltas as the sealed stream arrives. Retries are
 * bounded, jittered, honour `Retry-After`, and happen only before the response begins.
 *
 * What is sealed, and how, is `wire.ts`'s; the network (transport.ts) and the app's storage
 * (storage.ts) are this file's.
 */

import { sha256 } from '@noble/hashes/sha2.js';

import { b64uDecode, b64uEncode, EncodingError, utf8 } from './bytes.js';
import type { ChatRequest } from './chat.js';
import { MODEL_NAME, requestPlaintext } from './chat.js';
import {
  AbortedError,
  ConfigurationError,
  KeyDocumentError,
  KeyRotationError,
  LLMRouterError,
  NetworkError,
  RateLimitedError,
  RouterError,
  StorageError,
  TimeoutError,
  TruncatedStreamError,
  routerError,
  type UpstreamRefusal,
} from './errors.js';
import { generateKeyPair, type KeyPair, N_SK, publicKey } from './hpke.js';
import { challengeDifficulty, HEADER as POW_HEADER, type PowProgress, solve } from './pow.js';
import { DEFAULT_PAD, type ErrorEvent, type KeyDocument, type StreamItem } from './protocol.js';
import { type ChatEvent, type Reply, ReplyBuilder } from './reply.js';
import { type KeyStorage, MemoryStorage } from './storage.js';
import { type Fetch, type FetchInit, type FetchResponse, parseRefusal, RequestControl, responseDate, sleep, wholeBody } from './transport.js';
import { DEFAULT_K, MAX_WRAPS } from './v2request.js';
import { documentModels, type KeyDocumentV2 } from './v2keys.js';
import { type StreamOpener, V1, V2, type WireProtocol } from './wire.js';

export type { ChatEvent } from './reply.js';
export type { Fetch, FetchInit, FetchResponse } from './transport.js';

/**
 * What a request's `model` may be: protocol v2, the models the verified nodes of the key document
 * are certified for (`protocol: '2'`); v1.1, the router's `GET /api/models` (names only, not signed).
 */
export interface ModelList {
  /** `'2'`, `'1.1'` (or later); `'1'` for a router that predates the list: send it v1 fields only. */
  protocol: string;
  /** What a request without `model` gets; null when any backend may answer. */
  default: string | null;
  models: string[];
}

/**
 * What a request is doing while the app waits, for a status line: a proof of work (with its
 * progress), a wait before a retry (a `Retry-After` can be a minute), sealing again after
 * `key_unknown` or `stale`, and whether the answer streams (`streaming: false`: this platform's
 * `fetch` has no response streams, the whole answer arrives at the end).
 */
export type ChatStatus =
  | ({ type: 'proof_of_work' } & PowProgress)
  | { type: 'retrying'; attempt: number; delayMs: number; error: LLMRouterError }
  | { type: 'resealing'; reason: 'key_unknown' | 'stale' | 'pow_required' }
  | { type: 'response'; streaming: boolean };

export interface RequestOptions {
  signal?: AbortSignal | undefined;
  /** Called as the request goes along (in addition to the client's `onStatus`). */
  onStatus?: ((status: ChatStatus) => void) | undefined;
}

/** What `prepare()` is doing: `fraction` goes from 0 to 1 (the proof of work is most of it). */
export interface PrepareProgress {
  step: 'keys' | 'device_key' | 'proof_of_work' | 'done';
  fraction: number;
}

export interface PrepareOptions {
  signal?: AbortSignal | undefined;
  onProgress?: ((progress: PrepareProgress) => void) | undefined;
}

/** The wire protocol: `'2'` (the blind router) or `'1.1'` (the router opens the request). */
export type ProtocolVersion = '2' | '1.1';

export interface ClientOptions {
  /** The router, `https://host` (or `http://127.0.0.1:8080` in development). */
  url: string;
  /**
   * Protocol v2 (the default with it): the operator's Ed25519 public key, base64url, 43
   * characters (`llmrouter-keys operator-pin FILE` prints it). Every node key the client seals
   * to must be certified by it; the router cannot read the conversation.
   */
  operatorPin?: string;
  /** Protocol v1.1: the router's own Ed25519 signing key, base64url (`llmrouter-keys pin` prints it). */
  pin?: string;
  /** Protocol v1.1, instead of `pin`: trust the first signing key seen, keep it in `storage`, refuse any other. */
  trustOnFirstUse?: boolean;
  /**
   * Optional, to say it explicitly: `'2'` needs `operatorPin`, `'1.1'` needs `pin` or
   * `trustOnFirstUse` (the protocol otherwise follows from which one is given).
   */
  protocol?: ProtocolVersion;
  /** Protocol v2: how many candidate nodes each request's content key is wrapped to (default 3, 1 to 16). */
  k?: number;
  /**
   * Auth mode. `'auto'`: a device key made on first use and kept in `storage` (which must
   * persist); `'ephemeral'`: a new device key for each client, never stored (each one pays the
   * router's new-device proof of work); or the 32-byte secret key itself.
   */
  deviceKey?: Uint8Array | 'auto' | 'ephemeral';
  /** The secret store: the device key and a signing key trusted on first use (storage.ts). */
  storage?: KeyStorage;
  /** Public data: the last verified key document, for an offline start (default in memory). */
  cache?: KeyStorage;
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
  /** No verified event this long after sending: `TimeoutError` `first_token_timeout` (default 120 s; 0: none). */
  firstTokenTimeoutMs?: number;
  /** No bytes at all, not even keep-alives (every 15 s), this long: `idle_timeout` (default 45 s; 0: none). */
  idleTimeoutMs?: number;
  /**
   * After `stale`, the router's `Date` header corrects this device's clock for later requests,
   * by at most this much (default 3600 s); a clock further off stays an error the app shows.
   */
  maxClockCorrectionSeconds?: number;
  /** Every request's status (see `ChatStatus`). */
  onStatus?: (status: ChatStatus) => void;
  /** Milliseconds since the epoch (default `Date.now`); for tests. */
  now?: () => number;
}

interface CachedDocument {
  url: string;
  body: string;
  fetched_at: number;
}

/** The request `prepare()` sends to register a new device: one token, cancelled as soon as it is accepted. */
const REGISTRATION: ChatRequest = { messages: [{ role: 'user', content: 'hi' }], max_tokens: 1 };

/** A verified key document of either protocol. */
export type AnyKeyDocument = KeyDocument | KeyDocumentV2;

/** The codes after which a request is sealed again, once each (with a refetched document after `key_unknown`). */
const RESEAL = new Set(['key_unknown', 'stale', 'pow_required']);

export class LLMRouterClient {
  readonly url: string;
  /** The wire protocol this client speaks: `'2'` with an operator pin, else `'1.1'`. */
  readonly protocol: ProtocolVersion;
  private readonly options: ClientOptions;
  private readonly wire: WireProtocol<AnyKeyDocument>;
  private readonly storage: KeyStorage;
  private readonly cache: KeyStorage;
  private readonly prefix: string;
  private readonly pin: Uint8Array | undefined;
  private readonly now: () => number;
  private document: AnyKeyDocument | undefined;
  private fetchedAt = 0;
  private trusted: Uint8Array | null | undefined;
  private device: Promise<KeyPair> | undefined;
  private registered: boolean | undefined;
  private clockOffsetMs = 0;

  constructor(options: ClientOptions) {
    if (typeof options?.url !== 'string' || !/^https?:\/\/[^/]+/.test(options.url)) {
      throw new ConfigurationError('url must be an http(s) URL');
    }
    const trusts = [options.operatorPin !== undefined, options.pin !== undefined, options.trustOnFirstUse === true].filter(Boolean).length;
    if (trusts !== 1) {
      throw new ConfigurationError('give one of operatorPin (protocol v2: the operator key), pin (protocol v1.1: the router signing key) or trustOnFirstUse: true');
    }
    const protocol: ProtocolVersion = options.operatorPin !== undefined ? '2' : '1.1';
    if (options.protocol !== undefined && options.protocol !== protocol) {
      throw new ConfigurationError(
        options.protocol === '2'
          ? 'protocol 2 trusts the operator key only: give operatorPin (llmrouter-keys operator-pin prints it)'
          : "protocol '1.1' trusts the router's own key: give pin or trustOnFirstUse, not operatorPin",
      );
    }
    if (options.protocol !== undefined && options.protocol !== '2' && options.protocol !== '1.1') {
      throw new ConfigurationError("protocol is '2' or '1.1'");
    }
    const k = options.k ?? DEFAULT_K;
    if (!Number.isInteger(k) || k < 1 || k > MAX_WRAPS) throw new ConfigurationError(`k is an integer from 1 to ${MAX_WRAPS}`);
    const persistent = options.storage !== undefined && options.storage.persistent !== false;
    if (options.trustOnFirstUse && !persistent) {
      throw new ConfigurationError('trustOnFirstUse needs a persistent storage to remember the first signing key');
    }
    const pinned = options.operatorPin ?? options.pin;
    if (pinned !== undefined) {
      try {
        this.pin = b64uDecode(pinned, 'pin', 32);
      } catch {
        const name = options.operatorPin !== undefined ? 'operatorPin' : 'pin';
        throw new ConfigurationError(`${name} must be a 32-byte Ed25519 public key in base64url`);
      }
    }
    const device = options.deviceKey;
    if (device !== undefined && device !== 'auto' && device !== 'ephemeral' && !(device instanceof Uint8Array && device.length === N_SK)) {
      throw new ConfigurationError("deviceKey must be 'auto', 'ephemeral' or a 32-byte X25519 secret key");
    }
    if (device === 'auto' && !persistent) {
      // Each launch would be a new device: a new identity to the router and a new proof of work.
      throw new ConfigurationError(
        "deviceKey 'auto' needs a persistent secret storage (secureStoreStorage, keychainStorage); say deviceKey: 'ephemeral' for a new key per client",
      );
    }
    this.url = options.url.replace(/\/+$/, '');
    this.protocol = protocol;
    this.wire = protocol === '2' ? V2 : V1;
    this.options = options;
    this.storage = options.storage ?? new MemoryStorage();
    this.cache = options.cache ?? new MemoryStorage();
    this.prefix = options.storagePrefix ?? 'llmrouter';
    this.now = options.now ?? Date.now;
  }

  /** Unix seconds by this device's clock, corrected after a `stale` (bounded). */
  private seconds(): number {
    return Math.floor((this.now() + this.clockOffsetMs) / 1000);
  }

  private fetch(path: string, init: FetchInit): Promise<FetchResponse> {
    const impl = this.options.fetch ?? (globalThis.fetch as unknown as Fetch | undefined);
    if (impl === undefined) throw new ConfigurationError('no fetch: pass one in the options');
    return impl(this.url + path, init);
  }

  private key(name: string): string {
    return `${this.prefix}.${name}`;
  }

  private async stored(store: KeyStorage, name: string): Promise<string | null> {
    try {
      return (await store.getItem(this.key(name))) ?? null;
    } catch (e) {
      if (e instanceof StorageError) throw e;
      throw new StorageError('the storage could not read an item', { cause: e });
    }
  }

  private async store(store: KeyStorage, name: string, value: string | null): Promise<void> {
    try {
      if (value === null) await store.removeItem(this.key(name));
      else await store.setItem(this.key(name), value);
    } catch (e) {
      if (e instanceof StorageError) throw e;
      throw new StorageError('the storage could not write an item', { cause: e });
    }
  }

  // Keys.

  /**
   * The verified key document: the one in memory or the cache while it is fresh, else fetched.
   * When the router cannot be reached a cached document that still passes every check is used.
   */
  async keys(options: { signal?: AbortSignal | undefined; refresh?: boolean } = {}): Promise<AnyKeyDocument> {
    const now = this.seconds();
    const usable = this.stillValid(this.document ?? (await this.loadDocument(now)), now);
    const refreshAfter = this.options.keyRefreshSeconds ?? 3600;
    if (usable !== undefined && !options.refresh && now - this.fetchedAt < refreshAfter) return usable;
    const control = new RequestControl(options.signal);
    control.arm('first_token_timeout', this.options.firstTokenTimeoutMs ?? 120_000); // a dead connection must not hang the app
    try {
      return await this.fetchKeys(control);
    } catch (e) {
      if (e instanceof NetworkError && usable !== undefined && !options.refresh) return usable;
      throw e;
    } finally {
      control.dispose();
    }
  }

  /**
   * `document` checked again at `now` (the time rules: v2 also drops the node entries expired
   * since), or undefined when it no longer holds and must be fetched again.
   */
  private stillValid(document: AnyKeyDocument | undefined, now: number): AnyKeyDocument | undefined {
    if (document === undefined) return undefined;
    try {
      return this.wire.checkKeys(document, now);
    } catch {
      return undefined;
    }
  }

  private async trustedKey(): Promise<Uint8Array | null> {
    if (this.pin !== undefined) return this.pin;
    if (this.trusted !== undefined) return this.trusted;
    const stored = await this.stored(this.storage, 'signing-key');
    if (!stored) return null;
    try {
      this.trusted = b64uDecode(stored, 'stored signing key', 32);
    } catch {
      throw new ConfigurationError('the stored signing key is not a signing key');
    }
    return this.trusted;
  }

  /** The cache's name for the document: one per protocol (a v1.1 document is no v2 one). */
  private get documentName(): string {
    return this.protocol === '2' ? 'key-document-v2' : 'key-document';
  }

  private async loadDocument(now: number): Promise<AnyKeyDocument | undefined> {
    const stored = await this.stored(this.cache, this.documentName);
    if (!stored) return undefined;
    try {
      const cached = JSON.parse(stored) as CachedDocument;
      const pin = await this.trustedKey();
      if (pin === null || cached.url !== this.url) return undefined;
      this.document = this.wire.verifyKeys(cached.body, pin, now);
      this.fetchedAt = cached.fetched_at;
      return this.document;
    } catch (e) {
      if (e instanceof ConfigurationError || e instanceof StorageError) throw e;
      return undefined; // a stale or damaged cache is simply not used
    }
  }

  private async fetchKeys(control: RequestControl): Promise<AnyKeyDocument> {
    const response = await control.guard(() =>
      this.fetch(this.wire.keysPath, { method: 'GET', headers: { Accept: 'application/json' }, signal: control.signal }),
    );
    const body = await control.guard(() => response.text());
    if (response.status === 404 && this.protocol === '2') {
      // A router from before v2 (a v2 router without its certificate answers 503 v2_unavailable itself).
      throw new RouterError('v2_unavailable', 'the router does not speak protocol v2 (no /api/v2/keys): it needs an operator certificate', 404);
    }
    if (response.status !== 200) throw refusalError(response.status, body, response);
    const pin = await this.trustedKey();
    let document: AnyKeyDocument;
    try {
      document = this.wire.verifyKeys(body, pin, this.seconds());
    } catch (e) {
      if (e instanceof KeyDocumentError && e.code === 'pin_mismatch' && this.pin === undefined) {
        throw new KeyDocumentError('pin_mismatch', 'key document is not signed by the key trusted on first use');
      }
      if (e instanceof KeyDocumentError && e.code === 'pin_mismatch' && this.protocol === '2' && (await this.isRouterPin(control))) {
        throw new KeyDocumentError('pin_mismatch', "the pin is this router's own signing key (protocol v1.1), not the operator's: pin the operator key, or pass it as pin for v1.1");
      }
      throw e;
    }
    if (pin === null) {
      const signingKey = this.wire.signingKey(document);
      await this.store(this.storage, 'signing-key', b64uEncode(signingKey));
      this.trusted = signingKey;
    }
    this.fetchedAt = this.seconds();
    // An older document than the one held (and still valid) is what a replay looks like: kept out.
    const held = this.stillValid(this.document, this.fetchedAt);
    if (held !== undefined && this.wire.issuedAt(document) < this.wire.issuedAt(held)) return held;
    this.document = document;
    const cached: CachedDocument = { url: this.url, body, fetched_at: this.fetchedAt };
    await this.store(this.cache, this.documentName, JSON.stringify(cached));
    return document;
  }

  /** Whether the operator pin given is in fact the router's v1.1 signing key (for a helpful message only). */
  private async isRouterPin(control: RequestControl): Promise<boolean> {
    try {
      const response = await control.guard(() => this.fetch(V1.keysPath, { method: 'GET', headers: { Accept: 'application/json' }, signal: control.signal }));
      const body = await control.guard(() => response.text());
      return response.status === 200 && this.pin !== undefined && V1.verifyKeys(body, this.pin, this.seconds()) !== undefined;
    } catch {
      return false;
    }
  }

  // Device key (auth mode).

  /** The device's X25519 public key in auth mode (what the router rate-limits by), else null. */
  async devicePublicKey(): Promise<Uint8Array | null> {
    const pair = await this.deviceKeyPair();
    return pair === undefined ? null : pair.pk;
  }

  /**
   * Forget the stored device key (and that the router knew it): the next request makes a new one,
   * which pays the new-device proof of work. For a key the platform invalidated (`StorageError`
   * after the user changed their biometrics) or a user who wants a fresh identity.
   */
  async resetDevice(): Promise<void> {
    this.device = undefined;
    this.registered = false;
    await this.store(this.cache, 'registered', null);
    if (this.options.deviceKey === 'auto') await this.store(this.storage, 'device-key', null);
  }

  private deviceKeyPair(): Promise<KeyPair | undefined> {
    const option = this.options.deviceKey;
    if (option === undefined) return Promise.resolve(undefined);
    this.device ??= this.loadDeviceKey(option).catch((e: unknown) => {
      this.device = undefined; // a cancelled biometric prompt can be tried again
      throw e;
    });
    return this.device;
  }

  private async loadDeviceKey(option: Uint8Array | 'auto' | 'ephemeral'): Promise<KeyPair> {
    if (option instanceof Uint8Array) return { sk: option, pk: publicKey(option) };
    if (option === 'ephemeral') return generateKeyPair();
    const stored = await this.stored(this.storage, 'device-key');
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
    await this.store(this.storage, 'device-key', b64uEncode(pair.sk));
    return pair;
  }

  /** A name for "this router knows this device key" that is no identifier (the key stays in the secret store). */
  private registrationMark(pair: KeyPair): string {
    return b64uEncode(sha256(utf8(`llmrouter registered|${this.url}|${b64uEncode(pair.pk)}`)).subarray(0, 16));
  }

  private async isRegistered(pair: KeyPair): Promise<boolean> {
    this.registered ??= (await this.stored(this.cache, 'registered')) === this.registrationMark(pair);
    return this.registered;
  }

  private async markRegistered(): Promise<void> {
    const pair = await this.deviceKeyPair();
    if (pair === undefined || this.registered === true) return;
    this.registered = true;
    if (this.options.deviceKey !== 'ephemeral') await this.store(this.cache, 'registered', this.registrationMark(pair));
  }

  /**
   * Everything a first request needs, done ahead, for app start or an onboarding screen: verify
   * the key document (and cache it), load or make and store the device key (the biometric prompt,
   * if the storage asks for one), and have the router accept the device key (its new-device proof
   * of work, time-sliced so the UI stays responsive; the one request this sends asks for one token
   * and is cancelled as soon as it is accepted). Later calls, and later launches, return at once
   * while the router knows the device. Chats started meanwhile are fine: they do the same work.
   */
  async prepare(options: PrepareOptions = {}): Promise<void> {
    const { signal, onProgress } = options;
    onProgress?.({ step: 'keys', fraction: 0 });
    await this.keys({ signal });
    onProgress?.({ step: 'device_key', fraction: 0.05 });
    const pair = await this.deviceKeyPair();
    if (pair !== undefined && !(await this.isRegistered(pair))) {
      // the chance that the work is done by now: 1 - e^(-hashes/expected), smooth and below 1
      const onStatus = (status: ChatStatus) => {
        if (status.type === 'proof_of_work') onProgress?.({ step: 'proof_of_work', fraction: 0.1 + 0.85 * (1 - Math.exp(-status.hashes / status.expected)) });
      };
      if (this.wire.sealedAdmission) {
        // v2: the router admits a new device once it opened the request (its proof of work comes
        // sealed), so the first verified event is the admission; leaving the loop cancels the rest.
        const document = (await this.keys({ signal })) as KeyDocumentV2;
        const model = document.default_model ?? documentModels(document)[0];
        for await (const _ of this.chat(model === undefined ? REGISTRATION : { ...REGISTRATION, model }, { signal, onStatus })) break;
        onProgress?.({ step: 'done', fraction: 1 });
        return;
      }
      const control = new RequestControl(signal);
      try {
        const { response } = await this.send(REGISTRATION, control, onStatus, new Set());
        await response.body?.getReader().cancel().catch(() => undefined); // accepted: the router stops there
      } finally {
        control.dispose();
      }
    }
    onProgress?.({ step: 'done', fraction: 1 });
  }

  // Chat.

  /**
   * The models the router serves (`GET /api/models`), and whether it speaks protocol v1.1: a v1
   * router has no such list (`protocol: '1'`), and refuses every v1.1 field with `bad_payload`.
   */
  async models(options: { signal?: AbortSignal | undefined } = {}): Promise<ModelList> {
    if (this.protocol === '2') {
      const document = (await this.keys(options)) as KeyDocumentV2;
      return { protocol: '2', default: document.default_model, models: documentModels(document) };
    }
    const control = new RequestControl(options.signal);
    control.arm('first_token_timeout', this.options.firstTokenTimeoutMs ?? 120_000);
    let response: FetchResponse, body: string;
    try {
      response = await control.guard(() => this.fetch('/api/models', { method: 'GET', headers: { Accept: 'application/json' }, signal: control.signal }));
      body = await control.guard(() => response.text());
    } finally {
      control.dispose();
    }
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
  async *chat(request: ChatRequest, options: RequestOptions = {}): AsyncGenerator<ChatEvent, void, undefined> {
    requestPlaintext(request); // a bad request is refused before anything is fetched or sent
    const onStatus = this.statusHook(options.onStatus);
    const control = new RequestControl(options.signal);
    const maxRetries = this.options.maxRetries ?? 2;
    const resealed = new Set<string>();
    let challenge: string | undefined;
    try {
      for (let attempt = 0; ; ) {
        const { response, opener } = await this.send(request, control, onStatus, resealed, challenge);
        challenge = undefined;
        let started = false;
        try {
          for await (const event of this.read(response, opener, control, onStatus)) {
            if (!started && this.wire.sealedAdmission) await this.markRegistered();
            started = true;
            yield event;
          }
          return;
        } catch (e) {
          // A refusal after the router decrypted the request comes sealed, as the stream's only
          // chunk (v2: the router's event, or the node's): sealed again (key_unknown, stale, a new
          // device's proof of work), or retried (overloaded, a device rate limit, ...) as its
          // plain form would be.
          if (started || !(e instanceof RouterError || e instanceof RateLimitedError || e instanceof KeyRotationError)) throw e;
          if (e.code === 'model_unknown') this.fetchedAt = -Infinity; // the document is behind: the next request refetches it
          if (e.code === 'stale') this.correctClock(responseDate(response)); // v2's sealed stale: the 200's Date, as a plain one's
          if (await this.reseal(e, resealed, control, onStatus)) {
            challenge = e instanceof RouterError ? e.challenge : undefined;
            continue;
          }
          const delay = this.retryDelay(e, attempt);
          if (delay === undefined || attempt >= maxRetries) throw e;
          attempt += 1;
          onStatus({ type: 'retrying', attempt, delayMs: Math.round(delay), error: e });
          try {
            await sleep(delay, control.signal);
          } catch {
            throw control.failure();
          }
        }
      }
    } finally {
      control.dispose();
    }
  }

  /**
   * Send one request and return the whole reply: text, reasoning, tool calls assembled from
   * their fragments, logprobs, usage, and the assistant message for the history. `onEvent` sees
   * every event as it arrives (to show the text streaming).
   */
  async complete(request: ChatRequest, options: RequestOptions & { onEvent?: (event: ChatEvent) => void } = {}): Promise<Reply> {
    const builder = new ReplyBuilder();
    for await (const event of this.chat(request, options)) {
      builder.add(event);
      options.onEvent?.(event);
    }
    return builder.reply();
  }

  private statusHook(local: ((status: ChatStatus) => void) | undefined): (status: ChatStatus) => void {
    const global = this.options.onStatus;
    return (status) => {
      global?.(status);
      local?.(status);
    };
  }

  /**
   * Seal again, once per code: after `key_unknown` (the router, or in v2 every candidate node,
   * rotated its keys) with a refetched document; after `stale` (a router that just restarted
   * refuses earlier timestamps, or this clock is off and was corrected by the router's Date) with
   * a fresh timestamp; after v2's sealed `pow_required` (a new device), solving the challenge for
   * the new request. A second time the same refusal is final.
   */
  private async reseal(failure: LLMRouterError, resealed: Set<string>, control: RequestControl, onStatus: (status: ChatStatus) => void): Promise<boolean> {
    const code = failure.code;
    if (!RESEAL.has(code) || resealed.has(code)) return false;
    if (code === 'pow_required' && !(failure instanceof RouterError && failure.challenge !== undefined)) return false;
    resealed.add(code);
    onStatus({ type: 'resealing', reason: code as 'key_unknown' | 'stale' | 'pow_required' });
    if (code === 'key_unknown') await this.keys({ signal: control.signal, refresh: true });
    return true;
  }

  private async send(
    request: ChatRequest,
    control: RequestControl,
    onStatus: (status: ChatStatus) => void,
    resealed: Set<string>,
    challenge?: string,
  ): Promise<{ response: FetchResponse; opener: StreamOpener }> {
    const maxRetries = this.options.maxRetries ?? 2;
    for (let attempt = 0; ; ) {
      if (control.aborted) throw control.failure();
      let failure: LLMRouterError;
      try {
        return await this.post(request, control, onStatus, challenge);
      } catch (e) {
        if (!(e instanceof LLMRouterError) || e instanceof AbortedError || e instanceof TimeoutError) throw e;
        failure = e;
      }
      if (await this.reseal(failure, resealed, control, onStatus)) continue;
      const delay = this.retryDelay(failure, attempt);
      if (delay === undefined || attempt >= maxRetries) throw failure;
      attempt += 1;
      onStatus({ type: 'retrying', attempt, delayMs: Math.round(delay), error: failure });
      try {
        await sleep(delay, control.signal);
      } catch {
        throw control.failure();
      }
    }
  }

  /** How long to wait before retrying after `failure`, or undefined when it is not retried. */
  private retryDelay(failure: LLMRouterError, attempt: number): number | undefined {
    if (!failure.retryable) return undefined;
    const retryAfter = failure instanceof RateLimitedError ? failure.retryAfter : undefined;
    if (retryAfter !== undefined) {
      if (retryAfter > (this.options.maxRetryAfterSeconds ?? 60)) return undefined;
      return retryAfter * 1000 + Math.random() * 250;
    }
    const cap = Math.min(this.options.retryMaxDelayMs ?? 8000, (this.options.retryBaseDelayMs ?? 500) * 2 ** attempt);
    return cap / 2 + (Math.random() * cap) / 2;
  }

  /** Learn the clock offset from a `stale` refusal's Date header, within the allowed correction. */
  private correctClock(serverMs: number | undefined): void {
    if (serverMs === undefined) return;
    const offset = serverMs - this.now();
    if (Math.abs(offset) <= (this.options.maxClockCorrectionSeconds ?? 3600) * 1000) this.clockOffsetMs = offset;
  }

  /**
   * One sealed request (and, if the router asks before opening it, once more with a proof of
   * work); `challenge`: a sealed one from the answer before (v2), solved for this request first.
   */
  private async post(
    request: ChatRequest,
    control: RequestControl,
    onStatus: (status: ChatStatus) => void,
    challenge?: string,
  ): Promise<{ response: FetchResponse; opener: StreamOpener }> {
    const document = await this.keys({ signal: control.signal });
    const deviceKey = await this.deviceKeyPair();
    const seal = { deviceKey, pad: this.options.pad ?? DEFAULT_PAD, k: this.options.k ?? DEFAULT_K };
    const sealed = this.wire.seal(document, request, this.seconds(), seal);
    const headers: Record<string, string> = { 'Content-Type': this.wire.contentType, Accept: 'text/event-stream' };
    const solveFor = async (given: string, error: LLMRouterError) => {
      headers[POW_HEADER] = await this.solve(given, sealed.enc, error, control, onStatus);
    };
    if (challenge !== undefined) await solveFor(challenge, new RouterError('pow_invalid', 'the challenge is malformed', 401));
    for (;;) {
      control.arm('first_token_timeout', this.options.firstTokenTimeoutMs ?? 120_000);
      const response = await control.guard(() => this.fetch(this.wire.chatPath, { method: 'POST', headers, body: sealed.body, signal: control.signal }));
      if (response.status === 200) {
        if (!this.wire.sealedAdmission) await this.markRegistered();
        return { response, opener: sealed.opener() };
      }
      control.disarm('first_token_timeout');
      const text = await control.guard(() => response.text());
      const { code, message, retryAfter, challenge, upstream, date } = parseRefusal(response.status, text, response);
      const error = routerError(code, message, response.status, retryAfter, upstream);
      if (code === 'stale') this.correctClock(date);
      if (code !== 'pow_required' || POW_HEADER in headers || challenge === undefined) throw error;
      await solveFor(challenge, error);
    }
  }

  /** The `X-LLMRouter-PoW` value for `challenge` bound to `enc`; `error` when the challenge is malformed. */
  private async solve(challenge: string, enc: Uint8Array, error: LLMRouterError, control: RequestControl, onStatus: (status: ChatStatus) => void): Promise<string> {
    let difficulty: number;
    try {
      difficulty = challengeDifficulty(challenge);
    } catch {
      throw error;
    }
    if (difficulty > (this.options.maxProofOfWorkDifficulty ?? 24)) {
      throw new RouterError('pow_too_hard', 'the proof of work asked for is harder than this client allows', 401);
    }
    return solve(challenge, enc, difficulty, {
      signal: control.signal,
      onProgress: (progress) => onStatus({ type: 'proof_of_work', ...progress }),
    }).catch((e: unknown) => {
      throw e instanceof AbortedError ? control.failure() : e;
    });
  }

  private async *read(
    response: FetchResponse,
    opener: StreamOpener,
    control: RequestControl,
    onStatus: (status: ChatStatus) => void,
  ): AsyncGenerator<ChatEvent, void, undefined> {
    const body = response.body;
    onStatus({ type: 'response', streaming: body !== undefined && body !== null });
    if (body === undefined || body === null) {
      // No streaming body on this platform: the same checks, all at once. Timeouts end here:
      // nothing shows progress until the whole answer is in.
      control.disarm('first_token_timeout');
      const data = await control.guard(() => wholeBody(response));
      yield* deliver(opener.feed(data));
      const final = opener.close();
      if (final.type === 'error') throw chunkError(final);
      return;
    }
    const idle = this.options.idleTimeoutMs ?? 45_000;
    const reader = body.getReader();
    let finished = false;
    try {
      control.arm('idle_timeout', idle);
      for (;;) {
        let chunk: { done: boolean; value?: Uint8Array | undefined };
        try {
          chunk = await reader.read();
        } catch (e) {
          if (control.aborted) throw control.failure();
          throw new TruncatedStreamError({ cause: e }); // the connection broke before the final chunk
        }
        if (chunk.done) break;
        control.arm('idle_timeout', idle);
        for (const event of deliver(opener.feed(chunk.value ?? new Uint8Array(0)))) {
          if (control.aborted) throw control.failure(); // nothing more after an abort
          control.disarm('first_token_timeout');
          if (event.type === 'done') finished = true;
          yield event;
          if (finished) return;
        }
      }
      opener.close(); // throws: the stream ended without its final chunk
    } finally {
      control.disarm('idle_timeout');
      // Closing the body closes the connection; the router then cancels generation.
      if (!finished) await reader.cancel().catch(() => undefined);
    }
  }
}

/** Stream items as chat events; the router's sealed error chunk becomes its typed error. */
function* deliver(items: StreamItem[]): Generator<ChatEvent, void, undefined> {
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
  return routerError(item.code, item.message, item.status, item.retry_after, upstream, item.challenge);
}

function refusalError(status: number, body: string, response: FetchResponse): LLMRouterError {
  const { code, message, retryAfter, upstream } = parseRefusal(status, body, response);
  return routerError(code, message, status, retryAfter, upstream);
}
