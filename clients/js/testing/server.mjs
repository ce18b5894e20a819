/**
 * Test support: starts a real kernelbox server (local backend) on a free port and stops it.
 * Lives outside `test/` so `node --test` does not take it for a test file.
 *
 * The binary is `$KERNELBOX_BIN`, or `target/debug/kernelbox` of this repository.
 *
 * @module testing/server
 */

import { spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import net from 'node:net';
import { fileURLToPath } from 'node:url';

const REPO = fileURLToPath(new URL('../../../', import.meta.url));

/** @returns {string} The kernelbox binary the tests run. */
export function kernelboxBin() {
  return process.env.KERNELBOX_BIN || `${REPO}target/debug/kernelbox`;
}

/**
 * A port nobody listens on right now.
 * @returns {Promise<number>}
 */
export function freePort() {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.unref();
    server.on('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const { port } = /** @type {net.AddressInfo} */ (server.address());
      server.close(() => resolve(port));
    });
  });
}

/**
 * @typedef {object} RunningServer
 * @property {string} url Base URL, e.g. `http://127.0.0.1:PORT`.
 * @property {string} token The API token.
 * @property {() => string} log What the server printed so far.
 * @property {() => Promise<void>} stop Stops the server (SIGTERM, then SIGKILL after 10 s).
 */

/**
 * Starts `kernelbox serve --backend local --pool-size 0` and waits until `/healthz` answers.
 * @param {{token?: string, timeoutMs?: number}} [options]
 * @returns {Promise<RunningServer>}
 */
export async function startServer(options = {}) {
  const token = options.token ?? 'T';
  const bin = kernelboxBin();
  if (!existsSync(bin)) {
    throw new Error(`no kernelbox binary at ${bin}: run \`cargo build\` or set KERNELBOX_BIN`);
  }
  const port = await freePort();
  const url = `http://127.0.0.1:${port}`;
  const args = ['serve', '--backend', 'local', '--ephemeral', '--token', token];
  args.push('--bind', `127.0.0.1:${port}`, '--pool-size', '0');
  const child = spawn(bin, args, { stdio: ['ignore', 'pipe', 'pipe'] });
  let output = '';
  child.stdout.on('data', (chunk) => (output += chunk));
  child.stderr.on('data', (chunk) => (output += chunk));
  const exited = new Promise((resolve) => child.once('exit', resolve));

  const stop = async () => {
    if (child.exitCode !== null || child.signalCode !== null) return;
    child.kill('SIGTERM');
    const timer = setTimeout(() => child.kill('SIGKILL'), 10_000);
    await exited;
    clearTimeout(timer);
  };

  const deadline = Date.now() + (options.timeoutMs ?? 30_000);
  for (;;) {
    if (child.exitCode !== null) {
      throw new Error(`kernelbox exited with code ${child.exitCode}:\n${output}`);
    }
    try {
      const response = await fetch(`${url}/healthz`);
      if (response.ok) break;
    } catch {
      // not listening yet
    }
    if (Date.now() > deadline) {
      await stop();
      throw new Error(`kernelbox did not answer /healthz within the timeout:\n${output}`);
    }
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
  return { url, token, log: () => output, stop };
}

/**
 * A TCP proxy in front of a server whose connections a test can cut, to simulate a network
 * drop without touching the server.
 */
export class CuttableProxy {
  /** @type {net.Server} */ #server;
  /** @type {Set<net.Socket>} */ #sockets = new Set();
  #refusing = false;
  /** Connections the proxy accepted (refused ones included). */
  accepted = 0;

  /**
   * @param {number} targetPort The server's port on 127.0.0.1.
   */
  constructor(targetPort) {
    this.#server = net.createServer((client) => {
      this.accepted += 1;
      if (this.#refusing) {
        client.destroy();
        return;
      }
      const upstream = net.connect(targetPort, '127.0.0.1');
      for (const [a, b] of [
        [client, upstream],
        [upstream, client],
      ]) {
        this.#sockets.add(a);
        a.on('error', () => b.destroy());
        a.on('close', () => {
          this.#sockets.delete(a);
          b.destroy();
        });
        a.pipe(b);
      }
    });
  }

  /**
   * Starts listening on a free port.
   * @returns {Promise<string>} The proxy's base URL.
   */
  listen() {
    return new Promise((resolve) => {
      this.#server.listen(0, '127.0.0.1', () => {
        const { port } = /** @type {net.AddressInfo} */ (this.#server.address());
        resolve(`http://127.0.0.1:${port}`);
      });
    });
  }

  /**
   * Cuts every open connection; with `refuse`, new ones are cut at once until {@link resume}.
   * @param {{refuse?: boolean}} [options]
   */
  cut(options = {}) {
    this.#refusing = Boolean(options.refuse);
    for (const socket of this.#sockets) socket.destroy();
  }

  /** Accepts connections again. */
  resume() {
    this.#refusing = false;
  }

  /** @returns {Promise<void>} Cuts everything and stops listening. */
  close() {
    this.cut();
    return new Promise((resolve) => this.#server.close(() => resolve()));
  }
}
