/**
 * RFC 9180 Appendix A.2 (DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, ChaCha20-Poly1305) as published,
 * read from the repository's tests/vectors/ (the file the Python tests use too).
 */

import { readFileSync } from 'node:fs';
import { join } from 'node:path';

import { REPO } from './stack.js';

export const VECTOR_FILE = join(REPO, 'tests', 'vectors', 'rfc9180-a2-x25519-sha256-chacha20poly1305.txt');

export type Record_ = Record<string, string>;

export interface ModeVectors {
  setup: Record_;
  encryptions: Record_[];
  exports: Record_[];
}

const SECTIONS: Record<string, string> = {
  'Base Setup Information': 'base',
  'PSK Setup Information': 'psk',
  'Auth Setup Information': 'auth',
  'AuthPSK Setup Information': 'auth_psk',
};

/** Fields are `name: hex`; long hex values continue on the following lines. */
function parseRecord(lines: string[]): Record_ {
  const record: Record_ = {};
  let name: string | undefined;
  for (const line of lines) {
    const colon = line.indexOf(':');
    if (colon >= 0) {
      name = line.slice(0, colon).trim();
      record[name] = line.slice(colon + 1).trim();
    } else if (name !== undefined) {
      record[name] += line.trim();
    }
  }
  return record;
}

/** {mode: {setup, encryptions, exports}} for the first suite of the file (ours). */
export function loadVectors(): Record<string, ModeVectors> {
  const out: Record<string, ModeVectors> = {};
  let mode: string | undefined;
  let part: 'setup' | 'encryptions' | 'exports' = 'setup';
  let block: string[] | undefined;
  for (const raw of readFileSync(VECTOR_FILE, 'utf8').split('\n')) {
    const line = raw.trimEnd();
    if (line.startsWith('## ')) {
      if (Object.keys(out).length) break; // other suites follow: ours is the first
      continue;
    }
    if (line.startsWith('### ')) {
      mode = SECTIONS[line.slice(4).trim()];
      if (mode === undefined) throw new Error(`unknown section ${line}`);
      out[mode] = { setup: {}, encryptions: [], exports: [] };
      part = 'setup';
    } else if (line.startsWith('#### ')) {
      part = line.slice(5).trim() === 'Encryptions' ? 'encryptions' : 'exports';
    } else if (line === '~~~') {
      if (block === undefined) {
        block = [];
        continue;
      }
      const records = block.join('\n').split('\n\n').map((r) => parseRecord(r.split('\n')));
      const target = out[mode!]!;
      if (part === 'setup') target.setup = records[0]!;
      else target[part] = records.filter((r) => Object.keys(r).length > 0);
      block = undefined;
    } else if (block !== undefined) {
      block.push(line);
    }
  }
  return out;
}

export function hex(value: string | undefined): Uint8Array {
  if (value === undefined) throw new Error('missing vector field');
  return Uint8Array.from(Buffer.from(value, 'hex'));
}
