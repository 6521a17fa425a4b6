/**
 * A whole answer assembled from the events of one `chat()` stream: the text, the reasoning apart
 * from it, the tool calls put together from their fragments, the log probabilities, and the
 * assistant message to put back into the history for the next turn.
 */

import type { AssistantMessage, ToolCall } from './chat.js';
import type { DeltaEvent, DoneEvent, FinishReason, Logprob, ReasoningEvent, ToolCallEvent, Usage } from './protocol.js';

/** What `chat()` yields, in order; `done` is always the last one. */
export type ChatEvent = DeltaEvent | ReasoningEvent | ToolCallEvent | DoneEvent;

export interface Reply {
  text: string;
  /** Empty unless the request had `include_reasoning: true`. */
  reasoning: string;
  /** In index order; `arguments` is the model's JSON text, to be parsed with care. */
  tool_calls: ToolCall[];
  /** Of the answer text, when the request had `logprobs: true`. */
  logprobs: Logprob[];
  finish_reason: FinishReason;
  usage: Usage;
  /** The assistant message for the history (the reasoning is not sent back). */
  message: AssistantMessage;
}

interface PartialCall {
  id: string | undefined;
  name: string;
  arguments: string[];
}

/** Feed it every event of a stream (`add`), then take the `reply()` once `done` has come. */
export class ReplyBuilder {
  private readonly text: string[] = [];
  private readonly reasoning: string[] = [];
  private readonly logprobs: Logprob[] = [];
  private readonly calls = new Map<number, PartialCall>();
  private done: DoneEvent | undefined;

  add(event: ChatEvent): void {
    switch (event.type) {
      case 'delta':
        this.text.push(event.text);
        this.logprobs.push(...(event.logprobs ?? []));
        break;
      case 'reasoning':
        this.reasoning.push(event.text);
        break;
      case 'tool_call': {
        let call = this.calls.get(event.index);
        if (call === undefined) this.calls.set(event.index, (call = { id: undefined, name: '', arguments: [] }));
        call.id ??= event.id;
        if (event.name) call.name = event.name;
        call.arguments.push(event.arguments);
        break;
      }
      case 'done':
        this.done = event;
        break;
    }
  }

  reply(): Reply {
    if (this.done === undefined) throw new Error('the stream has not ended');
    const text = this.text.join('');
    const toolCalls = [...this.calls.entries()]
      .sort(([a], [b]) => a - b)
      .map(([index, call]): ToolCall => ({
        id: call.id || `call_${index}`, // a call without an id gets one, so it can go back in the history
        type: 'function',
        function: { name: call.name, arguments: call.arguments.join('') },
      }));
    const message: AssistantMessage =
      toolCalls.length > 0 ? { role: 'assistant', content: text || null, tool_calls: toolCalls } : { role: 'assistant', content: text };
    return {
      text,
      reasoning: this.reasoning.join(''),
      tool_calls: toolCalls,
      logprobs: this.logprobs,
      finish_reason: this.done.finish_reason,
      usage: this.done.usage,
      message,
    };
  }
}
