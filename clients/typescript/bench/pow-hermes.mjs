// The proof of work's cost in Hermes, React Native's engine: the SDK's own solve() (dist/pow.js),
// bundled and passed through React Native's Babel preset as in hermes.test.ts, run in the
// `hermes` VM of hermes-engine-cli for SECONDS against a difficulty it never reaches; its
// hashes per second, and what that makes of each difficulty on average (2^d hashes). Baselines
// in the same run: the loop the SDK had before (a fresh SHA-256 of the whole input per nonce)
// in the same Hermes, and solve() under this Node.
//
//   cd clients/typescript && npm ci && node bench/pow-hermes.mjs [seconds]   (docs/clients.md)
import { execFileSync } from 'node:child_process';
import { mkdtempSync, writeFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const require = createRequire(import.meta.url);
const PACKAGE = join(dirname(fileURLToPath(import.meta.url)), '..');
const HERMES = join(dirname(require.resolve('hermes-engine-cli/package.json')), 'linux64-bin', 'hermes');
const SECONDS = Number(process.argv[2] ?? 10);
const CHALLENGE = 'AQAAAABpQ2eAIAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA'; // difficulty byte 32: never solved

// Runs in Hermes and in Node: `report` prints one JSON line.
const polyfills = (target) => (target === 'hermes' ? `import { installed } from ${JSON.stringify(join(PACKAGE, 'build', 'test', 'hermes', 'polyfills.js'))};\nif (!installed) throw new Error('no polyfills');\n` : '');
const entry = `
import { solve } from ${JSON.stringify(join(PACKAGE, 'dist', 'pow.js'))};
import { sha256 } from '@noble/hashes/sha2.js';
const enc = new Uint8Array(32).fill(7);
const seconds = ${SECONDS};
function before() { // the SDK's loop before this change: concat + a whole SHA-256 per nonce
  const encoder = new TextEncoder();
  const prefix = encoder.encode('llmrouter/v1 pow|${CHALLENGE}|');
  const tail = encoder.encode('|');
  const start = Date.now();
  let n = 0;
  for (; Date.now() - start < seconds * 1000; ) {
    for (let i = 0; i < 256; i++, n++) {
      const nonce = encoder.encode(String(n));
      const input = new Uint8Array(prefix.length + enc.length + tail.length + nonce.length);
      input.set(prefix, 0); input.set(enc, prefix.length); input.set(tail, prefix.length + enc.length); input.set(nonce, prefix.length + enc.length + tail.length);
      sha256(input);
    }
  }
  return n / ((Date.now() - start) / 1000);
}
async function now() {
  const signal = { aborted: false };
  let hashes = 0, slices = 0, longest = 0, last = Date.now();
  const start = Date.now();
  const onProgress = (p) => {
    hashes = p.hashes;
    slices++;
    const t = Date.now();
    longest = Math.max(longest, t - last); // how long the event loop waited on one slice
    last = t;
    if (t - start >= seconds * 1000) signal.aborted = true;
  };
  await solve('${CHALLENGE}', enc, 32, { signal, onProgress }).catch(() => undefined);
  return { rate: hashes / ((Date.now() - start) / 1000), slices, longestSliceMs: longest };
}
now().then((solveResult) => report({ solve: solveResult, before: before() }));
`;

async function bundle(target) {
  const { build } = await import('esbuild');
  const dir = mkdtempSync(join(tmpdir(), 'llmr-pow-'));
  const out = join(dir, 'bundle.js');
  const report = target === 'hermes' ? 'function report(r) { print("POW " + JSON.stringify(r)); }' : 'function report(r) { console.log("POW " + JSON.stringify(r)); }';
  await build({
    stdin: { contents: polyfills(target) + entry, resolveDir: PACKAGE, loader: 'js' },
    bundle: true,
    format: 'iife',
    platform: 'neutral',
    target: 'es2017',
    banner: { js: report },
    mainFields: ['module', 'main'],
    outfile: out,
    logLevel: 'error',
  });
  if (target !== 'hermes') return out;
  const babel = await import('@babel/core');
  const { code } = babel.transformFileSync(out, {
    babelrc: false,
    configFile: false,
    sourceType: 'script',
    presets: [[require.resolve('@react-native/babel-preset'), { enableBabelRuntime: false }]],
  });
  writeFileSync(out, code);
  return out;
}

function result(output) {
  const line = output.split('\n').find((l) => l.startsWith('POW '));
  if (!line) throw new Error(`no result:\n${output}`);
  return JSON.parse(line.slice(4));
}

const hermes = result(execFileSync(HERMES, [await bundle('hermes')], { encoding: 'utf8' }));
const node = result(execFileSync(process.execPath, [await bundle('node')], { encoding: 'utf8' }));
const rate = hermes.solve.rate;
const k = (n) => `${Math.round(n / 1000)}k`;
console.log(`SHA-256 per second, ${SECONDS} s each (this machine: ${(await import('node:os')).cpus()[0].model})`);
console.log(`  Hermes, solve():            ${k(rate)}/s  (${hermes.solve.slices} slices, longest gap ${hermes.solve.longestSliceMs} ms)`);
console.log(`  Hermes, the loop before:    ${k(hermes.before)}/s  -> solve() is ${(rate / hermes.before).toFixed(2)}x`);
console.log(`  Node ${process.version}, solve():  ${k(node.solve.rate)}/s  -> Hermes is ${(node.solve.rate / rate).toFixed(1)}x slower`);
console.log('Mean time to solve in Hermes on this machine (2^d hashes):');
for (const d of [12, 14, 16, 17, 18, 20]) console.log(`  ${d} bits: ${(2 ** d / rate).toFixed(1)} s`);
