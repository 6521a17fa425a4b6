/**
 * The one boundary between what the client does on the network and in storage (client.ts,
 * transport.ts, storage.ts) and what it seals: a `WireProtocol` says where the keys are, how a
 * key document is verified, how a request is sealed and how its answer is opened. Protocol v1.1
 * is `V1`, protocol v2 (the blind router) `V2`; retries, timeouts, proof of work and storage are
 * the same for both.
 */

import { ConfigurationError } from './errors.js';
import { type ChatRequest, type ExpectedChunks, expectedChunks, requestPlaintext } from './chat.js';
import { type KeyPair } from './hpke.js';
import { CONTENT_TYPE, sealRequestV2 } from './v2request.js';
import { ResponseOpenerV2 } from './v2response.js';
import { type KeyDocumentV2, stillValidV2, verifyKeyDocumentV2 } from './v2keys.js';
import {
  checkKeyDocumentTimes,
  type FinalItem,
  type KeyDocument,
  ResponseOpener,
  sealRequest,
  type StreamItem,
  verifyKeyDocument,
} from './protocol.js';

/** Opens one answer: raw SSE bytes in, verified items out; `close()` throws if the end never came. */
export interface StreamOpener {
  feed(data: Uint8Array): StreamItem[];
  close(): FinalItem;
}

/** A request ready to POST. */
export interface SealedRequest {
  body: string | ArrayBuffer;
  /** What a proof of work is bound to (docs/protocol.md 2.4). */
  enc: Uint8Array;
  opener(): StreamOpener;
}

export interface SealOptions {
  deviceKey: KeyPair | undefined;
  pad: number;
  /** Protocol v2: how many candidate nodes the content key is wrapped to. */
  k: number;
}

export interface WireProtocol<Document> {
  /** `'1.1'` or `'2'`. */
  readonly version: string;
  readonly keysPath: string;
  readonly chatPath: string;
  readonly contentType: string;
  /**
   * True when the router admits a device only after opening the request, so a `200` is not yet
   * an admission (v2: a new device's proof of work comes sealed, as the stream's only event).
   */
  readonly sealedAdmission: boolean;
  /** Verify a key document body at `now` (Unix seconds) against `pin` (null: trust on first use). */
  verifyKeys(body: string, pin: Uint8Array | null, now: number): Document;
  /**
   * The time rules alone, for a document verified earlier, at `now`: throws when it no longer
   * holds, else returns what of it may be sealed to (v2: without node entries expired since).
   */
  checkKeys(document: Document, now: number): Document;
  /** When it was signed: a fetched document older than the one held never replaces it. */
  issuedAt(document: Document): number;
  /** The key that signed `document` (what trust on first use remembers). */
  signingKey(document: Document): Uint8Array;
  /** Check and seal `request` at `ts`; throws InvalidRequestError before anything is sealed. */
  seal(document: Document, request: ChatRequest, ts: number, options: SealOptions): SealedRequest;
}

/** Protocol v1.1: HPKE to the router's current key (docs/protocol.md). */
export const V1: WireProtocol<KeyDocument> = {
  version: '1.1',
  keysPath: '/api/pubkey',
  chatPath: '/api/chat',
  contentType: 'application/json',
  sealedAdmission: false,
  verifyKeys: verifyKeyDocument,
  checkKeys(document, now) {
    checkKeyDocumentTimes(document, now);
    return document;
  },
  issuedAt: (document) => document.issued_at,
  signingKey: (document) => document.signing_key,
  seal(document, request, ts, options) {
    const expects: ExpectedChunks = expectedChunks(requestPlaintext(request));
    const { envelope, state } = sealRequest(document.current, request, ts, { deviceKey: options.deviceKey, pad: options.pad });
    return { body: JSON.stringify(envelope), enc: state.enc, opener: () => new ResponseOpener(state, expects) };
  },
};

/**
 * Protocol v2, the blind router (docs/protocol.md part II): the key document is trusted through
 * the pinned operator key (never on first use), the request is sealed to k certified nodes and,
 * around them, to the router.
 */
export const V2: WireProtocol<KeyDocumentV2> = {
  version: '2',
  keysPath: '/api/v2/keys',
  chatPath: '/api/v2/chat',
  contentType: CONTENT_TYPE,
  sealedAdmission: true,
  verifyKeys(body, pin, now) {
    if (pin === null) throw new ConfigurationError('protocol v2 needs the operator pin');
    return verifyKeyDocumentV2(body, pin, now);
  },
  checkKeys: stillValidV2,
  issuedAt: (document) => document.issued_at,
  signingKey: (document) => document.signing_key,
  seal(document, request, ts, options) {
    const { body, state, expects } = sealRequestV2(document, request, ts, { deviceKey: options.deviceKey, pad: options.pad, k: options.k });
    const buffer = new ArrayBuffer(body.length);
    new Uint8Array(buffer).set(body);
    return { body: buffer, enc: state.enc, opener: () => new ResponseOpenerV2(state, expects) };
  },
};
