/**
 * `useChat`: a chat screen's state and actions, for React and React Native.
 *
 *     const { messages, streaming, error, status, send, stop, retry } = useChat(client, { system: 'Be brief.' });
 *
 * The session lives as long as the component; leaving the screen aborts the answer in flight
 * (the router stops generating). The logic is `ChatSession` (the main entry), so it can be
 * tested, or used from another UI layer, without React.
 */

import { useEffect, useMemo, useSyncExternalStore } from 'react';

import type { LLMRouterClient } from './client.js';
import { type ChatSessionOptions, ChatSession, type ChatState } from './session.js';

export type { ChatMessage, ChatSessionOptions, ChatState } from './session.js';

export interface UseChat extends ChatState {
  send(text: string): Promise<void>;
  stop(): void;
  retry(): Promise<void>;
  reset(): void;
}

export function useChat(client: LLMRouterClient, options: ChatSessionOptions = {}): UseChat {
  // One session per client, with the options of the first render.
  const session = useMemo(() => new ChatSession(client, options), [client]); // eslint-disable-line react-hooks/exhaustive-deps
  const state = useSyncExternalStore(session.subscribe, session.getState, session.getState);
  useEffect(() => () => session.stop(), [session]);
  return useMemo(
    () => ({ ...state, send: (text: string) => session.send(text), stop: () => session.stop(), retry: () => session.retry(), reset: () => session.reset() }),
    [state, session],
  );
}
