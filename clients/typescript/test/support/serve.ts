/**
 * A real stack for tests outside this package (the Expo example's Jest run): `twistd inference`
 * on the tiny model and `twistd llmrouter` in front of it, as support/stack.ts starts them for
 * the SDK's own tests. Prints one JSON line, `{"url", "pin"}`, then serves until stdin closes or
 * SIGTERM, and stops both daemons.
 *
 *     node build/test/support/serve.js [ENV=VALUE ...]   (settings for the router)
 */
import { startInference, startRouter } from './stack.js';

const env = Object.fromEntries(process.argv.slice(2).map((arg) => arg.split('=', 2) as [string, string]));
const inference = await startInference(['--max-tokens', '4000']);
const router = await startRouter(inference, env);
let stopping = false;
const stop = async () => {
  if (stopping) return;
  stopping = true;
  await router.stop();
  await inference.stop();
  process.exit(0);
};
process.on('SIGTERM', () => void stop());
process.stdin.on('end', () => void stop());
process.stdin.resume();
console.log(JSON.stringify({ url: router.url, pin: router.pin }));
