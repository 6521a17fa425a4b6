/** A bare React Native app's entry: protocol v1.1 (the router's own pin), global fetch (no streams), the device key in react-native-keychain. */
import 'react-native-get-random-values';

import { AppRegistry } from 'react-native';
import * as Keychain from 'react-native-keychain';

import { LLMRouterClient, keychainStorage } from '@llmrouter/client';

import { Chat, PIN } from './Chat';

const client = new LLMRouterClient({
  url: 'https://router.example',
  pin: PIN,
  deviceKey: 'auto',
  storage: keychainStorage(Keychain, { requireAuthentication: true }),
});

AppRegistry.registerComponent('main', () => () => <Chat client={client} />);
