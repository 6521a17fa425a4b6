/** docs/protocol.md, and its fenced examples by section. */

import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';

import { REPO } from './stack.js';

export const DOC = readFileSync(join(REPO, 'docs', 'protocol.md'), 'utf8');

/** From the first line of section `section` of docs/protocol.md that starts with `first` to the end of its fenced block. */
export function fenced(section: string, first: string): string {
  const from = DOC.indexOf(`\n### ${section} `);
  assert.ok(from >= 0, `docs/protocol.md has no section ${section}`);
  const start = DOC.indexOf('\n' + first, from) + 1;
  const next = DOC.indexOf('\n### ', from + 1);
  assert.ok(start > 0 && (next < 0 || start < next), `section ${section} has no block starting with ${first}`);
  return DOC.slice(start, DOC.indexOf('```', start)) + '\n'; // the blank line ending the last event
}
