/**
 * Real daemons for the SDK's tests: `twistd inference` on the tiny test model (tests/tinymodel.py),
 * a stock llama-server on the same model with a real chat template (as tests/llama_server.py), and
 * `twistd llmrouter` in front of them, run with the repository's Python (`.venv/bin/python`, or
 * `$LLMROUTER_PYTHON`), each in its own temp dir, stopped by the test's `after` hook.
 *
 * Routers listen on a free loopback port (support/launch.py binds it and hands it over as systemd
 * would); inference and the router's metrics listen on UNIX sockets in the temp dir.
 */

import { type ChildProcess, execFile, spawn } from 'node:child_process';
import { createWriteStream, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { request } from 'node:http';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';

export const PACKAGE = fileURLToPath(new URL('../../../', import.meta.url));
export const REPO = fileURLToPath(new URL('../../../../../', import.meta.url));
export const PYTHON = process.env.LLMROUTER_PYTHON ?? join(REPO, '.venv', 'bin', 'python');
const TWISTD = 'from twisted.scripts.twistd import run; run()';
const LAUNCH = join(PACKAGE, 'test', 'support', 'launch.py');
const run = promisify(execFile);

export function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

function tempDir(): string {
  return mkdtempSync(join(tmpdir(), 'llmr-ts-')); // short: UNIX socket paths must fit 108 bytes
}

/** Run the repository's Python with `args` (cwd: the repository); resolves with stdout. */
export async function python(...args: string[]): Promise<string> {
  const { stdout } = await run(PYTHON, args, { cwd: REPO, env: cleanEnv() });
  return stdout;
}

function cleanEnv(extra: Record<string, string> = {}): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = {};
  for (const [name, value] of Object.entries(process.env)) {
    // The daemons read their settings from the environment: only what a test sets gets through.
    if (!/^(INFERENCE_|LLMROUTER_|LISTEN|NODE_OPTIONS)/.test(name)) env[name] = value;
  }
  return { ...env, PYTHONUNBUFFERED: '1', ...extra };
}

/** GET over a UNIX socket (metrics listeners, the inference daemon). */
export function unixGet(socket: string, path: string): Promise<{ status: number; body: string }> {
  return new Promise((resolve, reject) => {
    const req = request({ socketPath: socket, path, method: 'GET' }, (res) => {
      const chunks: Buffer[] = [];
      res.on('data', (c: Buffer) => chunks.push(c));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, body: Buffer.concat(chunks).toString() }));
      res.on('error', reject);
    });
    req.on('error', reject);
    req.end();
  });
}

/** The value of one Prometheus sample (0 when absent). */
export function metric(text: string, name: string, labels = ''): number {
  const prefix = labels ? `${name}{${labels}} ` : `${name} `;
  const line = text.split('\n').find((l) => l.startsWith(prefix));
  return line === undefined ? 0 : Number(line.slice(prefix.length));
}

class DaemonExited extends Error {}

/** Poll `probe` until `predicate` holds (bounded; not a timing assertion). */
export async function waitFor<T>(
  probe: () => Promise<T>,
  predicate: (value: T) => boolean,
  what: string | (() => string),
  limitMs = 30000,
): Promise<T> {
  const deadline = Date.now() + limitMs;
  for (;;) {
    let value: T | undefined;
    try {
      value = await probe();
      if (predicate(value)) return value;
    } catch (e) {
      if (e instanceof DaemonExited) throw e;
      value = undefined;
    }
    if (Date.now() > deadline) {
      throw new Error(`${typeof what === 'string' ? what : what()}: still ${JSON.stringify(value)}`);
    }
    await sleep(50);
  }
}

export class Daemon {
  readonly exited: Promise<number | null>;
  private readonly proc: ChildProcess;
  private ended = false;

  constructor(
    readonly directory: string,
    readonly name: string,
    argv: string[],
    env: Record<string, string> = {},
    announces = false,
    command = PYTHON,
  ) {
    const log = createWriteStream(join(directory, `${name}.log`));
    this.proc = spawn(command, argv, { cwd: directory, env: cleanEnv(env), stdio: ['ignore', 'pipe', 'pipe'] });
    this.proc.stderr?.pipe(log);
    if (!announces) this.proc.stdout?.pipe(createWriteStream(join(directory, `${name}.out`)));
    this.exited = new Promise((resolve) =>
      this.proc.on('exit', (code) => {
        this.ended = true;
        resolve(code);
      }),
    );
    running.add(this);
  }

  /** Poll `probe` until it answers 200; fails at once if the daemon exits. */
  async healthy(probe: () => Promise<number>, limitMs: number): Promise<void> {
    await waitFor(
      async () => {
        if (this.ended) throw new DaemonExited(`${this.name} exited:\n${this.logTail()}`);
        return probe();
      },
      (status) => status === 200,
      `${this.name} health`,
      limitMs,
    );
  }

  /** The first line of stdout (launch.py's JSON, when `announces`); the rest goes to the log. */
  firstLine(): Promise<string> {
    const out = this.proc.stdout!;
    const log = createWriteStream(join(this.directory, `${this.name}.out`));
    return new Promise((resolve, reject) => {
      let buffer = '';
      const onData = (chunk: Buffer) => {
        buffer += chunk.toString();
        const newline = buffer.indexOf('\n');
        if (newline < 0) return;
        out.off('data', onData);
        out.pipe(log);
        resolve(buffer.slice(0, newline));
      };
      out.on('data', onData);
      this.exited.then((code) => reject(new Error(`${this.name} exited with ${code}:\n${this.logTail()}`)));
    });
  }

  logTail(): string {
    const tail = (file: string) => {
      try {
        return readFileSync(join(this.directory, file), 'utf8').split('\n').slice(-30).join('\n');
      } catch {
        return '';
      }
    };
    return tail(`${this.name}.out`) + tail(`${this.name}.log`);
  }

  signal(name: NodeJS.Signals): void {
    this.proc.kill(name);
  }

  /** SIGTERM, SIGKILL after 20 s; resolves once the process is gone. */
  async stop(): Promise<void> {
    running.delete(this);
    if (this.proc.exitCode === null && this.proc.signalCode === null) {
      this.proc.kill('SIGTERM');
      const killer = setTimeout(() => this.proc.kill('SIGKILL'), 20000);
      await this.exited;
      clearTimeout(killer);
    }
  }
}

const running = new Set<Daemon>();
process.on('exit', () => {
  for (const daemon of running) daemon.stop().catch(() => undefined);
});

/** Anything the router can have as a backend: it listens on a UNIX socket. */
export interface Backend {
  socket: string;
}

export interface Inference extends Backend {
  daemon: Daemon;
  /** With the v2 gate: its key directory (`llmrouter-keys --keys-dir` it to rotate or revoke). */
  nodeKeysDir?: string;
  metrics(): Promise<string>;
  stop(): Promise<void>;
}

/** The tiny test model's name (its file's stem), as nodes are certified for it. */
export const TINY = 'tiny';

/**
 * The operator of protocol v2: its key lives in a temp file of the test (offline in production),
 * made and used with `llmrouter-keys operator-init` / `operator-certify`, as docs/deployment.md's
 * ceremony does; apps pin `pin`.
 */
export interface Operator {
  pin: string;
  /** Certify the signing key of the key directory `keysDir` (`llmrouter-keys pin`), install `<type>.cert` there. */
  certify(type: 'router' | 'node', name: string, keysDir: string, models?: string[]): Promise<void>;
  stop(): void;
}

export async function makeOperator(): Promise<Operator> {
  const directory = tempDir();
  const file = join(directory, 'operator.key');
  const keyctl = (...args: string[]) => python('-m', 'llmrouter.ops.keyctl', ...args);
  const init = await keyctl('operator-init', file);
  const pin = /operator pin \(v2 apps pin it\): (\S+)/.exec(init)?.[1];
  if (pin === undefined) throw new Error(`llmrouter-keys operator-init printed no pin:\n${init}`);
  return {
    pin,
    async certify(type, name, keysDir, models = []) {
      const key = (await keyctl('--keys-dir', keysDir, 'pin')).trim();
      const certificate = await keyctl('operator-certify', file, '--type', type, '--name', name, `--key=${key}`, ...models.flatMap((m) => ['--model', m]));
      writeFileSync(join(keysDir, `${type}.cert`), certificate);
    },
    stop: () => rmSync(directory, { recursive: true, force: true }),
  };
}

/**
 * `twistd inference` on the tiny model (written here by tests/tinymodel.py). With `node`, also
 * the protocol v2 gate (`--keys-dir`), certified by the operator as `node.name` for the tiny model.
 */
export async function startInference(args: string[] = [], node?: { operator: Operator; name: string }): Promise<Inference> {
  const directory = tempDir();
  if (node !== undefined) args = [...args, '--keys-dir', join(directory, 'node-keys')];
  const model = join(directory, 'tiny.gguf');
  await python('-c', 'import sys, pathlib; from tests.tinymodel import write_tiny_model; write_tiny_model(pathlib.Path(sys.argv[1]))', model);
  const socket = join(directory, 'inference.sock');
  const daemon = new Daemon(directory, 'inference', ['-c', TWISTD, '-n', '--pidfile=', 'inference', '--listen', `unix:${socket}:mode=600`, '--model', model, '--threads', '1', ...args]);
  await daemon.healthy(async () => (await unixGet(socket, '/health')).status, 120000);
  if (node !== undefined) {
    await node.operator.certify('node', node.name, join(directory, 'node-keys'), [TINY]);
    await waitFor(async () => (await unixGet(socket, '/v2/keys')).status, (status) => status === 200, `${node.name} serving /v2/keys`);
  }
  return {
    daemon,
    socket,
    ...(node === undefined ? {} : { nodeKeysDir: join(directory, 'node-keys') }),
    metrics: async () => (await unixGet(socket, '/metrics')).body,
    stop: async () => {
      await daemon.stop();
      rmSync(directory, { recursive: true, force: true });
    },
  };
}

export interface Router {
  daemon: Daemon;
  url: string;
  /** The signing key, as `llmrouter-keys init` printed it (what an app pins). */
  pin: string;
  keysDir: string;
  metrics(): Promise<string>;
  keys(...args: string[]): Promise<string>;
  stop(): Promise<void>;
}

/** Chat templates in tests/data/templates (see its README). */
export const QWQ = 'Qwen-QwQ-32B'; // reasoning: its generation prompt opens <think>
export const HERMES = 'NousResearch-Hermes-2-Pro-Llama-3-8B-tool_use'; // <tool_call> JSON tool calls

/** The llama-server `make llama-server` builds (found as tests/llama_server.py does), if any. */
export async function llamaServerBinary(): Promise<string | undefined> {
  try {
    return (await python('-c', 'from tests.llama_server import binary; print(binary())')).trim();
  } catch {
    return undefined;
  }
}

export interface LlamaServer extends Backend {
  daemon: Daemon;
  stop(): Promise<void>;
}

/**
 * `llama-server --jinja` on the tiny model carrying `template` (a file stem in
 * tests/data/templates, or its own template), serving `alias`, with the options of
 * tests/llama_server.py (one thread, two slots of 4096 tokens).
 */
export async function startLlamaServer(binary: string, alias: string, template?: string): Promise<LlamaServer> {
  const directory = tempDir();
  const model = join(directory, 'tiny.gguf');
  const templateFile = template === undefined ? '' : join(REPO, 'tests', 'data', 'templates', `${template}.jinja`);
  const write = 'import sys, pathlib; from tests import tinymodel; t = sys.argv[2]; '
    + 'tinymodel.write_tiny_model(pathlib.Path(sys.argv[1]), chat_template=pathlib.Path(t).read_text() if t else None)';
  await python('-c', write, model, templateFile);
  const socket = join(directory, 'llama.sock');
  const args = ['-m', model, '--host', socket, '--alias', alias, '--jinja', '--no-webui'];
  args.push('--threads', '1', '--parallel', '2', '--ctx-size', '8192', '--no-warmup');
  const daemon = new Daemon(directory, 'llama-server', args, { LD_LIBRARY_PATH: dirname(binary) }, false, binary);
  await daemon.healthy(async () => (await unixGet(socket, '/health')).status, 120000);
  return {
    daemon,
    socket,
    stop: async () => {
      await daemon.stop();
      rmSync(directory, { recursive: true, force: true });
    },
  };
}

/**
 * A protocol v2 router: `startRouter` certified by `operator` as `router-1`, ready once its key
 * document lists every one of `nodes` (after its next probe of them).
 */
export async function startRouterV2(operator: Operator, nodes: Backend[], nodeNames: string[], env: Record<string, string> = {}, args: string[] = []): Promise<Router> {
  const router = await startRouter(nodes, env, args);
  await operator.certify('router', 'router-1', router.keysDir);
  await waitFor(
    async () => {
      const response = await fetch(`${router.url}/api/v2/keys`);
      if (response.status !== 200) return response.status;
      const payload = JSON.parse(Buffer.from(((await response.json()) as { payload: string }).payload, 'base64url').toString()) as { nodes: unknown[] };
      return payload.nodes.length;
    },
    (listed) => listed === nodeNames.length && nodeNames.length > 0,
    'the router listing its certified nodes',
  );
  return router;
}

/** `twistd llmrouter` in front of `backends`, settings from `env` (e.g. CORS_ORIGINS), options `args`. */
export async function startRouter(backends: Backend | Backend[], env: Record<string, string> = {}, args: string[] = []): Promise<Router> {
  const directory = tempDir();
  const keysDir = join(directory, 'keys');
  const keys = (...args: string[]) => python('-m', 'llmrouter.ops.keyctl', '--keys-dir', keysDir, ...args);
  // Made here, owned by whoever runs the tests: as root, llmrouter-keys creates no key directory
  // (in production it belongs to the router's user), but it fills one it is given.
  mkdirSync(keysDir, { mode: 0o700 });
  const init = await keys('init');
  const pin = /clients pin this\): (\S+)/.exec(init)?.[1];
  if (pin === undefined) throw new Error(`llmrouter-keys init printed no signing key:\n${init}`);
  const metricsSocket = join(directory, 'metrics.sock');
  const daemon = new Daemon(
    directory,
    'llmrouter',
    [
      LAUNCH,
      'llmrouter',
      '--listen',
      'systemd:domain=INET:index=0',
      '--metrics-listen',
      `unix:${metricsSocket}`,
      '--keys-dir',
      keysDir,
      ...(Array.isArray(backends) ? backends : [backends]).flatMap((backend) => ['--inference', `unix:${backend.socket}`]),
      ...args,
    ],
    // Every request of a suite comes from one address (127.0.0.1) and a suite shares its routers
    // between tests: at the production per-address burst (20) a suite's length alone would decide
    // whether its last test is rate limited. Tests of that limit set their own.
    { HEALTH_INTERVAL_SECONDS: '0.5', RATE_LIMIT_BURST: '1000', ...env },
    true,
  );
  const { port } = JSON.parse(await daemon.firstLine()) as { port: number };
  const url = `http://127.0.0.1:${port}`;
  await daemon.healthy(async () => (await fetch(`${url}/health`)).status, 60000);
  return {
    daemon,
    url,
    pin,
    keysDir,
    keys,
    metrics: async () => (await unixGet(metricsSocket, '/metrics')).body,
    stop: async () => {
      await daemon.stop();
      rmSync(directory, { recursive: true, force: true });
    },
  };
}
