/**
 * Byte helpers: UTF-8, strict unpadded base64url (RFC 4648 section 5, canonical encodings only),
 * concatenation, and the platform's random source.
 *
 * Base64 is done here rather than with `atob`/`btoa` because React Native's engine has had neither
 * for most of its life; it is an encoding, not a cryptographic primitive.
 */

const ALPHABET = 'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_';
const LOOKUP: Record<string, number> = {};
for (let i = 0; i < ALPHABET.length; i++) LOOKUP[ALPHABET[i]!] = i;
const B64U = /^[A-Za-z0-9_-]*$/;

/** Thrown by {@link b64uDecode}; the message names our field, never the peer's value. */
export class EncodingError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'EncodingError';
  }
}

export function b64uEncode(data: Uint8Array): string {
  let out = '';
  let i = 0;
  for (; i + 2 < data.length; i += 3) {
    const n = (data[i]! << 16) | (data[i + 1]! << 8) | data[i + 2]!;
    out += ALPHABET[n >> 18]! + ALPHABET[(n >> 12) & 63]! + ALPHABET[(n >> 6) & 63]! + ALPHABET[n & 63]!;
  }
  const rest = data.length - i;
  if (rest === 1) {
    const n = data[i]! << 16;
    out += ALPHABET[n >> 18]! + ALPHABET[(n >> 12) & 63]!;
  } else if (rest === 2) {
    const n = (data[i]! << 16) | (data[i + 1]! << 8);
    out += ALPHABET[n >> 18]! + ALPHABET[(n >> 12) & 63]! + ALPHABET[(n >> 6) & 63]!;
  }
  return out;
}

/** Decode; refuses padding, other alphabets, stray bits and (with `length`) a wrong size. */
export function b64uDecode(text: unknown, field: string, length?: number): Uint8Array {
  if (typeof text !== 'string') throw new EncodingError(`${field} must be a string`);
  if (text.length % 4 === 1 || !B64U.test(text)) {
    throw new EncodingError(`${field} is not unpadded base64url`);
  }
  const out = new Uint8Array(Math.floor((text.length * 3) / 4));
  let bits = 0;
  let acc = 0;
  let j = 0;
  for (let i = 0; i < text.length; i++) {
    acc = (acc << 6) | LOOKUP[text[i]!]!;
    bits += 6;
    if (bits >= 8) {
      bits -= 8;
      out[j++] = (acc >> bits) & 0xff;
    }
    acc &= (1 << bits) - 1;
  }
  if (acc !== 0) throw new EncodingError(`${field} is not canonical base64url`);
  if (length !== undefined && out.length !== length) {
    throw new EncodingError(`${field} must be ${length} bytes`);
  }
  return out;
}

const encoder = new TextEncoder();

export function utf8(text: string): Uint8Array {
  return encoder.encode(text);
}

let decoder: TextDecoder | undefined;

/**
 * Strict UTF-8 decoding: invalid bytes are an error, never U+FFFD. (Expo's TextDecoder on native
 * platforms knows only UTF-8 and may refuse options; it is then used as it is: everything decoded
 * here is either authenticated by the AEAD first or ASCII framing.)
 */
export function fromUtf8(data: Uint8Array): string {
  if (decoder === undefined) {
    try {
      decoder = new TextDecoder('utf-8', { fatal: true, ignoreBOM: true });
    } catch {
      decoder = new TextDecoder();
    }
  }
  return decoder.decode(data);
}

export function concat(...parts: Uint8Array[]): Uint8Array {
  let length = 0;
  for (const part of parts) length += part.length;
  const out = new Uint8Array(length);
  let offset = 0;
  for (const part of parts) {
    out.set(part, offset);
    offset += part.length;
  }
  return out;
}

/** I2OSP (RFC 8017): `value` as a big-endian integer of `length` bytes (value < 2^53). */
export function i2osp(value: number, length: number): Uint8Array {
  const out = new Uint8Array(length);
  let rest = value;
  for (let i = length - 1; i >= 0 && rest > 0; i--) {
    out[i] = rest % 256;
    rest = Math.floor(rest / 256);
  }
  return out;
}

export function xor(a: Uint8Array, b: Uint8Array): Uint8Array {
  const out = new Uint8Array(a.length);
  for (let i = 0; i < a.length; i++) out[i] = a[i]! ^ b[i]!;
  return out;
}

interface RandomSource {
  getRandomValues<T extends ArrayBufferView | null>(array: T): T;
}

/**
 * `length` random bytes from `crypto.getRandomValues`, the only thing the SDK takes from the
 * platform. React Native and Node 18 need a polyfill for it (docs/clients.md).
 */
export function randomBytes(length: number): Uint8Array {
  const source = (globalThis as { crypto?: Partial<RandomSource> }).crypto;
  if (typeof source?.getRandomValues !== 'function') {
    throw new Error(
      'crypto.getRandomValues is missing: add the polyfill for this platform (React Native, Node 18: docs/clients.md)',
    );
  }
  return source.getRandomValues(new Uint8Array(length));
}
