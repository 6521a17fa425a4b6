/**
 * The app's chat logic under Jest with React Native's preset, against a real certified router
 * and node on protocol v2 (see router.setup.js): onboarding with prepare(), a streamed answer into the conversation, Stop,
 * the client-side rate limit, and what the user reads when things fail. The device's secure
 * store is stood in for by memory here (its native module is not in Jest); everything else is
 * what the app runs.
 */
import {
  ChatSession,
  KeyDocumentError,
  LLMRouterClient,
  MemoryStorage,
  NetworkError,
  RateLimitedError,
  RouterError,
  StorageError,
  TimeoutError,
} from '@llmrouter/client';

import { friendlyError } from '../src/errors';
import { RateLimiter } from '../src/rateLimit';

const url = process.env.ROUTER_URL!;
const operatorPin = process.env.OPERATOR_PIN!;

/** Stands for expo-secure-store: persistent as far as the client can tell. */
class SecretStore extends MemoryStorage {
  override readonly persistent: boolean = true;
}

function newClient(storage = new SecretStore(), cache = new MemoryStorage()) {
  return new LLMRouterClient({ url, operatorPin, deviceKey: 'auto', storage, cache, fetch: globalThis.fetch });
}

test('onboarding pays the new-device proof of work once, with progress; a relaunch pays nothing', async () => {
  const storage = new SecretStore();
  const cache = new MemoryStorage();
  const progress: string[] = [];
  await newClient(storage, cache).prepare({ onProgress: ({ step }) => progress.push(step) });
  expect(progress).toContain('proof_of_work');
  expect(progress[progress.length - 1]).toBe('done');
  const again: string[] = [];
  await newClient(storage, cache).prepare({ onProgress: ({ step }) => again.push(step) });
  expect(again).not.toContain('proof_of_work');
});

test('a message streams into the conversation, and the history goes with the next one', async () => {
  const session = new ChatSession(newClient(), { system: 'Be brief.', request: { max_tokens: 8, temperature: 0 } });
  const lengths: number[] = [];
  session.subscribe(() => lengths.push(session.getState().messages[1]?.content.length ?? 0));
  await session.send('Hello');
  await session.send('And then?');
  const { messages, error, streaming } = session.getState();
  expect(error).toBeUndefined();
  expect(streaming).toBe(false);
  expect(messages.map((m) => `${m.role}:${m.state}`)).toEqual(['user:complete', 'assistant:complete', 'user:complete', 'assistant:complete']);
  expect(messages[1]!.content.length).toBeGreaterThan(0);
  expect(new Set(lengths).size).toBeGreaterThan(2); // it grew as it streamed
});

test('Stop keeps what arrived and marks it stopped, with no error to show', async () => {
  const session = new ChatSession(newClient(), { request: { max_tokens: 2000 } });
  session.subscribe(() => {
    if (session.getState().messages[1]?.content) session.stop();
  });
  await session.send('Tell me a long story');
  expect(session.getState().messages[1]!.state).toBe('stopped');
  expect(session.getState().error).toBeUndefined();
});

test('the client-side limit: a burst, then one message every five seconds', () => {
  let now = 0;
  const limiter = new RateLimiter(5, 12, () => now);
  expect([0, 0, 0, 0, 0].map(() => limiter.take())).toEqual([0, 0, 0, 0, 0]);
  expect(limiter.take()).toBe(5000);
  now += 2500;
  expect(limiter.take()).toBe(2500);
  now += 2500;
  expect(limiter.take()).toBe(0);
});

test('a router that cannot be reached, and one the app does not trust, read as such', async () => {
  const offline = new LLMRouterClient({ url: 'http://127.0.0.1:9', operatorPin, maxRetries: 0, fetch: globalThis.fetch });
  const unreachable = await offline.keys().catch((e: unknown) => e);
  expect(unreachable).toBeInstanceOf(NetworkError);
  expect(friendlyError(unreachable as NetworkError)).toMatch(/Can't reach the server/);

  const otherPin = 'QjPsZB1yzgvk5NxcRVplETaGiBOS5fZO7TnLRB-GZyc';
  const impostor = await new LLMRouterClient({ url, operatorPin: otherPin, fetch: globalThis.fetch }).keys().catch((e: unknown) => e);
  expect(impostor).toBeInstanceOf(KeyDocumentError);
  expect(friendlyError(impostor as KeyDocumentError)).toMatch(/not the one the app trusts/);
});

test('friendly messages for the rest', () => {
  expect(friendlyError(new RateLimitedError('rate_limited', 'm', 429, 12))).toBe('The service is busy. Try again in 12 seconds.');
  expect(friendlyError(new RateLimitedError('budget_exhausted', 'm', 429, undefined))).toMatch(/today's limit/);
  expect(friendlyError(new TimeoutError('idle_timeout'))).toMatch(/Can't reach/);
  expect(friendlyError(new StorageError('locked'))).toMatch(/locked/);
  expect(friendlyError(new RouterError('stale', 'm', 401))).toMatch(/date and time/);
  expect(friendlyError(new RouterError('model_unknown', 'm', 404))).toBe('Something went wrong (model_unknown).');
});
