/** The chat: messages streaming in, Send and Stop, the setup progress, friendly errors. */
import { useEffect, useRef, useState } from 'react';
import { ActivityIndicator, Button, FlatList, KeyboardAvoidingView, Platform, StyleSheet, Text, TextInput, View } from 'react-native';

import type { LLMRouterClient, LLMRouterError } from '@llmrouter/client';
import { useChat } from '@llmrouter/client/react';

import { friendlyError } from './errors';
import { RateLimiter } from './rateLimit';

export function ChatScreen({ client, note }: { client: LLMRouterClient; note?: string }) {
  const { messages, streaming, error, status, send, stop, retry } = useChat(client, {
    system: 'You are a helpful assistant. Answer briefly.',
    request: { max_tokens: 512 },
  });
  const limiter = useRef(new RateLimiter(5, 12)).current; // 5 at once, then one every 5 s
  const [draft, setDraft] = useState('');
  const [setup, setSetup] = useState<{ fraction: number; error?: LLMRouterError }>({ fraction: 0 });
  const [notice, setNotice] = useState('');

  // At start: verify the keys, unlock or make the device key, pay the new-device proof of work.
  useEffect(() => {
    const controller = new AbortController();
    client
      .prepare({ signal: controller.signal, onProgress: ({ fraction }) => setSetup({ fraction }) })
      .catch((e: LLMRouterError) => controller.signal.aborted || setSetup({ fraction: 0, error: e }));
    return () => controller.abort();
  }, [client]);

  function onSend() {
    const text = draft.trim();
    if (!text || streaming) return;
    const wait = limiter.take();
    if (wait > 0) {
      setNotice(`Slow down a little: ${Math.ceil(wait / 1000)} s.`);
      return;
    }
    setNotice('');
    setDraft('');
    void send(text);
  }

  const line =
    status?.type === 'proof_of_work'
      ? 'Securing this device…'
      : status?.type === 'retrying'
        ? `Busy, retrying in ${Math.ceil(status.delayMs / 1000)} s…`
        : status?.type === 'response' && !status.streaming
          ? 'The answer will appear when it is complete.'
          : '';

  return (
    <KeyboardAvoidingView style={styles.screen} behavior={Platform.OS === 'ios' ? 'padding' : undefined}>
      {setup.fraction < 1 && !setup.error ? (
        <View style={styles.row}>
          <ActivityIndicator />
          <Text> Setting up encryption… {Math.round(setup.fraction * 100)} %</Text>
        </View>
      ) : null}
      {setup.error ? <Text style={styles.error}>{friendlyError(setup.error)}</Text> : null}
      {note ? <Text style={styles.note}>{note}</Text> : null}
      <FlatList
        style={styles.list}
        data={messages}
        keyExtractor={(m) => m.id}
        renderItem={({ item }) => (
          <Text style={item.role === 'user' ? styles.user : styles.assistant}>
            {item.content || (item.state === 'streaming' ? '…' : '')}
            {item.state === 'stopped' ? ' (stopped)' : ''}
          </Text>
        )}
      />
      {line ? <Text style={styles.note}>{line}</Text> : null}
      {error ? (
        <View style={styles.row}>
          <Text style={styles.error}>{friendlyError(error)} </Text>
          {error.retryable ? <Button title="Retry" onPress={() => void retry()} /> : null}
        </View>
      ) : null}
      {notice ? <Text style={styles.note}>{notice}</Text> : null}
      <View style={styles.row}>
        <TextInput style={styles.input} value={draft} onChangeText={setDraft} placeholder="Message" onSubmitEditing={onSend} />
        {streaming ? <Button title="Stop" onPress={stop} /> : <Button title="Send" onPress={onSend} />}
      </View>
    </KeyboardAvoidingView>
  );
}

const styles = StyleSheet.create({
  screen: { flex: 1, padding: 16, paddingTop: 56 },
  list: { flex: 1 },
  row: { flexDirection: 'row', alignItems: 'center', gap: 8 },
  input: { flex: 1, borderWidth: 1, borderColor: '#ccc', borderRadius: 8, padding: 8 },
  user: { alignSelf: 'flex-end', backgroundColor: '#dbeafe', padding: 8, borderRadius: 8, marginVertical: 4 },
  assistant: { alignSelf: 'flex-start', backgroundColor: '#f1f5f9', padding: 8, borderRadius: 8, marginVertical: 4 },
  note: { color: '#64748b', marginVertical: 4 },
  error: { color: '#b91c1c', marginVertical: 4 },
});
