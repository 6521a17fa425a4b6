/**
 * A protocol v2 request, client side (docs/protocol.md section 10): a fresh content key `K`
 * encrypts the chat request; `K` is wrapped to k candidate nodes' HPKE keys (auth mode with the
 * device key, proving it to the node); the model, the device key and its proof, the wraps and
 * the inner ciphertext are sealed to the router in RFC 9458's encapsulated-request format. The
 * router opens only that outer layer; the answer is sealed under a secret derived from `K`.
 */

import { b64uEncode, concat, i2osp, randomBytes, utf8 } from './bytes.js';
import { type ChatRequest, type ExpectedChunks, expectedChunks, MODEL_NAME, requestPlaintext } from './chat.js';
import { EncryptionError, InvalidRequestError, RouterError } from './errors.js';
import * as hpke from './hpke.js';
import { DEFAULT_PAD, pad } from './protocol.js';
import { type KeyDocumentV2, type NodeEntry, nodesFor, VERSION_2 } from './v2keys.js';

export const CONTENT_TYPE = 'message/ohttp-req';
export const OUTER_INFO = utf8('llmrouter/v2 request');
export const DEVICE_INFO = utf8('llmrouter/v2 device');
export const WRAP_INFO = utf8('llmrouter/v2 wrap');
export const CONTENT_SALT = utf8('llmrouter/v2 content');
export const ROUTER_RESPONSE_LABEL = utf8('llmrouter/v2 router response');
export const HEADER_BYTES = 7;
export const DEFAULT_K = 3;
export const MAX_WRAPS = 16;
/** The largest body a router accepts (section 10.4). */
export const MAX_BODY = 256 * 1024;
const KEY_BYTES = 32;
const SECRET_BYTES = 32;

/** Where randomness comes from: the platform's CSPRNG, or fixed values for the worked examples. */
export interface Random {
  bytes(length: number): Uint8Array;
  /** A uniform integer in [0, n). */
  below(n: number): number;
}

/** `crypto.getRandomValues`, with rejection sampling for uniform integers. */
export const SECURE_RANDOM: Random = {
  bytes: randomBytes,
  below(n: number): number {
    if (!Number.isInteger(n) || n < 1 || n > 2 ** 32) throw new RangeError('n is 1 to 2^32');
    const limit = 2 ** 32 - (2 ** 32 % n);
    for (;;) {
      const b = randomBytes(4);
      const value = ((b[0]! << 24) >>> 0) + (b[1]! << 16) + (b[2]! << 8) + b[3]!;
      if (value < limit) return value % n;
    }
  },
};

/** What the client keeps to open the answer (section 10.5). Secret: anyone with it reads that answer. */
export interface ClientStateV2 {
  /** The outer `enc`: what a proof of work is bound to, and the router event's salt. */
  enc: Uint8Array;
  routerSecret: Uint8Array;
  responseSecret: Uint8Array;
}

/** RFC 9458's `hdr`: the router key's id, then the suite. */
export function outerHeader(kid: string): Uint8Array {
  return concat(Uint8Array.of(parseInt(kid, 16)), i2osp(hpke.KEM_ID, 2), i2osp(hpke.KDF_ID, 2), i2osp(hpke.AEAD_ID, 2));
}

/** The AAD of every wrap and of the inner ciphertext: what the router sees and must not change. */
export function binding(ts: number, model: string, devicePk: Uint8Array | undefined): Uint8Array {
  return utf8(`llmrouter/v2|${ts}|${model}|${devicePk === undefined ? '' : b64uEncode(devicePk)}`);
}

/** `[key, nonce, response secret]` of a content key: plain RFC 5869 HKDF-SHA256. */
export function contentKeys(contentKey: Uint8Array): [Uint8Array, Uint8Array, Uint8Array] {
  const prk = hpke.hkdfExtract(CONTENT_SALT, contentKey);
  return [hpke.hkdfExpand(prk, utf8('request key'), hpke.N_K), hpke.hkdfExpand(prk, utf8('request nonce'), hpke.N_N), hpke.hkdfExpand(prk, utf8('response'), SECRET_BYTES)];
}

/** `k` of `nodes` uniformly at random (all if there are k or fewer), in document order. */
function choose(nodes: NodeEntry[], k: number, random: Random): NodeEntry[] {
  if (k >= nodes.length) return nodes;
  const indices = nodes.map((_, i) => i);
  const chosen: number[] = [];
  for (let i = 0; i < k; i++) chosen.push(indices.splice(random.below(indices.length), 1)[0]!); // partial Fisher-Yates
  return chosen.sort((a, b) => a - b).map((i) => nodes[i]!);
}

export interface SealOptionsV2 {
  /** Auth mode with this device key pair; anonymous (base mode) without. */
  deviceKey?: hpke.KeyPair | undefined;
  /** Candidate nodes (default 3, at most 16). */
  k?: number;
  pad?: number;
  /** Only to reproduce the worked examples of docs/protocol.md: leave unset. */
  random?: Random;
}

export interface SealedV2 {
  body: Uint8Array;
  state: ClientStateV2;
  /** The request's model: the one it names, else the document's default. */
  model: string;
  expects: ExpectedChunks;
}

/**
 * The body of `POST /api/v2/chat` for `request` at `ts` (Unix seconds), and what opens its
 * answer. Refused before anything is sealed: a bad request (InvalidRequestError), no model
 * (`model_required`), no verified node for the model (`model_unknown`).
 */
export function sealRequestV2(document: KeyDocumentV2, request: ChatRequest, ts: number, options: SealOptionsV2 = {}): SealedV2 {
  const model = request.model ?? document.default_model;
  if (model === null || model === undefined) {
    throw new InvalidRequestError('model_required', 'the router names no default model: name one (client.models())', 'model');
  }
  const plain = requestPlaintext({ ...request, model }); // checks the request (and the model name)
  const k = options.k ?? DEFAULT_K;
  if (!Number.isInteger(k) || k < 1 || k > MAX_WRAPS) throw new RangeError(`k is 1 to ${MAX_WRAPS}`);
  if (!MODEL_NAME.test(model)) throw new InvalidRequestError('invalid_request', 'model is not a model name', 'model');
  const candidates = nodesFor(document, model);
  if (candidates.length === 0) throw new RouterError('model_unknown', 'no verified node of the key document serves this model', 404);
  const random = options.random ?? SECURE_RANDOM;
  const ephemeral = () => hpke.deriveKeyPair(random.bytes(hpke.N_SK)); // RFC 9180 DeriveKeyPair of fresh bytes
  const device = options.deviceKey;
  const padding = options.pad ?? DEFAULT_PAD;
  try {
    const bound = binding(ts, model, device?.pk);
    const contentKey = random.bytes(KEY_BYTES);
    const [key, nonce, responseSecret] = contentKeys(contentKey);
    const inner = hpke.aeadSeal(key, nonce, bound, pad(utf8(JSON.stringify(plain)), padding));
    const wraps = choose(candidates, k, random).map((node) => {
      const { enc, ctx } =
        device === undefined
          ? hpke.setupBaseS(node.current.pk, WRAP_INFO, { ephemeral: ephemeral() })
          : hpke.setupAuthS(node.current.pk, WRAP_INFO, device.sk, { ephemeral: ephemeral() });
      return { node: node.name, kid: node.current.kid, enc: b64uEncode(enc), key: b64uEncode(ctx.seal(bound, contentKey)) };
    });
    const router = document.current;
    const hdr = outerHeader(router.kid);
    const outer = hpke.setupBaseS(router.pk, concat(OUTER_INFO, Uint8Array.of(0), hdr), { ephemeral: ephemeral() });
    let deviceField: { device?: { pk: string; proof: string } } = {};
    if (device !== undefined) {
      const proof = hpke.setupAuthS(router.pk, DEVICE_INFO, device.sk, { ephemeral: ephemeral() });
      deviceField = { device: { pk: b64uEncode(device.pk), proof: b64uEncode(concat(proof.enc, proof.ctx.seal(outer.enc, new Uint8Array(0)))) } };
    }
    // Fields in the order of docs/protocol.md; device only in auth mode.
    const plaintext = { v: VERSION_2, ts, model, ...deviceField, wraps, ct: b64uEncode(inner) };
    const body = concat(hdr, outer.enc, outer.ctx.seal(new Uint8Array(0), pad(utf8(JSON.stringify(plaintext)), padding)));
    const state = { enc: outer.enc, routerSecret: outer.ctx.export(ROUTER_RESPONSE_LABEL, SECRET_BYTES), responseSecret };
    return { body, state, model, expects: expectedChunks(plain) };
  } catch (e) {
    if (e instanceof hpke.HpkeError) throw new EncryptionError();
    throw e;
  }
}
