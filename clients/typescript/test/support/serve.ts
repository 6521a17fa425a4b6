/**
 * A real stack for tests outside this package (the Expo example's Jest run): `twistd inference`
 * on the tiny model (a certified protocol v2 node) and `twistd llmrouter` in front of it
 * (certified), as support/stack.ts starts them for the SDK's own tests. Prints one JSON line,
 * `{"url", "operatorPin", "pin"}` (the operator's pin for v2, the router's own for v1.1), then
 * serves until stdin closes or SIGTERM, and stops both daemons.
 *
 *     node build/test/support/serve.js [ENV=VALUE ...]   (settings for the router)
 */
import { makeOperator, startInference, startRouterV2 } from './stack.js';

const env = Object.fromEntries(process.argv.slice(2).map((arg) => arg.split('=', 2) as [string, string]));
const operator = await makeOperator();
const inference = await startInference(['--max-tokens', '4000'], { operator, name: 'node-a' });
const router = await startRouterV2(operator, [inference], ['node-a'], env);
let stopping = false;
const stop = async () => {
  if (stopping) return;
  stopping = true;
  await router.stop();
  await inference.stop();
  operator.stop();
  process.exit(0);
};
process.on('SIGTERM', () => void stop());
process.stdin.on('end', () => void stop());
process.stdin.resume();
console.log(JSON.stringify({ url: router.url, operatorPin: operator.pin, pin: router.pin }));
