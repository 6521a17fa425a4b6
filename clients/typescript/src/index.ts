/**
 * @llmrouter/client: end-to-end encrypted chat with an llmrouter router: protocol v2, the blind
 * router (with the operator's pin; the router cannot read the conversation), or v1.1 (with the
 * router's own pin).
 *
 *     const client = new LLMRouterClient({ url, operatorPin });
 *     for await (const event of client.chat({ messages: [{ role: 'user', content: 'Hi' }] })) {
 *       if (event.type === 'delta') show(event.text);
 *     }
 *
 * docs/clients.md has the React Native and browser setups, tool calls, JSON output, reasoning,
 * and what the client guarantees.
 */

export type {
  AssistantMessage,
  ChatRequest,
  Content,
  FunctionTool,
  JsonSchema,
  Message,
  ReasoningEffort,
  ResponseFormat,
  Role,
  SystemMessage,
  TextPart,
  ToolCall,
  ToolChoice,
  ToolMessage,
  UserMessage,
} from './chat.js';
export {
  type AnyKeyDocument,
  type ChatEvent,
  type ChatStatus,
  type ClientOptions,
  LLMRouterClient,
  type ModelList,
  type ProtocolVersion,
  type PrepareOptions,
  type PrepareProgress,
  type RequestOptions,
} from './client.js';
export type { BodyStream, Fetch, FetchInit, FetchResponse } from './transport.js';
export { type XMLHttpRequestLike, xhrFetch } from './xhr.js';
export type { PowProgress } from './pow.js';
export {
  AbortedError,
  type ClientErrorCode,
  ConfigurationError,
  DecryptionError,
  EncryptionError,
  type ErrorCode,
  type ErrorOptions,
  InvalidRequestError,
  KeyDocumentError,
  KeyRotationError,
  LLMRouterError,
  NetworkError,
  RateLimitedError,
  RouterError,
  type RouterErrorCode,
  StorageError,
  TimeoutError,
  TruncatedStreamError,
  type UpstreamRefusal,
} from './errors.js';
export type {
  DeltaEvent,
  DoneEvent,
  FinishReason,
  KeyDocument,
  Logprob,
  PublishedKey,
  ReasoningEvent,
  ToolCallEvent,
  TopLogprob,
  Usage,
} from './protocol.js';
export type { Certificate, KeyDocumentV2, NodeEntry } from './v2keys.js';
export { type Reply, ReplyBuilder } from './reply.js';
export { type ChatMessage, ChatSession, type ChatSessionOptions, type ChatState } from './session.js';
export { type KeyStorage, MemoryStorage } from './storage.js';
export {
  type KeychainModule,
  type KeychainOptions,
  keychainStorage,
  type KeychainStorageOptions,
  type SecureStoreModule,
  type SecureStoreOptions,
  secureStoreStorage,
  type SecureStoreStorageOptions,
} from './stores.js';
export type { SealedRequest, SealOptions, StreamOpener, WireProtocol } from './wire.js';
