// The JavaScript client against a real kernelbox server (local backend, real ipykernel).
// Run: node --experimental-websocket --test clients/js/test/   (Node ≥ 22: without the flag)

import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';

import {
  AuthError,
  Execution,
  NotFoundError,
  Result,
  Sandbox,
  SandboxError,
  TimeoutError,
} from '../kernelbox.js';
import { startServer } from '../testing/server.mjs';

/** @type {import('../testing/server.mjs').RunningServer} */
let server;
/** @type {Sandbox} */
let sb;

before(async () => {
  server = await startServer();
  sb = await Sandbox.create({ url: server.url, token: server.token });
});

after(async () => {
  await sb?.close({ kill: true });
  await server?.stop();
});

describe('running code', () => {
  test('variables live on between cells: x = 41, then x + 1 is "42"', async () => {
    const first = await sb.runCode('x = 41');
    assert.ok(first instanceof Execution);
    assert.equal(first.status, 'ok');
    assert.equal(first.error, null);
    assert.deepEqual(first.results, []);

    const second = await sb.runCode('x + 1');
    assert.equal(second.text, '42');
    assert.equal(second.results.length, 1);
    const [result] = second.results;
    assert.ok(result instanceof Result);
    assert.equal(result.isMainResult, true);
    assert.equal(result.data['text/plain'], '42');
    assert.equal(second.executionCount, first.executionCount + 1);
    assert.equal(result.executionCount, second.executionCount);
  });

  test('stdout and stderr stream to the callbacks while the cell runs', async () => {
    const arrivals = [];
    const stderr = [];
    const started = Date.now();
    const ex = await sb.runCode(
      'import sys, time\n' +
        'for i in range(3):\n' +
        '    print("line", i, flush=True)\n' +
        '    time.sleep(0.4)\n' +
        'print("oops", file=sys.stderr, flush=True)',
      {
        onStdout: (text) => arrivals.push({ text, at: Date.now() - started }),
        onStderr: (text) => stderr.push(text),
      },
    );
    const finished = Date.now() - started;
    assert.equal(arrivals.map((a) => a.text).join(''), 'line 0\nline 1\nline 2\n');
    assert.equal(ex.logs.stdout.join(''), 'line 0\nline 1\nline 2\n');
    assert.equal(stderr.join(''), 'oops\n');
    assert.deepEqual(ex.logs.stderr, stderr);
    // The first line came long before the cell ended: it was streamed, not batched.
    assert.ok(arrivals.length >= 3, `expected one chunk per print, got ${arrivals.length}`);
    const first = arrivals[0].at;
    assert.ok(finished - first >= 700, `first chunk at ${first} ms, done at ${finished} ms`);
  });

  test('an exception is the execution\'s error, with a traceback', async () => {
    const seen = [];
    const ex = await sb.runCode('def f():\n    return 1 / 0\nf()', {
      onError: (e) => seen.push(e),
    });
    assert.equal(ex.status, 'error');
    assert.equal(ex.error.name, 'ZeroDivisionError');
    assert.equal(ex.error.value, 'division by zero');
    assert.ok(ex.error.traceback.length > 0);
    const plain = ex.error.traceback.join('\n').replace(/\x1b\[[0-9;]*m/g, '');
    assert.match(plain, /return 1 \/ 0/);
    assert.deepEqual(seen, [ex.error]);
    // The kernel is fine afterwards.
    assert.equal((await sb.runCode('x')).text, '41');
  });

  test('a matplotlib figure comes back as a PNG result', async () => {
    const results = [];
    const ex = await sb.runCode(
      'import matplotlib.pyplot as plt\nplt.plot([1, 2, 3], [1, 4, 9])\nplt.show()',
      { onResult: (r) => results.push(r) },
    );
    assert.equal(ex.error, null);
    const plot = ex.results.find((r) => r.png);
    assert.ok(plot, `no PNG among ${JSON.stringify(ex.results.map((r) => r.formats()))}`);
    assert.equal(plot.isMainResult, false);
    assert.deepEqual(results, ex.results);
    const png = Buffer.from(plot.png, 'base64');
    assert.deepEqual([...png.subarray(0, 8)], [0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]);
    assert.equal(png.toString('latin1', 12, 16), 'IHDR');
    assert.ok(png.readUInt32BE(16) > 100 && png.readUInt32BE(20) > 100, 'a real-sized image');
    assert.match(plot.text, /Figure/);
  });

  test('display updates and clear_output reach onDisplay', async () => {
    const changes = [];
    const ex = await sb.runCode(
      'from IPython.display import display, clear_output\n' +
        'h = display("first", display_id=True)\n' +
        'h.update("second")\n' +
        'clear_output(wait=True)\n' +
        'print("after")',
      { onDisplay: (c) => changes.push(c) },
    );
    assert.equal(ex.results.length, 1);
    assert.equal(ex.results[0].text, "'second'", 'the update replaced the display in place');
    const displayId = ex.results[0].displayId;
    assert.ok(displayId);
    assert.equal(changes.length, 2);
    assert.equal(changes[0].kind, 'update');
    assert.equal(changes[0].displayId, displayId);
    assert.equal(changes[0].result.text, "'second'");
    assert.deepEqual(changes[1], { kind: 'clear', wait: true });
  });

  test('input() is answered through onInput', async () => {
    const prompts = [];
    const ex = await sb.runCode('name = input("Your name? ")\nprint("hello", name)', {
      onInput: async ({ prompt, password }) => {
        prompts.push({ prompt, password });
        return 'Ada';
      },
    });
    assert.deepEqual(prompts, [{ prompt: 'Your name? ', password: false }]);
    assert.equal(ex.logs.stdout.join(''), 'hello Ada\n');
  });

  test('without onInput, input() fails at once instead of waiting', async () => {
    const ex = await sb.runCode('input("? ")', { timeoutMs: 20_000 });
    assert.equal(ex.status, 'error');
    assert.match(ex.error.name, /StdinNotImplemented/);
  });

  test('events of the cell reach onEvent raw, in order, ending with done', async () => {
    const events = [];
    await sb.runCode('print(1)', { onEvent: (e) => events.push(e) });
    const types = events.map((e) => e.type);
    assert.equal(types[0], 'accepted');
    assert.equal(types.at(-1), 'done');
    assert.ok(types.includes('stream'));
    const seqs = events.map((e) => e.seq);
    assert.deepEqual(seqs, [...seqs].sort((a, b) => a - b));
  });
});

describe('control', () => {
  test('interrupt stops a running cell with KeyboardInterrupt', async (t) => {
    const started = Date.now();
    let interrupts = 0;
    /** @type {ReturnType<typeof setInterval> | undefined} */
    let again;
    const interrupt = () => {
      interrupts += 1;
      sb.interrupt();
    };
    const running = sb.runCode('import time\nprint("sleeping", flush=True)\ntime.sleep(60)', {
      onStdout: () => {
        interrupt();
        // Now and then the kernel's SIGINT misses the main thread (ipykernel signals the
        // process, not the thread): press again, as a person would, and say so.
        again = setInterval(interrupt, 3000);
      },
    });
    const ex = await running.finally(() => clearInterval(again));
    if (interrupts > 1) t.diagnostic(`the cell stopped after ${interrupts} interrupts`);
    assert.equal(ex.status, 'error');
    assert.equal(ex.error.name, 'KeyboardInterrupt');
    assert.ok(Date.now() - started < 20_000);
    assert.equal((await sb.runCode('x')).text, '41', 'variables survive an interrupt');
  });

  test('an AbortSignal interrupts the cell', async () => {
    const controller = new AbortController();
    const ex = await sb.runCode('import time\nprint("go", flush=True)\ntime.sleep(60)', {
      signal: controller.signal,
      onStdout: () => controller.abort(),
    });
    assert.equal(ex.error?.name, 'KeyboardInterrupt');
  });

  test('timeoutMs interrupts the cell; the TimeoutError holds the partial output', async () => {
    await assert.rejects(
      sb.runCode('import time\nprint("partial", flush=True)\ntime.sleep(60)', { timeoutMs: 1500 }),
      (error) => {
        assert.ok(error instanceof TimeoutError);
        assert.equal(error.execution.status, 'timeout');
        assert.equal(error.execution.logs.stdout.join(''), 'partial\n');
        return true;
      },
    );
  });

  test('completions, is_complete and inspect', async () => {
    await sb.runCode('import os\nlong_variable_name = 3');
    const completion = await sb.complete('os.pa');
    assert.ok(completion.matches.includes('os.path') || completion.matches.includes('path'));
    assert.equal(completion.cursorEnd, 5);

    // Cursors are JavaScript string indexes: a non-BMP character before the cursor counts 2.
    const code = 's = "😀"; long_var';
    const unicode = await sb.complete(code, code.length);
    assert.ok(unicode.matches.includes('long_variable_name'), JSON.stringify(unicode));
    assert.equal(code.slice(unicode.cursorStart, unicode.cursorEnd), 'long_var');

    assert.deepEqual(await sb.isComplete('x = 1'), { status: 'complete' });
    const open = await sb.isComplete('for i in range(3):');
    assert.equal(open.status, 'incomplete');
    assert.equal(typeof open.indent, 'string');

    const doc = await sb.inspect('len(', 3);
    assert.equal(doc.found, true);
    assert.match(doc.data['text/plain'], /Return the number of items/);
  });

  test('restart loses variables; kernel events say restarting, then idle', async () => {
    await sb.runCode('y = 1');
    const states = [];
    const off = sb.on('kernel', ({ state }) => states.push(state));
    await sb.restart();
    off();
    // (The previous cell's `kernel: idle` may come just before: it follows the cell's `done`.)
    const from = states.indexOf('restarting');
    assert.ok(from >= 0, `states: ${states}`);
    assert.equal(states.at(-1), 'idle');
    assert.ok(!states.slice(from).includes('busy'), `states: ${states}`);
    assert.equal(sb.kernelState, 'idle');
    const ex = await sb.runCode('y');
    assert.equal(ex.error?.name, 'NameError');
    assert.equal(ex.executionCount, 1, 'the new kernel counts from 1');
  });

  test('a restart aborts the running cell', async () => {
    const running = sb.runCode('import time\nprint("started", flush=True)\ntime.sleep(60)', {
      onStdout: () => sb.restart(),
    });
    const ex = await running;
    assert.equal(ex.status, 'aborted');
    assert.equal(ex.error.name, 'Aborted');
  });
});

describe('sessions and errors', () => {
  test('a wrong token is an AuthError', async () => {
    await assert.rejects(Sandbox.create({ url: server.url, token: 'wrong' }), AuthError);
    await assert.rejects(
      Sandbox.connect({ url: server.url, token: 'wrong', sessionId: sb.sessionId }),
      AuthError,
    );
  });

  test('an unknown session is a NotFoundError', async () => {
    await assert.rejects(
      Sandbox.connect({ url: server.url, token: server.token, sessionId: 'no-such-session' }),
      (error) => error instanceof NotFoundError && error.status === 404,
    );
  });

  test('a second client of the same session shares its variables', async () => {
    await sb.runCode('shared = "yes"');
    const other = await Sandbox.connect({
      url: server.url,
      token: server.token,
      sessionId: sb.sessionId,
    });
    try {
      assert.equal((await other.runCode('shared')).text, "'yes'");
    } finally {
      await other.close();
    }
  });

  test('close({kill: true}) removes the session; later calls reject', async () => {
    const temp = await Sandbox.create({ url: server.url, token: server.token });
    const listed = async () =>
      (await Sandbox.list({ url: server.url, token: server.token })).some(
        (s) => s.id === temp.sessionId,
      );
    assert.ok(await listed());
    await temp.close({ kill: true });
    assert.equal(temp.connectionState, 'closed');
    assert.ok(!(await listed()));
    await assert.rejects(temp.runCode('1'), SandboxError);
    await assert.rejects(temp.info(), NotFoundError);
  });
});
