/**
 * What a React Native app adds before the SDK (docs/clients.md, React Native): Hermes has no
 * TextEncoder, TextDecoder or crypto.getRandomValues. These stand-ins are for the Hermes test
 * only: strict UTF-8 both ways, and a random source that is NOT cryptographic (an app uses
 * react-native-get-random-values, backed by the platform's generator).
 */

/* eslint-disable @typescript-eslint/no-explicit-any */
const g = globalThis as any;

class Utf8Encoder {
  readonly encoding = 'utf-8';
  encode(text = ''): Uint8Array {
    const out: number[] = [];
    for (const char of text) {
      const c = char.codePointAt(0)!;
      if (c < 0x80) out.push(c);
      else if (c < 0x800) out.push(0xc0 | (c >> 6), 0x80 | (c & 63));
      else if (c < 0x10000) out.push(0xe0 | (c >> 12), 0x80 | ((c >> 6) & 63), 0x80 | (c & 63));
      else out.push(0xf0 | (c >> 18), 0x80 | ((c >> 12) & 63), 0x80 | ((c >> 6) & 63), 0x80 | (c & 63));
    }
    return Uint8Array.from(out);
  }
}

class Utf8Decoder {
  readonly encoding = 'utf-8';
  decode(data?: Uint8Array): string {
    const bytes = data ?? new Uint8Array(0);
    let out = '';
    for (let i = 0; i < bytes.length; ) {
      const b = bytes[i]!;
      const n = b < 0x80 ? 0 : b >= 0xc2 && b < 0xe0 ? 1 : b >= 0xe0 && b < 0xf0 ? 2 : b >= 0xf0 && b < 0xf5 ? 3 : -1;
      if (n < 0 || i + n >= bytes.length + (n === 0 ? 1 : 0)) throw new TypeError('invalid UTF-8');
      let c = n === 0 ? b : b & (0x3f >> n);
      for (let k = 1; k <= n; k++) {
        const next = bytes[i + k]!;
        if ((next & 0xc0) !== 0x80) throw new TypeError('invalid UTF-8');
        c = (c << 6) | (next & 63);
      }
      if ((n === 2 && (c < 0x800 || (c >= 0xd800 && c < 0xe000))) || (n === 3 && (c < 0x10000 || c > 0x10ffff))) {
        throw new TypeError('invalid UTF-8');
      }
      out += String.fromCodePoint(c);
      i += n + 1;
    }
    return out;
  }
}

g.TextEncoder ??= Utf8Encoder;
g.TextDecoder ??= Utf8Decoder;
let state = 0x9e3779b9;
g.crypto ??= {
  getRandomValues<T extends ArrayBufferView>(array: T): T {
    const bytes = new Uint8Array(array.buffer, array.byteOffset, array.byteLength);
    for (let i = 0; i < bytes.length; i++) {
      state ^= state << 13;
      state ^= state >>> 17;
      state ^= state << 5;
      bytes[i] = state & 255;
    }
    return array;
  },
};

/** Imported by name: the package's `"sideEffects": false` would let a bare import be dropped. */
export const installed = typeof g.TextEncoder === 'function' && typeof g.crypto?.getRandomValues === 'function';
