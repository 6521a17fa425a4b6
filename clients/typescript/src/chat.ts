/**
 * The request plaintext of protocol v1.1 (docs/protocol.md, section 2.2): the OpenAI chat fields
 * as the router carries them, and the router's own checks and limits, run here first so that a
 * request it would refuse is refused by name before anything is sealed or sent.
 *
 * `requestPlaintext` builds a fresh plaintext object in the wire's field order from only what it
 * checked: nothing the app passed is forwarded unchecked, and a request without v1.1 fields is
 * exactly a protocol v1 plaintext.
 */

import { InvalidRequestError } from './errors.js';
import { utf8 } from './bytes.js';
import { codePoints as chars } from './json.js';

export const MAX_MESSAGES = 1024;
export const MAX_PARTS = 64;
export const MAX_STOP_SEQUENCES = 4;
export const MAX_STOP_CHARS = 128;
export const MAX_MAX_TOKENS = 2 ** 31 - 1;
export const MAX_SEED = 2 ** 32 - 1;
export const MAX_TOOLS = 64;
export const MAX_TOOLS_BYTES = 64 * 1024;
export const MAX_TOOL_CALLS = 64;
export const MAX_ID_CHARS = 256;
export const MAX_DESCRIPTION_CHARS = 4096;
export const MAX_SCHEMA_BYTES = 16 * 1024;
export const MAX_SCHEMA_DEPTH = 32;
export const MAX_SCHEMA_COUNT = 1024;
export const MAX_PATTERN_CHARS = 512;
export const MAX_TOP_LOGPROBS = 20;

/** A model name as `GET /api/models` lists it. */
export const MODEL_NAME = /^[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,127}$/;
const NAME = /^[A-Za-z0-9_-]{1,64}$/;
const QUANTIFIER = /\{\s*(\d+)\s*(?:,\s*(\d*)\s*)?\}/g;
// JSON Schema keywords whose number a grammar compiler expands into that many copies.
const COUNTS = ['minItems', 'maxItems', 'minLength', 'maxLength', 'minProperties', 'maxProperties', 'minContains', 'maxContains'];
const TOOL_CHOICES = new Set<unknown>(['none', 'auto', 'required']);
const EFFORTS = new Set<unknown>(['low', 'medium', 'high']);

// The request, as the app writes it (the names are the wire's, and OpenAI's).

export type Role = 'system' | 'user' | 'assistant' | 'tool';

/** A text content part; `content` may be a list of them (1.1). */
export interface TextPart {
  type: 'text';
  text: string;
}

export type Content = string | TextPart[];

/** A call the model made: `arguments` is JSON text (the model's, so parse it with care). */
export interface ToolCall {
  id: string;
  type: 'function';
  function: { name: string; arguments: string };
}

export interface SystemMessage {
  role: 'system';
  content: Content;
}

export interface UserMessage {
  role: 'user';
  content: Content;
}

/** `content` may be null when the message carries `tool_calls` (1.1). */
export interface AssistantMessage {
  role: 'assistant';
  content: Content | null;
  tool_calls?: ToolCall[];
}

/** (1.1) The result of one call of the assistant message before it. */
export interface ToolMessage {
  role: 'tool';
  content: Content;
  tool_call_id: string;
}

export type Message = SystemMessage | UserMessage | AssistantMessage | ToolMessage;

/** A JSON Schema (a tool's `parameters`, a `json_schema` response format). */
export type JsonSchema = Record<string, unknown>;

export interface FunctionTool {
  type: 'function';
  function: { name: string; description?: string; parameters?: JsonSchema; strict?: boolean };
}

export type ToolChoice = 'none' | 'auto' | 'required' | { type: 'function'; function: { name: string } };

export type ResponseFormat =
  | { type: 'text' }
  | { type: 'json_object' }
  | { type: 'json_schema'; json_schema: { name?: string; schema: JsonSchema; strict?: boolean; description?: string } };

export type ReasoningEffort = 'low' | 'medium' | 'high';

/** A chat request. The first five fields are protocol v1; the others need a v1.1 router. */
export interface ChatRequest {
  messages: Message[];
  /** 1 to 2147483647 (a backend may have a lower cap). */
  max_tokens?: number;
  temperature?: number;
  top_p?: number;
  stop?: string[];
  /** A name from `client.models()`; absent: the router's default. */
  model?: string;
  /** OpenAI's newer name for `max_tokens` (give one of the two; it is sent as `max_tokens`). */
  max_completion_tokens?: number;
  seed?: number;
  presence_penalty?: number;
  frequency_penalty?: number;
  response_format?: ResponseFormat;
  tools?: FunctionTool[];
  tool_choice?: ToolChoice;
  parallel_tool_calls?: boolean;
  /** Log probabilities on text chunks (`logprobs` of delta events). */
  logprobs?: boolean;
  top_logprobs?: number;
  reasoning_effort?: ReasoningEffort;
  /** Receive the model's reasoning as `reasoning` events (not an OpenAI field). */
  include_reasoning?: boolean;
}

/** The fields of `ChatRequest`, in the order the plaintext carries them. */
export const REQUEST_FIELDS = [
  'messages',
  'max_tokens',
  'max_completion_tokens',
  'temperature',
  'top_p',
  'stop',
  'model',
  'seed',
  'presence_penalty',
  'frequency_penalty',
  'response_format',
  'tools',
  'tool_choice',
  'parallel_tool_calls',
  'logprobs',
  'top_logprobs',
  'reasoning_effort',
  'include_reasoning',
] as const;
const KNOWN = new Set<string>(REQUEST_FIELDS);

// Checking.

type Doc = Record<string, unknown>;

function refuse(field: string, message: string): InvalidRequestError {
  return new InvalidRequestError('invalid_request', message, field);
}

function hasOwn(object: object, name: string): boolean {
  return Object.prototype.hasOwnProperty.call(object, name);
}

/** A name for a message: names are the caller's code, not user content, but keep them short. */
function safeName(name: string): string {
  return /^[A-Za-z0-9_]{1,64}$/.test(name) ? name : '(unnamed)';
}

function isObject(value: unknown): value is Doc {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}

function isNumber(value: unknown): value is number {
  return typeof value === 'number' && Number.isFinite(value);
}

function isInteger(value: unknown, low: number, high: number): value is number {
  return Number.isInteger(value) && (value as number) >= low && (value as number) <= high;
}

/** Keys whose value is not `undefined` (JSON.stringify leaves those out anyway). */
function keys(doc: Doc): string[] {
  return Object.keys(doc).filter((key) => doc[key] !== undefined);
}

/** True when `doc` has exactly the keys `required` plus any of `optional`. */
function shaped(doc: Doc, required: string[], optional: string[] = []): boolean {
  const present = keys(doc);
  return required.every((k) => present.includes(k)) && present.every((k) => required.includes(k) || optional.includes(k));
}


function shortString(value: unknown, max: number): value is string {
  return typeof value === 'string' && value.length > 0 && (value.length <= max || chars(value) <= max);
}

function content(raw: unknown, role: string): Content {
  if (typeof raw === 'string') return raw;
  if (Array.isArray(raw) && raw.length > 0) {
    if (raw.length > MAX_PARTS) throw refuse('messages', `message content may hold at most ${MAX_PARTS} parts`);
    return raw.map((part: unknown) => {
      if (!isObject(part) || !shaped(part, ['type', 'text']) || part.type !== 'text' || typeof part.text !== 'string') {
        throw refuse('messages', 'content parts must be text parts: type text and a text string');
      }
      return { type: 'text' as const, text: part.text };
    });
  }
  throw refuse('messages', `${role} message content must be a string or a list of text parts`);
}

function toolCalls(raw: unknown): ToolCall[] {
  if (!Array.isArray(raw) || raw.length === 0 || raw.length > MAX_TOOL_CALLS) {
    throw refuse('messages', `tool_calls must be a list of 1 to ${MAX_TOOL_CALLS} calls`);
  }
  const calls = raw.map((call: unknown): ToolCall => {
    const fn = isObject(call) ? call.function : undefined;
    if (!isObject(call) || !shaped(call, ['id', 'type', 'function']) || call.type !== 'function' || !isObject(fn) || !shaped(fn, ['name', 'arguments'])) {
      throw refuse('messages', 'each tool call must have id, type function and function with name and arguments');
    }
    if (!shortString(call.id, MAX_ID_CHARS)) throw refuse('messages', `a tool call id must be a string of 1 to ${MAX_ID_CHARS} chars`);
    if (typeof fn.name !== 'string' || !NAME.test(fn.name)) throw refuse('messages', 'a tool call name must be 1 to 64 letters, digits, _ or -');
    if (typeof fn.arguments !== 'string') throw refuse('messages', 'tool call arguments must be a string');
    return { id: call.id, type: 'function', function: { name: fn.name, arguments: fn.arguments } };
  });
  if (new Set(calls.map((c) => c.id)).size !== calls.length) throw refuse('messages', 'tool call ids must be unique within a message');
  return calls;
}

const MESSAGE_FIELDS: Record<Role, string[]> = {
  system: ['role', 'content'],
  user: ['role', 'content'],
  assistant: ['role', 'content', 'tool_calls'],
  tool: ['role', 'content', 'tool_call_id'],
};

function messages(raw: unknown): Message[] {
  if (!Array.isArray(raw) || raw.length === 0) throw refuse('messages', 'messages must be a non-empty list');
  if (raw.length > MAX_MESSAGES) throw refuse('messages', `messages may hold at most ${MAX_MESSAGES} messages`);
  let open: Set<string> | undefined; // ids of the latest assistant tool calls not yet answered
  return raw.map((item: unknown): Message => {
    if (!isObject(item)) throw refuse('messages', 'each message must be an object');
    const role = item.role;
    if (typeof role !== 'string' || !hasOwn(MESSAGE_FIELDS, role)) {
      throw refuse('messages', 'message role must be system, user, assistant or tool');
    }
    const allowed = MESSAGE_FIELDS[role as Role];
    const extra = keys(item).find((key) => !allowed.includes(key));
    if (extra !== undefined) {
      throw new InvalidRequestError('unsupported_field', `message field ${safeName(extra)} is not supported by protocol v1.1`, 'messages');
    }
    if (role === 'assistant') {
      if (item.tool_calls === undefined || item.tool_calls === null) {
        open = undefined;
        return { role, content: content(item.content, role) };
      }
      const calls = toolCalls(item.tool_calls);
      open = new Set(calls.map((c) => c.id));
      const text = item.content === undefined || item.content === null ? null : content(item.content, role);
      return { role, content: text, tool_calls: calls };
    }
    if (role === 'tool') {
      const id = item.tool_call_id;
      if (!shortString(id, MAX_ID_CHARS)) throw refuse('messages', 'a tool message needs a tool_call_id string');
      if (open === undefined || !open.delete(id)) {
        throw refuse('messages', 'a tool message must answer a tool call of the assistant message before it');
      }
      return { role, content: content(item.content, role), tool_call_id: id };
    }
    open = undefined;
    return { role: role as 'system' | 'user', content: content(item.content, role) };
  });
}

function jsonBytes(value: unknown): number {
  return utf8(JSON.stringify(value)).length;
}

function checkPattern(pattern: string, what: string, field: string): void {
  if (pattern.length > MAX_PATTERN_CHARS && chars(pattern) > MAX_PATTERN_CHARS) {
    throw refuse(field, `${what} patterns must be at most ${MAX_PATTERN_CHARS} characters`);
  }
  for (const [, low, high] of pattern.matchAll(QUANTIFIER)) {
    if (Number(low) > MAX_SCHEMA_COUNT || (high && Number(high) > MAX_SCHEMA_COUNT)) {
      throw refuse(field, `${what} pattern repetitions must be at most ${MAX_SCHEMA_COUNT}`);
    }
  }
}

/**
 * Bound a JSON Schema as the router does: nesting, repetition counts, patterns, local `$ref`
 * only, bytes. Grammar compilers expand `maxItems: n` or `a{n}` into n copies, and some fetch
 * remote references. An object graph that shares or loops (possible in JavaScript, never in
 * JSON) is bounded by the number of nodes a schema of the allowed size can hold.
 */
function checkSchema(schema: unknown, what: string, field: string): JsonSchema {
  if (!isObject(schema)) throw refuse(field, `${what} must be a JSON object`);
  const tooBig = () => refuse(field, `${what} exceeds ${MAX_SCHEMA_BYTES} bytes`);
  const stack: [unknown, number][] = [[schema, 1]];
  let nodes = 0;
  while (stack.length > 0) {
    const [node, depth] = stack.pop()!;
    if (depth > MAX_SCHEMA_DEPTH) throw refuse(field, `${what} is nested deeper than ${MAX_SCHEMA_DEPTH} levels`);
    if ((nodes += 1) > MAX_SCHEMA_BYTES / 2) throw tooBig(); // every node takes at least two bytes
    let children: unknown[];
    if (Array.isArray(node)) {
      children = node;
    } else if (isObject(node)) {
      const ref = node.$ref;
      if (ref !== undefined && (typeof ref !== 'string' || !ref.startsWith('#'))) {
        throw refuse(field, `${what} may only use local $ref (starting with #)`);
      }
      for (const key of COUNTS) {
        const count = node[key];
        if (typeof count === 'number' && !(count >= 0 && count <= MAX_SCHEMA_COUNT)) {
          throw refuse(field, `${what} ${key} must be from 0 to ${MAX_SCHEMA_COUNT}`);
        }
      }
      if (typeof node.pattern === 'string') checkPattern(node.pattern, what, field);
      if (isObject(node.patternProperties)) for (const key of Object.keys(node.patternProperties)) checkPattern(key, what, field);
      children = Object.values(node);
    } else {
      continue;
    }
    for (const child of children) if (typeof child === 'object' && child !== null) stack.push([child, depth + 1]);
  }
  let size: number;
  try {
    size = jsonBytes(schema);
  } catch {
    throw refuse(field, `${what} must be JSON`); // a BigInt, say
  }
  if (size > MAX_SCHEMA_BYTES) throw tooBig();
  return schema;
}

function description(raw: unknown, what: string, field: string): string | undefined {
  if (raw !== undefined && (typeof raw !== 'string' || (raw.length > MAX_DESCRIPTION_CHARS && chars(raw) > MAX_DESCRIPTION_CHARS))) {
    throw refuse(field, `${what} description must be a string of at most ${MAX_DESCRIPTION_CHARS} chars`);
  }
  return raw;
}

function responseFormat(raw: unknown): ResponseFormat {
  const field = 'response_format';
  if (!isObject(raw) || !['text', 'json_object', 'json_schema'].includes(raw.type as string)) {
    throw refuse(field, 'response_format must be an object with type text, json_object or json_schema');
  }
  if (raw.type !== 'json_schema') {
    if (!shaped(raw, ['type'])) throw refuse(field, `response_format of type ${raw.type as string} takes no other field`);
    return { type: raw.type as 'text' | 'json_object' };
  }
  const inner = raw.json_schema;
  if (!shaped(raw, ['type', 'json_schema']) || !isObject(inner)) throw refuse(field, 'response_format json_schema needs a json_schema object');
  if (!shaped(inner, ['schema'], ['name', 'strict', 'description'])) {
    throw refuse(field, 'response_format json_schema takes schema, name, strict, description');
  }
  const name = inner.name ?? 'response';
  if (typeof name !== 'string' || !NAME.test(name)) throw refuse(field, 'response_format json_schema name must be 1 to 64 letters, digits, _ or -');
  if (inner.strict !== undefined && typeof inner.strict !== 'boolean') throw refuse(field, 'response_format json_schema strict must be true or false');
  const text = description(inner.description, 'response_format json_schema', field);
  const schema = checkSchema(inner.schema, 'response_format schema', field);
  return {
    type: 'json_schema',
    json_schema: {
      name,
      schema,
      ...(inner.strict === undefined ? {} : { strict: inner.strict }),
      ...(text === undefined ? {} : { description: text }),
    },
  };
}

function tools(raw: unknown): FunctionTool[] {
  if (!Array.isArray(raw) || raw.length === 0 || raw.length > MAX_TOOLS) throw refuse('tools', `tools must be a list of 1 to ${MAX_TOOLS} tools`);
  const out = raw.map((item: unknown): FunctionTool => {
    const fn = isObject(item) ? item.function : undefined;
    if (!isObject(item) || !shaped(item, ['type', 'function']) || item.type !== 'function' || !isObject(fn) || !shaped(fn, ['name'], ['description', 'parameters', 'strict'])) {
      throw refuse('tools', 'each tool must be type function with a function of name, description, parameters and strict');
    }
    if (typeof fn.name !== 'string' || !NAME.test(fn.name)) throw refuse('tools', 'a tool name must be 1 to 64 letters, digits, _ or -');
    const text = description(fn.description, 'a tool', 'tools');
    const parameters = fn.parameters === undefined ? undefined : checkSchema(fn.parameters, 'tool parameters', 'tools');
    if (fn.strict !== undefined && typeof fn.strict !== 'boolean') throw refuse('tools', "a tool's strict must be true or false");
    const out: FunctionTool['function'] = { name: fn.name };
    if (text !== undefined) out.description = text;
    if (parameters !== undefined) out.parameters = parameters;
    if (fn.strict !== undefined) out.strict = fn.strict;
    return { type: 'function', function: out };
  });
  if (new Set(out.map((t) => t.function.name)).size !== out.length) throw refuse('tools', 'tool names must be unique');
  if (jsonBytes(out) > MAX_TOOLS_BYTES) throw refuse('tools', `tools exceed ${MAX_TOOLS_BYTES} bytes`);
  return out;
}

function toolChoice(raw: unknown, offered: FunctionTool[] | undefined): ToolChoice {
  if (offered === undefined) throw refuse('tool_choice', 'tool_choice needs tools');
  if (typeof raw === 'string' && TOOL_CHOICES.has(raw)) return raw as ToolChoice;
  const fn = isObject(raw) ? raw.function : undefined;
  if (!isObject(raw) || !shaped(raw, ['type', 'function']) || raw.type !== 'function' || !isObject(fn) || !shaped(fn, ['name']) || typeof fn.name !== 'string') {
    throw refuse('tool_choice', 'tool_choice must be none, auto, required or a named function');
  }
  if (!offered.some((tool) => tool.function.name === fn.name)) throw refuse('tool_choice', 'tool_choice names a function that is not in tools');
  if (TOOL_CHOICES.has(fn.name)) throw refuse('tool_choice', 'tool_choice cannot name a function none, auto or required');
  return { type: 'function', function: { name: fn.name } };
}

function maxTokens(value: unknown, name: string): number {
  if (!isInteger(value, 1, MAX_MAX_TOKENS)) throw refuse(name, `${name} must be an integer from 1 to ${MAX_MAX_TOKENS}`);
  return value;
}

function bool(value: unknown, name: string): boolean {
  if (typeof value !== 'boolean') throw refuse(name, `${name} must be true or false`);
  return value;
}

function penalty(value: unknown, name: string): number {
  if (!isNumber(value) || value < -2 || value > 2) throw refuse(name, `${name} must be a number from -2 to 2`);
  return value;
}

/**
 * Check `request` and return its plaintext, fields in the wire's order. An unknown field is
 * refused by name (`unsupported_field`), a bad value with the field's name (`invalid_request`),
 * never with the value; `undefined` and `null` count as absent, as the router reads them.
 */
export function requestPlaintext(request: ChatRequest): Doc {
  if (!isObject(request)) throw new InvalidRequestError('invalid_request', 'the request must be an object', '');
  const doc = request as unknown as Doc;
  for (const name of Object.keys(doc)) {
    if (doc[name] !== undefined && !KNOWN.has(name)) {
      throw new InvalidRequestError('unsupported_field', `${safeName(name)} is not supported by protocol v1.1`, safeName(name));
    }
  }
  const given = (name: (typeof REQUEST_FIELDS)[number]): unknown => (doc[name] === null ? undefined : doc[name]);
  const out: Doc = { messages: messages(doc.messages) };
  const max_tokens = given('max_tokens');
  const max_completion_tokens = given('max_completion_tokens');
  const temperature = given('temperature');
  const top_p = given('top_p');
  const stop = given('stop');
  if (max_tokens !== undefined && max_completion_tokens !== undefined) {
    throw refuse('max_completion_tokens', 'give max_tokens or max_completion_tokens, not both');
  }
  if (max_tokens !== undefined) out.max_tokens = maxTokens(max_tokens, 'max_tokens');
  if (max_completion_tokens !== undefined) out.max_tokens = maxTokens(max_completion_tokens, 'max_completion_tokens');
  if (temperature !== undefined) {
    if (!isNumber(temperature) || temperature < 0 || temperature > 2) throw refuse('temperature', 'temperature must be a number from 0 to 2');
    out.temperature = temperature;
  }
  if (top_p !== undefined) {
    if (!isNumber(top_p) || top_p <= 0 || top_p > 1) throw refuse('top_p', 'top_p must be a number above 0 and at most 1');
    out.top_p = top_p;
  }
  if (stop !== undefined) {
    if (!Array.isArray(stop) || stop.length > MAX_STOP_SEQUENCES || !stop.every((s) => shortString(s, MAX_STOP_CHARS))) {
      throw refuse('stop', `stop must be a list of at most ${MAX_STOP_SEQUENCES} non-empty strings of at most ${MAX_STOP_CHARS} characters`);
    }
    out.stop = [...(stop as string[])];
  }
  const model = given('model');
  if (model !== undefined) {
    if (typeof model !== 'string' || !MODEL_NAME.test(model)) throw refuse('model', 'model must be a model name (letters, digits and ._:/@+-)');
    out.model = model;
  }
  const seed = given('seed');
  if (seed !== undefined) {
    if (!isInteger(seed, 0, MAX_SEED)) throw refuse('seed', `seed must be an integer from 0 to ${MAX_SEED}`);
    out.seed = seed;
  }
  for (const name of ['presence_penalty', 'frequency_penalty'] as const) {
    const value = given(name);
    if (value !== undefined) out[name] = penalty(value, name);
  }
  const format = given('response_format');
  if (format !== undefined) out.response_format = responseFormat(format);
  const rawTools = given('tools');
  const offered = rawTools === undefined ? undefined : tools(rawTools);
  if (offered !== undefined) out.tools = offered;
  const choice = given('tool_choice');
  if (choice !== undefined) out.tool_choice = toolChoice(choice, offered);
  const parallel = given('parallel_tool_calls');
  if (parallel !== undefined) {
    out.parallel_tool_calls = bool(parallel, 'parallel_tool_calls');
    if (offered === undefined) throw refuse('parallel_tool_calls', 'parallel_tool_calls needs tools');
  }
  const logprobs = given('logprobs');
  if (logprobs !== undefined) out.logprobs = bool(logprobs, 'logprobs');
  const top = given('top_logprobs');
  if (top !== undefined) {
    if (!isInteger(top, 0, MAX_TOP_LOGPROBS)) throw refuse('top_logprobs', `top_logprobs must be an integer from 0 to ${MAX_TOP_LOGPROBS}`);
    if (logprobs !== true) throw refuse('top_logprobs', 'top_logprobs needs logprobs set to true');
    out.top_logprobs = top;
  }
  const effort = given('reasoning_effort');
  if (effort !== undefined) {
    if (!EFFORTS.has(effort)) throw refuse('reasoning_effort', 'reasoning_effort must be low, medium or high');
    out.reasoning_effort = effort;
  }
  const reasoning = given('include_reasoning');
  if (reasoning !== undefined) out.include_reasoning = bool(reasoning, 'include_reasoning');
  return out;
}

/** Which v1.1 chunk types the router may send for a checked plaintext (it sends no others). */
export interface ExpectedChunks {
  reasoning: boolean;
  toolCalls: boolean;
  logprobs: boolean;
}

export function expectedChunks(plaintext: Doc): ExpectedChunks {
  return { reasoning: plaintext.include_reasoning === true, toolCalls: plaintext.tools !== undefined, logprobs: plaintext.logprobs === true };
}
