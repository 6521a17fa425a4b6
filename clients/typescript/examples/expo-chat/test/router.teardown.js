module.exports = async function () {
  const child = globalThis.__ROUTER__;
  if (!child) return;
  const exited = new Promise((resolve) => child.on('exit', resolve));
  child.stdin.end(); // serve.js stops both daemons when its stdin closes
  await exited;
};
