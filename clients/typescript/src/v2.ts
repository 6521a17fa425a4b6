/**
 * Protocol v2, the blind router (docs/protocol.md part II), as pure functions of bytes and time:
 * the key document's chain of trust, the sealed request, the sealed answer. `LLMRouterClient`
 * does the HTTP; this entry point is for tools and tests that work with the wire itself
 * (`@llmrouter/client/v2`).
 */

export * from './v2keys.js';
export * from './v2request.js';
export * from './v2response.js';
export { hasExactly, isObject, JsonError, parseStrict } from './json.js';
