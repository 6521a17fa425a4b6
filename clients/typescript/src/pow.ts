/**
 * Proof of work, solved only when the router asks (docs/protocol.md, "Proof of work"): find a
 * decimal nonce such that SHA-256("llmrouter/v1 pow|" || challenge || "|" || enc || "|" || nonce)
 * starts with `difficulty` zero bits. The loop yields to the event loop now and then, so a UI
 * stays responsive and an `AbortSignal` can stop it.
 */

import { sha256 } from '@noble/hashes/sha2.js';

import { b64uDecode, concat, utf8 } from './bytes.js';
import { AbortedError } from './errors.js';

export const HEADER = 'X-LLMRouter-PoW';
/** The router's own ceiling; a client may set a lower one (it costs 2^difficulty hashes). */
export const MAX_DIFFICULTY = 32;
const LABEL = utf8('llmrouter/v1 pow|');
const CHALLENGE_BYTES = 1 + 8 + 1 + 16 + 16; // version, expiry, difficulty, random, MAC
const YIELD_EVERY = 4096;

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

/** Returns the header value `<challenge>:<nonce>`. */
export async function solve(
  challenge: string,
  enc: Uint8Array,
  difficulty: number,
  signal?: AbortSignal,
): Promise<string> {
  const prefix = concat(LABEL, utf8(challenge), utf8('|'), enc, utf8('|'));
  for (let nonce = 0; ; nonce++) {
    if (leadingZeroBits(sha256(concat(prefix, utf8(String(nonce))))) >= difficulty) {
      return `${challenge}:${nonce}`;
    }
    if (nonce % YIELD_EVERY === YIELD_EVERY - 1) {
      await new Promise((resolve) => setTimeout(resolve, 0));
      if (signal?.aborted) throw new AbortedError();
    }
  }
}
