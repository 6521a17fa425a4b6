/**
 * The app's one client: protocol v2 with the pinned operator key (the router cannot read the
 * conversation), device key in the Keychain / Keystore behind
 * biometrics, the key document cached in AsyncStorage for an offline start, streaming over
 * React Native's (TLS-pinned) networking.
 */
import AsyncStorage from '@react-native-async-storage/async-storage';
import * as SecureStore from 'expo-secure-store';

import { type KeyStorage, LLMRouterClient, secureStoreStorage, xhrFetch } from '@llmrouter/client';

import type { Config } from './config';

export function createClient(config: Config): LLMRouterClient {
  const cache: KeyStorage = AsyncStorage; // public data only: the signed key document
  return new LLMRouterClient({
    url: config.routerUrl,
    operatorPin: config.operatorPin,
    deviceKey: 'auto',
    storage: secureStoreStorage(SecureStore, { requireAuthentication: true, authenticationPrompt: 'Unlock your private chat' }),
    cache,
    fetch: xhrFetch(),
  });
}
