/**
 * TLS public-key pinning with react-native-ssl-public-key-pinning: React Native's networking
 * (its fetch and XMLHttpRequest, OkHttp on Android, NSURLSession on iOS) then refuses any
 * certificate for the router's host whose key is not one of the pins, even one a user- or
 * MDM-installed CA signed. The chat goes over XMLHttpRequest (xhrFetch) for that reason:
 * expo/fetch has its own native stack, which the library does not cover.
 *
 * Belt and braces: the SDK already refuses any key the pinned operator key did not certify,
 * so a forged certificate alone can read nothing; TLS pinning keeps such a proxy from seeing
 * even the metadata and from dropping or delaying requests unnoticed.
 */
import { initializeSslPinning, isSslPinningAvailable } from 'react-native-ssl-public-key-pinning';

export type Pinning = 'pinned' | 'unavailable' | 'not-https';

export async function pinTls(routerUrl: string, publicKeyHashes: string[]): Promise<Pinning> {
  const match = /^https:\/\/([^/:]+)/.exec(routerUrl);
  if (match === null) return 'not-https'; // a development router on http://, nothing to pin
  // Expo Go has no native module of its own: a development build (npx expo run:ios) has it
  if (!isSslPinningAvailable() || publicKeyHashes.length < 2) return 'unavailable';
  await initializeSslPinning({ [match[1]!]: { includeSubdomains: false, publicKeyHashes } });
  return 'pinned';
}
