// Reconnect with replay: a TCP proxy between client and server cuts the connection while a cell
// runs; the client resumes with ?since=<last seq> and gets every missed event exactly once.

import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';

import { Sandbox } from '../kernelbox.js';
import { CuttableProxy, startServer } from '../testing/server.mjs';

/** @type {import('../testing/server.mjs').RunningServer} */
let server;
/** @type {CuttableProxy} */
let proxy;
/** @type {string} */
let proxyUrl;

before(async () => {
  server = await startServer();
  proxy = new CuttableProxy(Number(new URL(server.url).port));
  proxyUrl = await proxy.listen();
});

after(async () => {
  await proxy?.close();
  await server?.stop();
});

/**
 * Resolves once `predicate` holds, polling.
 * @param {() => boolean} predicate
 * @param {string} what
 */
async function until(predicate, what, timeoutMs = 20_000) {
  const deadline = Date.now() + timeoutMs;
  while (!predicate()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}

test('a cut mid-cell resumes with replay: each output arrives once, in order', async () => {
  const sb = await Sandbox.create({ url: proxyUrl, token: server.token });
  try {
    await sb.runCode('import time');
    const connection = [];
    const resumed = [];
    sb.on('connection', ({ state }) => connection.push(state));
    sb.on('resumed', (r) => resumed.push(r));

    const chunks = [];
    const running = sb.runCode(
      'for i in range(12):\n    print(i, flush=True)\n    time.sleep(0.15)\n"finished"',
      { onStdout: (text) => chunks.push(text) },
    );
    await until(() => chunks.length >= 3, 'the first lines');
    const seqBeforeCut = sb.lastSeq;
    proxy.cut({ refuse: true });
    // Stay disconnected while the cell prints more: those lines must come from the replay.
    await new Promise((resolve) => setTimeout(resolve, 600));
    assert.equal(sb.connectionState, 'reconnecting');
    proxy.resume();

    const ex = await running;
    const expected = Array.from({ length: 12 }, (_, i) => `${i}\n`).join('');
    assert.equal(chunks.join(''), expected, 'nothing lost, nothing twice');
    assert.equal(ex.logs.stdout.join(''), expected);
    assert.equal(ex.text, "'finished'");
    assert.equal(resumed.length, 1);
    assert.ok(resumed[0].since >= seqBeforeCut);
    assert.ok(resumed[0].replayed > 0, 'events missed while away were replayed');
    assert.equal(resumed[0].dropped, 0);
    assert.equal(connection[0], 'reconnecting');
    assert.equal(connection.at(-1), 'open');
    assert.equal(sb.connectionState, 'open');

    // The session and its variables are the same.
    assert.equal((await sb.runCode('i')).text, '11');
  } finally {
    await sb.close({ kill: true });
  }
});

test('cells sent while disconnected are sent on reconnect', async () => {
  const sb = await Sandbox.create({ url: proxyUrl, token: server.token });
  try {
    await sb.runCode('z = 5');
    proxy.cut({ refuse: true });
    await until(() => sb.connectionState === 'reconnecting', 'the client to notice the cut');
    const pending = sb.runCode('z * 2');
    setTimeout(() => proxy.resume(), 300);
    const ex = await pending;
    assert.equal(ex.text, '10');
  } finally {
    await sb.close({ kill: true });
  }
});

test('a session that is gone ends reconnecting with a NotFoundError', async () => {
  const sb = await Sandbox.create({
    url: proxyUrl,
    token: server.token,
    reconnect: { maxAttempts: 5, initialDelayMs: 50 },
  });
  const closed = new Promise((resolve) =>
    sb.on('connection', ({ state, error }) => state === 'closed' && resolve(error)),
  );
  await Sandbox.kill({ url: server.url, token: server.token, sessionId: sb.sessionId });
  proxy.cut();
  const error = await closed;
  assert.equal(error?.name, 'NotFoundError');
  assert.equal(sb.connectionState, 'closed');
});

test('close() while reconnecting stops for good and rejects what was pending', async () => {
  const sb = await Sandbox.create({ url: proxyUrl, token: server.token });
  try {
    await sb.runCode('1');
    proxy.cut({ refuse: true });
    await until(() => sb.connectionState === 'reconnecting', 'the client to notice the cut');
    const pending = sb.runCode('2');
    await sb.close();
    await assert.rejects(pending, { name: 'SandboxError' });
    assert.equal(sb.connectionState, 'closed');
    proxy.resume();
    await new Promise((resolve) => setTimeout(resolve, 500));
    assert.equal(sb.connectionState, 'closed', 'no reconnect after close()');
  } finally {
    proxy.resume();
    await Sandbox.kill({ url: server.url, token: server.token, sessionId: sb.sessionId });
  }
});
