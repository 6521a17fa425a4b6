/**
 * Fault injection and observation around the real router: a `fetch` that records what the client
 * sends, one that replays each sealed request, one whose network is down for some paths, and a
 * TCP proxy that cuts a response stream short. None of them stands in for the router.
 */

import { createServer, connect, type Server, type Socket } from 'node:net';

import type { Fetch, FetchResponse } from '@llmrouter/client';

export interface Call {
  method: string;
  path: string;
  headers: Record<string, string>;
  body: string | undefined;
  status?: number;
}

/** Global fetch, recording every call (method, path, headers, body, status). */
export function recorder(inner: Fetch = (url, init) => fetch(url, init)): { fetch: Fetch; calls: Call[]; chats: () => Call[] } {
  const calls: Call[] = [];
  const recorded: Fetch = async (url, init) => {
    // a v2 body is binary: kept as latin1 text, byte for byte, so that it can be searched too
    const body = init.body === undefined || typeof init.body === 'string' ? init.body : Buffer.from(init.body).toString('latin1');
    const call: Call = { method: init.method, path: new URL(url).pathname, headers: { ...init.headers }, body };
    calls.push(call);
    const response = await inner(url, init);
    call.status = response.status;
    return response;
  };
  return { fetch: recorded, calls, chats: () => calls.filter((c) => c.path === '/api/chat' || c.path === '/api/v2/chat') };
}

/** Sends every sealed request twice (a replaying middlebox) and hands back the second answer. */
export const replaying: Fetch = async (url, init) => {
  if (init.method === 'POST') {
    const first = await fetch(url, init);
    await first.arrayBuffer();
  }
  return fetch(url, init);
};

/** Global fetch, keeping the raw body of every answer to `POST /api/chat` (read whole, then handed on). */
export function capturing(): { fetch: Fetch; bodies: string[] } {
  const bodies: string[] = [];
  const captured: Fetch = async (url, init) => {
    const response = await fetch(url, init);
    if (init.method !== 'POST') return response;
    const body = await response.text();
    bodies.push(body);
    return new Response(body, { status: response.status, headers: response.headers });
  };
  return { fetch: captured, bodies };
}

/**
 * A fetch without response streams, as React Native's own: the body arrives all at once, and
 * `arrayBuffer()` throws as it does in React Native before 0.73.1.
 */
export const unstreamed: Fetch = async (url, init) => {
  const response = await fetch(url, init);
  const arrayBuffer = () => Promise.reject(new Error('FileReader.readAsArrayBuffer is not implemented'));
  return { status: response.status, headers: response.headers, body: null, text: () => response.text(), arrayBuffer };
};

/** The network is down for requests whose path starts with `prefix`. */
export function unreachable(prefix: string): Fetch {
  return async (url, init): Promise<FetchResponse> => {
    if (new URL(url).pathname.startsWith(prefix)) throw new TypeError('fetch failed');
    return fetch(url, init);
  };
}

/** Requests whose path starts with `prefix` go out and never get an answer (until aborted). */
export function stalled(prefix: string): Fetch {
  return async (url, init): Promise<FetchResponse> => {
    if (!new URL(url).pathname.startsWith(prefix)) return fetch(url, init);
    return new Promise((_, reject) => init.signal?.addEventListener('abort', () => reject(new DOMException('aborted', 'AbortError'))));
  };
}

/**
 * A TCP proxy to `target` that forwards a response stream up to the end of its `chunks`-th
 * `event: chunk` and then cuts both connections, as a dropped connection would; or, with
 * `stall`, forwards nothing more but keeps both open, as a connection lost without a reset
 * (a phone that changed networks) looks. `chunks` 0 with `stall`: not even the response headers.
 */
export async function cuttingProxy(target: string, chunks: number, stall = false): Promise<{ url: string; close: () => Promise<void> }> {
  const { hostname, port } = new URL(target);
  const sockets = new Set<Socket>();
  const server: Server = createServer((downstream) => {
    const upstream = connect(Number(port), hostname);
    sockets.add(downstream).add(upstream);
    downstream.pipe(upstream);
    let seen = '';
    let stalled = stall && chunks === 0;
    upstream.on('data', (data: Buffer) => {
      if (stalled) return;
      const start = seen.length;
      seen += data.toString('latin1');
      let end = -1;
      let index = 0;
      for (let n = 0; n < chunks; n++) {
        index = seen.indexOf('event: chunk', index);
        if (index < 0) break;
        end = seen.indexOf('\n\n', index);
        index += 1;
        if (n === chunks - 1 && end < 0) index = -1;
      }
      if (index < 0 || end < 0) {
        downstream.write(data);
        return;
      }
      stalled = stall;
      downstream.write(data.subarray(0, Math.max(0, end + 2 - start)), () => {
        if (stall) return;
        downstream.destroy();
        upstream.destroy();
      });
    });
    for (const socket of [upstream, downstream]) {
      socket.on('error', () => undefined);
      socket.on('close', () => {
        sockets.delete(socket);
        upstream.destroy();
        downstream.destroy();
      });
    }
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const address = server.address();
  if (address === null || typeof address === 'string') throw new Error('no address');
  return {
    url: `http://127.0.0.1:${address.port}`,
    close: () =>
      new Promise<void>((resolve) => {
        for (const socket of sockets) socket.destroy();
        server.close(() => resolve());
      }),
  };
}
