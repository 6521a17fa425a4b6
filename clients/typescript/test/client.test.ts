/** The client's own checks, before any network traffic. */

import assert from 'node:assert/strict';
import { describe, it } from 'node:test';

import { ConfigurationError, type Fetch, InvalidRequestError, LLMRouterClient, MemoryStorage } from '@llmrouter/client';

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
    assert.ok(new LLMRouterClient({ url, trustOnFirstUse: true, storage: new MemoryStorage() }));
    assert.throws(() => new LLMRouterClient({ url, pin: 'short' }), /pin must be/);
    assert.throws(() => new LLMRouterClient({ url, pin: PIN + '=' }), /pin must be/);
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
