/**
 * @llmrouter/client: end-to-end encrypted chat with an llmrouter router (protocol v1.1).
 *
 *     const client = new LLMRouterClient({ url, pin });
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
export { type ChatEvent, type ClientOptions, type Fetch, type FetchResponse, LLMRouterClient, type ModelList } from './client.js';
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
export { type Reply, ReplyBuilder } from './reply.js';
export { type KeyStorage, MemoryStorage } from './storage.js';
