// The proof of work's cost in Hermes, React Native's engine: the SDK's own solve() (dist/pow.js),
// bundled and passed through React Native's Babel preset as in hermes.test.ts, run in the
// `hermes` VM of hermes-engine-cli for HASHES hashes of a difficulty it never reaches. Timed by
// the CPU time the VM used (user + system), so that other work on the machine does not count.
// Baselines in the same run: the loop the SDK had before (a fresh SHA-256 of the whole input
// per nonce) in the same Hermes, and solve() under this Node. Then the mean time of each
// difficulty (2^d hashes) at Hermes's rate.
//
//   cd clients/typescript && npm test (builds dist/ and build/test/) && node bench/pow-hermes.mjs [hashes]
import { spawnSync } from 'node:child_process';
import { cpus, tmpdir } from 'node:os';
import { mkdtempSync, writeFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const require = createRequire(import.meta.url);
const PACKAGE = join(dirname(fileURLToPath(import.meta.url)), '..');
const HERMES = join(dirname(require.resolve('hermes-engine-cli/package.json')), 'linux64-bin', 'hermes');
const HASHES = Number(process.argv[2] ?? 200000);
const CHALLENGE = 'AQAAAABpQ2eAIAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA'; // difficulty byte 32: never solved

const entry = (mode) => `
import { solve } from ${JSON.stringify(join(PACKAGE, 'dist', 'pow.js'))};
import { sha256 } from '@noble/hashes/sha2.js';
const enc = new Uint8Array(32).fill(7);
const hashes = ${HASHES};
function before() { // the SDK's loop before: concat + a whole SHA-256 per nonce
  const encoder = new TextEncoder();
  const prefix = encoder.encode('llmrouter/v1 pow|${CHALLENGE}|');
  const tail = encoder.encode('|');
  for (let n = 0; n < hashes; n++) {
    const nonce = encoder.encode(String(n));
    const input = new Uint8Array(prefix.length + enc.length + tail.length + nonce.length);
    input.set(prefix, 0); input.set(enc, prefix.length); input.set(tail, prefix.length + enc.length); input.set(nonce, prefix.length + enc.length + tail.length);
    sha256(input);
  }
}
async function now() {
  const signal = { aborted: false };
  await solve('${CHALLENGE}', enc, 32, { signal, onProgress: (p) => { if (p.hashes >= hashes) signal.aborted = true; } }).catch(() => undefined);
}
${mode === 'before' ? 'before();' : 'now();'}
`;

async function bundle(mode, hermes) {
  const { build } = await import('esbuild');
  const out = join(mkdtempSync(join(tmpdir(), 'llmr-pow-')), 'bundle.js');
  const polyfills = hermes
    ? `import { installed } from ${JSON.stringify(join(PACKAGE, 'build', 'test', 'hermes', 'polyfills.js'))};\nif (!installed) throw new Error('no polyfills');\n`
    : '';
  await build({
    stdin: { contents: polyfills + entry(mode), resolveDir: PACKAGE, loader: 'js' },
    bundle: true,
    format: 'iife',
    platform: 'neutral',
    target: 'es2017',
    mainFields: ['module', 'main'],
    outfile: out,
    logLevel: 'error',
  });
  if (!hermes) return out;
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

/** Hashes per CPU second of one run (bash's `time`: the child's user + system time). */
function rate(command, file) {
  const run = spawnSync('bash', ['-c', 'TIMEFORMAT="%U %S"; time "$0" "$1" >/dev/null', command, file], { encoding: 'utf8' });
  if (run.status !== 0) throw new Error(run.stderr);
  const [user, system] = run.stderr.trim().split('\n').at(-1).split(' ').map(Number);
  return HASHES / (user + system);
}

const hermes = rate(HERMES, await bundle('solve', true));
const before = rate(HERMES, await bundle('before', true));
const node = rate(process.execPath, await bundle('solve', false));
const k = (n) => `${(n / 1000).toFixed(1)}k`;
console.log(`SHA-256 per CPU second, ${HASHES} hashes each, on ${cpus()[0].model}`);
console.log(`  Hermes (hermes-engine-cli), solve():  ${k(hermes)}/s`);
console.log(`  Hermes, the loop before:              ${k(before)}/s  -> solve() is ${(hermes / before).toFixed(2)}x`);
console.log(`  Node ${process.version}, solve():          ${k(node)}/s  -> Hermes is ${(node / hermes).toFixed(1)}x slower`);
console.log('Mean time to solve in Hermes at this rate (2^d hashes):');
for (const d of [12, 14, 16, 17, 18, 20]) console.log(`  ${d} bits: ${(2 ** d / hermes).toFixed(1)} s`);
