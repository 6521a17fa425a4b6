/**
 * The SDK as an app's screen uses it, every entry point: copied into each fixture app by
 * test/apps/run before it is type-checked (the app's own tsconfig) and bundled (Metro).
 */
import { useEffect, useState } from 'react';
import { Button, Text, TextInput, View } from 'react-native';

import { LLMRouterClient, type LLMRouterError, RateLimitedError } from '@llmrouter/client';
import { deriveKeyPair } from '@llmrouter/client/hpke';
import { createOpenAIFetch } from '@llmrouter/client/openai';
import { verifyKeyDocument } from '@llmrouter/client/protocol';
import { useChat } from '@llmrouter/client/react';

export const PIN = 'QjPsZB1yzgvk5NxcRVplETaGiBOS5fZO7TnLRB-GZyc';

/** What a friendly error line says. */
export function describe(error: LLMRouterError): string {
  if (error instanceof RateLimitedError) return `busy, try again in ${error.retryAfter ?? 30} s`;
  return error.retryable ? 'connection trouble, try again' : `failed: ${error.code}`;
}

export function Chat({ client }: { client: LLMRouterClient }) {
  const { messages, streaming, error, status, send, stop } = useChat(client, { request: { max_tokens: 256 } });
  const [draft, setDraft] = useState('');
  const [ready, setReady] = useState(0);
  useEffect(() => {
    const controller = new AbortController();
    client.prepare({ signal: controller.signal, onProgress: ({ fraction }) => setReady(fraction) }).catch(() => undefined);
    return () => controller.abort();
  }, [client]);
  // the OpenAI-compatible fetch and the wire modules resolve too (not used on this screen)
  void [createOpenAIFetch(client), deriveKeyPair, verifyKeyDocument];
  return (
    <View style={{ flex: 1, padding: 24 }}>
      <Text>{ready < 1 ? `setting up ${Math.round(ready * 100)} %` : 'ready'}</Text>
      {messages.map((m) => (
        <Text key={m.id}>{`${m.role}: ${m.content}`}</Text>
      ))}
      {status?.type === 'response' && !status.streaming ? <Text>(the answer arrives at the end)</Text> : null}
      {error ? <Text>{describe(error)}</Text> : null}
      <TextInput value={draft} onChangeText={setDraft} />
      <Button title={streaming ? 'Stop' : 'Send'} onPress={() => (streaming ? stop() : void send(draft))} />
    </View>
  );
}
