/**
 * Runs in Hermes, React Native's JavaScript engine, with neither Node nor a browser around it
 * (test/hermes.test.ts bundles it after `HERMES_INPUT` and compares what it prints with what the
 * same SDK computes under Node and with the published RFC 9180 vectors).
 */

import { installed } from './polyfills.js';

import * as hpke from '@llmrouter/client/hpke';
import { type PublishedKey, ResponseOpener, sealRequest, verifyKeyDocument } from '@llmrouter/client/protocol';
import { parseStrict, ResponseOpenerV2, sealRequestV2, verifyKeyDocumentV2 } from '@llmrouter/client/v2';

interface Vectors {
  setup: Record<string, string>;
  encryptions: Record<string, string>[];
  exports: Record<string, string>[];
}

interface Input {
  vectors: Record<'base' | 'auth', Vectors>;
  stream: string;
  keyDocument: string;
  pin: number[];
  otherPin: number[];
  now: number;
  /** docs/protocol.md section 16: the key document, the operator pin, the answer and a router event. */
  v2: { keyDocument: string; pin: number[]; now: number; stream: string; routerEvent: string };
}

declare const HERMES_INPUT: Input;
declare function print(...args: unknown[]): void;

const fromHex = (value: string | undefined) => Uint8Array.from((value ?? '').match(/../g) ?? [], (b) => parseInt(b, 16));
const toHex = (data: Uint8Array) => Array.from(data, (b) => b.toString(16).padStart(2, '0')).join('');
const range = (from: number, to: number) => Uint8Array.from({ length: to - from }, (_, i) => from + i);

function vectors(mode: 'base' | 'auth', v: Vectors): Record<string, unknown> {
  const s = v.setup;
  const info = fromHex(s.info);
  const ephemeral = hpke.deriveKeyPair(fromHex(s.ikmE));
  const recipient = hpke.deriveKeyPair(fromHex(s.ikmR));
  const sender = mode === 'auth' ? hpke.deriveKeyPair(fromHex(s.ikmS)) : undefined;
  const { enc, ctx } = sender
    ? hpke.setupAuthS(recipient.pk, info, sender.sk, { ephemeral })
    : hpke.setupBaseS(recipient.pk, info, { ephemeral });
  const receiver = sender ? hpke.setupAuthR(enc, recipient.sk, info, sender.pk) : hpke.setupBaseR(enc, recipient.sk, info);
  const encryptions = v.encryptions.map((rec) => {
    ctx.seq = receiver.seq = Number(rec['sequence number']);
    const ct = ctx.seal(fromHex(rec.aad), fromHex(rec.pt));
    return { ct: toHex(ct), pt: toHex(receiver.open(fromHex(rec.aad), ct)) };
  });
  const exports = v.exports.map((rec) => toHex(ctx.export(fromHex(rec.exporter_context), Number(rec.L))));
  return { skRm: toHex(recipient.sk), pkRm: toHex(recipient.pk), enc: toHex(enc), encryptions, exports };
}

/** Section 16 of docs/protocol.md: verify the document, seal the example request, open both answers. */
function v2(input: Input['v2']): Record<string, unknown> {
  const document = verifyKeyDocumentV2(input.keyDocument, Uint8Array.from(input.pin), input.now);
  const given = [range(0x30, 0x50), ...[0xe1, 0xe2, 0xe3, 0xe4].map((b) => new Uint8Array(32).fill(b))];
  const random = { bytes: () => given.shift()!, below: () => 0 };
  const device = hpke.deriveKeyPair(new Uint8Array(32).fill(0xde));
  const request = { messages: [{ role: 'user' as const, content: 'Hello!' }], max_tokens: 16 };
  const sealed = sealRequestV2(document, request, input.now, { deviceKey: device, random });
  const opener = new ResponseOpenerV2(sealed.state, sealed.expects);
  const items = opener.feed(new TextEncoder().encode(input.stream));
  const refusal = new ResponseOpenerV2(sealed.state, sealed.expects).feed(new TextEncoder().encode(input.routerEvent));
  let duplicate = 'accepted';
  try {
    parseStrict('{"a":1,"\\u0061":2}');
  } catch (e) {
    duplicate = (e as Error).name;
  }
  const fresh = sealRequestV2(document, request, input.now, { deviceKey: device });
  return {
    nodes: document.nodes.map((node) => node.name),
    body: toHex(sealed.body),
    routerSecret: toHex(sealed.state.routerSecret),
    texts: items.flatMap((item) => (item.type === 'delta' ? [item.text] : [])),
    final: opener.close(),
    refusal,
    duplicate,
    freshDiffers: toHex(fresh.body) !== toHex(sealed.body),
  };
}

function run(input: Input): Record<string, unknown> {
  if (!installed) throw new Error('the polyfills are not installed');
  // docs/protocol.md 7.1: the worked example's fixed keys and request, then its stream
  const router = hpke.deriveKeyPair(range(0, 32));
  const current: PublishedKey = { kid: '01', pk: router.pk, status: 'current', not_before: 1767225600, not_after: 1767312000 };
  const request = { messages: [{ role: 'user' as const, content: 'Hello!' }], max_tokens: 16 };
  const example = sealRequest(current, request, 1767225660, { ephemeral: hpke.deriveKeyPair(range(32, 64)), rid: range(0, 16) });
  const opener = new ResponseOpener(example.state);
  const items = opener.feed(new TextEncoder().encode(input.stream));
  const texts = items.flatMap((item) => (item.type === 'delta' ? [item.text] : []));

  const document = verifyKeyDocument(input.keyDocument, Uint8Array.from(input.pin), input.now);
  let otherSigner = 'accepted';
  try {
    verifyKeyDocument(input.keyDocument, Uint8Array.from(input.otherPin), input.now);
  } catch (e) {
    otherSigner = (e as { code?: string }).code ?? 'error';
  }
  // two requests to the verified key: fresh ephemeral keys from crypto.getRandomValues
  const first = sealRequest(document.current, { messages: [{ role: 'user', content: 'héllo ✓ 🌍' }] }, input.now, {});
  const second = sealRequest(document.current, { messages: [{ role: 'user', content: 'héllo ✓ 🌍' }] }, input.now, {});
  return {
    base: vectors('base', input.vectors.base),
    auth: vectors('auth', input.vectors.auth),
    example: { envelope: example.envelope, secret: toHex(example.state.secret), texts, final: opener.close() },
    keyDocument: { kid: document.current.kid, pk: toHex(document.current.pk), otherSigner },
    fresh: { differ: first.envelope.enc !== second.envelope.enc, ctLength: first.envelope.ct.length },
    v2: v2(input.v2),
  };
}

try {
  print(`HERMES_RESULT ${JSON.stringify(run(HERMES_INPUT))}`);
} catch (e) {
  print(`HERMES_FAILED ${(e as Error).name}: ${(e as Error).message}\n${(e as Error).stack ?? ''}`);
}
