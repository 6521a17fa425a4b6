/**
 * Runs in Hermes, React Native's JavaScript engine, with neither Node nor a browser around it
 * (test/hermes.test.ts bundles it after `HERMES_INPUT` and compares what it prints with what the
 * same SDK computes under Node and with the published RFC 9180 vectors).
 */

import { installed } from './polyfills.js';

import * as hpke from '@llmrouter/client/hpke';
import { type PublishedKey, ResponseOpener, sealRequest, verifyKeyDocument } from '@llmrouter/client/protocol';

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
  };
}

try {
  print(`HERMES_RESULT ${JSON.stringify(run(HERMES_INPUT))}`);
} catch (e) {
  print(`HERMES_FAILED ${(e as Error).name}: ${(e as Error).message}\n${(e as Error).stack ?? ''}`);
}
