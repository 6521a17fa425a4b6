/**
 * One conversation on a screen, without React: the messages so far, the answer as it streams,
 * whether it is streaming, the last error, and send / stop / retry / reset. `useChat`
 * (`@llmrouter/client/react`) is this behind `useSyncExternalStore`; other UI layers subscribe
 * to it directly. The history stays on the device: it is sealed into each request.
 */

import type { ChatRequest, Message } from './chat.js';
import { type ChatStatus, type LLMRouterClient } from './client.js';
import { AbortedError, LLMRouterError } from './errors.js';

export interface ChatMessage {
  id: string;
  role: 'user' | 'assistant';
  content: string;
  /** The model's reasoning, for a request with `include_reasoning: true`. */
  reasoning: string;
  /** `stopped`: the user aborted it (kept, as far as it got); `failed`: an error cut it (not sent back). */
  state: 'complete' | 'streaming' | 'stopped' | 'failed';
}

export interface ChatState {
  messages: readonly ChatMessage[];
  streaming: boolean;
  /** The last request's error, until the next send. */
  error: LLMRouterError | undefined;
  /** What the request in flight is doing (proof of work, a retry wait, ...). */
  status: ChatStatus | undefined;
}

export interface ChatSessionOptions {
  /** A system message put first in every request. */
  system?: string;
  /** The other request fields (`model`, `max_tokens`, ...). */
  request?: Omit<ChatRequest, 'messages'>;
}

let counter = 0;
const newId = () => `m${Date.now().toString(36)}${(counter++).toString(36)}`;

export class ChatSession {
  private state: ChatState = { messages: [], streaming: false, error: undefined, status: undefined };
  private readonly listeners = new Set<() => void>();
  private controller: AbortController | undefined;

  constructor(
    private readonly client: LLMRouterClient,
    private readonly options: ChatSessionOptions = {},
  ) {}

  /** The current state: the same object until something changes (what useSyncExternalStore needs). */
  getState = (): ChatState => this.state;

  subscribe = (listener: () => void): (() => void) => {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  };

  private update(change: Partial<ChatState>): void {
    this.state = { ...this.state, ...change };
    for (const listener of this.listeners) listener();
  }

  private patchLast(change: Partial<ChatMessage>): void {
    const messages = this.state.messages.slice();
    messages[messages.length - 1] = { ...messages[messages.length - 1]!, ...change };
    this.update({ messages });
  }

  /** The history as the router gets it: failed answers left out, a stopped one as far as it got. */
  private history(): Message[] {
    const out: Message[] = [];
    if (this.options.system !== undefined) out.push({ role: 'system', content: this.options.system });
    for (const m of this.state.messages) {
      if (m.state === 'failed' || (m.role === 'assistant' && m.content === '')) continue;
      out.push({ role: m.role, content: m.content });
    }
    return out;
  }

  /** Send `text` as the user's next message and stream the answer; resolves when it has ended. */
  async send(text: string): Promise<void> {
    if (this.state.streaming) throw new Error('a request is already streaming: stop() it first');
    this.update({ messages: [...this.state.messages, { id: newId(), role: 'user', content: text, reasoning: '', state: 'complete' }] });
    await this.run();
  }

  /** After an error: ask again for the last user message. */
  async retry(): Promise<void> {
    if (this.state.streaming) return;
    const messages = this.state.messages.filter((m, i, all) => !(i === all.length - 1 && m.role === 'assistant' && m.state === 'failed'));
    if (messages[messages.length - 1]?.role !== 'user') return;
    this.update({ messages });
    await this.run();
  }

  /** Abort the answer in flight; what arrived is kept as `stopped`. */
  stop(): void {
    this.controller?.abort();
  }

  /** Forget the conversation (aborting an answer in flight). */
  reset(): void {
    this.stop();
    this.update({ messages: [], error: undefined, status: undefined });
  }

  private async run(): Promise<void> {
    const controller = (this.controller = new AbortController());
    const request: ChatRequest = { ...this.options.request, messages: this.history() };
    this.update({
      messages: [...this.state.messages, { id: newId(), role: 'assistant', content: '', reasoning: '', state: 'streaming' }],
      streaming: true,
      error: undefined,
      status: undefined,
    });
    let content = '';
    let reasoning = '';
    try {
      const events = this.client.chat(request, { signal: controller.signal, onStatus: (status) => this.update({ status }) });
      for await (const event of events) {
        if (event.type === 'delta') content += event.text;
        else if (event.type === 'reasoning') reasoning += event.text;
        else continue;
        this.patchLast({ content, reasoning });
      }
      this.patchLast({ state: 'complete' });
      this.update({ streaming: false, status: undefined });
    } catch (e) {
      const error = e instanceof LLMRouterError ? e : new LLMRouterError('internal', 'the request failed', undefined, { cause: e });
      const stopped = error instanceof AbortedError;
      this.patchLast({ state: stopped ? 'stopped' : 'failed' });
      this.update({ streaming: false, status: undefined, error: stopped ? undefined : error });
    } finally {
      if (this.controller === controller) this.controller = undefined;
    }
  }
}
