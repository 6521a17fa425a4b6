/** What the user reads when something fails: short, actionable, never the conversation. */
import {
  KeyDocumentError,
  type LLMRouterError,
  NetworkError,
  RateLimitedError,
  StorageError,
  TimeoutError,
  TruncatedStreamError,
} from '@llmrouter/client';

export function friendlyError(error: LLMRouterError): string {
  if (error instanceof RateLimitedError) {
    if (error.code === 'budget_exhausted') return "You've reached today's limit. Try again tomorrow.";
    return `The service is busy. Try again in ${error.retryAfter ?? 30} seconds.`;
  }
  if (error instanceof NetworkError || error instanceof TimeoutError) return "Can't reach the server. Check your connection and try again.";
  if (error instanceof TruncatedStreamError) return 'The answer was cut off. Try again.';
  if (error instanceof StorageError) return 'Your chat key is locked. Unlock it to continue.';
  if (error instanceof KeyDocumentError && error.code === 'pin_mismatch') return "This server is not the one the app trusts. Don't continue on this network.";
  if (error.code === 'stale' || error.code === 'stale_key_document') return "Check your phone's date and time, then try again.";
  if (error.code === 'v2_unavailable') return "This server can't keep your chat private from itself yet. Don't continue.";
  return error.retryable ? 'Something went wrong. Try again.' : `Something went wrong (${error.code}).`;
}
