/**
 * Strict JSON for protocol v2 (docs/protocol.md part II): every object has exactly the fields the
 * page lists, and a duplicate key is refused. `JSON.parse` keeps the last of two equal keys
 * silently, so a signed document could say one thing to this client and another to a parser that
 * keeps the first; the text is scanned for duplicates after `JSON.parse` has checked its syntax.
 */

/** The text is not JSON, or an object in it has a key twice. The message names no value. */
export class JsonError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'JsonError';
  }
}

const QUOTE = 0x22;
const BACKSLASH = 0x5c;

/** The end (exclusive) of the string token that starts at `start` (a quote) in valid JSON. */
function stringEnd(text: string, start: number): number {
  for (let i = start + 1; ; i++) {
    const c = text.charCodeAt(i);
    if (c === BACKSLASH) i++;
    else if (c === QUOTE) return i + 1;
  }
}

function nextSignificant(text: string, from: number): string {
  let i = from;
  while (i < text.length && ' \t\n\r'.includes(text[i]!)) i++;
  return text[i] ?? '';
}

/** Throws when an object of `text` (valid JSON) has a key twice, escapes decoded (`"a"` = `"\u0061"`). */
function refuseDuplicates(text: string): void {
  const stack: (Set<string> | null)[] = [];
  for (let i = 0; i < text.length; ) {
    const c = text[i]!;
    if (c === '"') {
      const end = stringEnd(text, i);
      const top = stack[stack.length - 1];
      if (top && nextSignificant(text, end) === ':') {
        const key = JSON.parse(text.slice(i, end)) as string;
        if (top.has(key)) throw new JsonError('an object has a duplicate key');
        top.add(key);
      }
      i = end;
      continue;
    }
    if (c === '{') stack.push(new Set());
    else if (c === '[') stack.push(null);
    else if (c === '}' || c === ']') stack.pop();
    i++;
  }
}

/** `JSON.parse`, refusing duplicate keys. */
export function parseStrict(text: string): unknown {
  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch {
    throw new JsonError('not JSON');
  }
  refuseDuplicates(text);
  return value;
}

export type JsonObject = Record<string, unknown>;

export function isObject(value: unknown): value is JsonObject {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}

/** `value` is an object with exactly the fields `names`. */
export function hasExactly(value: unknown, names: readonly string[]): value is JsonObject {
  if (!isObject(value)) return false;
  const keys = Object.keys(value);
  return keys.length === names.length && names.every((name) => Object.prototype.hasOwnProperty.call(value, name));
}

/** Length in Unicode code points, as the protocol's limits count (and Python's `len`). */
export function codePoints(text: string): number {
  let n = 0;
  for (const _ of text) n += 1;
  return n;
}
