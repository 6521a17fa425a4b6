/**
 * The OpenAI-compatible fetch (`@llmrouter/client/openai`) with the real libraries app developers
 * use, unchanged, against a real router and inference daemon: the `openai` package, the Vercel AI
 * SDK's OpenAI-compatible provider and LangChain's ChatOpenAI each stream, call a tool (forced by
 * the daemon's grammar: a random-weight model calls none by itself) and surface the router's
 * refusals as their own typed errors. And `useChat` in React (react-test-renderer) and
 * `ChatSession`, the logic it runs, against the router.
 */

import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';

import { createOpenAICompatible } from '@ai-sdk/openai-compatible';
import { tool as langchainTool } from '@langchain/core/tools';
import { ChatOpenAI } from '@langchain/openai';
import { APICallError, generateText, jsonSchema, streamText, tool } from 'ai';
import OpenAI from 'openai';
import { createElement } from 'react';
import { create, type ReactTestRenderer } from 'react-test-renderer';

import { ChatSession, LLMRouterClient, type ChatStatus } from '@llmrouter/client';
import { createOpenAIFetch } from '@llmrouter/client/openai';
import { type UseChat, useChat } from '@llmrouter/client/react';

import { type Inference, metric, type Router, startInference, startRouter, waitFor } from './support/stack.js';

const BASE_URL = 'https://llmrouter.invalid/v1'; // never resolved: the fetch answers in process
const CITIES = ['Paris', 'Oslo'];
const WEATHER_SCHEMA = {
  type: 'object' as const,
  properties: { city: { type: 'string' as const, enum: CITIES } },
  required: ['city'],
  additionalProperties: false,
};

describe('the OpenAI-compatible fetch with openai, the AI SDK and LangChain', { timeout: 300000 }, () => {
  let inference: Inference;
  let router: Router;
  let limited: Router;
  let client: LLMRouterClient;
  let fetch: ReturnType<typeof createOpenAIFetch>;
  let limitedFetch: ReturnType<typeof createOpenAIFetch>;

  before(async () => {
    inference = await startInference(['--parallel', '2', '--max-tokens', '4000']);
    [router, limited] = await Promise.all([startRouter(inference), startRouter(inference, { RATE_LIMIT_BURST: '1', RATE_LIMIT_PER_MINUTE: '1' })]);
    client = new LLMRouterClient({ url: router.url, pin: router.pin });
    fetch = createOpenAIFetch(client);
    // no SDK retries: the 429 goes through to the library (its Retry-After is a minute)
    limitedFetch = createOpenAIFetch(new LLMRouterClient({ url: limited.url, pin: limited.pin, maxRetries: 0 }));
    await limitedFetch(`${BASE_URL}/chat/completions`, { method: 'POST', body: JSON.stringify({ model: 'llmrouter', messages: [{ role: 'user', content: 'spend the burst' }], max_tokens: 1 }) });
  });

  const cancelledCount = async () => metric(await inference.metrics(), 'inference_requests_total', 'outcome="cancelled"');

  after(async () => {
    await Promise.all([router?.stop(), limited?.stop()]);
    await inference?.stop();
  });

  describe('openai', () => {
    const openai = () => new OpenAI({ apiKey: 'unused', baseURL: BASE_URL, fetch, maxRetries: 0 });

    it('streams: verified deltas as chunks, then the finish reason and usage', async () => {
      const stream = await openai().chat.completions.create({
        model: 'llmrouter',
        messages: [{ role: 'developer', content: 'Be brief.' }, { role: 'user', content: 'Hello' }],
        max_tokens: 8,
        temperature: 0,
        stream: true,
        stream_options: { include_usage: true },
      });
      let text = '';
      let finish: string | null = null;
      let usage: OpenAI.CompletionUsage | null | undefined;
      for await (const chunk of stream) {
        text += chunk.choices[0]?.delta.content ?? '';
        finish = chunk.choices[0]?.finish_reason ?? finish;
        usage = chunk.usage ?? usage;
      }
      assert.ok(text.length > 0);
      assert.equal(finish, 'length');
      assert.equal(usage?.completion_tokens, 8);
    });

    it('calls a tool', async () => {
      const completion = await openai().chat.completions.create({
        model: 'llmrouter',
        messages: [{ role: 'user', content: 'Weather in Oslo?' }],
        tools: [{ type: 'function', function: { name: 'get_weather', description: 'The weather in a city', parameters: WEATHER_SCHEMA } }],
        tool_choice: 'required',
        parallel_tool_calls: false,
        temperature: 0,
        max_tokens: 300,
      });
      const choice = completion.choices[0]!;
      assert.equal(choice.finish_reason, 'tool_calls');
      const call = choice.message.tool_calls?.[0];
      assert.ok(call?.type === 'function' && call.function.name === 'get_weather' && call.id);
      assert.ok(CITIES.includes((JSON.parse(call.function.arguments) as { city: string }).city));
    });

    it('surfaces refusals as its typed errors, without retrying them', async () => {
      const refused = openai().chat.completions.create({ model: 'llmrouter', messages: [{ role: 'user', content: 'hi' }], n: 2 });
      await assert.rejects(refused, (e: unknown) => e instanceof OpenAI.BadRequestError && e.code === 'unsupported_parameter' && e.param === 'n other than 1');
      const unknown = openai().chat.completions.create({ model: 'no-such-model', messages: [{ role: 'user', content: 'hi' }] });
      await assert.rejects(unknown, (e: unknown) => e instanceof OpenAI.NotFoundError && e.code === 'model_not_found');
      const limitedClient = new OpenAI({ apiKey: 'unused', baseURL: BASE_URL, fetch: limitedFetch }); // its default retries: x-should-retry says no
      const busy = limitedClient.chat.completions.create({ model: 'llmrouter', messages: [{ role: 'user', content: 'hi' }], max_tokens: 1 });
      await assert.rejects(busy, (e: unknown) => e instanceof OpenAI.RateLimitError && e.code === 'rate_limited' && Number(e.headers?.get('retry-after')) > 0);
    });

    it('stops the router generating when the app aborts the stream', async () => {
      const cancelled = await cancelledCount();
      const controller = new AbortController();
      const stream = await openai().chat.completions.create(
        { model: 'llmrouter', messages: [{ role: 'user', content: 'a long answer' }], max_tokens: 4000, stream: true },
        { signal: controller.signal },
      );
      let chunks = 0;
      for await (const _ of stream) if (++chunks === 3) controller.abort(); // openai's stream then just ends
      assert.equal(chunks, 3);
      // the connection closed, the router cancelled the generation (4000 tokens would take minutes)
      await waitFor(cancelledCount, (v) => v === cancelled + 1, 'inference cancelled');
    });
  });

  describe('the Vercel AI SDK (OpenAI-compatible provider)', () => {
    const provider = () => createOpenAICompatible({ name: 'llmrouter', baseURL: BASE_URL, fetch, includeUsage: true });

    it('streams text, then the usage', async () => {
      const result = streamText({ model: provider()('llmrouter'), prompt: 'Hello', maxOutputTokens: 8, temperature: 0, maxRetries: 0 });
      let text = '';
      for await (const part of result.textStream) text += part;
      assert.ok(text.length > 0);
      assert.equal((await result.usage).outputTokens, 8);
      assert.equal(await result.finishReason, 'length');
    });

    it('calls a tool', async () => {
      const result = await generateText({
        model: provider()('llmrouter'),
        prompt: 'Weather in Oslo?',
        tools: { get_weather: tool({ description: 'The weather in a city', inputSchema: jsonSchema<{ city: string }>(WEATHER_SCHEMA) }) },
        toolChoice: 'required',
        providerOptions: { llmrouter: { parallel_tool_calls: false } }, // passed through as a body field
        temperature: 0,
        maxOutputTokens: 300,
        maxRetries: 0,
      });
      const [call] = result.toolCalls;
      assert.equal(result.finishReason, 'tool-calls');
      assert.ok(call !== undefined && call.toolName === 'get_weather');
      assert.ok(CITIES.includes((call.input as { city: string }).city));
    });

    it('surfaces refusals as APICallError with the status and whether to retry', async () => {
      const model = createOpenAICompatible({ name: 'llmrouter', baseURL: BASE_URL, fetch: limitedFetch })('llmrouter');
      await assert.rejects(
        generateText({ model, prompt: 'hi', maxOutputTokens: 1, maxRetries: 0 }),
        (e: unknown) => APICallError.isInstance(e) && e.statusCode === 429 && e.responseHeaders?.['retry-after'] !== undefined,
      );
      await assert.rejects(
        generateText({ model: provider()('no-such-model'), prompt: 'hi', maxRetries: 0 }),
        (e: unknown) => APICallError.isInstance(e) && e.statusCode === 404 && !e.isRetryable,
      );
    });
  });

  describe("LangChain's ChatOpenAI", () => {
    const chat = (extra: Record<string, unknown> = {}) =>
      new ChatOpenAI({ model: 'llmrouter', apiKey: 'unused', configuration: { baseURL: BASE_URL, fetch }, maxRetries: 0, temperature: 0, ...extra });

    it('streams', async () => {
      let text = '';
      let chunks = 0;
      for await (const chunk of await chat({ maxTokens: 8 }).stream('Hello')) {
        text += typeof chunk.content === 'string' ? chunk.content : '';
        chunks += 1;
      }
      assert.ok(text.length > 0 && chunks > 1);
    });

    it('calls a tool', async () => {
      const weather = langchainTool(async () => 'sunny', { name: 'get_weather', description: 'The weather in a city', schema: WEATHER_SCHEMA });
      const model = chat({ maxTokens: 300 }).bindTools([weather], { tool_choice: 'required', parallel_tool_calls: false });
      const message = await model.invoke('Weather in Oslo?');
      const [call] = message.tool_calls ?? [];
      assert.ok(call !== undefined && call.name === 'get_weather');
      assert.ok(CITIES.includes((call.args as { city: string }).city));
    });

    it("surfaces refusals as the openai package's typed errors", async () => {
      const model = new ChatOpenAI({ model: 'llmrouter', apiKey: 'unused', configuration: { baseURL: BASE_URL, fetch: limitedFetch }, maxRetries: 0, maxTokens: 1 });
      await assert.rejects(model.invoke('hi'), (e: unknown) => e instanceof OpenAI.RateLimitError && e.status === 429);
      await assert.rejects(chat({ model: 'no-such-model' }).invoke('hi'), (e: unknown) => e instanceof OpenAI.NotFoundError && e.status === 404);
    });
  });

  describe('useChat (React, with react-test-renderer)', () => {
    let latest: UseChat | undefined;
    function Probe({ chatClient }: { chatClient: LLMRouterClient }) {
      latest = useChat(chatClient, { system: 'Be brief.', request: { max_tokens: 2000, temperature: 0 } });
      return null;
    }

    it('renders the conversation as it streams; unmounting the screen stops the answer and the generation', async () => {
      // React as an app runs it: no act(), updates land when the stream delivers them
      (globalThis as { IS_REACT_ACT_ENVIRONMENT?: boolean }).IS_REACT_ACT_ENVIRONMENT = false;
      const renderer: ReactTestRenderer = create(createElement(Probe, { chatClient: client }));
      await waitFor(async () => latest !== undefined, Boolean, 'the first render');
      const renders: string[] = [];
      const watch = setInterval(() => renders.push(latest!.messages.at(-1)?.content ?? ''), 5);
      const cancelled = await cancelledCount();
      const sent = latest!.send('Hello there');
      await waitFor(async () => latest!.messages.at(-1)?.content.length ?? 0, (n) => n > 20, 'an answer streaming in');
      assert.equal(latest!.streaming, true);
      assert.deepEqual(latest!.messages.map((m) => m.role), ['user', 'assistant']);
      renderer.unmount(); // leaving the screen
      await sent;
      clearInterval(watch);
      assert.ok(new Set(renders).size > 2, 'the answer rendered as it grew');
      await waitFor(cancelledCount, (v) => v === cancelled + 1, 'inference cancelled');
    });
  });

  describe('ChatSession (what useChat runs)', () => {
    it('keeps the conversation, streams the answer into it, and sends the history on', async () => {
      const session = new ChatSession(client, { system: 'Be brief.', request: { max_tokens: 6, temperature: 0 } });
      const seen: string[] = [];
      session.subscribe(() => {
        const last = session.getState().messages.at(-1);
        if (last?.role === 'assistant') seen.push(last.content);
      });
      await session.send('Hello');
      await session.send('And then?');
      const { messages, streaming, error } = session.getState();
      assert.deepEqual(messages.map((m) => [m.role, m.state]), [['user', 'complete'], ['assistant', 'complete'], ['user', 'complete'], ['assistant', 'complete']]);
      assert.ok(messages[1]!.content.length > 0 && !streaming && error === undefined);
      assert.ok(new Set(seen).size > 2, 'the answer grew as it streamed');
    });

    it('stops on demand, keeping what arrived; an error shows and retry asks again', async () => {
      const session = new ChatSession(client, { request: { max_tokens: 2000 } });
      const unsubscribe = session.subscribe(() => {
        if (session.getState().messages.at(-1)?.content) session.stop();
      });
      await session.send('a long answer');
      unsubscribe();
      const stopped = session.getState().messages.at(-1)!;
      assert.equal(stopped.state, 'stopped');
      assert.equal(session.getState().error, undefined);

      const statuses: ChatStatus['type'][] = [];
      const failing = new ChatSession(new LLMRouterClient({ url: limited.url, pin: limited.pin, maxRetries: 0 }), { request: { max_tokens: 1 } });
      failing.subscribe(() => {
        const status = failing.getState().status;
        if (status !== undefined) statuses.push(status.type);
      });
      await failing.send('hi');
      assert.equal(failing.getState().error?.code, 'rate_limited');
      assert.equal(failing.getState().messages.at(-1)?.state, 'failed');
      await failing.retry(); // still limited: the failed answer is replaced, not stacked
      assert.deepEqual(failing.getState().messages.map((m) => [m.role, m.state]), [['user', 'complete'], ['assistant', 'failed']]);
    });
  });
});
