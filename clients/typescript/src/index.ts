/**
 * @llmrouter/client: end-to-end encrypted chat with an llmrouter router (protocol v1).
 *
 *     const client = new LLMRouterClient({ url, pin });
 *     for await (const event of client.chat({ messages: [{ role: 'user', content: 'Hi' }] })) {
 *       if (event.type === 'delta') show(event.text);
 *     }
 *
 * docs/clients.md has the React Native and browser setups and what the client guarantees.
 */

export { type ChatEvent, type ClientOptions, type Fetch, type FetchResponse, LLMRouterClient } from './client.js';
export {
  AbortedError,
  type ClientErrorCode,
  ConfigurationError,
  DecryptionError,
  EncryptionError,
  type ErrorCode,
  InvalidRequestError,
  KeyDocumentError,
  KeyRotationError,
  LLMRouterError,
  NetworkError,
  RateLimitedError,
  RouterError,
  type RouterErrorCode,
  TruncatedStreamError,
} from './errors.js';
export type { ChatRequest, DeltaEvent, DoneEvent, KeyDocument, Message, PublishedKey, Role, Usage } from './protocol.js';
export { type KeyStorage, MemoryStorage } from './storage.js';
