/**
 * The package as npm packs it: what an app installs. Its licence and repository, the fields that
 * resolvers without package exports read (Metro 0.81, TypeScript's `node` resolution, Jest), the
 * CommonJS build that `require` gets, @noble as peers with ranges that dedupe, and a size budget:
 * the tarball, and the minified code of the main entry with its @noble dependencies (what an app
 * ships), so that growth is a decision rather than an accident.
 */

import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { join } from 'node:path';
import { describe, it } from 'node:test';

import * as esm from '@llmrouter/client';

import { PACKAGE, REPO } from './support/stack.js';

// Protocol v2 (v2keys, v2request, v2response, json: ESM, CommonJS, types, maps and sources) added
// about 9 kB packed and 137 kB unpacked; the main entry, what an app bundles, stayed under 110 kB.
const BUDGET = { tarball: 170_000, unpacked: 900_000, minifiedEntry: 110_000 };
const SUBPATHS = ['hpke', 'protocol', 'v2', 'openai', 'react'];

interface Packed {
  size: number;
  unpackedSize: number;
  files: { path: string }[];
}

describe('the package as packed', () => {
  const packed = JSON.parse(execFileSync('npm', ['pack', '--dry-run', '--json', '--ignore-scripts'], { cwd: PACKAGE, encoding: 'utf8' }))[0] as Packed;
  const files = new Set(packed.files.map((f) => f.path));
  const manifest = JSON.parse(readFileSync(join(PACKAGE, 'package.json'), 'utf8')) as Record<string, any>;

  it('carries the licence and says where it comes from', () => {
    assert.ok(files.has('LICENSE'));
    assert.equal(readFileSync(join(PACKAGE, 'LICENSE'), 'utf8'), readFileSync(join(REPO, 'LICENSE'), 'utf8'));
    assert.equal(manifest.license, 'Apache-2.0');
    assert.equal(manifest.repository?.directory, 'clients/typescript');
  });

  it('resolves without package exports: main, types, react-native, and a folder per subpath', () => {
    for (const field of ['main', 'module', 'react-native', 'types']) assert.ok(files.has(manifest[field].replace(/^\.\//, '')), field);
    for (const name of SUBPATHS) {
      const stub = JSON.parse(readFileSync(join(PACKAGE, name, 'package.json'), 'utf8')) as Record<string, string>;
      assert.ok(files.has(`${name}/package.json`));
      for (const field of ['main', 'module', 'react-native', 'types']) assert.ok(files.has(join(name, stub[field]!)), `${name} ${field}`);
      for (const condition of ['import', 'require']) assert.ok(files.has(manifest.exports[`./${name}`][condition].types.slice(2)), `${name} ${condition} types`);
    }
  });

  it('require() gets the CommonJS build, which works and is the same API', () => {
    const required = createRequire(join(PACKAGE, 'test', 'x.cjs'))('@llmrouter/client') as typeof esm;
    assert.match(createRequire(join(PACKAGE, 'test', 'x.cjs')).resolve('@llmrouter/client'), /dist\/cjs\/index\.js$/);
    assert.deepEqual(Object.keys(required).sort(), Object.keys(esm).sort());
    const client = new required.LLMRouterClient({ url: 'https://x', pin: Buffer.alloc(32, 1).toString('base64url') });
    assert.ok(client instanceof required.LLMRouterClient);
    assert.ok(new required.NetworkError().retryable);
  });

  it('takes @noble as peers that dedupe with an app on the current or the next major', () => {
    assert.equal(manifest.dependencies, undefined);
    for (const name of ['@noble/ciphers', '@noble/curves', '@noble/hashes']) {
      assert.match(manifest.peerDependencies[name], /^\^1\.\d+\.\d+ \|\| \^2\.0\.0$/, name);
    }
    assert.equal(manifest.peerDependenciesMeta?.react?.optional, true);
  });

  it("agrees with the production settings and the docs on the new-device proof of work", () => {
    const production = readFileSync(join(REPO, 'etc', 'llmrouter', 'env.production'), 'utf8');
    const bits = /^NEW_DEVICE_POW_DIFFICULTY=(\d+)$/m.exec(production)?.[1];
    const docs = readFileSync(join(REPO, 'docs', 'clients.md'), 'utf8');
    assert.ok(bits !== undefined && docs.includes(`NEW_DEVICE_POW_DIFFICULTY=${bits}`), `env.production asks ${bits} bits; docs/clients.md must say so`);
    assert.ok(Number(bits) <= 16, 'a phone pays seconds at 16 bits and a minute at 20 (docs/clients.md, "Onboarding")');
  });

  it('stays within its size budget', async () => {
    const { build } = await import('esbuild');
    const result = await build({
      stdin: { contents: "export * from './dist/index.js';", resolveDir: PACKAGE },
      bundle: true,
      minify: true,
      format: 'esm',
      platform: 'neutral',
      mainFields: ['module', 'main'],
      write: false,
      logLevel: 'error',
    });
    const minified = result.outputFiles[0]!.contents.length;
    console.log(`size: tarball ${packed.size} B, unpacked ${packed.unpackedSize} B, main entry minified with @noble ${minified} B`);
    assert.ok(packed.size <= BUDGET.tarball, `tarball ${packed.size} > ${BUDGET.tarball}`);
    assert.ok(packed.unpackedSize <= BUDGET.unpacked, `unpacked ${packed.unpackedSize} > ${BUDGET.unpacked}`);
    assert.ok(minified <= BUDGET.minifiedEntry, `main entry ${minified} > ${BUDGET.minifiedEntry}`);
  });
});
