/**
 * Where the client keeps what must outlive the process: the device key (auth mode), the signing
 * key trusted on first use, and the last verified key document (for an offline start).
 *
 * The shape is `localStorage`'s (and React Native AsyncStorage's); methods may be synchronous or
 * return promises. Keep it in secure storage on a phone (Expo SecureStore, Keychain/Keystore):
 * the device key is a secret. Keys are `<prefix>.device-key`, `<prefix>.signing-key` and
 * `<prefix>.key-document`, using only characters SecureStore accepts.
 */
export interface KeyStorage {
  getItem(key: string): string | null | undefined | Promise<string | null | undefined>;
  setItem(key: string, value: string): void | Promise<void>;
  removeItem(key: string): void | Promise<void>;
}

/** Keeps everything in memory: what a client without `storage` uses, and handy in tests. */
export class MemoryStorage implements KeyStorage {
  private readonly items = new Map<string, string>();

  getItem(key: string): string | null {
    return this.items.get(key) ?? null;
  }

  setItem(key: string, value: string): void {
    this.items.set(key, value);
  }

  removeItem(key: string): void {
    this.items.delete(key);
  }
}
