/**
 * A streaming `fetch` over `XMLHttpRequest`, for React Native apps that pin the router's TLS key.
 *
 * Pinning libraries (react-native-ssl-public-key-pinning, TrustKit, OkHttp's CertificatePinner)
 * hook React Native's own networking, the stack under its `fetch` and `XMLHttpRequest`; a native
 * `fetch` with its own stack (`expo/fetch`) is not covered by them. React Native's `fetch` does
 * not stream, but its `XMLHttpRequest` does deliver the body as it arrives (`onprogress`, with
 * `responseText` growing). This `fetch` reads that: the answer streams, over the pinned stack.
 * An event stream is ASCII, so reading it as text loses nothing.
 *
 *     import { xhrFetch } from '@llmrouter/client';
 *     new LLMRouterClient({ url, pin, fetch: xhrFetch() });
 */

import { utf8 } from './bytes.js';
import type { BodyStream, Fetch, FetchInit, FetchResponse } from './transport.js';

/** The part of `XMLHttpRequest` used here (React Native's, a browser's). */
export interface XMLHttpRequestLike {
  readonly readyState: number;
  readonly status: number;
  readonly responseText: string;
  responseType: string;
  onreadystatechange: (() => void) | null;
  onprogress: (() => void) | null;
  onerror: (() => void) | null;
  onabort: (() => void) | null;
  ontimeout: (() => void) | null;
  open(method: string, url: string): void;
  setRequestHeader(name: string, value: string): void;
  getResponseHeader(name: string): string | null;
  /** React Native's and browsers' XMLHttpRequest send an ArrayBuffer's bytes as they are. */
  send(body?: string | ArrayBuffer | null): void;
  abort(): void;
}

const HEADERS_RECEIVED = 2;
const DONE = 4;

/** A `fetch` for the client, over `XMLHttpRequest` (default: the global one), streaming the body. */
export function xhrFetch(create: () => XMLHttpRequestLike = () => new (globalThis as unknown as { XMLHttpRequest: new () => XMLHttpRequestLike }).XMLHttpRequest()): Fetch {
  return (url: string, init: FetchInit): Promise<FetchResponse> =>
    new Promise((resolve, reject) => {
      const xhr = create();
      let seen = 0; // characters of responseText already handed on
      let failed: Error | undefined;
      let finished = false;
      let wake: (() => void) | undefined;
      const chunks: Uint8Array[] = [];
      const notify = () => {
        wake?.();
        wake = undefined;
      };
      const take = () => {
        const text = xhr.responseText ?? '';
        if (text.length > seen) {
          chunks.push(utf8(text.slice(seen)));
          seen = text.length;
        }
      };
      const fail = (message: string) => () => {
        failed = new TypeError(message); // what fetch rejects with
        if (responded) notify();
        else reject(failed);
      };
      let responded = false;
      const body: BodyStream = {
        getReader: () => ({
          read: async () => {
            for (;;) {
              const chunk = chunks.shift();
              if (chunk !== undefined) return { done: false, value: chunk };
              if (failed !== undefined) throw failed;
              if (finished) return { done: true, value: undefined };
              await new Promise<void>((woken) => (wake = woken));
            }
          },
          cancel: async () => {
            finished = true;
            xhr.abort();
            notify();
          },
        }),
      };
      const response: FetchResponse = {
        get status() {
          return xhr.status;
        },
        headers: { get: (name) => xhr.getResponseHeader(name) },
        body,
        text: async () => {
          const reader = body.getReader();
          while (!(await reader.read()).done); // until the whole body is in (or it failed)
          return xhr.responseText;
        },
      };
      xhr.onreadystatechange = () => {
        if (xhr.readyState >= HEADERS_RECEIVED && !responded && xhr.status !== 0) {
          responded = true;
          resolve(response);
        }
        if (xhr.readyState === DONE && failed === undefined) {
          take();
          finished = true;
          notify();
        }
      };
      xhr.onprogress = () => {
        take();
        notify();
      };
      xhr.onerror = fail('Network request failed');
      xhr.ontimeout = fail('Network request timed out');
      xhr.onabort = fail('Aborted');
      init.signal?.addEventListener('abort', () => xhr.abort(), { once: true });
      xhr.open(init.method, url);
      xhr.responseType = 'text';
      for (const [name, value] of Object.entries(init.headers)) xhr.setRequestHeader(name, value);
      xhr.send(init.body ?? null);
    });
}
