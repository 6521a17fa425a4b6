/** The client's own checks, before any network traffic. */

import assert from 'node:assert/strict';
import { describe, it } from 'node:test';

import {
  ConfigurationError,
  type Fetch,
  InvalidRequestError,
  keychainStorage,
  type KeychainModule,
  LLMRouterClient,
  LLMRouterError,
  MemoryStorage,
  NetworkError,
  RateLimitedError,
  RouterError,
  secureStoreStorage,
  type SecureStoreModule,
  StorageError,
  TimeoutError,
} from '@llmrouter/client';

import { PersistentMemory } from './support/stores.js';

const PIN = Buffer.alloc(32, 7).toString('base64url');
const offline: Fetch = () => {
  throw new Error('no request may be sent');
};

describe('client options', () => {
  it('needs a pin, or trust on first use with a storage', () => {
    const url = 'https://router.example';
    assert.throws(() => new LLMRouterClient({ url }), ConfigurationError);
    assert.throws(() => new LLMRouterClient({ url, pin: PIN, trustOnFirstUse: true }), ConfigurationError);
    assert.throws(() => new LLMRouterClient({ url, trustOnFirstUse: true }), /storage/);
    assert.throws(() => new LLMRouterClient({ url, trustOnFirstUse: true, storage: new MemoryStorage() }), /persistent storage/);
    assert.ok(new LLMRouterClient({ url, trustOnFirstUse: true, storage: new PersistentMemory() }));
    assert.throws(() => new LLMRouterClient({ url, pin: 'short' }), /pin must be/);
    assert.throws(() => new LLMRouterClient({ url, pin: PIN + '=' }), /pin must be/);
  });

  it("refuses deviceKey 'auto' on a store that forgets, unless the identity is said to be ephemeral", async () => {
    const url = 'https://router.example';
    assert.throws(() => new LLMRouterClient({ url, pin: PIN, deviceKey: 'auto' }), /persistent secret storage/);
    assert.throws(() => new LLMRouterClient({ url, pin: PIN, deviceKey: 'auto', storage: new MemoryStorage() }), /'ephemeral'/);
    const storage = new PersistentMemory();
    const kept = new LLMRouterClient({ url, pin: PIN, deviceKey: 'auto', storage });
    const key = await kept.devicePublicKey();
    assert.deepEqual(await new LLMRouterClient({ url, pin: PIN, deviceKey: 'auto', storage }).devicePublicKey(), key);
    const ephemeral = new LLMRouterClient({ url, pin: PIN, deviceKey: 'ephemeral', storage });
    assert.notDeepEqual(await ephemeral.devicePublicKey(), key);
    const names = ['device-key', 'signing-key', 'key-document', 'registered'];
    assert.deepEqual(names.map((name) => storage.getItem(`llmrouter.${name}`) !== null), [true, false, false, false]);
  });

  it('refuses other URLs and device keys', () => {
    assert.throws(() => new LLMRouterClient({ url: 'ftp://x', pin: PIN }), /url/);
    assert.throws(() => new LLMRouterClient({ url: 'https://x', pin: PIN, deviceKey: new Uint8Array(31) }), /deviceKey/);
    assert.equal(new LLMRouterClient({ url: 'https://x//', pin: PIN }).url, 'https://x');
  });

  it('refuses a request the router would refuse before sending anything', async () => {
    const client = new LLMRouterClient({ url: 'https://x', pin: PIN, fetch: offline });
    const messages = [{ role: 'user' as const, content: 'hi' }];
    const cases: [Record<string, unknown>, string, string][] = [
      [{ messages, n: 2 }, 'n', 'unsupported_field'],
      [{ messages, tools: [] }, 'tools', 'invalid_request'],
      [{ messages, top_logprobs: 3 }, 'top_logprobs', 'invalid_request'],
    ];
    for (const [request, field, code] of cases) {
      await assert.rejects(
        client.chat(request as never).next(),
        (e: unknown) => e instanceof InvalidRequestError && e.field === field && e.code === code,
      );
      await assert.rejects(client.complete(request as never), InvalidRequestError);
    }
  });
});

describe('errors', () => {
  it('say whether the same request may succeed later, and keep their cause', () => {
    const cause = new TypeError('fetch failed');
    const network = new NetworkError(undefined, { cause });
    assert.equal(network.cause, cause);
    assert.equal(network.retryable, true);
    assert.ok(network instanceof LLMRouterError && network instanceof Error);
    assert.equal(new RateLimitedError('rate_limited', 'm', 429, 3).retryable, true);
    assert.equal(new RateLimitedError('budget_exhausted', 'm', 429, undefined).retryable, false);
    assert.equal(new RouterError('overloaded', 'm', 503).retryable, true);
    assert.equal(new RouterError('model_unknown', 'm', 404).retryable, false);
    assert.equal(new RouterError('http_error', 'm', 502).retryable, true);
    assert.equal(new RouterError('http_error', 'm', 400).retryable, false);
    assert.equal(new TimeoutError('idle_timeout').retryable, true);
    assert.equal(new ConfigurationError('m').retryable, false);
    assert.equal(new ConfigurationError('m').cause, undefined);
  });
});

describe('secret stores', () => {
  type Call = [string, ...unknown[]];

  it('expo-secure-store: the device key behind authentication, in its own service; the rest plain', async () => {
    const calls: Call[] = [];
    const items = new Map<string, string>();
    const SecureStore: SecureStoreModule = {
      WHEN_UNLOCKED_THIS_DEVICE_ONLY: 6,
      getItemAsync: async (key, options) => (calls.push(['get', key, options]), items.get(key) ?? null),
      setItemAsync: async (key, value, options) => void (calls.push(['set', key, options]), items.set(key, value)),
      deleteItemAsync: async (key, options) => void (calls.push(['delete', key, options]), items.delete(key)),
    };
    const storage = secureStoreStorage(SecureStore, { requireAuthentication: true, authenticationPrompt: 'Unlock' });
    const client = new LLMRouterClient({ url: 'https://x', trustOnFirstUse: true, deviceKey: 'auto', storage });
    await client.devicePublicKey();
    await storage.setItem('llmrouter.signing-key', PIN);
    const auth = { keychainService: 'llmrouter.auth', keychainAccessible: 6, requireAuthentication: true, authenticationPrompt: 'Unlock' };
    const plain = { keychainService: 'llmrouter', keychainAccessible: 6 };
    assert.deepEqual(calls, [
      ['get', 'llmrouter.device-key', auth],
      ['set', 'llmrouter.device-key', auth],
      ['set', 'llmrouter.signing-key', plain],
    ]);
  });

  it('react-native-keychain: one service per item, biometrics for the device key only', async () => {
    const calls: Call[] = [];
    const Keychain: KeychainModule = {
      ACCESSIBLE: { WHEN_UNLOCKED_THIS_DEVICE_ONLY: 'AccessibleWhenUnlockedThisDeviceOnly' },
      ACCESS_CONTROL: { BIOMETRY_CURRENT_SET_OR_DEVICE_PASSCODE: 'BiometryCurrentSetOrDevicePasscode' },
      getGenericPassword: async (options) => (calls.push(['get', options]), false),
      setGenericPassword: async (username, password, options) => (calls.push(['set', username, options]), true),
      resetGenericPassword: async (options) => (calls.push(['reset', options]), true),
    };
    const storage = keychainStorage(Keychain, { requireAuthentication: true });
    assert.equal(await storage.getItem('llmrouter.device-key'), null);
    await storage.setItem('llmrouter.signing-key', PIN);
    await storage.removeItem('llmrouter.signing-key');
    assert.deepEqual(calls, [
      ['get', { service: 'llmrouter:llmrouter.device-key', accessible: 'AccessibleWhenUnlockedThisDeviceOnly', accessControl: 'BiometryCurrentSetOrDevicePasscode', authenticationPrompt: { title: 'Unlock your chat key' } }],
      ['set', 'llmrouter', { service: 'llmrouter:llmrouter.signing-key', accessible: 'AccessibleWhenUnlockedThisDeviceOnly' }],
      ['reset', { service: 'llmrouter:llmrouter.signing-key', accessible: 'AccessibleWhenUnlockedThisDeviceOnly' }],
    ]);
  });

  it('a failing platform store becomes StorageError with the cause, and the next try reads again', async () => {
    const invalidated = new Error('User canceled the authentication');
    let fail = true;
    const SecureStore: SecureStoreModule = {
      WHEN_UNLOCKED_THIS_DEVICE_ONLY: 6,
      getItemAsync: async () => {
        if (fail) throw invalidated;
        return null;
      },
      setItemAsync: async () => undefined,
      deleteItemAsync: async () => undefined,
    };
    const client = new LLMRouterClient({ url: 'https://x', pin: PIN, deviceKey: 'auto', storage: secureStoreStorage(SecureStore, { requireAuthentication: true }) });
    await assert.rejects(client.devicePublicKey(), (e: unknown) => e instanceof StorageError && e.cause === invalidated && !e.retryable);
    fail = false;
    assert.ok((await client.devicePublicKey()) !== null);
  });
});
