import { StatusBar } from 'expo-status-bar';
import { useEffect, useState } from 'react';
import { Text, View } from 'react-native';

import type { LLMRouterClient } from '@llmrouter/client';

import { ChatScreen } from './src/ChatScreen';
import { createClient } from './src/client';
import { config } from './src/config';
import { type Pinning, pinTls } from './src/pinning';

const NOTES: Record<Pinning, string> = {
  pinned: '',
  'not-https': 'Development router over http: nothing to pin.',
  unavailable: 'TLS pinning is off (Expo Go, or fewer than two pins): the operator key is still pinned.',
};

export default function App() {
  const [ready, setReady] = useState<{ client: LLMRouterClient; note: string } | undefined>();
  const [failed, setFailed] = useState(false);
  useEffect(() => {
    // Pin TLS before the first request, then make the client; pins that do not load stop the app
    // rather than let it talk unpinned.
    pinTls(config.routerUrl, config.tlsPins).then(
      (pinning) => setReady({ client: createClient(config), note: NOTES[pinning] }),
      () => setFailed(true),
    );
  }, []);
  return (
    <View style={{ flex: 1 }}>
      {ready ? (
        <ChatScreen client={ready.client} note={ready.note} />
      ) : (
        <Text style={{ padding: 56 }}>{failed ? 'The TLS pins in this build are invalid: not connecting.' : 'Starting…'}</Text>
      )}
      <StatusBar style="auto" />
    </View>
  );
}
