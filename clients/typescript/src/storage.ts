/**
 * Where the client keeps what must outlive the process, in two places that are not alike:
 *
 * - `storage`, the **secret store**: the device key (auth mode; whoever reads it can speak as
 *   this device) and a signing key trusted on first use (whoever writes it can redirect the app
 *   to another router). On a phone that is the Keychain / Keystore: `secureStoreStorage`
 *   (expo-secure-store) or `keychainStorage` (react-native-keychain). Never AsyncStorage or
 *   `localStorage`: those are plain files, readable in backups and by anything that roots the
 *   device or the browser profile.
 * - `cache`, **public data**: the last verified key document (for an offline start) and whether
 *   the router already knows this device. Anything that persists will do (AsyncStorage,
 *   `localStorage`); the document is verified against the pin again whenever it is read.
 *
 * Both have one shape, a subset of `localStorage`'s; methods may be synchronous or return
 * promises. Keys are `<prefix>.device-key` and `<prefix>.signing-key` (secret store),
 * `<prefix>.key-document` and `<prefix>.registered` (cache), in characters SecureStore accepts.
 */
export interface KeyStorage {
  getItem(key: string): string | null | undefined | Promise<string | null | undefined>;
  setItem(key: string, value: string): void | Promise<void>;
  removeItem(key: string): void | Promise<void>;
  /**
   * `false` for a store that forgets everything when the process ends (`MemoryStorage`): the
   * client refuses `deviceKey: 'auto'` on one, since each launch would be a new device paying a
   * new proof of work. Absent means persistent.
   */
  readonly persistent?: boolean;
}

/** Keeps everything in memory until the process ends: the default `cache`, and handy in tests. */
export class MemoryStorage implements KeyStorage {
  readonly persistent: boolean = false;
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
