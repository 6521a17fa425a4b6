/**
 * The SDK in Hermes, React Native's JavaScript engine (the `hermes` command-line VM from
 * hermes-engine-cli): hermes/entry.ts, bundled with esbuild, runs the SDK's HPKE against every
 * RFC 9180 A.2 base and auth vector, recomputes and opens the worked example of docs/protocol.md,
 * verifies a signed key document and seals requests with fresh keys, and does protocol v2's worked
 * example (section 16: the operator-pinned document, the request byte for byte, both answers);
 * its results must equal the
 * published vectors and what the same SDK computes here under Node. This is the engine, not a
 * whole app: no device, no Metro, no React Native networking (docs/clients.md says what an app
 * adds).
 */

import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { mkdirSync, writeFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';
import { describe, it } from 'node:test';
import { fileURLToPath } from 'node:url';

import { ed25519 } from '@noble/curves/ed25519.js';

import * as hpke from '@llmrouter/client/hpke';
import { type PublishedKey, ResponseOpener, sealRequest } from '@llmrouter/client/protocol';

import { DOC, fenced } from './support/docs.js';
import { TS } from './support/v2docs.js';
import { loadVectors } from './support/vectors.js';

const HERE = dirname(fileURLToPath(import.meta.url)); // build/test
const PACKAGE = join(HERE, '..', '..');
const require = createRequire(import.meta.url);
const HERMES = join(dirname(require.resolve('hermes-engine-cli/package.json')), 'linux64-bin', 'hermes');
const NOW = 1_800_000_000;

const toHex = (data: Uint8Array) => Buffer.from(data).toString('hex');
const b64u = (data: Uint8Array) => Buffer.from(data).toString('base64url');
const range = (from: number, to: number) => Uint8Array.from({ length: to - from }, (_, i) => from + i);

function keyDocument(signer: Uint8Array, current: Uint8Array): string {
  const keys = [
    { kid: '07', pk: b64u(current), status: 'current', not_before: NOW - 3600, not_after: NOW + 86400 },
    { kid: '08', pk: b64u(hpke.generateKeyPair().pk), status: 'next', not_before: NOW + 82800, not_after: NOW + 172800 },
  ];
  const payload = new TextEncoder().encode(JSON.stringify({ v: 1, suite: { kem: 32, kdf: 1, aead: 3 }, issued_at: NOW - 60, keys }));
  return JSON.stringify({ payload: b64u(payload), signature: b64u(ed25519.sign(payload, signer)), signing_key: b64u(ed25519.getPublicKey(signer)) });
}

async function runInHermes(input: unknown): Promise<Record<string, any>> {
  const { build } = await import('esbuild');
  const out = join(PACKAGE, 'build', 'hermes');
  mkdirSync(out, { recursive: true });
  const bundle = join(out, 'bundle.js');
  await build({
    entryPoints: [join(HERE, 'hermes', 'entry.js')],
    bundle: true,
    format: 'iife',
    platform: 'neutral',
    target: 'es2017', // Hermes 0.12: no optional chaining or nullish coalescing of its own
    banner: { js: `var HERMES_INPUT = ${JSON.stringify(input)};` },
    alias: { '@llmrouter/client': join(PACKAGE, 'dist') },
    mainFields: ['module', 'main'],
    outfile: bundle,
    logLevel: 'error',
  });
  // then what Metro does to every React Native app's code: Babel with React Native's preset
  // (Hermes has no classes of its own, for one)
  const babel = await import('@babel/core');
  const transformed = babel.transformFileSync(bundle, {
    babelrc: false,
    configFile: false,
    compact: false,
    sourceType: 'script',
    presets: [[require.resolve('@react-native/babel-preset'), { enableBabelRuntime: false }]], // helpers inline, as in one file
  });
  assert.ok(transformed?.code, 'Babel returned no code');
  const app = join(out, 'app.js');
  writeFileSync(app, transformed.code);
  const output = execFileSync(HERMES, [app], { encoding: 'utf8', timeout: 120000 });
  const line = output.split('\n').find((l) => l.startsWith('HERMES_')) ?? '';
  assert.ok(line.startsWith('HERMES_RESULT '), `Hermes printed:\n${output}`);
  return JSON.parse(line.slice('HERMES_RESULT '.length)) as Record<string, any>;
}

describe('in Hermes (React Native\'s engine)', { skip: process.platform !== 'linux' || process.arch !== 'x64' ? 'the hermes CLI here is for linux-x64' : false }, () => {
  const vectors = loadVectors();
  const signer = range(100, 132);
  const router = hpke.generateKeyPair();
  const stream = fenced('7.1', 'event: init');
  let result: Record<string, any>;

  it('runs the SDK (HPKE, protocol, Ed25519) and prints its results', async () => {
    result = await runInHermes({
      vectors: { base: vectors.base, auth: vectors.auth },
      stream,
      keyDocument: keyDocument(signer, router.pk),
      pin: Array.from(ed25519.getPublicKey(signer)),
      otherPin: Array.from(ed25519.getPublicKey(range(1, 33))),
      now: NOW,
      v2: {
        keyDocument: fenced('16.1', '{\n  "payload"'),
        pin: Array.from(ed25519.getPublicKey(range(0x60, 0x80))),
        now: TS,
        stream: fenced('16.3', 'event: init'),
        routerEvent: fenced('16.3', 'event: router'),
      },
    });
  });

  for (const mode of ['base', 'auth'] as const) {
    it(`reproduces every RFC 9180 A.2 ${mode} value`, () => {
      const v = vectors[mode]!;
      const got = result[mode];
      assert.equal(got.skRm, v.setup.skRm);
      assert.equal(got.pkRm, v.setup.pkRm);
      assert.equal(got.enc, v.setup.enc);
      assert.equal(got.encryptions.length, v.encryptions.length);
      v.encryptions.forEach((rec, i) => {
        assert.equal(got.encryptions[i].ct, rec.ct, `encryption ${rec['sequence number']}`);
        assert.equal(got.encryptions[i].pt, rec.pt);
      });
      assert.deepEqual(got.exports, v.exports.map((rec) => rec.exported_value));
    });
  }

  it('seals the worked example of docs/protocol.md byte for byte as Node does, and opens its stream', () => {
    const current: PublishedKey = { kid: '01', pk: hpke.deriveKeyPair(range(0, 32)).pk, status: 'current', not_before: 1767225600, not_after: 1767312000 };
    const request = { messages: [{ role: 'user' as const, content: 'Hello!' }], max_tokens: 16 };
    const here = sealRequest(current, request, 1767225660, { ephemeral: hpke.deriveKeyPair(range(32, 64)), rid: range(0, 16) });
    assert.deepEqual(result.example.envelope, JSON.parse(JSON.stringify(here.envelope)));
    assert.equal(result.example.secret, toHex(here.state.secret));
    const opener = new ResponseOpener(here.state);
    const texts = opener.feed(new TextEncoder().encode(stream)).flatMap((item) => (item.type === 'delta' ? [item.text] : []));
    assert.deepEqual(result.example.texts, texts);
    assert.deepEqual(result.example.texts, ['Hi', ' there']);
    assert.deepEqual(result.example.final, opener.close());
  });

  it('verifies a signed key document against the pin and refuses another signer', () => {
    assert.deepEqual(result.keyDocument, { kid: '07', pk: toHex(router.pk), otherSigner: 'pin_mismatch' });
  });

  it("protocol v2: verifies section 16's document under the operator pin, seals its request byte for byte, opens both answers", () => {
    const v2 = result.v2;
    assert.deepEqual(v2.nodes, ['node-a', 'node-b']);
    assert.equal(Buffer.from(v2.body, 'hex').toString('base64url'), fenced('16.2', 'AQAgAAEAAw').trim());
    assert.equal(v2.routerSecret, /router secret both sides hold: `([0-9a-f]{64})`/.exec(DOC)?.[1]);
    assert.deepEqual(v2.texts, ['Hi', ' there']);
    assert.deepEqual(v2.final, { type: 'done', finish_reason: 'stop', usage: { prompt_tokens: 9, completion_tokens: 2 } });
    assert.deepEqual(v2.refusal, [{ type: 'error', code: 'device_rate_limited', message: 'too many requests from this device', status: 429, retry_after: 30 }]);
    assert.equal(v2.duplicate, 'JsonError');
    assert.equal(v2.freshDiffers, true);
  });

  it('seals each request with a fresh ephemeral key', () => {
    assert.equal(result.fresh.differ, true);
    assert.ok(result.fresh.ctLength > 0);
  });
});

