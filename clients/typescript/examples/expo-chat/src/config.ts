/**
 * Where the router is and which keys the app trusts. Build-time values (Expo inlines
 * EXPO_PUBLIC_* variables into the bundle): set them in `.env` or the shell, see README.md.
 */

export interface Config {
  /** The router, https://... (http:// only for a router on this machine during development). */
  routerUrl: string;
  /**
   * The operator's Ed25519 key (`llmrouter-keys operator-pin FILE` prints it): what the app
   * trusts. Protocol v2: requests are sealed to inference nodes it certified, and the router,
   * which only relays them, cannot read the conversation.
   */
  operatorPin: string;
  /**
   * SHA-256 hashes (base64) of the TLS certificate's public key: the current one and a backup
   * (both platforms want two, so that a key can be replaced without shipping a new app first).
   */
  tlsPins: string[];
}

export const config: Config = {
  routerUrl: process.env.EXPO_PUBLIC_ROUTER_URL ?? 'https://router.example',
  operatorPin: process.env.EXPO_PUBLIC_OPERATOR_PIN ?? 'QjPsZB1yzgvk5NxcRVplETaGiBOS5fZO7TnLRB-GZyc',
  tlsPins: (process.env.EXPO_PUBLIC_TLS_PINS ?? '').split(',').filter(Boolean),
};
