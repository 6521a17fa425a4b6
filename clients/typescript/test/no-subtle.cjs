// Preloaded (NODE_OPTIONS=--require) for the second run of the suite: the platform's crypto is cut
// down to what React Native has with its polyfill, getRandomValues and nothing else, so a
// dependency on crypto.subtle anywhere in the SDK fails the tests.
'use strict';
const platform = globalThis.crypto || require('node:crypto').webcrypto;
Object.defineProperty(globalThis, 'crypto', {
  value: Object.freeze({ getRandomValues: platform.getRandomValues.bind(platform) }),
  configurable: true,
  writable: false,
});
