// Real OpenAI clients for Node against the local proxy: the official `openai` package and the
// Vercel AI SDK's OpenAI-compatible provider. Driven by tests/test_client_matrix.py, which starts
// inference + router + proxy on the tiny model and checks what this prints (one JSON object).
// Env: BASE_URL (the proxy's .../v1), API_KEY (its token).

import { createOpenAICompatible } from '@ai-sdk/openai-compatible';
import { APICallError, generateText, jsonSchema, streamText, tool } from 'ai';
import OpenAI from 'openai';

const baseURL = process.env.BASE_URL;
const apiKey = process.env.API_KEY;
const out = {};
const messages = [{ role: 'user', content: 'Weather in Oslo?' }];
const weather = {
  type: 'function',
  function: {
    name: 'get_weather',
    description: 'The weather in a city',
    parameters: { type: 'object', properties: { city: { type: 'string', enum: ['Paris', 'Oslo'] } }, required: ['city'], additionalProperties: false },
  },
};

const client = new OpenAI({ baseURL, apiKey, maxRetries: 0 });
const plain = await client.chat.completions.create({ model: 'llmrouter', messages, max_tokens: 4 });
out.openai_plain = { finish: plain.choices[0].finish_reason, tokens: plain.usage.completion_tokens, text: plain.choices[0].message.content.length > 0 };
let streamed = '';
let last;
for await (const chunk of await client.chat.completions.create({ model: 'llmrouter', messages, max_tokens: 4, stream: true })) {
  streamed += chunk.choices[0]?.delta?.content ?? '';
  last = chunk.choices[0]?.finish_reason ?? last;
}
out.openai_stream = { finish: last, text: streamed.length > 0 };
const called = await client.chat.completions.create({ model: 'tiny', messages, tools: [weather], tool_choice: 'required', parallel_tool_calls: false, temperature: 0, max_tokens: 200 });
const call = called.choices[0].message.tool_calls[0];
out.openai_tool = { name: call.function.name, city: JSON.parse(call.function.arguments).city, finish: called.choices[0].finish_reason };
const schema = { type: 'object', properties: { city: { type: 'string', enum: ['Paris', 'Oslo'] }, sunny: { type: 'boolean' } }, required: ['city', 'sunny'], additionalProperties: false };
const structured = await client.chat.completions.create({
  model: 'tiny',
  messages,
  max_tokens: 100,
  response_format: { type: 'json_schema', json_schema: { name: 'weather', schema, strict: true } },
});
out.openai_json_schema = JSON.parse(structured.choices[0].message.content);
for (const [name, request] of [
  ['openai_404', { model: 'gpt-4o', messages }],
  ['openai_400', { model: 'llmrouter', messages, logit_bias: { 1: 5 } }],
]) {
  try {
    await client.chat.completions.create(request);
    out[name] = 'accepted';
  } catch (e) {
    out[name] = { cls: e.constructor.name, status: e.status, code: e.code, param: e.param };
  }
}
try {
  await new OpenAI({ baseURL, apiKey: 'wrong', maxRetries: 0 }).models.list();
  out.openai_bad_key = 'accepted';
} catch (e) {
  out.openai_bad_key = { cls: e.constructor.name, status: e.status, code: e.code };
}

const provider = createOpenAICompatible({ name: 'llmrouter', baseURL, apiKey });
const generated = await generateText({ model: provider('llmrouter'), prompt: 'Hello', maxOutputTokens: 4 });
out.ai_generate = { finish: generated.finishReason, tokens: generated.usage.outputTokens, text: generated.text.length > 0 };
const stream = streamText({ model: provider('llmrouter'), prompt: 'Hello', maxOutputTokens: 4 });
let aiText = '';
for await (const part of stream.textStream) aiText += part;
out.ai_stream = { finish: await stream.finishReason, text: aiText.length > 0 };
const tooled = await generateText({
  model: provider('tiny'),
  prompt: 'Weather in Oslo?',
  tools: { get_weather: tool({ description: 'The weather in a city', inputSchema: jsonSchema(weather.function.parameters) }) },
  toolChoice: { type: 'tool', toolName: 'get_weather' },
  temperature: 0,
  maxOutputTokens: 200,
});
out.ai_tool = { name: tooled.toolCalls[0]?.toolName, city: tooled.toolCalls[0]?.input?.city };
try {
  await generateText({ model: provider('no-such-model'), prompt: 'Hello', maxRetries: 0 });
  out.ai_404 = 'accepted';
} catch (e) {
  out.ai_404 = { api_call_error: APICallError.isInstance(e), status: e.statusCode };
}
process.stdout.write(JSON.stringify(out) + '\n');
