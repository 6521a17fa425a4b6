/**
 * Headless Chromium (Debian's `chromium`, or `$CHROMIUM`) driven over the DevTools protocol on a
 * pipe (`--remote-debugging-pipe`: JSON messages separated by NUL bytes on fds 3 and 4), so no
 * browser download and no driver package are needed. Enough of the protocol for the SDK's test:
 * open a page, run code before its scripts, evaluate expressions.
 */

import { type ChildProcess, spawn } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { Readable, Writable } from 'node:stream';

export const CHROMIUM = process.env.CHROMIUM ?? '/usr/bin/chromium';

// The flags the machine notes list as working headless here: no sandbox (we run as root), no GPU,
// and no background connections to the outside world (the network is closed).
const FLAGS = [
  '--headless',
  '--no-sandbox',
  '--disable-gpu',
  '--disable-quic',
  '--no-first-run',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
  '--disable-dev-shm-usage',
  '--remote-debugging-pipe',
];

type Pending = { resolve: (value: Record<string, unknown>) => void; reject: (error: Error) => void };

export class Browser {
  private readonly proc: ChildProcess;
  private readonly profile: string;
  private readonly pending = new Map<number, Pending>();
  private nextId = 1;
  private buffer = '';
  readonly exited: Promise<void>;
  /** Exceptions and console errors of every page, for failure messages. */
  readonly problems: string[] = [];

  constructor() {
    this.profile = mkdtempSync(join(tmpdir(), 'llmr-chromium-'));
    this.proc = spawn(CHROMIUM, [...FLAGS, `--user-data-dir=${this.profile}`, 'about:blank'], {
      stdio: ['ignore', 'ignore', 'ignore', 'pipe', 'pipe'],
    });
    this.exited = new Promise((resolve) => this.proc.on('exit', () => resolve()));
    this.proc.on('error', (e) => this.failAll(e));
    (this.proc.stdio[4] as Readable).on('data', (data: Buffer) => this.receive(data));
    this.exited.then(() => this.failAll(new Error('chromium exited')));
  }

  private failAll(error: Error): void {
    for (const waiter of this.pending.values()) waiter.reject(error);
    this.pending.clear();
  }

  private receive(data: Buffer): void {
    this.buffer += data.toString('utf8');
    let end: number;
    while ((end = this.buffer.indexOf('\0')) >= 0) {
      const message = JSON.parse(this.buffer.slice(0, end)) as {
        id?: number;
        method?: string;
        params?: Record<string, unknown>;
        result?: Record<string, unknown>;
        error?: { message: string };
      };
      this.buffer = this.buffer.slice(end + 1);
      if (message.method === 'Runtime.exceptionThrown' || message.method === 'Log.entryAdded') {
        this.problems.push(JSON.stringify(message.params).slice(0, 500));
      }
      const waiter = message.id === undefined ? undefined : this.pending.get(message.id);
      if (waiter === undefined) continue;
      this.pending.delete(message.id!);
      if (message.error) waiter.reject(new Error(message.error.message));
      else waiter.resolve(message.result ?? {});
    }
  }

  send(method: string, params: Record<string, unknown> = {}, sessionId?: string): Promise<Record<string, unknown>> {
    const id = this.nextId++;
    const message = JSON.stringify({ id, method, params, ...(sessionId ? { sessionId } : {}) });
    return new Promise((resolve, reject) => {
      this.pending.set(id, { resolve, reject });
      (this.proc.stdio[3] as Writable).write(message + '\0');
    });
  }

  /** A new tab; `beforeScripts` runs in it before any script of any page it loads. */
  async page(beforeScripts?: string): Promise<Page> {
    const { targetId } = await this.send('Target.createTarget', { url: 'about:blank' });
    const { sessionId } = await this.send('Target.attachToTarget', { targetId, flatten: true });
    const page = new Page(this, sessionId as string);
    if (beforeScripts !== undefined) await page.send('Page.addScriptToEvaluateOnNewDocument', { source: beforeScripts });
    return page;
  }

  async close(): Promise<void> {
    if (this.proc.exitCode === null) {
      this.send('Browser.close').catch(() => undefined);
      const killer = setTimeout(() => this.proc.kill('SIGKILL'), 5000);
      await this.exited;
      clearTimeout(killer);
    }
    rmSync(this.profile, { recursive: true, force: true });
  }
}

export class Page {
  constructor(
    private readonly browser: Browser,
    private readonly sessionId: string,
  ) {}

  send(method: string, params: Record<string, unknown> = {}): Promise<Record<string, unknown>> {
    return this.browser.send(method, params, this.sessionId);
  }

  async goto(url: string): Promise<void> {
    await Promise.all([this.send('Page.enable'), this.send('Runtime.enable'), this.send('Log.enable')]);
    await this.send('Page.navigate', { url });
  }

  /** The value of `expression` in the page (JSON-serializable values only). */
  async evaluate<T>(expression: string): Promise<T> {
    const { result, exceptionDetails } = (await this.send('Runtime.evaluate', { expression, returnByValue: true, awaitPromise: true })) as {
      result: { value?: T };
      exceptionDetails?: { text: string };
    };
    if (exceptionDetails) throw new Error(`page: ${exceptionDetails.text}`);
    return result.value as T;
  }
}
