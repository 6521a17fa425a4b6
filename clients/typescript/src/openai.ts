/**
 * An OpenAI-compatible `fetch` over the SDK, in process: libraries that speak OpenAI's chat API
 * and accept a custom `fetch` (the `openai` package, the Vercel AI SDK's OpenAI-compatible
 * provider, LangChain's `ChatOpenAI`) run unchanged, and every request they make is sealed to the
 * router, its stream verified, here on the device. Nothing listens on a port.
 *
 *     import OpenAI from 'openai';
 *     import { createOpenAIFetch } from '@llmrouter/client/openai';
 *     const openai = new OpenAI({ apiKey: 'unused', baseURL: 'https://llmrouter.invalid/v1', fetch: createOpenAIFetch(client) });
 *
 * It answers `POST …/chat/completions` (streaming or not) and `GET …/models`, with the mapping of
 * `llmrouter-client proxy` (docs/clients.md): an OpenAI field that protocol v1.1 does not carry is
 * refused by name (400 `unsupported_parameter`), `developer` messages go as `system`, reasoning
 * comes back as `reasoning_content`, router errors become OpenAI's error bodies with the statuses
 * the OpenAI clients map to their typed errors (429 with `Retry-After` for rate limits). Errors
 * carry `x-should-retry: false`: the SDK has already retried what was worth retrying.
 *
 * Needs the platform's `Response` and `ReadableStream` (Node 18+, browsers); React Native's own
 * `Response` takes no stream body.
 */

import { b64uEncode, fromUtf8, randomBytes, utf8 } from './bytes.js';
import { type ChatRequest, type Message, REQUEST_FIELDS } from './chat.js';
import { type ChatEvent, type LLMRouterClient, type RequestOptions } from './client.js';
import { AbortedError, InvalidRequestError, LLMRouterError, RateLimitedError } from './errors.js';
import type { Logprob } from './protocol.js';
import type { Reply } from './reply.js';

export interface OpenAIFetchOptions {
  /** The model name that stands for the router's default model (default `llmrouter`); any other name is the router's. */
  defaultModel?: string;
  /** Passed to each chat (e.g. `onStatus` for a proof-of-work progress bar). */
  requestOptions?: Omit<RequestOptions, 'signal'>;
}

/** What of a `fetch` call the adapter reads: `fetch(url, init)` as OpenAI-style clients make it. */
export type OpenAIFetch = (
  input: string | URL | { readonly url: string },
  init?: { method?: string; body?: unknown; signal?: AbortSignal | null; headers?: unknown },
) => Promise<Response>;

/** Fields of OpenAI's chat request that are protocol v1.1's, passed on as they are (and checked);
 * `messages`, `stop` and `model` are mapped on their own. */
const PASSED: readonly string[] = REQUEST_FIELDS.filter((f) => f !== 'messages' && f !== 'stop' && f !== 'model');
const ROLES: Record<string, Message['role']> = { system: 'system', developer: 'system', user: 'user', assistant: 'assistant', tool: 'tool' };
const MESSAGE_FIELDS: Record<string, string[]> = { assistant: ['tool_calls'], tool: ['tool_call_id'] };

class OpenAIError extends Error {
  constructor(
    readonly status: number,
    message: string,
    readonly code: string,
    readonly param: string | null = null,
    readonly retryAfter?: number,
  ) {
    super(message);
  }

  get type(): string {
    if (this.status === 429) return 'rate_limit_error';
    return this.status < 500 ? 'invalid_request_error' : 'server_error';
  }

  body(): { error: { message: string; type: string; param: string | null; code: string } } {
    return { error: { message: this.message, type: this.type, param: this.param, code: this.code } };
  }
}

/** A request's field name, for a message: only when it is a plain identifier. */
function fieldName(key: unknown, fallback: string): string {
  return typeof key === 'string' && /^[A-Za-z_][A-Za-z0-9_]{0,63}$/.test(key) ? key : fallback;
}

const unsupported = (name: string) => new OpenAIError(400, `${name} is not supported by this router (protocol v1.1)`, 'unsupported_parameter', name);
const invalid = (name: string, message: string) => new OpenAIError(400, message, 'invalid_value', name);
const modelNotFound = () => new OpenAIError(404, 'the router serves no model of that name (see GET /v1/models)', 'model_not_found', 'model');

interface Draft {
  request: ChatRequest;
  model: string;
  stream: boolean;
  includeUsage: boolean;
}

function messages(value: unknown): Message[] {
  if (!Array.isArray(value) || value.length === 0) throw invalid('messages', 'messages must be a non-empty list');
  return value.map((raw: unknown) => {
    if (typeof raw !== 'object' || raw === null) throw invalid('messages', 'each message must be an object');
    const message = raw as Record<string, unknown>;
    const role = typeof message.role === 'string' ? ROLES[message.role] : undefined;
    if (role === undefined) throw unsupported('messages[].role (only system, developer, user, assistant, tool)');
    const carried = MESSAGE_FIELDS[role] ?? [];
    for (const key of Object.keys(message)) {
      if (key !== 'role' && key !== 'content' && !carried.includes(key) && message[key] !== null && message[key] !== undefined) {
        throw unsupported(`messages[].${fieldName(key, 'field')}`);
      }
    }
    const content = message.content;
    if (Array.isArray(content)) {
      for (const part of content as unknown[]) {
        const type = (part as Record<string, unknown> | null)?.type;
        if (type !== 'text') throw unsupported(`messages[].content[].type=${fieldName(type, 'non-text')}`);
      }
    }
    const mapped: Record<string, unknown> = { role, content };
    for (const key of carried) {
      const v = message[key];
      if (v !== null && v !== undefined && !(Array.isArray(v) && v.length === 0)) mapped[key] = v;
    }
    return mapped as unknown as Message;
  });
}

function toRequest(text: string, defaultModel: string): Draft {
  let doc: unknown;
  try {
    doc = JSON.parse(text);
  } catch {
    throw new OpenAIError(400, 'the body is not JSON', 'invalid_json');
  }
  if (typeof doc !== 'object' || doc === null || Array.isArray(doc)) throw new OpenAIError(400, 'the body must be a JSON object', 'invalid_json');
  const body = doc as Record<string, unknown>;
  const request: Record<string, unknown> = {};
  const draft: Draft = { request: request as unknown as ChatRequest, model: defaultModel, stream: false, includeUsage: false };
  for (const [name, value] of Object.entries(body)) {
    if (value === null || value === undefined) continue;
    if (PASSED.includes(name)) {
      request[name] = value;
    } else if (name === 'messages') {
      request.messages = messages(value);
    } else if (name === 'model') {
      if (typeof value !== 'string') throw modelNotFound();
      draft.model = value;
      if (value !== defaultModel) request.model = value;
    } else if (name === 'stop') {
      request.stop = typeof value === 'string' ? [value] : value;
    } else if (name === 'stream') {
      if (typeof value !== 'boolean') throw invalid('stream', 'stream must be a boolean');
      draft.stream = value;
    } else if (name === 'stream_options') {
      const keys = typeof value === 'object' ? Object.keys(value as object) : ['?'];
      if (!keys.every((key) => key === 'include_usage')) throw unsupported('stream_options (only include_usage)');
      draft.includeUsage = (value as { include_usage?: unknown }).include_usage === true;
    } else if (name === 'n') {
      if (value !== 1) throw unsupported('n other than 1');
    } else {
      throw unsupported(fieldName(name, 'a field'));
    }
  }
  if (request.messages === undefined) throw invalid('messages', 'messages is required');
  if (draft.includeUsage && !draft.stream) throw invalid('stream_options', 'stream_options needs stream: true');
  request.include_reasoning ??= true;
  return draft;
}

/** A router or SDK failure as the OpenAI error an OpenAI client maps to its typed errors. */
function openAIError(error: unknown): OpenAIError {
  if (error instanceof OpenAIError) return error;
  if (error instanceof InvalidRequestError) {
    return error.code === 'unsupported_field' ? unsupported(error.field) : invalid(error.field, error.message);
  }
  if (!(error instanceof LLMRouterError)) return new OpenAIError(500, 'internal error', 'internal'); // never its text: it could quote the conversation
  if (error.code === 'model_unknown') return modelNotFound();
  if (error.code === 'unsupported_field') return new OpenAIError(400, error.message, 'unsupported_parameter');
  if (error instanceof RateLimitedError) return new OpenAIError(429, error.message, error.code, null, error.retryAfter);
  if (error.code === 'network') return new OpenAIError(502, 'cannot talk to the router', 'router_unreachable');
  let status = error.status;
  if (status === undefined || status === 401 || status >= 500) {
    // Trouble between the app and the router (stream cut, key document, proof of work, clock,
    // an overloaded router): the request itself was fine.
    status = status === 503 || status === 504 ? 503 : 502;
  }
  return new OpenAIError(status, error.message, error.code);
}

function jsonResponse(status: number, doc: unknown, headers: Record<string, string> = {}): Response {
  return new Response(JSON.stringify(doc), { status, headers: { 'Content-Type': 'application/json', 'Cache-Control': 'no-store', ...headers } });
}

function errorResponse(error: OpenAIError): Response {
  const headers: Record<string, string> = { 'x-should-retry': 'false' };
  if (error.retryAfter !== undefined) headers['Retry-After'] = String(error.retryAfter);
  return jsonResponse(error.status, error.body(), headers);
}

function logprobJson(entry: Logprob, top = true): Record<string, unknown> {
  const out: Record<string, unknown> = { token: entry.token, logprob: entry.logprob, bytes: entry.bytes ?? null };
  if (top) out.top_logprobs = entry.top_logprobs.map((alt) => logprobJson({ ...alt, top_logprobs: [] }, false));
  return out;
}

function usageJson(usage: Reply['usage']): Record<string, number> {
  return { prompt_tokens: usage.prompt_tokens, completion_tokens: usage.completion_tokens, total_tokens: usage.prompt_tokens + usage.completion_tokens };
}

async function bodyText(body: unknown): Promise<string> {
  if (typeof body === 'string') return body;
  if (body instanceof Uint8Array) return fromUtf8(body);
  if (body instanceof ArrayBuffer) return fromUtf8(new Uint8Array(body));
  throw new OpenAIError(400, 'the body must be JSON text', 'invalid_json');
}

/** An OpenAI-compatible `fetch` whose requests go, sealed, through `client`. */
export function createOpenAIFetch(client: LLMRouterClient, options: OpenAIFetchOptions = {}): OpenAIFetch {
  const defaultModel = options.defaultModel ?? 'llmrouter';
  return async (input, init = {}) => {
    // the path alone, without URL: React Native's own URL has no pathname
    const href = typeof input === 'string' ? input : 'url' in input ? input.url : String(input);
    const path = href.replace(/^[a-z][a-z0-9+.-]*:\/\/[^/]*/i, '').replace(/[?#].*$/, '');
    const method = (init.method ?? 'GET').toUpperCase();
    const signal = init.signal ?? undefined;
    try {
      if (path.endsWith('/chat/completions')) {
        if (method !== 'POST') return errorResponse(new OpenAIError(405, 'use POST', 'method_not_allowed'));
        const draft = toRequest(await bodyText(init.body), defaultModel);
        return await completion(client, draft, { ...options.requestOptions, signal });
      }
      if (path.endsWith('/models')) {
        const { models } = await client.models({ signal });
        const data = [defaultModel, ...models.filter((name) => name !== defaultModel)].map((id) => ({ id, object: 'model', created: 0, owned_by: 'llmrouter' }));
        return jsonResponse(200, { object: 'list', data });
      }
      return errorResponse(new OpenAIError(404, 'not found: this fetch answers /chat/completions and /models', 'not_found'));
    } catch (e) {
      if (e instanceof AbortedError) throw e; // as fetch does: the caller's abort rejects (name AbortError)
      return errorResponse(openAIError(e));
    }
  };
}

async function completion(client: LLMRouterClient, draft: Draft, options: RequestOptions): Promise<Response> {
  const id = `chatcmpl-${b64uEncode(randomBytes(12))}`;
  const created = Math.floor(Date.now() / 1000);
  const logprobs = draft.request.logprobs === true;
  if (!draft.stream) {
    const reply = await client.complete(draft.request, options);
    if (reply.finish_reason === 'cancelled') throw new OpenAIError(502, 'the router cancelled the generation', 'cancelled');
    const message: Record<string, unknown> = { role: 'assistant', content: reply.text || (reply.tool_calls.length > 0 ? null : '') };
    if (reply.reasoning) message.reasoning_content = reply.reasoning;
    if (reply.tool_calls.length > 0) message.tool_calls = reply.tool_calls;
    const choice = { index: 0, message, logprobs: logprobs ? { content: reply.logprobs.map((e) => logprobJson(e)), refusal: null } : null, finish_reason: reply.finish_reason };
    return jsonResponse(200, { id, object: 'chat.completion', created, model: draft.model, choices: [choice], usage: usageJson(reply.usage) });
  }

  const events = client.chat(draft.request, options);
  const first = await events.next(); // a refusal before the first event is an HTTP error, not a broken stream
  const chunk = (delta: Record<string, unknown>, finish: string | null = null, extra: Record<string, unknown> = {}) => ({
    id,
    object: 'chat.completion.chunk',
    created,
    model: draft.model,
    choices: [{ index: 0, delta, finish_reason: finish, ...extra }],
  });
  const named = new Set<number>(); // tool calls whose first fragment went out
  const frames = (event: ChatEvent): unknown[] => {
    switch (event.type) {
      case 'delta':
        if (!event.text && !event.logprobs) return [];
        return [chunk({ content: event.text }, null, logprobs ? { logprobs: { content: (event.logprobs ?? []).map((e) => logprobJson(e)), refusal: null } } : {})];
      case 'reasoning':
        return event.text ? [chunk({ reasoning_content: event.text })] : [];
      case 'tool_call': {
        const call: Record<string, unknown> = { index: event.index };
        let fn: Record<string, unknown> = { arguments: event.arguments };
        if (!named.has(event.index)) {
          named.add(event.index);
          Object.assign(call, { id: event.id ?? `call_${event.index}`, type: 'function' });
          fn = { name: event.name ?? '', ...fn };
        }
        call.function = fn;
        return [chunk({ tool_calls: [call] })];
      }
      case 'done': {
        if (event.finish_reason === 'cancelled') throw new OpenAIError(502, 'the router cancelled the generation', 'cancelled');
        const out: unknown[] = [chunk({}, event.finish_reason)];
        if (draft.includeUsage) out.push({ ...chunk({}), choices: [], usage: usageJson(event.usage) });
        return out;
      }
    }
  };
  const encode = (doc: unknown) => utf8(`data: ${JSON.stringify(doc)}\n\n`);
  let pending: IteratorResult<ChatEvent, void> | undefined = first;
  let started = false;
  const stream = new ReadableStream<Uint8Array>({
    async pull(controller) {
      try {
        if (!started) {
          started = true;
          controller.enqueue(encode(chunk({ role: 'assistant', content: '' })));
        }
        for (;;) {
          const next = pending ?? (await events.next());
          pending = undefined;
          if (next.done) {
            controller.enqueue(utf8('data: [DONE]\n\n'));
            controller.close();
            return;
          }
          const out = frames(next.value);
          if (out.length === 0) continue;
          for (const doc of out) controller.enqueue(encode(doc));
          return;
        }
      } catch (e) {
        if (e instanceof AbortedError) {
          controller.error(e);
          return;
        }
        // Mid-stream: OpenAI's clients raise on an error event; no [DONE] follows.
        controller.enqueue(encode(openAIError(e).body()));
        controller.close();
      }
    },
    async cancel() {
      await events.return(undefined); // closes the connection: the router stops generating
    },
  });
  return new Response(stream as unknown as BodyInit, { status: 200, headers: { 'Content-Type': 'text/event-stream', 'Cache-Control': 'no-store' } });
}
