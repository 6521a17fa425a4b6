/**
 * Proof of work, solved only when the router asks (docs/protocol.md, "Proof of work"): find a
 * decimal nonce such that SHA-256("llmrouter/v1 pow|" || challenge || "|" || enc || "|" || nonce)
 * starts with `difficulty` zero bits.
 *
 * On a phone this is the slowest thing the SDK does (docs/clients.md has Hermes's measured rate),
 * so the loop is time-sliced: it hashes for `sliceMs`, then yields to the event loop, so the UI
 * keeps drawing, taps are handled, `onProgress` can move a bar and an `AbortSignal` can stop it.
 * The hash state after the fixed prefix is computed once and cloned per nonce.
 */

import { sha256 } from '@noble/hashes/sha2.js';

import { b64uDecode, concat, utf8 } from './bytes.js';
import { AbortedError } from './errors.js';

export const HEADER = 'X-LLMRouter-PoW';
/** The router's own ceiling; a client may set a lower one (it costs 2^difficulty hashes). */
export const MAX_DIFFICULTY = 32;
const LABEL = utf8('llmrouter/v1 pow|');
const CHALLENGE_BYTES = 1 + 8 + 1 + 16 + 16; // version, expiry, difficulty, random, MAC
const CLOCK_EVERY = 64; // hashes between looks at the clock (a few ms in Hermes)

/** The difficulty the router wrote into its (MAC-protected) challenge. */
export function challengeDifficulty(challenge: string): number {
  return b64uDecode(challenge, 'challenge', CHALLENGE_BYTES)[9]!;
}

function leadingZeroBits(digest: Uint8Array): number {
  let bits = 0;
  for (const byte of digest) {
    if (byte === 0) {
      bits += 8;
      continue;
    }
    return bits + Math.clz32(byte) - 24;
  }
  return bits;
}

/** How far a proof of work has come; `expected` is 2^difficulty, the mean number of hashes. */
export interface PowProgress {
  difficulty: number;
  hashes: number;
  expected: number;
}

export interface SolveOptions {
  signal?: AbortSignal | undefined;
  /** Called after each slice. */
  onProgress?: ((progress: PowProgress) => void) | undefined;
  /** How long to hash before yielding to the event loop (default 12 ms: a frame stays under 16 ms). */
  sliceMs?: number | undefined;
}

const DIGITS = utf8('0123456789');

/** The ASCII decimal digits of `n` written into `out`; returns their count. */
function writeDecimal(n: number, out: Uint8Array): number {
  let length = 0;
  for (let rest = n; ; rest = Math.floor(rest / 10)) {
    out[length++] = DIGITS[rest % 10]!;
    if (rest < 10) break;
  }
  out.subarray(0, length).reverse();
  return length;
}

/** Returns the header value `<challenge>:<nonce>`. */
export async function solve(challenge: string, enc: Uint8Array, difficulty: number, options: SolveOptions = {}): Promise<string> {
  const { signal, onProgress } = options;
  const sliceMs = options.sliceMs ?? 12;
  const prefix = sha256.create().update(concat(LABEL, utf8(challenge), utf8('|'), enc, utf8('|')));
  const digits = new Uint8Array(20);
  const expected = 2 ** difficulty;
  for (let nonce = 0, sliceEnd = Date.now() + sliceMs; ; nonce++) {
    const length = writeDecimal(nonce, digits);
    if (leadingZeroBits(prefix.clone().update(digits.subarray(0, length)).digest()) >= difficulty) {
      onProgress?.({ difficulty, hashes: nonce + 1, expected });
      return `${challenge}:${nonce}`;
    }
    if (nonce % CLOCK_EVERY === CLOCK_EVERY - 1 && Date.now() >= sliceEnd) {
      onProgress?.({ difficulty, hashes: nonce + 1, expected });
      await new Promise((resolve) => setTimeout(resolve, 0));
      if (signal?.aborted) throw new AbortedError();
      sliceEnd = Date.now() + sliceMs;
    }
  }
}
