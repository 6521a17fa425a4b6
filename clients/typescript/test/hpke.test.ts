/**
 * The SDK's HPKE against every RFC 9180 A.2 base and auth vector (through the calls the SDK
 * itself makes), its failure modes, and a cross-check against hpke-js as an independent
 * implementation (tests only; it needs crypto.subtle, so it is skipped in the run without it).
 */

import assert from 'node:assert/strict';
import { describe, it } from 'node:test';

import * as hpke from '@llmrouter/client/hpke';

import { hex, loadVectors } from './support/vectors.js';

const vectors = loadVectors();
const NO_SUBTLE = process.env.LLMROUTER_NO_SUBTLE === '1';
const utf8 = (text: string) => new TextEncoder().encode(text);

function setups(mode: 'base' | 'auth') {
  const s = vectors[mode]!.setup;
  const info = hex(s.info);
  const ephemeral = hpke.deriveKeyPair(hex(s.ikmE));
  const recipient = hpke.deriveKeyPair(hex(s.ikmR));
  if (mode === 'base') {
    const { enc, ctx } = hpke.setupBaseS(recipient.pk, info, { ephemeral });
    return { s, ephemeral, recipient, enc, sender: ctx, receiver: hpke.setupBaseR(enc, recipient.sk, info) };
  }
  const senderKey = hpke.deriveKeyPair(hex(s.ikmS));
  assert.deepEqual(senderKey.sk, hex(s.skSm));
  assert.deepEqual(senderKey.pk, hex(s.pkSm));
  const { enc, ctx } = hpke.setupAuthS(recipient.pk, info, senderKey.sk, { ephemeral });
  return { s, ephemeral, recipient, enc, sender: ctx, receiver: hpke.setupAuthR(enc, recipient.sk, info, senderKey.pk) };
}

describe('RFC 9180 A.2 vectors', () => {
  it('parses both modes the SDK uses, with every encryption and export', () => {
    for (const mode of ['base', 'auth']) {
      assert.equal(vectors[mode]!.setup.mode, mode === 'base' ? '0' : '2');
      assert.ok(vectors[mode]!.encryptions.length >= 6);
      assert.equal(vectors[mode]!.exports.length, 3);
    }
  });

  for (const mode of ['base', 'auth'] as const) {
    it(`${mode}: keys, key schedule, every encryption and export`, () => {
      const { s, ephemeral, recipient, enc, sender, receiver } = setups(mode);
      assert.deepEqual(ephemeral.sk, hex(s.skEm));
      assert.deepEqual(ephemeral.pk, hex(s.pkEm));
      assert.deepEqual(recipient.sk, hex(s.skRm));
      assert.deepEqual(recipient.pk, hex(s.pkRm));
      assert.deepEqual(enc, hex(s.enc));
      for (const ctx of [sender, receiver]) {
        assert.deepEqual(ctx.key, hex(s.key));
        assert.deepEqual(ctx.baseNonce, hex(s.base_nonce));
        assert.deepEqual(ctx.exporterSecret, hex(s.exporter_secret));
      }
      for (const rec of vectors[mode]!.encryptions) {
        const seq = Number(rec['sequence number']);
        sender.seq = receiver.seq = seq;
        assert.deepEqual(sender.nonce(), hex(rec.nonce));
        const ct = sender.seal(hex(rec.aad), hex(rec.pt));
        assert.deepEqual(ct, hex(rec.ct));
        assert.deepEqual(receiver.open(hex(rec.aad), ct), hex(rec.pt));
        assert.equal(sender.seq, seq + 1);
        assert.equal(receiver.seq, seq + 1);
      }
      for (const rec of vectors[mode]!.exports) {
        const context = hex(rec.exporter_context);
        assert.deepEqual(sender.export(context, Number(rec.L)), hex(rec.exported_value));
        assert.deepEqual(receiver.export(context, Number(rec.L)), hex(rec.exported_value));
      }
    });
  }
});

describe('HPKE misuse', () => {
  const r = hpke.generateKeyPair();
  const s = hpke.generateKeyPair();

  it('generates fresh key pairs from getRandomValues', () => {
    assert.equal(r.sk.length, 32);
    assert.deepEqual(hpke.publicKey(r.sk), r.pk);
    assert.notDeepEqual(hpke.generateKeyPair().sk, r.sk);
  });

  it('refuses tampered ciphertexts, wrong AAD, info or sender', () => {
    const { enc, ctx } = hpke.setupAuthS(r.pk, utf8('info'), s.sk);
    const ct = ctx.seal(utf8('aad'), utf8('hello'));
    assert.equal(ct.length, 5 + hpke.N_T);
    assert.deepEqual(hpke.setupAuthR(enc, r.sk, utf8('info'), s.pk).open(utf8('aad'), ct), utf8('hello'));
    const tampered = ct.slice();
    tampered[0]! ^= 1;
    assert.throws(() => hpke.setupAuthR(enc, r.sk, utf8('info'), s.pk).open(utf8('aad'), tampered), hpke.OpenError);
    assert.throws(() => hpke.setupAuthR(enc, r.sk, utf8('info'), s.pk).open(utf8('other'), ct), hpke.OpenError);
    assert.throws(() => hpke.setupAuthR(enc, r.sk, utf8('other'), s.pk).open(utf8('aad'), ct), hpke.OpenError);
    const other = hpke.generateKeyPair();
    assert.throws(() => hpke.setupAuthR(enc, r.sk, utf8('info'), other.pk).open(utf8('aad'), ct), hpke.OpenError);
    // an auth-mode ciphertext does not open in base mode
    assert.throws(() => hpke.setupBaseR(enc, r.sk, utf8('info')).open(utf8('aad'), ct), hpke.OpenError);
  });

  it('refuses a replayed sequence number', () => {
    const { enc, ctx } = hpke.setupBaseS(r.pk, utf8('info'));
    const first = ctx.seal(utf8(''), utf8('one'));
    const receiver = hpke.setupBaseR(enc, r.sk, utf8('info'));
    receiver.open(utf8(''), first);
    assert.throws(() => receiver.open(utf8(''), first), hpke.OpenError);
  });

  it('refuses small-order points and wrong lengths', () => {
    const zero = new Uint8Array(32);
    assert.throws(() => hpke.setupBaseS(zero, utf8('')), hpke.HpkeError);
    const one = new Uint8Array(32);
    one[0] = 1;
    assert.throws(() => hpke.setupBaseS(one, utf8('')), hpke.HpkeError);
    assert.throws(() => hpke.setupBaseS(new Uint8Array(31), utf8('')), hpke.HpkeError);
    assert.throws(() => hpke.setupBaseR(new Uint8Array(33), r.sk, utf8('')), hpke.HpkeError);
    assert.throws(() => hpke.setupBaseS(r.pk, utf8('')).ctx.export(utf8(''), 255 * 32 + 1), hpke.HpkeError);
  });

  it('runs without crypto.subtle when the suite is run that way', { skip: !NO_SUBTLE && 'this run has crypto.subtle' }, () => {
    assert.equal((globalThis.crypto as { subtle?: unknown }).subtle, undefined);
    const { enc, ctx } = hpke.setupAuthS(r.pk, utf8('info'), s.sk);
    const ct = ctx.seal(utf8('aad'), utf8('no subtle'));
    assert.deepEqual(hpke.setupAuthR(enc, r.sk, utf8('info'), s.pk).open(utf8('aad'), ct), utf8('no subtle'));
  });
});

describe('cross-check against hpke-js', { skip: NO_SUBTLE && 'hpke-js needs crypto.subtle' }, () => {
  async function suite() {
    const { CipherSuite, HkdfSha256 } = await import('@hpke/core');
    const { DhkemX25519HkdfSha256 } = await import('@hpke/dhkem-x25519');
    const { Chacha20Poly1305 } = await import('@hpke/chacha20poly1305');
    return new CipherSuite({ kem: new DhkemX25519HkdfSha256(), kdf: new HkdfSha256(), aead: new Chacha20Poly1305() });
  }
  const buffer = (data: Uint8Array) => data.buffer.slice(data.byteOffset, data.byteOffset + data.byteLength) as ArrayBuffer;

  for (const auth of [false, true]) {
    it(`${auth ? 'auth' : 'base'} mode: ours seals, hpke-js opens; hpke-js seals, ours opens; exports agree`, async () => {
      const theirs = await suite();
      const recipient = hpke.generateKeyPair();
      const sender = hpke.generateKeyPair();
      const info = utf8('llmrouter/v1 request');
      const rKey = await theirs.kem.deserializePrivateKey(buffer(recipient.sk));
      const sPub = await theirs.kem.deserializePublicKey(buffer(sender.pk));
      const ours = auth ? hpke.setupAuthS(recipient.pk, info, sender.sk) : hpke.setupBaseS(recipient.pk, info);
      const ct = ours.ctx.seal(utf8('aad'), utf8('from the SDK'));
      const opener = await theirs.createRecipientContext({
        recipientKey: rKey,
        enc: buffer(ours.enc),
        info: buffer(info),
        ...(auth ? { senderPublicKey: sPub } : {}),
      });
      assert.deepEqual(new Uint8Array(await opener.open(buffer(ct), buffer(utf8('aad')))), utf8('from the SDK'));
      const label = utf8('llmrouter/v1 response');
      assert.deepEqual(new Uint8Array(await opener.export(buffer(label), 32)), ours.ctx.export(label, 32));

      const rPub = await theirs.kem.deserializePublicKey(buffer(recipient.pk));
      const sKey = await theirs.kem.deserializePrivateKey(buffer(sender.sk));
      const sealer = await theirs.createSenderContext({
        recipientPublicKey: rPub,
        info: buffer(info),
        ...(auth ? { senderKey: { privateKey: sKey, publicKey: sPub } } : {}),
      });
      const theirCt = new Uint8Array(await sealer.seal(buffer(utf8('from hpke-js')), buffer(utf8('aad'))));
      const enc = new Uint8Array(sealer.enc);
      const mine = auth ? hpke.setupAuthR(enc, recipient.sk, info, sender.pk) : hpke.setupBaseR(enc, recipient.sk, info);
      assert.deepEqual(mine.open(utf8('aad'), theirCt), utf8('from hpke-js'));
      assert.deepEqual(mine.export(label, 32), new Uint8Array(await sealer.export(buffer(label), 32)));
    });
  }
});
