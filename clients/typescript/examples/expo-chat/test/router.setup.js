// A real router for the chat tests: the repository's own (clients/typescript/build/test/support/
// serve.js, built by the SDK's `npm test`, daemons from the repository's .venv: a certified
// protocol v2 router and node), unless ROUTER_URL and OPERATOR_PIN name one already running.
const { spawn } = require('node:child_process');
const path = require('node:path');

module.exports = async function () {
  if (process.env.ROUTER_URL && process.env.OPERATOR_PIN) return;
  const serve = path.resolve(__dirname, '../../../build/test/support/serve.js');
  // a new device pays 12 bits here (fast tests); the client-side limits are the app's
  const child = spawn(process.execPath, [serve, 'NEW_DEVICE_POW_DIFFICULTY=12'], { stdio: ['pipe', 'pipe', 'inherit'] });
  globalThis.__ROUTER__ = child;
  const line = await new Promise((resolve, reject) => {
    let out = '';
    child.stdout.on('data', (data) => {
      out += data;
      if (out.includes('\n')) resolve(out.split('\n')[0]);
    });
    child.on('exit', (code) => reject(new Error(`the test router exited (${code}): is the SDK built (npm test there) and .venv set up?`)));
  });
  const { url, operatorPin } = JSON.parse(line);
  process.env.ROUTER_URL = url;
  process.env.OPERATOR_PIN = operatorPin;
};
