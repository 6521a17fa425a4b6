// Preloaded into every test process (NODE_OPTIONS=--require). Node 18 has no global `crypto`:
// it gets the one-line polyfill docs/clients.md gives apps on Node 18. With LLMROUTER_NO_SUBTLE=1
// (the suite's second run) the platform's crypto is cut down to what React Native has with its
// polyfill, getRandomValues and nothing else, so any use of crypto.subtle in the SDK fails the tests.
'use strict';
if (globalThis.crypto === undefined) {
  globalThis.crypto = require('node:crypto').webcrypto;
}
if (process.env.LLMROUTER_NO_SUBTLE === '1') {
  const platform = globalThis.crypto;
  Object.defineProperty(globalThis, 'crypto', {
    value: Object.freeze({ getRandomValues: platform.getRandomValues.bind(platform) }),
    configurable: true,
    writable: false,
  });
}
