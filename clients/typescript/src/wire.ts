/**
 * The one boundary between what the client does on the network and in storage (client.ts,
 * transport.ts, storage.ts) and what it seals: a `WireProtocol` says where the keys are, how a
 * key document is verified, how a request is sealed and how its answer is opened. Protocol v1.1
 * is `V1`; another protocol version plugs in here without touching retries, timeouts, proof of
 * work or storage.
 */

import { type ChatRequest, type ExpectedChunks, expectedChunks, requestPlaintext } from './chat.js';
import { type KeyPair } from './hpke.js';
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
  body: string;
  /** What a proof of work is bound to (docs/protocol.md 2.4). */
  enc: Uint8Array;
  opener(): StreamOpener;
}

export interface SealOptions {
  deviceKey: KeyPair | undefined;
  pad: number;
}

export interface WireProtocol<Document> {
  readonly keysPath: string;
  readonly chatPath: string;
  /** Verify a key document body at `now` (Unix seconds) against `pin` (null: trust on first use). */
  verifyKeys(body: string, pin: Uint8Array | null, now: number): Document;
  /** The time rules alone, for a document verified earlier. */
  checkKeys(document: Document, now: number): void;
  /** The key that signed `document` (what trust on first use remembers). */
  signingKey(document: Document): Uint8Array;
  /** Check and seal `request` at `ts`; throws InvalidRequestError before anything is sealed. */
  seal(document: Document, request: ChatRequest, ts: number, options: SealOptions): SealedRequest;
}

/** Protocol v1.1: HPKE to the router's current key (docs/protocol.md). */
export const V1: WireProtocol<KeyDocument> = {
  keysPath: '/api/pubkey',
  chatPath: '/api/chat',
  verifyKeys: verifyKeyDocument,
  checkKeys: checkKeyDocumentTimes,
  signingKey: (document) => document.signing_key,
  seal(document, request, ts, options) {
    const expects: ExpectedChunks = expectedChunks(requestPlaintext(request));
    const { envelope, state } = sealRequest(document.current, request, ts, { deviceKey: options.deviceKey, pad: options.pad });
    return { body: JSON.stringify(envelope), enc: state.enc, opener: () => new ResponseOpener(state, expects) };
  },
};
