/** The Expo app: protocol v2 (the operator pin), expo/fetch (streams), the device key in expo-secure-store behind biometrics. */
import { fetch } from 'expo/fetch';
import * as SecureStore from 'expo-secure-store';
import { StatusBar } from 'expo-status-bar';

import { LLMRouterClient, secureStoreStorage } from '@llmrouter/client';

import { Chat, PIN } from './Chat';

const client = new LLMRouterClient({
  url: 'https://router.example',
  operatorPin: PIN,
  deviceKey: 'auto',
  storage: secureStoreStorage(SecureStore, { requireAuthentication: true }),
  fetch,
});

export default function App() {
  return (
    <>
      <Chat client={client} />
      <StatusBar style="auto" />
    </>
  );
}
