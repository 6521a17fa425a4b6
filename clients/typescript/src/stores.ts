/**
 * Ready secret stores for phones (`storage` of the client; see storage.ts for why the secret
 * lives apart from the cache). Each takes the library's module as an argument, so this package
 * depends on neither and an app installs only the one it uses:
 *
 *     import * as SecureStore from 'expo-secure-store';
 *     storage: secureStoreStorage(SecureStore, { requireAuthentication: true })
 *
 *     import * as Keychain from 'react-native-keychain';
 *     storage: keychainStorage(Keychain, { requireAuthentication: true })
 *
 * With `requireAuthentication` the device key (and only it: the trusted signing key is not a
 * secret) is stored behind the user's biometrics or passcode, bound to this device, never in
 * backups. The client reads it once per launch (one prompt) and keeps it in memory after that.
 * When the user changes their enrolled biometrics the platform invalidates such an item: reading
 * it then fails with a `StorageError` (`cause` has the platform's error); `client.resetDevice()`
 * makes a new device key, which pays a new proof of work.
 */

import { StorageError } from './errors.js';
import { type KeyStorage } from './storage.js';

const DEVICE_KEY = /(^|\.)device-key$/;

/** What of `expo-secure-store` the adapter uses (its module, `import * as SecureStore`). */
export interface SecureStoreModule {
  getItemAsync(key: string, options?: SecureStoreOptions): Promise<string | null>;
  setItemAsync(key: string, value: string, options?: SecureStoreOptions): Promise<void>;
  deleteItemAsync(key: string, options?: SecureStoreOptions): Promise<void>;
  readonly WHEN_UNLOCKED_THIS_DEVICE_ONLY: number;
}

/** The subset of expo-secure-store's `SecureStoreOptions` the adapter sets. */
export interface SecureStoreOptions {
  keychainService?: string;
  requireAuthentication?: boolean;
  authenticationPrompt?: string;
  keychainAccessible?: number;
}

export interface SecureStoreStorageOptions {
  /** The device key behind biometrics or the passcode (expo-secure-store's `requireAuthentication`). */
  requireAuthentication?: boolean;
  /** What the system prompt says (iOS shows it; Android's prompt title). */
  authenticationPrompt?: string;
  /**
   * The Keychain service (iOS) / key alias (Android) for the SDK's items (default `llmrouter`);
   * the authenticated item gets `<service>.auth`, since one service cannot mix items that need
   * authentication and items that do not.
   */
  keychainService?: string;
}

/** A secret store on expo-secure-store: iOS Keychain, Android Keystore-encrypted preferences. */
export function secureStoreStorage(SecureStore: SecureStoreModule, options: SecureStoreStorageOptions = {}): KeyStorage {
  const service = options.keychainService ?? 'llmrouter';
  const optionsFor = (key: string): SecureStoreOptions => {
    const secret = options.requireAuthentication === true && DEVICE_KEY.test(key);
    return {
      keychainService: secret ? `${service}.auth` : service,
      keychainAccessible: SecureStore.WHEN_UNLOCKED_THIS_DEVICE_ONLY,
      ...(secret ? { requireAuthentication: true, authenticationPrompt: options.authenticationPrompt ?? 'Unlock your chat key' } : {}),
    };
  };
  return {
    persistent: true,
    getItem: (key) => guarded('read', () => SecureStore.getItemAsync(key, optionsFor(key))),
    setItem: (key, value) => guarded('write', () => SecureStore.setItemAsync(key, value, optionsFor(key))),
    removeItem: (key) => guarded('remove', () => SecureStore.deleteItemAsync(key, optionsFor(key))),
  };
}

/**
 * What of `react-native-keychain` the adapter uses (its module, `import * as Keychain`). The
 * options are loosely typed here because each major types them its own way (enums, a prompt
 * that is a string in one and an object in another); the adapter passes `KeychainOptions`.
 */
export interface KeychainModule {
  getGenericPassword(options?: LooseOptions): Promise<false | { password: string }>;
  setGenericPassword(username: string, password: string, options?: LooseOptions): Promise<unknown>;
  resetGenericPassword(options?: LooseOptions): Promise<boolean>;
  readonly ACCESSIBLE: { readonly WHEN_UNLOCKED_THIS_DEVICE_ONLY: string };
  readonly ACCESS_CONTROL: { readonly BIOMETRY_CURRENT_SET_OR_DEVICE_PASSCODE: string };
}

// eslint-disable-next-line @typescript-eslint/no-explicit-any
type LooseOptions = { [key: string]: any };

/** The subset of react-native-keychain's options the adapter sets. */
export interface KeychainOptions {
  service?: string;
  accessible?: string;
  accessControl?: string;
  authenticationPrompt?: { title?: string; subtitle?: string; description?: string; cancel?: string };
}

export interface KeychainStorageOptions {
  /** The device key behind biometrics or the passcode (`BIOMETRY_CURRENT_SET_OR_DEVICE_PASSCODE`). */
  requireAuthentication?: boolean;
  /** The system prompt's title. */
  authenticationPrompt?: string;
  /** Prefix of the Keychain services (default `llmrouter`); each item is its own service. */
  service?: string;
}

/** A secret store on react-native-keychain (one generic password per item). */
export function keychainStorage(Keychain: KeychainModule, options: KeychainStorageOptions = {}): KeyStorage {
  const prefix = options.service ?? 'llmrouter';
  const optionsFor = (key: string): KeychainOptions => {
    const secret = options.requireAuthentication === true && DEVICE_KEY.test(key);
    return {
      service: `${prefix}:${key}`,
      accessible: Keychain.ACCESSIBLE.WHEN_UNLOCKED_THIS_DEVICE_ONLY,
      ...(secret
        ? {
            accessControl: Keychain.ACCESS_CONTROL.BIOMETRY_CURRENT_SET_OR_DEVICE_PASSCODE,
            authenticationPrompt: { title: options.authenticationPrompt ?? 'Unlock your chat key' },
          }
        : {}),
    };
  };
  return {
    persistent: true,
    getItem: (key) =>
      guarded('read', async () => {
        const found = await Keychain.getGenericPassword(optionsFor(key));
        return found === false ? null : found.password;
      }),
    setItem: (key, value) =>
      guarded('write', async () => {
        await Keychain.setGenericPassword('llmrouter', value, optionsFor(key));
      }),
    removeItem: (key) =>
      guarded('remove', async () => {
        await Keychain.resetGenericPassword(optionsFor(key));
      }),
  };
}

/** Platform storage errors become StorageError, the platform's own error kept as `cause`. */
async function guarded<T>(what: string, step: () => Promise<T>): Promise<T> {
  try {
    return await step();
  } catch (e) {
    throw new StorageError(`the secure store could not ${what} an item`, { cause: e });
  }
}
