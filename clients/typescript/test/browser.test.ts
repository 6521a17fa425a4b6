/**
 * The SDK in a real headless Chromium: examples/browser/index.html loads it from this directory
 * (ES modules and an import map, no bundler) and chats with a real certified router and node on
 * protocol v2 (and v1.1), over fetch and over XMLHttpRequest (xhrFetch, the React Native path,
 * its binary body included); the router must list the page's origin in CORS_ORIGINS, and a
 * router without the setting is unreachable from the page.
 * In the suite's run without crypto.subtle the page loses it too.
 */

import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';

import { Browser } from './support/browser.js';
import { type Inference, makeOperator, type Operator, PACKAGE, type Router, startInference, startRouter, startRouterV2, waitFor } from './support/stack.js';
import { serveDirectory } from './support/static.js';

const NO_SUBTLE = process.env.LLMROUTER_NO_SUBTLE === '1';
const REMOVE_SUBTLE = "Object.defineProperty(Crypto.prototype, 'subtle', { get: () => undefined });";

describe('in headless Chromium', { timeout: 180000 }, () => {
  let site: Awaited<ReturnType<typeof serveDirectory>>;
  let operator: Operator;
  let inference: Inference;
  let open: Router;
  let closed: Router;
  let browser: Browser;

  before(async () => {
    site = await serveDirectory(PACKAGE);
    operator = await makeOperator();
    inference = await startInference([], { operator, name: 'node-a' });
    [open, closed] = await Promise.all([startRouterV2(operator, [inference], ['node-a'], { CORS_ORIGINS: site.origin }), startRouter(inference)]);
    browser = new Browser();
  });

  after(async () => {
    await browser?.close();
    await Promise.all([open?.stop(), closed?.stop()]);
    await inference?.stop();
    operator?.stop();
    await site?.close();
  });

  async function chatFromPage(
    router: Router,
    transport = 'fetch',
    protocol: '2' | '1.1' = '2',
  ): Promise<{ state: string; answer: string; status: string; subtle: boolean; deltas: number; streaming: string }> {
    browser.problems.length = 0;
    const page = await browser.page(NO_SUBTLE ? REMOVE_SUBTLE : undefined);
    const pin = protocol === '2' ? operator.pin : router.pin;
    const query = new URLSearchParams({ url: router.url, pin, prompt: 'Hello from a browser', transport, protocol });
    await page.goto(`${site.origin}/examples/browser/?${query}`);
    const state = await waitFor(
      () => page.evaluate<string>("document.body?.dataset.state ?? 'loading'"),
      (s) => s === 'done' || s.startsWith('error'),
      () => `the page chat (${browser.problems.join('; ')})`,
      60000,
    );
    return {
      state,
      answer: await page.evaluate<string>("document.getElementById('answer').textContent"),
      status: await page.evaluate<string>("document.getElementById('status').textContent"),
      subtle: await page.evaluate<boolean>('globalThis.crypto.subtle !== undefined'),
      deltas: Number(await page.evaluate<string>('document.body.dataset.deltas')),
      streaming: await page.evaluate<string>('document.body.dataset.streaming'),
    };
  }

  it('chats with a router that lists the page origin, on protocol v2 and v1.1', async () => {
    for (const protocol of ['2', '1.1'] as const) {
      const result = await chatFromPage(open, 'fetch', protocol);
      assert.equal(result.state, 'done', `${protocol}: ${result.status}`);
      assert.ok(result.answer.length > 0);
      assert.match(result.status, /^length, 64 tokens$/);
      assert.equal(result.subtle, !NO_SUBTLE);
    }
  });

  it('streams over XMLHttpRequest with xhrFetch (the transport TLS-pinning libraries cover on React Native)', async () => {
    const result = await chatFromPage(open, 'xhr');
    assert.equal(result.state, 'done', result.status);
    assert.match(result.status, /^length, 64 tokens$/);
    assert.equal(result.streaming, 'true');
    assert.ok(result.deltas > 1, `${result.deltas} deltas`);
  });

  it('cannot reach a router without CORS_ORIGINS', async () => {
    const result = await chatFromPage(closed);
    assert.equal(result.state, 'error:network', result.status);
    assert.equal(result.answer, '');
    const overXhr = await chatFromPage(closed, 'xhr');
    assert.equal(overXhr.state, 'error:network', overXhr.status);
  });
});
