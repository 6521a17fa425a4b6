/**
 * HPKE (RFC 9180), one suite: DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, ChaCha20-Poly1305, in the
 * modes protocol v1 uses (base and auth).
 *
 * Only the key schedule is composed here, line by line after RFC 9180 sections 4 to 5.3; every
 * primitive comes from the audited `@noble` libraries (X25519 from `@noble/curves`, HKDF and
 * SHA-256 from `@noble/hashes`, ChaCha20-Poly1305 from `@noble/ciphers`). Nothing here touches
 * `crypto.subtle`, which React Native's engine does not have; the only platform call is
 * `crypto.getRandomValues` for fresh key pairs. Checked against every RFC 9180 A.2 base and auth
 * vector and cross-checked against hpke-js by the tests.
 */

import { chacha20poly1305 } from '@noble/ciphers/chacha.js';
import { equalBytes } from '@noble/ciphers/utils.js';
import { x25519 } from '@noble/curves/ed25519.js';
import { expand, extract } from '@noble/hashes/hkdf.js';
import { sha256 } from '@noble/hashes/sha2.js';

import { concat, i2osp, randomBytes, utf8, xor } from './bytes.js';

export const KEM_ID = 0x0020;
export const KDF_ID = 0x0001;
export const AEAD_ID = 0x0003;
export const N_SECRET = 32;
export const N_ENC = 32;
export const N_PK = 32;
export const N_SK = 32;
export const N_K = 32;
export const N_N = 12;
export const N_H = 32;
export const N_T = 16;

export const Mode = { BASE: 0x00, AUTH: 0x02 } as const;
export type Mode = (typeof Mode)[keyof typeof Mode];

const VERSION_LABEL = utf8('HPKE-v1');
const KEM_SUITE_ID = concat(utf8('KEM'), i2osp(KEM_ID, 2));
const HPKE_SUITE_ID = concat(utf8('HPKE'), i2osp(KEM_ID, 2), i2osp(KDF_ID, 2), i2osp(AEAD_ID, 2));
const EMPTY = new Uint8Array(0);
const ZERO_DH = new Uint8Array(32);

/** Any HPKE failure. Messages are fixed strings and never carry key or message bytes. */
export class HpkeError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'HpkeError';
  }
}

/** The AEAD refused a ciphertext (wrong key, nonce, AAD, or tampered bytes). */
export class OpenError extends HpkeError {}

export interface KeyPair {
  readonly sk: Uint8Array;
  readonly pk: Uint8Array;
}

// HKDF, RFC 5869 and RFC 9180 section 4.

export function hkdfExtract(salt: Uint8Array, ikm: Uint8Array): Uint8Array {
  return extract(sha256, ikm, salt);
}

export function hkdfExpand(prk: Uint8Array, info: Uint8Array, length: number): Uint8Array {
  if (length > 255 * N_H) throw new HpkeError('requested length exceeds 255 * Nh');
  return expand(sha256, prk, info, length);
}

function labeledExtract(suiteId: Uint8Array, salt: Uint8Array, label: string, ikm: Uint8Array): Uint8Array {
  return hkdfExtract(salt, concat(VERSION_LABEL, suiteId, utf8(label), ikm));
}

function labeledExpand(
  suiteId: Uint8Array,
  prk: Uint8Array,
  label: string,
  info: Uint8Array,
  length: number,
): Uint8Array {
  const labeledInfo = concat(i2osp(length, 2), VERSION_LABEL, suiteId, utf8(label), info);
  return hkdfExpand(prk, labeledInfo, length);
}

// The AEAD.

export function aeadSeal(key: Uint8Array, nonce: Uint8Array, aad: Uint8Array, pt: Uint8Array): Uint8Array {
  return chacha20poly1305(key, nonce, aad).encrypt(pt);
}

export function aeadOpen(key: Uint8Array, nonce: Uint8Array, aad: Uint8Array, ct: Uint8Array): Uint8Array {
  try {
    return chacha20poly1305(key, nonce, aad).decrypt(ct);
  } catch {
    throw new OpenError('decryption failed');
  }
}

// DHKEM(X25519, HKDF-SHA256), RFC 9180 sections 4.1 and 7.1.

function checkKey(key: Uint8Array, length: number): Uint8Array {
  if (!(key instanceof Uint8Array) || key.length !== length) {
    throw new HpkeError('key has the wrong length');
  }
  return key;
}

export function publicKey(sk: Uint8Array): Uint8Array {
  return x25519.getPublicKey(checkKey(sk, N_SK));
}

/** A fresh X25519 key pair from `crypto.getRandomValues`. */
export function generateKeyPair(): KeyPair {
  const sk = randomBytes(N_SK);
  return { sk, pk: publicKey(sk) };
}

/** RFC 9180 DeriveKeyPair (section 7.1.3): deterministic, for test vectors and fixed examples. */
export function deriveKeyPair(ikm: Uint8Array): KeyPair {
  if (ikm.length < N_SK) throw new HpkeError('ikm must be at least Nsk bytes');
  const dkpPrk = labeledExtract(KEM_SUITE_ID, EMPTY, 'dkp_prk', ikm);
  const sk = labeledExpand(KEM_SUITE_ID, dkpPrk, 'sk', EMPTY, N_SK);
  return { sk, pk: publicKey(sk) };
}

function dh(sk: Uint8Array, pk: Uint8Array): Uint8Array {
  let out: Uint8Array;
  try {
    out = x25519.getSharedSecret(checkKey(sk, N_SK), checkKey(pk, N_PK));
  } catch (e) {
    if (e instanceof HpkeError) throw e;
    throw new HpkeError('DH output is zero'); // noble refuses the all-zero result itself
  }
  if (equalBytes(out, ZERO_DH)) throw new HpkeError('DH output is zero');
  return out;
}

function extractAndExpand(dhValue: Uint8Array, kemContext: Uint8Array): Uint8Array {
  const eaePrk = labeledExtract(KEM_SUITE_ID, EMPTY, 'eae_prk', dhValue);
  return labeledExpand(KEM_SUITE_ID, eaePrk, 'shared_secret', kemContext, N_SECRET);
}

function encap(pkR: Uint8Array, skS: Uint8Array | undefined, eph: KeyPair): [Uint8Array, Uint8Array] {
  let dhValue = dh(eph.sk, pkR);
  let kemContext = concat(eph.pk, pkR);
  if (skS !== undefined) {
    dhValue = concat(dhValue, dh(skS, pkR));
    kemContext = concat(kemContext, publicKey(skS));
  }
  return [extractAndExpand(dhValue, kemContext), eph.pk];
}

function decap(enc: Uint8Array, skR: Uint8Array, pkS: Uint8Array | undefined): Uint8Array {
  let dhValue = dh(skR, enc);
  let kemContext = concat(enc, publicKey(skR));
  if (pkS !== undefined) {
    dhValue = concat(dhValue, dh(skR, pkS));
    kemContext = concat(kemContext, pkS);
  }
  return extractAndExpand(dhValue, kemContext);
}

// Key schedule and contexts, RFC 9180 section 5.

/** One HPKE context; `seq` counts the messages sealed or opened so far. */
export class Context {
  seq = 0;

  constructor(
    readonly key: Uint8Array,
    readonly baseNonce: Uint8Array,
    readonly exporterSecret: Uint8Array,
  ) {}

  /** The nonce of the next message: base_nonce XOR I2OSP(seq, Nn). */
  nonce(): Uint8Array {
    return xor(this.baseNonce, i2osp(this.seq, N_N));
  }

  protected next(): Uint8Array {
    // RFC 9180 IncrementSeq refuses at 2^96 - 1; a JS number is exact only up to 2^53 - 1.
    if (this.seq >= Number.MAX_SAFE_INTEGER) throw new HpkeError('sequence number overflow');
    return this.nonce();
  }

  export(exporterContext: Uint8Array, length: number): Uint8Array {
    return labeledExpand(HPKE_SUITE_ID, this.exporterSecret, 'sec', exporterContext, length);
  }
}

export class SenderContext extends Context {
  seal(aad: Uint8Array, pt: Uint8Array): Uint8Array {
    const ct = aeadSeal(this.key, this.next(), aad, pt);
    this.seq += 1;
    return ct;
  }
}

export class RecipientContext extends Context {
  open(aad: Uint8Array, ct: Uint8Array): Uint8Array {
    const pt = aeadOpen(this.key, this.next(), aad, ct);
    this.seq += 1;
    return pt;
  }
}

function keySchedule(mode: Mode, sharedSecret: Uint8Array, info: Uint8Array): [Uint8Array, Uint8Array, Uint8Array] {
  // Neither mode uses a PSK: psk and psk_id are empty (RFC 9180 section 5.1, default_psk).
  const pskIdHash = labeledExtract(HPKE_SUITE_ID, EMPTY, 'psk_id_hash', EMPTY);
  const infoHash = labeledExtract(HPKE_SUITE_ID, EMPTY, 'info_hash', info);
  const context = concat(Uint8Array.of(mode), pskIdHash, infoHash);
  const secret = labeledExtract(HPKE_SUITE_ID, sharedSecret, 'secret', EMPTY);
  return [
    labeledExpand(HPKE_SUITE_ID, secret, 'key', context, N_K),
    labeledExpand(HPKE_SUITE_ID, secret, 'base_nonce', context, N_N),
    labeledExpand(HPKE_SUITE_ID, secret, 'exp', context, N_H),
  ];
}

export interface SenderSetup {
  enc: Uint8Array;
  ctx: SenderContext;
}

/** `ephemeral` exists only to reproduce published vectors and fixed examples; leave it unset. */
export interface SetupOptions {
  ephemeral?: KeyPair;
}

function setupS(pkR: Uint8Array, info: Uint8Array, skS: Uint8Array | undefined, options: SetupOptions): SenderSetup {
  checkKey(pkR, N_PK);
  if (skS !== undefined) checkKey(skS, N_SK);
  const [shared, enc] = encap(pkR, skS, options.ephemeral ?? generateKeyPair());
  const mode = skS === undefined ? Mode.BASE : Mode.AUTH;
  return { enc, ctx: new SenderContext(...keySchedule(mode, shared, info)) };
}

function setupR(enc: Uint8Array, skR: Uint8Array, info: Uint8Array, pkS: Uint8Array | undefined): RecipientContext {
  checkKey(enc, N_ENC);
  checkKey(skR, N_SK);
  if (pkS !== undefined) checkKey(pkS, N_PK);
  const mode = pkS === undefined ? Mode.BASE : Mode.AUTH;
  return new RecipientContext(...keySchedule(mode, decap(enc, skR, pkS), info));
}

/** SetupBaseS(pkR, info). */
export function setupBaseS(pkR: Uint8Array, info: Uint8Array, options: SetupOptions = {}): SenderSetup {
  return setupS(pkR, info, undefined, options);
}

/** SetupBaseR(enc, skR, info). */
export function setupBaseR(enc: Uint8Array, skR: Uint8Array, info: Uint8Array): RecipientContext {
  return setupR(enc, skR, info, undefined);
}

/** SetupAuthS(pkR, info, skS): proves to the recipient that the sender holds skS. */
export function setupAuthS(
  pkR: Uint8Array,
  info: Uint8Array,
  skS: Uint8Array,
  options: SetupOptions = {},
): SenderSetup {
  return setupS(pkR, info, skS, options);
}

/** SetupAuthR(enc, skR, info, pkS). */
export function setupAuthR(enc: Uint8Array, skR: Uint8Array, info: Uint8Array, pkS: Uint8Array): RecipientContext {
  return setupR(enc, skR, info, pkS);
}
