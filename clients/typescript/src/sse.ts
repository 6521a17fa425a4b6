/**
 * Server-Sent Events parsing (WHATWG HTML, "server-sent events"), incremental and bounded.
 *
 * Bytes arrive in arbitrary pieces; a line longer than `maxLine`, or an event whose data grows
 * past `maxEvent`, is an error rather than a buffer that grows with whatever a peer (or a hostile
 * proxy in between) sends. The work is linear in the bytes fed, however small the pieces: the
 * buffer grows by doubling and the search for a line end resumes where the last one stopped
 * (`scanned` counts the bytes it examined).
 */

import { fromUtf8 } from './bytes.js';

export interface SSEEvent {
  /** `message` when the event has no `event:` line. */
  event: string;
  data: string;
}

export class SSEError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'SSEError';
  }
}

const CR = 0x0d;
const LF = 0x0a;

export class SSEParser {
  private buffer: Uint8Array = new Uint8Array(256);
  private length = 0; // bytes of `buffer` in use
  private scan = 0; // no line end in the buffer before this offset
  /** Bytes examined for line ends, for tests of the work done. */
  scanned = 0;
  private eventName = '';
  private data: string[] = [];
  private dataLength = 0;
  private hasData = false;

  constructor(
    private readonly maxLine = 1 << 20,
    private readonly maxEvent = 1 << 20,
  ) {}

  feed(chunk: Uint8Array): SSEEvent[] {
    this.append(chunk);
    const events: SSEEvent[] = [];
    let start = 0;
    for (;;) {
      const [end, skip] = this.lineEnd(Math.max(start, this.scan));
      if (end < 0) break;
      const event = this.line(this.buffer.subarray(start, end));
      if (event !== undefined) events.push(event);
      start = this.scan = end + skip;
    }
    if (start > 0) {
      this.buffer.copyWithin(0, start, this.length); // only what follows the last line end
      this.length -= start;
      this.scan -= start;
    }
    if (this.length > this.maxLine) throw new SSEError('line too long');
    return events;
  }

  private append(chunk: Uint8Array): void {
    const needed = this.length + chunk.length;
    if (needed > this.buffer.length) {
      const grown = new Uint8Array(Math.max(needed, this.buffer.length * 2));
      grown.set(this.buffer.subarray(0, this.length));
      this.buffer = grown;
    }
    this.buffer.set(chunk, this.length);
    this.length = needed;
  }

  /** Index and length of the next line terminator (CRLF, LF or CR) at or after `from`. */
  private lineEnd(from: number): [number, number] {
    const buffer = this.buffer;
    for (let i = from; i < this.length; i++) {
      this.scanned += 1;
      if (buffer[i] === LF) return [i, 1];
      if (buffer[i] === CR) {
        if (i + 1 === this.length) {
          this.scan = i; // a CR at the end may be half of CRLF
          return [-1, 0];
        }
        return [i, buffer[i + 1] === LF ? 2 : 1];
      }
    }
    this.scan = this.length;
    return [-1, 0];
  }

  private line(raw: Uint8Array): SSEEvent | undefined {
    if (raw.length > this.maxLine) throw new SSEError('line too long');
    let line: string;
    try {
      line = fromUtf8(raw);
    } catch {
      throw new SSEError('stream is not UTF-8');
    }
    if (line === '') return this.dispatch();
    if (line.startsWith(':')) return undefined; // comments: keep-alives
    const colon = line.indexOf(':');
    const name = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? '' : line.slice(colon + 1);
    if (value.startsWith(' ')) value = value.slice(1);
    if (name === 'event') {
      this.eventName = value;
    } else if (name === 'data') {
      this.dataLength += value.length + 1;
      if (this.dataLength > this.maxEvent) throw new SSEError('event too large');
      this.data.push(value);
      this.hasData = true;
    }
    return undefined; // id, retry and unknown fields carry nothing for us
  }

  private dispatch(): SSEEvent | undefined {
    const event = { event: this.eventName || 'message', data: this.data.join('\n') };
    const hasData = this.hasData;
    this.eventName = '';
    this.data = [];
    this.dataLength = 0;
    this.hasData = false;
    return hasData ? event : undefined;
  }
}
