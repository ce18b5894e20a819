/**
 * kernelbox — a dependency-free JavaScript client for kernelbox sessions, for browsers and
 * Node ≥ 22 (any runtime with a global `fetch` and `WebSocket`; on Node 20 run with
 * `--experimental-websocket`).
 *
 * ```js
 * import { Sandbox } from './kernelbox.js';
 *
 * const sb = await Sandbox.create({ url: 'http://127.0.0.1:8888', token: 'T' });
 * await sb.runCode('x = 41');
 * const ex = await sb.runCode('x + 1', { onStdout: (text) => process.stdout.write(text) });
 * console.log(ex.text); // "42"
 * await sb.close({ kill: true });
 * ```
 *
 * The session's WebSocket speaks the native protocol (`protocol/README.md`): JSON commands in,
 * JSON events out, every event numbered by the session (`seq`). The client remembers the last
 * `seq` it saw; when the connection drops it reconnects with `?since=<seq>` and the server
 * replays exactly the events it missed, so a running cell's output arrives complete and once.
 *
 * @module kernelbox
 */

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

/** Base class of every error this client throws. */
export class KernelboxError extends Error {
  /**
   * @param {string} message What went wrong.
   * @param {{status?: number, cause?: unknown}} [options] The HTTP status, if any, and the cause.
   */
  constructor(message, options = {}) {
    super(message, options.cause === undefined ? undefined : { cause: options.cause });
    this.name = new.target.name;
    /** @type {number | undefined} The HTTP status of the failed request, if there was one. */
    this.status = options.status;
  }
}

/** The token was missing or wrong (HTTP 401). */
export class AuthError extends KernelboxError {}

/** The session does not exist (HTTP 404): it was never created, or was closed. */
export class NotFoundError extends KernelboxError {}

/**
 * A cell ran longer than its `timeoutMs` (it was interrupted), or an answer did not come in
 * time. `execution` holds what the cell produced until then, when it was a cell.
 */
export class TimeoutError extends KernelboxError {
  /**
   * @param {string} message What timed out.
   * @param {{execution?: Execution, cause?: unknown}} [options]
   */
  constructor(message, options = {}) {
    super(message, options);
    /** @type {Execution | undefined} The partial execution of a cell that timed out. */
    this.execution = options.execution;
  }
}

/**
 * Anything else: the server refused a request, the kernel died or restarted under a pending
 * request, the connection was lost for good, or an unexpected HTTP status.
 */
export class SandboxError extends KernelboxError {}

// ---------------------------------------------------------------------------------------------
// Results
// ---------------------------------------------------------------------------------------------

/** MIME types that get their own property on a {@link Result}. */
const MIME_FIELDS = /** @type {const} */ ([
  ['text/plain', 'text'],
  ['text/html', 'html'],
  ['text/markdown', 'markdown'],
  ['image/svg+xml', 'svg'],
  ['image/png', 'png'],
  ['image/jpeg', 'jpeg'],
  ['application/pdf', 'pdf'],
  ['text/latex', 'latex'],
  ['application/json', 'json'],
  ['application/javascript', 'javascript'],
]);

/**
 * One rich output of a cell: the value of its last expression (`isMainResult`) or something it
 * displayed (a plot, a table, …), in every MIME type the kernel offered.
 */
export class Result {
  /**
   * @param {Record<string, any>} data MIME type → content (images are base64).
   * @param {{metadata?: Record<string, any>, isMainResult?: boolean, displayId?: string | null,
   *   executionCount?: number | null}} [options]
   */
  constructor(data, options = {}) {
    /** @type {Record<string, any>} Every representation by MIME type. */
    this.data = data ?? {};
    /** @type {Record<string, any>} MIME type → metadata (e.g. image sizes). */
    this.metadata = options.metadata ?? {};
    /** @type {boolean} Whether this is the value of the cell's last expression. */
    this.isMainResult = options.isMainResult ?? false;
    /** @type {string | null} The display id, for displays that can be updated. */
    this.displayId = options.displayId ?? null;
    /** @type {number | null} The cell's execution count (main results only). */
    this.executionCount = options.executionCount ?? null;
    /** @type {string | undefined} `text/plain`. */ this.text = undefined;
    /** @type {string | undefined} `text/html`. */ this.html = undefined;
    /** @type {string | undefined} `text/markdown`. */ this.markdown = undefined;
    /** @type {string | undefined} `image/svg+xml`. */ this.svg = undefined;
    /** @type {string | undefined} `image/png`, base64. */ this.png = undefined;
    /** @type {string | undefined} `image/jpeg`, base64. */ this.jpeg = undefined;
    /** @type {string | undefined} `application/pdf`, base64. */ this.pdf = undefined;
    /** @type {string | undefined} `text/latex`. */ this.latex = undefined;
    /** @type {any} `application/json`. */ this.json = undefined;
    /** @type {string | undefined} `application/javascript`. */ this.javascript = undefined;
    for (const [mime, field] of MIME_FIELDS) {
      if (mime in this.data) /** @type {any} */ (this)[field] = this.data[mime];
    }
  }

  /** @returns {string[]} The MIME types this result has. */
  formats() {
    return Object.keys(this.data);
  }
}

/**
 * @typedef {object} ExecutionError
 * @property {string} name The exception class, e.g. `ZeroDivisionError`.
 * @property {string} value The exception message.
 * @property {string[]} traceback Traceback lines, with ANSI colour codes.
 */

/**
 * Everything a cell produced: its results, what it printed, its exception. Returned by
 * {@link Sandbox#runCode} once the cell finished.
 */
export class Execution {
  constructor() {
    /** @type {Result[]} Displays and the main result, in order. */
    this.results = [];
    /** @type {{stdout: string[], stderr: string[]}} Printed text, in the chunks it came in. */
    this.logs = { stdout: [], stderr: [] };
    /** @type {ExecutionError | null} The exception the cell raised, if any. */
    this.error = null;
    /** @type {number | null} The cell's execution count (`In [n]`). */
    this.executionCount = null;
    /**
     * @type {'running' | 'ok' | 'error' | 'aborted' | 'timeout'} How the cell ended: `aborted`
     * when a restart or the kernel's death stopped it.
     */
    this.status = 'running';
    /** @type {number | null} How long the cell ran, in milliseconds. */
    this.durationMs = null;
  }

  /** @returns {string | undefined} The `text/plain` of the main result, if there is one. */
  get text() {
    return this.results.find((r) => r.isMainResult)?.text;
  }
}

// ---------------------------------------------------------------------------------------------
// Options and events
// ---------------------------------------------------------------------------------------------

/**
 * @typedef {object} ConnectionOptions
 * @property {string} url The server's base URL, e.g. `http://127.0.0.1:8888`.
 * @property {string} token The API token.
 * @property {boolean | ReconnectOptions} [reconnect] Reconnect when the connection drops
 *   (default `true`).
 * @property {typeof WebSocket} [WebSocket] A WebSocket implementation (default: the global one).
 * @property {typeof fetch} [fetch] A fetch implementation (default: the global one).
 * @property {number} [requestTimeoutMs] Timeout of HTTP requests and of opening the WebSocket
 *   (default 30 000).
 */

/**
 * @typedef {object} ReconnectOptions
 * @property {number} [maxAttempts] Attempts in a row before giving up (default 30).
 * @property {number} [initialDelayMs] Delay before the second attempt (default 200); the first
 *   is immediate and the delay doubles up to `maxDelayMs`.
 * @property {number} [maxDelayMs] Longest delay between attempts (default 5000).
 */

/**
 * @typedef {object} RunOptions
 * @property {(text: string) => void} [onStdout] Each chunk printed to stdout, as it arrives.
 * @property {(text: string) => void} [onStderr] Each chunk printed to stderr, as it arrives.
 * @property {(result: Result) => void} [onResult] Each rich result (displays and the main
 *   result) as it arrives.
 * @property {(error: ExecutionError) => void} [onError] The exception the cell raised.
 * @property {(change: DisplayChange) => void} [onDisplay] Changes to outputs already shown:
 *   `update_display_data` and `clear_output` (for renderers).
 * @property {(request: {prompt: string, password: boolean}) => string | Promise<string>} [onInput]
 *   Answers the cell's `input()` calls. Without it (and without `allowStdin: true`) `input()`
 *   raises at once instead of waiting.
 * @property {(event: ServerEvent) => void} [onEvent] Every protocol event of the cell, raw.
 * @property {number} [timeoutMs] Interrupt the cell when it runs longer; the promise then
 *   rejects with a {@link TimeoutError} carrying the partial execution.
 * @property {AbortSignal} [signal] Aborting interrupts the cell.
 * @property {string} [id] The cell's id on the wire (default: a random one).
 * @property {boolean} [silent] Run quietly: no output, no execution count.
 * @property {boolean} [storeHistory] Record the cell in the kernel's history (default: not silent).
 * @property {boolean} [allowStdin] Let the cell call `input()` (default: whether `onInput` is
 *   given); with `true` and no `onInput`, answer with {@link Sandbox#sendInput}.
 */

/**
 * @typedef {object} DisplayChange
 * @property {'update' | 'clear'} kind `update`: the display `displayId` now shows `result`;
 *   `clear`: clear the cell's output (when the next output arrives, if `wait`).
 * @property {string} [displayId] For `update`.
 * @property {Result} [result] For `update`.
 * @property {boolean} [wait] For `clear`.
 */

/**
 * A server event as it came over the wire (see `protocol/README.md`): `type`, the session's
 * `seq` (absent on replies to this connection only), the `id` of the cell or request it
 * belongs to, and the type's own fields.
 * @typedef {{type: string, seq?: number, id?: string, [field: string]: any}} ServerEvent
 */

/**
 * @typedef {'starting' | 'idle' | 'busy' | 'restarting' | 'dead' | 'closed'} KernelState
 */

/**
 * @typedef {'connecting' | 'open' | 'reconnecting' | 'closed'} ConnectionState
 */

/**
 * Events of {@link Sandbox#on}:
 * - `kernel` `{state, reason}` — the kernel changed state;
 * - `connection` `{state, attempt?, error?}` — the WebSocket connected, is reconnecting, or
 *   closed for good (`error` says why, when it was not {@link Sandbox#close});
 * - `resumed` `{since, replayed, dropped}` — a reconnect resumed; `dropped` events were lost;
 * - `event` — every server event, raw (including other clients' cells);
 * - `error` — a problem not tied to a pending request (e.g. `Lagged`), as a {@link SandboxError}.
 * @typedef {'kernel' | 'connection' | 'resumed' | 'event' | 'error'} SandboxEventName
 */

const DEFAULT_RECONNECT = { maxAttempts: 30, initialDelayMs: 200, maxDelayMs: 5000 };

/** Extra time a client-side cell timeout gives the server to report its own. */
const TIMEOUT_GRACE_MS = 10_000;

// ---------------------------------------------------------------------------------------------
// HTTP
// ---------------------------------------------------------------------------------------------

/**
 * Turns a failed HTTP response into the matching typed error.
 * @param {Response} response
 * @param {string} what What was asked, for the message.
 * @returns {Promise<KernelboxError>}
 */
async function httpError(response, what) {
  let detail = '';
  try {
    const body = await response.json();
    detail = typeof body?.error === 'string' ? body.error : JSON.stringify(body);
  } catch {
    detail = response.statusText;
  }
  const message = `${what}: HTTP ${response.status}${detail ? ` (${detail})` : ''}`;
  const Kind =
    response.status === 401 ? AuthError : response.status === 404 ? NotFoundError : SandboxError;
  return new Kind(message, { status: response.status });
}

/**
 * One authenticated JSON request to the REST API.
 * @param {ConnectionOptions} options
 * @param {string} method
 * @param {string} path
 * @param {unknown} [body]
 * @returns {Promise<any>} The parsed body (`null` for 204).
 */
async function request(options, method, path, body) {
  const doFetch = options.fetch ?? globalThis.fetch;
  if (typeof doFetch !== 'function') throw new SandboxError('no fetch() in this runtime');
  const what = `${method} ${path}`;
  const timeoutMs = options.requestTimeoutMs ?? 30_000;
  let response;
  try {
    response = await doFetch(new URL(path, baseUrl(options.url)), {
      method,
      headers: {
        Authorization: `Bearer ${options.token}`,
        ...(body === undefined ? {} : { 'Content-Type': 'application/json' }),
      },
      body: body === undefined ? undefined : JSON.stringify(body),
      signal: AbortSignal.timeout(timeoutMs),
    });
  } catch (cause) {
    if (/** @type {any} */ (cause)?.name === 'TimeoutError') {
      throw new TimeoutError(`${what}: no answer within ${timeoutMs} ms`, { cause });
    }
    throw new SandboxError(`${what}: ${/** @type {any} */ (cause)?.message ?? cause}`, { cause });
  }
  if (!response.ok) throw await httpError(response, what);
  return response.status === 204 ? null : response.json();
}

/**
 * The server's base URL with a trailing slash, so relative paths resolve under it.
 * @param {string} url
 * @returns {string}
 */
function baseUrl(url) {
  if (!url) throw new SandboxError('no server url given');
  return url.endsWith('/') ? url : `${url}/`;
}

/**
 * A random id (hex) for cells and requests; works outside secure contexts too.
 * @returns {string}
 */
function newId() {
  const bytes = new Uint8Array(12);
  globalThis.crypto.getRandomValues(bytes);
  return Array.from(bytes, (b) => b.toString(16).padStart(2, '0')).join('');
}

/**
 * Converts a JavaScript string index (UTF-16 code units) into unicode code points, the unit
 * of the protocol's cursors.
 * @param {string} text
 * @param {number} index
 * @returns {number}
 */
function toCodePoints(text, index) {
  return Array.from(text.slice(0, index)).length;
}

/**
 * Converts a code point offset back into a JavaScript string index.
 * @param {string} text
 * @param {number} points
 * @returns {number}
 */
function fromCodePoints(text, points) {
  let index = 0;
  for (const ch of text) {
    if (points-- <= 0) break;
    index += ch.length;
  }
  return index;
}

// ---------------------------------------------------------------------------------------------
// The sandbox
// ---------------------------------------------------------------------------------------------

/**
 * @typedef {object} PendingCell
 * @property {Execution} execution
 * @property {RunOptions} options
 * @property {(execution: Execution) => void} resolve
 * @property {(error: Error) => void} reject
 * @property {string | null} rejected The server's reason, when it refused the cell.
 * @property {() => void} cleanup Clears timers and listeners.
 */

/**
 * @typedef {object} PendingQuery
 * @property {string} code The code asked about (to convert cursors back).
 * @property {(event: ServerEvent) => void} resolve
 * @property {(error: Error) => void} reject
 */

/**
 * One kernelbox session: a sandboxed kernel whose variables live on between cells, reached
 * over a WebSocket that reconnects by itself. Make one with {@link Sandbox.create} or
 * {@link Sandbox.connect}.
 */
export class Sandbox {
  /** @type {ConnectionOptions} */ #options;
  /** @type {string} */ #id;
  /** @type {Required<ReconnectOptions> | null} */ #reconnect;
  /** @type {WebSocket | null} */ #ws = null;
  /** @type {ConnectionState} */ #connection = 'connecting';
  /** @type {KernelState} */ #kernel = 'starting';
  /** @type {string | null} */ #kernelReason = null;
  /** The last sequence number seen (`null`: none yet, on a connection opened without one). */
  /** @type {number | null} */ #lastSeq;
  /** Frames sent while disconnected, sent on reconnect. @type {string[]} */ #outbox = [];
  /** @type {Map<string, PendingCell>} */ #cells = new Map();
  /** @type {Map<string, PendingQuery>} */ #queries = new Map();
  /** @type {Map<string, Set<Function>>} */ #listeners = new Map();
  /** @type {Set<{resolve: () => void, reject: (e: Error) => void}>} */ #readyWaiters = new Set();
  /** @type {ReturnType<typeof setTimeout> | null} */ #retryTimer = null;
  /** @type {boolean} */ #closing = false;

  /**
   * Use {@link Sandbox.create} or {@link Sandbox.connect}.
   * @param {ConnectionOptions} options
   * @param {string} sessionId
   * @param {number | null} since
   * @private
   */
  constructor(options, sessionId, since) {
    this.#options = options;
    this.#id = sessionId;
    this.#lastSeq = since;
    const reconnect = options.reconnect ?? true;
    this.#reconnect =
      reconnect === false
        ? null
        : { ...DEFAULT_RECONNECT, ...(reconnect === true ? {} : reconnect) };
  }

  /**
   * Starts a new session (`POST /v1/sessions`) and connects to it.
   * @param {ConnectionOptions & {network?: boolean, env?: Record<string, string>}} options
   *   `network` asks for network access (refused unless the server allows it); `env` sets
   *   environment variables of the kernel.
   * @returns {Promise<Sandbox>} Connected; cells may be sent at once (they wait for the kernel).
   * @throws {AuthError | SandboxError | TimeoutError}
   */
  static async create(options) {
    const body = {};
    if (options.network !== undefined) body.network = options.network;
    if (options.env !== undefined) body.env = options.env;
    const view = await request(options, 'POST', 'v1/sessions', body);
    // A new session: every event it ever had is ours, so replay from the start.
    const sandbox = new Sandbox(options, view.id, 0);
    try {
      await sandbox.#open();
    } catch (error) {
      await request(options, 'DELETE', `v1/sessions/${encodeURIComponent(view.id)}`).catch(
        () => {},
      );
      throw error;
    }
    return sandbox;
  }

  /**
   * Connects to an existing session.
   * @param {ConnectionOptions & {sessionId: string, since?: number}} options `since`: replay
   *   the session's buffered events after this sequence number (0: all of them) before live
   *   ones, e.g. to rebuild a page's output after a reload.
   * @returns {Promise<Sandbox>}
   * @throws {AuthError | NotFoundError | SandboxError | TimeoutError}
   */
  static async connect(options) {
    if (!options.sessionId) throw new SandboxError('no sessionId given');
    const sandbox = new Sandbox(options, options.sessionId, options.since ?? null);
    await sandbox.#open();
    return sandbox;
  }

  /**
   * Lists the server's sessions (`GET /v1/sessions`).
   * @param {ConnectionOptions} options
   * @returns {Promise<Array<Record<string, any>>>} The sessions as the REST API shows them.
   */
  static async list(options) {
    return request(options, 'GET', 'v1/sessions');
  }

  /**
   * Stops a session and removes its sandbox without connecting to it.
   * @param {ConnectionOptions & {sessionId: string}} options
   * @returns {Promise<void>}
   * @throws {AuthError | NotFoundError | SandboxError}
   */
  static async kill(options) {
    await request(options, 'DELETE', `v1/sessions/${encodeURIComponent(options.sessionId)}`);
  }

  /** @returns {string} The session id. */
  get sessionId() {
    return this.#id;
  }

  /** @returns {KernelState} The kernel's state as last reported. */
  get kernelState() {
    return this.#kernel;
  }

  /** @returns {ConnectionState} The WebSocket's state. */
  get connectionState() {
    return this.#connection;
  }

  /** @returns {number | null} The last sequence number seen (what a reconnect resumes after). */
  get lastSeq() {
    return this.#lastSeq;
  }

  /**
   * The session as the REST API shows it (`GET /v1/sessions/{id}`).
   * @returns {Promise<Record<string, any>>}
   * @throws {AuthError | NotFoundError | SandboxError}
   */
  async info() {
    return request(this.#options, 'GET', `v1/sessions/${encodeURIComponent(this.#id)}`);
  }

  /**
   * Subscribes to an event (see {@link SandboxEventName}).
   * @param {SandboxEventName} name
   * @param {(payload: any) => void} listener
   * @returns {() => void} Unsubscribes.
   */
  on(name, listener) {
    let set = this.#listeners.get(name);
    if (!set) this.#listeners.set(name, (set = new Set()));
    set.add(listener);
    return () => this.off(name, listener);
  }

  /**
   * Unsubscribes a listener added with {@link Sandbox#on}.
   * @param {SandboxEventName} name
   * @param {(payload: any) => void} listener
   */
  off(name, listener) {
    this.#listeners.get(name)?.delete(listener);
  }

  /**
   * Runs a cell and waits until it finished. Cells run one at a time in the order they were
   * sent; variables live on between them. A Python exception does not reject: it is in
   * `execution.error` (and `status` is `error`).
   * @param {string} code
   * @param {RunOptions} [options]
   * @returns {Promise<Execution>}
   * @throws {TimeoutError} The cell ran longer than `timeoutMs` (it was interrupted).
   * @throws {SandboxError} The server refused the cell, or the connection was lost for good.
   */
  runCode(code, options = {}) {
    const id = options.id ?? newId();
    if (this.#cells.has(id)) return Promise.reject(new SandboxError(`cell ${id} is running`));
    const execution = new Execution();
    return new Promise((resolve, reject) => {
      /** @type {ReturnType<typeof setTimeout> | undefined} */
      let timer;
      const onAbort = () => this.interrupt().catch(() => {});
      /** @type {PendingCell} */
      const pending = {
        execution,
        options,
        resolve,
        reject,
        rejected: null,
        cleanup: () => {
          clearTimeout(timer);
          options.signal?.removeEventListener('abort', onAbort);
        },
      };
      if (this.#connection === 'closed') {
        reject(new SandboxError('the sandbox is closed'));
        return;
      }
      this.#cells.set(id, pending);
      /** @type {Record<string, unknown>} */
      const frame = { type: 'execute', id, code };
      if (options.silent) frame.silent = true;
      if (options.storeHistory !== undefined) frame.store_history = options.storeHistory;
      frame.allow_stdin = options.allowStdin ?? typeof options.onInput === 'function';
      if (options.timeoutMs !== undefined) {
        frame.timeout_s = options.timeoutMs / 1000;
        // The server interrupts the cell and reports `timeout`; this only catches a server
        // that cannot be reached.
        timer = setTimeout(() => {
          const message = `the cell did not finish within ${options.timeoutMs} ms`;
          this.#finishCell(id, new TimeoutError(message, { execution }));
        }, options.timeoutMs + TIMEOUT_GRACE_MS);
      }
      if (options.signal) {
        if (options.signal.aborted) queueMicrotask(onAbort);
        else options.signal.addEventListener('abort', onAbort, { once: true });
      }
      try {
        this.#send(frame);
      } catch (error) {
        this.#finishCell(id, /** @type {Error} */ (error));
      }
    });
  }

  /**
   * Interrupts the running cell (it ends with `KeyboardInterrupt`). Queued cells still run.
   * @returns {Promise<void>} Once the request is sent (or queued while reconnecting).
   */
  async interrupt() {
    this.#send({ type: 'interrupt' });
  }

  /**
   * Restarts the kernel: variables are lost; the running and queued cells end as `aborted`.
   * @param {{timeoutMs?: number}} [options] How long to wait for the new kernel (default 60 000).
   * @returns {Promise<void>} Once the new kernel is idle.
   * @throws {SandboxError} The kernel died instead. @throws {TimeoutError}
   */
  async restart(options = {}) {
    if (this.#closing) throw new SandboxError('the sandbox is closed');
    const timeoutMs = options.timeoutMs ?? 60_000;
    const done = new Promise((resolve, reject) => {
      let restarting = false;
      const timer = setTimeout(() => {
        stop();
        reject(new TimeoutError(`the kernel did not restart within ${timeoutMs} ms`));
      }, timeoutMs);
      const stop = () => {
        clearTimeout(timer);
        offKernel();
        offConnection();
      };
      const offKernel = this.on('kernel', ({ state, reason }) => {
        if (state === 'restarting') restarting = true;
        else if (restarting && state === 'idle') {
          stop();
          resolve(undefined);
        } else if (state === 'dead' || state === 'closed') {
          stop();
          const what = state === 'dead' ? 'died' : 'closed';
          reject(new SandboxError(`the kernel ${what}${reason ? `: ${reason}` : ''}`));
        }
      });
      const offConnection = this.on('connection', ({ state, error }) => {
        if (state === 'closed') {
          stop();
          reject(error ?? new SandboxError('the sandbox is closed'));
        }
      });
    });
    this.#send({ type: 'restart' });
    await done;
  }

  /**
   * Completions at `cursor`.
   * @param {string} code
   * @param {number} [cursor] A JavaScript string index into `code` (default: its end).
   * @returns {Promise<{matches: string[], cursorStart: number, cursorEnd: number,
   *   metadata: Record<string, any>}>} Cursors are JavaScript string indexes into `code`.
   */
  async complete(code, cursor = code.length) {
    const points = toCodePoints(code, cursor);
    const reply = await this.#query({ type: 'complete', code, cursor: points }, code);
    const start = reply.cursor_start ?? points;
    const end = reply.cursor_end ?? points;
    return {
      matches: reply.matches ?? [],
      cursorStart: fromCodePoints(code, start),
      cursorEnd: fromCodePoints(code, end),
      metadata: reply.metadata ?? {},
    };
  }

  /**
   * Whether `code` is a complete statement, as a REPL decides between running and continuing.
   * @param {string} code
   * @returns {Promise<{status: 'complete' | 'incomplete' | 'invalid' | 'unknown',
   *   indent?: string}>}
   */
  async isComplete(code) {
    const reply = await this.#query({ type: 'is_complete', code }, code);
    return reply.indent === undefined
      ? { status: reply.status }
      : { status: reply.status, indent: reply.indent };
  }

  /**
   * Documentation of the object at `cursor`.
   * @param {string} code
   * @param {number} [cursor] A JavaScript string index into `code` (default: its end).
   * @param {{detailLevel?: 0 | 1}} [options] 1 adds the source.
   * @returns {Promise<{found: boolean, data: Record<string, any>, metadata: Record<string, any>}>}
   */
  async inspect(code, cursor = code.length, options = {}) {
    const reply = await this.#query(
      {
        type: 'inspect',
        code,
        cursor: toCodePoints(code, cursor),
        detail_level: options.detailLevel ?? 0,
      },
      code,
    );
    return { found: Boolean(reply.found), data: reply.data ?? {}, metadata: reply.metadata ?? {} };
  }

  /**
   * Answers the pending `input()` prompt (when not answered through `onInput`).
   * @param {string} value The line typed.
   */
  sendInput(value) {
    this.#send({ type: 'input_reply', value: String(value) });
  }

  /**
   * Waits until the kernel can answer (`idle` or `busy`).
   * @param {{timeoutMs?: number}} [options] Default 60 000.
   * @returns {Promise<void>}
   * @throws {TimeoutError | SandboxError}
   */
  ready(options = {}) {
    if (this.#kernel === 'idle' || this.#kernel === 'busy') return Promise.resolve();
    if (this.#connection === 'closed') {
      return Promise.reject(new SandboxError('the sandbox is closed'));
    }
    if (this.#kernel === 'dead') return Promise.reject(this.#deadError());
    const timeoutMs = options.timeoutMs ?? 60_000;
    return new Promise((resolve, reject) => {
      const waiter = {
        resolve: () => {
          clearTimeout(timer);
          resolve();
        },
        reject: (/** @type {Error} */ error) => {
          clearTimeout(timer);
          reject(error);
        },
      };
      const timer = setTimeout(() => {
        this.#readyWaiters.delete(waiter);
        reject(new TimeoutError(`the kernel was not ready within ${timeoutMs} ms`));
      }, timeoutMs);
      this.#readyWaiters.add(waiter);
    });
  }

  /**
   * Closes the connection; pending cells and requests reject.
   * @param {{kill?: boolean}} [options] `kill`: also stop the session and remove its sandbox.
   * @returns {Promise<void>}
   */
  async close(options = {}) {
    this.#closing = true;
    clearTimeout(/** @type {any} */ (this.#retryTimer));
    const ws = this.#ws;
    this.#ws = null;
    if (ws && ws.readyState <= 1) ws.close(1000, 'client closed');
    this.#shutDown(new SandboxError('the sandbox was closed'), { byUser: true });
    if (options.kill) {
      await request(this.#options, 'DELETE', `v1/sessions/${encodeURIComponent(this.#id)}`).catch(
        (error) => {
          if (!(error instanceof NotFoundError)) throw error;
        },
      );
    }
  }

  // -------------------------------------------------------------------------------------------
  // Connection
  // -------------------------------------------------------------------------------------------

  /** @returns {string} The WebSocket URL, resuming after the last event seen if any. */
  #socketUrl() {
    const path = `v1/sessions/${encodeURIComponent(this.#id)}/ws`;
    const url = new URL(path, baseUrl(this.#options.url));
    url.protocol = url.protocol === 'https:' ? 'wss:' : 'ws:';
    url.searchParams.set('token', this.#options.token);
    if (this.#lastSeq !== null) url.searchParams.set('since', String(this.#lastSeq));
    return url.toString();
  }

  /**
   * Opens the WebSocket and waits for the server's greeting (`kernel` or `resumed`).
   * @returns {Promise<void>}
   */
  #open() {
    const Impl = this.#options.WebSocket ?? globalThis.WebSocket;
    if (typeof Impl !== 'function') {
      return Promise.reject(
        new SandboxError(
          'no WebSocket in this runtime: use Node ≥ 22 (or node --experimental-websocket)',
        ),
      );
    }
    return new Promise((resolve, reject) => {
      const ws = new Impl(this.#socketUrl());
      this.#ws = ws;
      let greeted = false;
      let ended = false;
      const timeoutMs = this.#options.requestTimeoutMs ?? 30_000;
      const timer = setTimeout(() => {
        end(new TimeoutError(`no greeting from the server within ${timeoutMs} ms`));
      }, timeoutMs);
      /**
       * The socket failed or closed (once): before the greeting the open fails; after it, a
       * drop reconnects — unless this socket was replaced or the sandbox closed meanwhile.
       * @param {Error | null} error
       */
      const end = (error) => {
        if (ended) return;
        ended = true;
        clearTimeout(timer);
        const current = this.#ws === ws;
        if (current) this.#ws = null;
        try {
          ws.close();
        } catch {
          // already closed
        }
        if (!greeted && (!current || this.#closing)) {
          reject(new SandboxError('the sandbox was closed'));
        } else if (!greeted) {
          // A browser does not tell why an upgrade failed: ask the REST API.
          this.#diagnose(error).then(reject, reject);
        } else if (current) {
          this.#onDrop();
        }
      };
      ws.onmessage = (message) => {
        if (this.#ws !== ws) return;
        let event;
        try {
          event = JSON.parse(String(message.data));
        } catch {
          this.#emit('error', new SandboxError('the server sent a frame that is not JSON'));
          return;
        }
        const greeting =
          (event.type === 'kernel' || event.type === 'resumed') && event.seq === undefined;
        if (!greeted && greeting) {
          greeted = true;
          clearTimeout(timer);
          this.#setConnection('open');
          this.#handle(event);
          this.#flush();
          resolve();
          return;
        }
        this.#handle(event);
      };
      ws.onerror = () => end(null);
      ws.onclose = () => end(null);
    });
  }

  /**
   * Works out why a WebSocket would not open: the session's REST resource answers 401 or 404
   * with a reason where a failed upgrade says nothing.
   * @param {Error | null} error The failure seen, if it said more than "closed".
   * @returns {Promise<KernelboxError>}
   */
  async #diagnose(error) {
    if (error instanceof KernelboxError) return error;
    try {
      await this.info();
    } catch (known) {
      if (known instanceof AuthError || known instanceof NotFoundError) return known;
      const why = /** @type {Error} */ (known).message;
      return new SandboxError(`cannot connect to session ${this.#id}: ${why}`, { cause: known });
    }
    return new SandboxError(`cannot open the WebSocket of session ${this.#id}`);
  }

  /** The connection dropped: reconnect (resuming after the last event seen), or give up. */
  #onDrop() {
    if (this.#closing) return;
    if (!this.#reconnect) {
      this.#shutDown(new SandboxError('the connection was lost'));
      return;
    }
    this.#retry(1);
  }

  /**
   * One reconnect attempt (the first at once, then with a doubling delay).
   * @param {number} attempt
   */
  #retry(attempt) {
    const policy = /** @type {Required<ReconnectOptions>} */ (this.#reconnect);
    if (attempt > policy.maxAttempts) {
      const message = `the connection was lost and ${policy.maxAttempts} reconnects failed`;
      this.#shutDown(new SandboxError(message));
      return;
    }
    this.#setConnection('reconnecting', { attempt });
    const delay =
      attempt === 1 ? 0 : Math.min(policy.initialDelayMs * 2 ** (attempt - 2), policy.maxDelayMs);
    this.#retryTimer = setTimeout(() => {
      if (this.#closing) return;
      this.#open().catch((error) => {
        if (this.#closing) return;
        if (error instanceof AuthError || error instanceof NotFoundError) {
          this.#shutDown(error);
        } else {
          this.#retry(attempt + 1);
        }
      });
    }, delay);
  }

  /**
   * Ends the sandbox for good: every pending cell and request rejects with `error`.
   * @param {Error} error
   * @param {{byUser?: boolean}} [options] `byUser`: {@link Sandbox#close} did it (then
   *   `connection` listeners get no `error`).
   */
  #shutDown(error, options = {}) {
    this.#closing = true;
    for (const id of [...this.#cells.keys()]) this.#finishCell(id, error);
    for (const [id, query] of this.#queries) {
      this.#queries.delete(id);
      query.reject(error);
    }
    for (const waiter of this.#readyWaiters) waiter.reject(error);
    this.#readyWaiters.clear();
    this.#outbox = [];
    if (this.#connection !== 'closed') {
      this.#setConnection('closed', options.byUser ? {} : { error });
    }
  }

  /**
   * Sends a frame, or keeps it for the next connection while reconnecting.
   * @param {Record<string, unknown>} frame
   */
  #send(frame) {
    if (this.#closing) throw new SandboxError('the sandbox is closed');
    const text = JSON.stringify(frame);
    const ws = this.#ws;
    if (ws && ws.readyState === 1 && this.#connection === 'open') ws.send(text);
    else this.#outbox.push(text);
  }

  /** Sends what was kept while disconnected. */
  #flush() {
    const ws = this.#ws;
    while (ws && ws.readyState === 1 && this.#outbox.length > 0) {
      ws.send(/** @type {string} */ (this.#outbox.shift()));
    }
  }

  /**
   * @param {ConnectionState} state
   * @param {Record<string, unknown>} [extra]
   */
  #setConnection(state, extra = {}) {
    if (this.#connection === state && state !== 'reconnecting') return;
    this.#connection = state;
    this.#emit('connection', { state, ...extra });
  }

  /**
   * Calls the listeners of an event; a throwing listener does not disturb the others.
   * @param {SandboxEventName} name
   * @param {unknown} payload
   */
  #emit(name, payload) {
    for (const listener of [...(this.#listeners.get(name) ?? [])]) {
      try {
        listener(payload);
      } catch (error) {
        queueMicrotask(() => {
          throw error;
        });
      }
    }
  }

  // -------------------------------------------------------------------------------------------
  // Events
  // -------------------------------------------------------------------------------------------

  /**
   * Routes one server event to the cell, request or listeners it belongs to.
   * @param {ServerEvent} event
   */
  #handle(event) {
    if (typeof event.seq === 'number') {
      // A replay never repeats what was seen; this guards against a server that would.
      if (this.#lastSeq !== null && event.seq <= this.#lastSeq) return;
      this.#lastSeq = event.seq;
    }
    this.#emit('event', event);
    switch (event.type) {
      case 'kernel':
        this.#onKernel(event.state, event.reason ?? null);
        return;
      case 'resumed':
        const { since, replayed, dropped } = event;
        this.#emit('resumed', { since, replayed, dropped });
        if (dropped > 0) {
          // Kernel state changes may be among the lost events: ask for the current one.
          this.info().then(
            (view) => this.#onKernel(view.state, null),
            () => {},
          );
        }
        return;
    }
    const id = event.id;
    if (id !== undefined && this.#cells.has(id)) this.#onCellEvent(id, event);
    else if (id !== undefined && this.#queries.has(id)) this.#onQueryEvent(id, event);
    else if (event.type === 'error' && event.seq === undefined) {
      this.#emit('error', new SandboxError(`${event.ename}: ${event.evalue}`));
    }
  }

  /**
   * @param {KernelState} state
   * @param {string | null} reason
   */
  #onKernel(state, reason) {
    if (state === this.#kernel && reason === this.#kernelReason) return;
    this.#kernel = state;
    this.#kernelReason = reason;
    if (state === 'idle' || state === 'busy') {
      for (const waiter of this.#readyWaiters) waiter.resolve();
      this.#readyWaiters.clear();
    }
    if (state === 'dead' || state === 'restarting' || state === 'closed') {
      // The server forgets pending requests then: their answers will never come.
      const error =
        state === 'restarting' ? new SandboxError('the kernel restarted') : this.#deadError();
      for (const [id, query] of this.#queries) {
        this.#queries.delete(id);
        query.reject(error);
      }
    }
    if (state === 'dead' || state === 'closed') {
      for (const waiter of this.#readyWaiters) waiter.reject(this.#deadError());
      this.#readyWaiters.clear();
    }
    this.#emit('kernel', reason === null ? { state } : { state, reason });
  }

  /** @returns {SandboxError} Why the kernel cannot answer. */
  #deadError() {
    if (this.#kernel === 'closed') return new SandboxError('the session was closed');
    const reason = this.#kernelReason ? `: ${this.#kernelReason}` : '';
    return new SandboxError(`the kernel died${reason}`);
  }

  /**
   * @param {string} id
   * @param {ServerEvent} event
   */
  #onCellEvent(id, event) {
    const pending = /** @type {PendingCell} */ (this.#cells.get(id));
    const { execution, options } = pending;
    call(options.onEvent, event);
    switch (event.type) {
      case 'stream': {
        const name = event.name === 'stderr' ? 'stderr' : 'stdout';
        execution.logs[name].push(event.text);
        call(name === 'stderr' ? options.onStderr : options.onStdout, event.text);
        break;
      }
      case 'display_data':
      case 'execute_result': {
        const main = event.type === 'execute_result';
        const result = new Result(event.data, {
          metadata: event.metadata,
          isMainResult: main,
          displayId: event.transient?.display_id ?? null,
          executionCount: main ? event.execution_count : null,
        });
        execution.results.push(result);
        call(options.onResult, result);
        break;
      }
      case 'update_display_data': {
        const displayId = event.transient?.display_id;
        if (typeof displayId !== 'string') break;
        const result = new Result(event.data, { metadata: event.metadata, displayId });
        const index = execution.results.findIndex((r) => r.displayId === displayId);
        if (index >= 0) execution.results[index] = result;
        call(options.onDisplay, { kind: 'update', displayId, result });
        break;
      }
      case 'clear_output':
        call(options.onDisplay, { kind: 'clear', wait: Boolean(event.wait) });
        break;
      case 'input_request':
        this.#answerInput(pending, event);
        break;
      case 'error':
        if (event.seq === undefined) {
          // This connection's frame was refused (invalid, or the session is gone): no `done`.
          const message = `the cell was refused: ${event.ename}: ${event.evalue}`;
          this.#finishCell(id, new SandboxError(message));
        } else if (event.ename === 'Rejected' && (event.traceback ?? []).length === 0) {
          pending.rejected = event.evalue;
        } else {
          execution.error = {
            name: event.ename,
            value: event.evalue,
            traceback: event.traceback ?? [],
          };
          call(options.onError, execution.error);
        }
        break;
      case 'done':
        this.#onDone(id, pending, event);
        break;
    }
  }

  /**
   * Asks `onInput` for the line a cell's `input()` waits for and sends it.
   * @param {PendingCell} pending
   * @param {ServerEvent} event
   */
  #answerInput(pending, event) {
    const { onInput } = pending.options;
    if (typeof onInput !== 'function') return; // answered through sendInput()
    const stillRunning = () => this.#cells.get(/** @type {string} */ (event.id)) === pending;
    Promise.resolve()
      .then(() => onInput({ prompt: event.prompt ?? '', password: Boolean(event.password) }))
      .then(
        (value) => {
          if (stillRunning() && !this.#closing) this.sendInput(value ?? '');
        },
        () => {
          // No answer: interrupting ends the input() call with KeyboardInterrupt.
          if (stillRunning()) this.interrupt().catch(() => {});
        },
      );
  }

  /**
   * @param {string} id
   * @param {PendingCell} pending
   * @param {ServerEvent} event
   */
  #onDone(id, pending, event) {
    const { execution } = pending;
    execution.durationMs = event.duration_ms ?? null;
    if (event.execution_count !== undefined && event.execution_count !== null) {
      execution.executionCount = event.execution_count;
    }
    switch (event.status) {
      case 'ok':
      case 'error':
        execution.status = event.status;
        this.#finishCell(id, null);
        return;
      case 'aborted':
        execution.status = 'aborted';
        execution.error ??= {
          name: 'Aborted',
          value: 'the kernel restarted or died before the cell finished',
          traceback: [],
        };
        this.#finishCell(id, null);
        return;
      case 'timeout':
        execution.status = 'timeout';
        this.#finishCell(
          id,
          new TimeoutError(
            `the cell ran longer than ${pending.options.timeoutMs} ms and was interrupted`,
            { execution },
          ),
        );
        return;
      default:
        const why = pending.rejected ?? event.status;
        this.#finishCell(id, new SandboxError(`the cell was refused: ${why}`));
    }
  }

  /**
   * Settles a pending cell: resolves with its execution, or rejects with `error`.
   * @param {string} id
   * @param {Error | null} error
   */
  #finishCell(id, error) {
    const pending = this.#cells.get(id);
    if (!pending) return;
    this.#cells.delete(id);
    pending.cleanup();
    if (error) pending.reject(error);
    else pending.resolve(pending.execution);
  }

  /**
   * Sends a request answered by one `*_reply` event, once the kernel can answer.
   * @param {Record<string, unknown>} frame
   * @param {string} code
   * @returns {Promise<ServerEvent>}
   */
  async #query(frame, code) {
    await this.ready();
    const id = newId();
    return new Promise((resolve, reject) => {
      this.#queries.set(id, { code, resolve, reject });
      try {
        this.#send({ ...frame, id });
      } catch (error) {
        this.#queries.delete(id);
        reject(error);
      }
    });
  }

  /**
   * @param {string} id
   * @param {ServerEvent} event
   */
  #onQueryEvent(id, event) {
    const query = /** @type {PendingQuery} */ (this.#queries.get(id));
    if (event.type === 'error') {
      this.#queries.delete(id);
      query.reject(new SandboxError(`${event.ename}: ${event.evalue}`));
    } else if (event.type.endsWith('_reply')) {
      this.#queries.delete(id);
      query.resolve(event);
    }
  }
}

/**
 * Calls an optional user callback; its exceptions surface asynchronously instead of breaking
 * the event loop of the connection.
 * @template T
 * @param {((arg: T) => unknown) | undefined} callback
 * @param {T} arg
 */
function call(callback, arg) {
  if (typeof callback !== 'function') return;
  try {
    callback(arg);
  } catch (error) {
    queueMicrotask(() => {
      throw error;
    });
  }
}
