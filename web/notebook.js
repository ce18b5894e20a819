/**
 * The kernelbox browser notebook: cells with a small code editor, live output, and a session
 * that survives reloads (its id is in the address; cell sources are kept in sessionStorage and
 * outputs are rebuilt from the server's replay of the session's events).
 *
 * Security: everything the kernel sends is untrusted. Text is escaped before it is coloured;
 * images are shown through <img> with data: URLs (SVG too — never inlined); `text/html` only
 * inside a sandboxed srcdoc frame without `allow-same-origin`, so it never runs with this page's
 * origin (and the page's policy, which such frames inherit, blocks its inline scripts).
 *
 * @module notebook
 */

import { AuthError, NotFoundError, Sandbox } from '/static/kernelbox.js';

/** sessionStorage key of the API token (this tab only). */
const TOKEN_KEY = 'kernelbox.token';

/** Spaces per indentation level. */
const INDENT = '    ';

/** Most stream text kept per output block (older text is cut). */
const MAX_STREAM_CHARS = 500_000;

/** @param {string} sessionId @returns {string} sessionStorage key of a session's cells. */
const cellsKey = (sessionId) => `kernelbox.cells.${sessionId}`;

/** @param {string} selector @returns {HTMLElement} */
const $ = (selector) => /** @type {HTMLElement} */ (document.querySelector(selector));

// ---------------------------------------------------------------------------------------------
// Text: HTML escaping, ANSI colours, carriage returns
// ---------------------------------------------------------------------------------------------

/**
 * Escapes the characters that mean something in HTML.
 * @param {string} text
 * @returns {string}
 */
export function escapeHtml(text) {
  return text.replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
}

const ANSI_NAMES = ['black', 'red', 'green', 'yellow', 'blue', 'magenta', 'cyan', 'white'];

/**
 * A colour of the 256-colour palette: an index 0–15 is named by a class, the rest are RGB.
 * @param {number} n
 * @returns {{cls?: string, rgb?: string}}
 */
function paletteColour(n) {
  if (n < 8) return { cls: ANSI_NAMES[n] };
  if (n < 16) return { cls: `bright-${ANSI_NAMES[n - 8]}` };
  if (n < 232) {
    const level = (/** @type {number} */ v) => (v === 0 ? 0 : 55 + v * 40);
    const i = n - 16;
    const [r, g, b] = [Math.floor(i / 36), Math.floor(i / 6) % 6, i % 6].map(level);
    return { rgb: `rgb(${r},${g},${b})` };
  }
  const grey = 8 + (n - 232) * 10;
  return { rgb: `rgb(${grey},${grey},${grey})` };
}

/**
 * Converts text with ANSI SGR escape codes (colours, bold, italic, underline) into HTML spans.
 * The text is HTML-escaped first; other escape sequences are dropped.
 * @param {string} text
 * @returns {string} Safe HTML.
 */
export function ansiToHtml(text) {
  /** @typedef {{cls?: string, rgb?: string}} Colour */
  /** @returns {{fg: Colour | null, bg: Colour | null, bold: boolean, dim: boolean,
   *   italic: boolean, underline: boolean}} */
  const reset = () => ({
    fg: null,
    bg: null,
    bold: false,
    dim: false,
    italic: false,
    underline: false,
  });
  let style = reset();
  let html = '';
  const parts = escapeHtml(text).split(/\x1b\[([0-9;:]*)([A-Za-z])/);
  for (let i = 0; i < parts.length; i += 3) {
    const chunk = parts[i].replace(/\x1b[^[]?/g, '');
    if (chunk) {
      const classes = [];
      const css = [];
      if (style.fg?.cls) classes.push(`ansi-${style.fg.cls}-fg`);
      if (style.fg?.rgb) css.push(`color:${style.fg.rgb}`);
      if (style.bg?.cls) classes.push(`ansi-${style.bg.cls}-bg`);
      if (style.bg?.rgb) css.push(`background-color:${style.bg.rgb}`);
      if (style.bold) classes.push('ansi-bold');
      if (style.dim) classes.push('ansi-dim');
      if (style.italic) classes.push('ansi-italic');
      if (style.underline) classes.push('ansi-underline');
      if (classes.length || css.length) {
        const cls = classes.length ? ` class="${classes.join(' ')}"` : '';
        const st = css.length ? ` style="${css.join(';')}"` : '';
        html += `<span${cls}${st}>${chunk}</span>`;
      } else {
        html += chunk;
      }
    }
    if (i + 2 >= parts.length || parts[i + 2] !== 'm') continue;
    const codes = parts[i + 1].split(/[;:]/).map((c) => (c === '' ? 0 : Number(c)));
    for (let k = 0; k < codes.length; k++) {
      const code = codes[k];
      if (code === 0) style = reset();
      else if (code === 1) style.bold = true;
      else if (code === 2) style.dim = true;
      else if (code === 3) style.italic = true;
      else if (code === 4) style.underline = true;
      else if (code === 22) style.bold = style.dim = false;
      else if (code === 23) style.italic = false;
      else if (code === 24) style.underline = false;
      else if (code >= 30 && code <= 37) style.fg = { cls: ANSI_NAMES[code - 30] };
      else if (code >= 90 && code <= 97) style.fg = { cls: `bright-${ANSI_NAMES[code - 90]}` };
      else if (code >= 40 && code <= 47) style.bg = { cls: ANSI_NAMES[code - 40] };
      else if (code >= 100 && code <= 107) style.bg = { cls: `bright-${ANSI_NAMES[code - 100]}` };
      else if (code === 39) style.fg = null;
      else if (code === 49) style.bg = null;
      else if (code === 38 || code === 48) {
        let colour = null;
        if (codes[k + 1] === 5 && k + 2 < codes.length) {
          colour = paletteColour(codes[k + 2] & 255);
          k += 2;
        } else if (codes[k + 1] === 2 && k + 4 < codes.length) {
          const [r, g, b] = codes.slice(k + 2, k + 5).map((v) => v & 255);
          colour = { rgb: `rgb(${r},${g},${b})` };
          k += 4;
        }
        if (colour && code === 38) style.fg = colour;
        else if (colour) style.bg = colour;
      }
    }
  }
  return html;
}

/**
 * Applies carriage returns as a terminal would: text after `\r` overwrites its line from the
 * start (progress bars). `\r\n` is a plain newline.
 * @param {string} text
 * @returns {string}
 */
export function applyCarriageReturns(text) {
  if (!text.includes('\r')) return text;
  return text
    .replace(/\r\n/g, '\n')
    .split('\n')
    .map((line) => line.split('\r').reduce((shown, part) => part + shown.slice(part.length), ''))
    .join('\n');
}

// ---------------------------------------------------------------------------------------------
// Rich output
// ---------------------------------------------------------------------------------------------

/** The frames showing user HTML, to size them when they report their height. */
const htmlFrames = new Set();

/** Styles of the documents inside output frames. */
const FRAME_CSS =
  'html{color-scheme:light}body{margin:0;padding:2px 0;font:14px/1.4 system-ui,sans-serif;' +
  'color:#1f2328;display:flow-root}table{border-collapse:collapse;font-size:13px}' +
  'th,td{border:1px solid #d0d7de;padding:3px 8px;text-align:right}' +
  'thead th{background:#f6f8fa}tbody tr:nth-child(odd){background:#fafbfc}';

window.addEventListener('message', (event) => {
  const height = event.data?.kernelboxFrameHeight;
  if (typeof height !== 'number' || !Number.isFinite(height)) return;
  for (const frame of htmlFrames) {
    if (!frame.isConnected) {
      htmlFrames.delete(frame);
    } else if (frame.contentWindow === event.source) {
      frame.style.height = `${Math.min(Math.max(Math.ceil(height), 16), 4000)}px`;
    }
  }
});

/**
 * The script each output frame runs to report its height, inlined into the frame: the server's
 * policy allows exactly this text by its hash (a frame could not load it by URL: its requests
 * come from an opaque origin). Without it frames keep a default height.
 * @type {Promise<string>}
 */
const frameSizer = fetch('/static/output-frame.js')
  .then((response) => (response.ok ? response.text() : ''))
  .catch(() => '');

/**
 * A sandboxed frame showing user HTML, with an opaque origin: it can reach nothing of this
 * page's, and the policy it inherits from this page blocks the user's scripts.
 * @param {string} html
 * @returns {HTMLIFrameElement}
 */
function htmlFrame(html) {
  const frame = document.createElement('iframe');
  frame.className = 'html-output';
  frame.setAttribute('sandbox', 'allow-scripts');
  frame.setAttribute('referrerpolicy', 'no-referrer');
  frame.title = 'HTML output';
  htmlFrames.add(frame);
  frameSizer.then((sizer) => {
    const script = sizer ? `<script>${sizer}</script>` : '';
    frame.srcdoc =
      `<!doctype html><html><head><meta charset="utf-8"><style>${FRAME_CSS}</style>` +
      `${script}</head><body>${html}</body></html>`;
  });
  return frame;
}

/**
 * An image from base64 (PNG, JPEG) or text (SVG) data, always through a data: URL.
 * @param {string} mime
 * @param {string} content
 * @param {Record<string, any>} [metadata] The MIME type's metadata (`width`, `height`).
 * @returns {HTMLImageElement}
 */
function image(mime, content, metadata = {}) {
  const img = document.createElement('img');
  img.className = 'image-output';
  img.alt = 'image output';
  img.src =
    mime === 'image/svg+xml'
      ? `data:image/svg+xml;charset=utf-8,${encodeURIComponent(content)}`
      : `data:${mime};base64,${String(content).replace(/\s+/g, '')}`;
  if (Number(metadata.width) > 0) img.width = Number(metadata.width);
  if (Number(metadata.height) > 0) img.height = Number(metadata.height);
  return img;
}

/**
 * A <pre> of (ANSI-coloured) text.
 * @param {string} text
 * @param {string} className
 * @returns {HTMLPreElement}
 */
function textBlock(text, className) {
  const pre = document.createElement('pre');
  pre.className = className;
  pre.innerHTML = ansiToHtml(text);
  return pre;
}

/**
 * Renders the richest representation of a display/result this page can show safely.
 * @param {Record<string, any>} data MIME type → content.
 * @param {Record<string, any>} metadata MIME type → metadata.
 * @returns {HTMLElement}
 */
function renderMime(data, metadata = {}) {
  if (typeof data['text/html'] === 'string') return htmlFrame(data['text/html']);
  for (const mime of ['image/svg+xml', 'image/png', 'image/jpeg', 'image/gif']) {
    if (typeof data[mime] === 'string') return image(mime, data[mime], metadata[mime]);
  }
  for (const [mime, kind] of [
    ['text/markdown', 'markdown'],
    ['text/latex', 'latex'],
  ]) {
    if (typeof data[mime] === 'string') return textBlock(data[mime], `text-output ${kind}`);
  }
  if ('application/json' in data) {
    return textBlock(JSON.stringify(data['application/json'], null, 2), 'text-output json');
  }
  if (typeof data['text/plain'] === 'string') return textBlock(data['text/plain'], 'text-output');
  const formats = Object.keys(data).join(', ') || 'no format';
  return textBlock(`[output in ${formats}]`, 'text-output unsupported');
}

/** Displays that can be updated (`update_display_data`), by display id; any cell may update. */
const displays = new Map();

// ---------------------------------------------------------------------------------------------
// A cell's output area
// ---------------------------------------------------------------------------------------------

/** The outputs of one cell: streams, rich results, errors, input prompts. */
class OutputArea {
  /** @type {boolean} A `clear_output(wait=True)` waiting for the next output. */
  #pendingClear = false;
  /** @type {Set<{cancel: () => void}>} Unanswered input prompts. */
  #prompts = new Set();

  /** @param {HTMLElement} element */
  constructor(element) {
    this.element = element;
  }

  /** Removes every output now. */
  reset() {
    this.#pendingClear = false;
    this.cancelPrompts();
    this.element.replaceChildren();
  }

  /**
   * Shows one protocol event of the cell.
   * @param {Record<string, any>} event
   */
  handle(event) {
    switch (event.type) {
      case 'stream':
        this.#beforeOutput();
        this.#appendStream(event.name === 'stderr' ? 'stderr' : 'stdout', String(event.text ?? ''));
        break;
      case 'display_data':
      case 'execute_result': {
        this.#beforeOutput();
        const wrapper = document.createElement('div');
        const main = event.type === 'execute_result';
        wrapper.className = `result ${main ? 'execute-result' : 'display-data'}`;
        wrapper.append(renderMime(event.data ?? {}, event.metadata ?? {}));
        const displayId = event.transient?.display_id;
        if (typeof displayId === 'string') {
          wrapper.dataset.displayId = displayId;
          if (!displays.has(displayId)) displays.set(displayId, new Set());
          displays.get(displayId).add(wrapper);
        }
        this.element.append(wrapper);
        break;
      }
      case 'update_display_data':
        updateDisplay(event.transient?.display_id, event.data ?? {}, event.metadata ?? {});
        break;
      case 'clear_output':
        if (event.wait) this.#pendingClear = true;
        else this.reset();
        break;
      case 'error':
        this.#beforeOutput();
        if ((event.traceback ?? []).length > 0) {
          this.element.append(textBlock(event.traceback.join('\n'), 'error-output'));
        } else {
          this.element.append(textBlock(`${event.ename}: ${event.evalue}`, 'error-output'));
        }
        break;
    }
  }

  /**
   * A message from the notebook itself (not the kernel), e.g. a refused cell.
   * @param {string} text
   */
  note(text) {
    const p = document.createElement('p');
    p.className = 'system-output';
    p.textContent = text;
    this.element.append(p);
  }

  /**
   * Shows an inline input box for the cell's `input()` and resolves with what is typed.
   * @param {string} prompt
   * @param {boolean} password
   * @returns {Promise<string | null>} `null` when the prompt went away unanswered.
   */
  ask(prompt, password) {
    this.#beforeOutput();
    const row = document.createElement('div');
    row.className = 'input-request';
    const label = document.createElement('label');
    label.className = 'input-prompt';
    label.textContent = prompt;
    const input = document.createElement('input');
    input.className = 'input-box';
    input.type = password ? 'password' : 'text';
    input.autocomplete = 'off';
    input.spellcheck = false;
    label.append(input);
    row.append(label);
    this.element.append(row);
    // The prompt takes the focus and gives it back once answered.
    const before = /** @type {HTMLElement | null} */ (document.activeElement);
    input.focus();
    return new Promise((resolve) => {
      /** @param {string | null} value What was typed; null: the prompt went away unanswered. */
      const finish = (value) => {
        this.#prompts.delete(entry);
        const hadFocus = document.activeElement === input;
        const shown = document.createElement('span');
        shown.className = 'input-value';
        shown.textContent = value === null ? '' : password ? '•'.repeat(value.length) : value;
        input.replaceWith(shown);
        row.classList.add(value === null ? 'unanswered' : 'answered');
        if (hadFocus && before?.isConnected && before !== document.body) before.focus();
        resolve(value);
      };
      const entry = { cancel: () => finish(null) };
      this.#prompts.add(entry);
      input.addEventListener('keydown', (e) => {
        if (e.key !== 'Enter') return;
        e.preventDefault();
        finish(input.value);
      });
    });
  }

  /** Disables prompts that can no longer be answered (the cell ended). */
  cancelPrompts() {
    for (const prompt of [...this.#prompts]) prompt.cancel();
  }

  #beforeOutput() {
    if (this.#pendingClear) this.reset();
  }

  /**
   * Appends printed text, continuing the last block when it is the same stream.
   * @param {'stdout' | 'stderr'} name
   * @param {string} text
   */
  #appendStream(name, text) {
    const last = this.element.lastElementChild;
    let block = /** @type {HTMLPreElement & {raw?: string} | null} */ (last);
    if (!block || !block.classList.contains('stream-output') || block.dataset.stream !== name) {
      block = document.createElement('pre');
      block.className = `stream-output ${name}`;
      block.dataset.stream = name;
      block.raw = '';
      this.element.append(block);
    }
    let raw = (block.raw ?? '') + text;
    if (raw.length > MAX_STREAM_CHARS) {
      raw = `[… earlier output cut …]\n${raw.slice(-MAX_STREAM_CHARS)}`;
    }
    block.raw = raw;
    block.innerHTML = ansiToHtml(applyCarriageReturns(raw));
  }
}

/**
 * Replaces every display with this id, in whichever cell it is.
 * @param {unknown} displayId
 * @param {Record<string, any>} data
 * @param {Record<string, any>} metadata
 */
function updateDisplay(displayId, data, metadata) {
  if (typeof displayId !== 'string') return;
  for (const wrapper of [...(displays.get(displayId) ?? [])]) {
    if (!wrapper.isConnected) {
      displays.get(displayId).delete(wrapper);
      continue;
    }
    wrapper.replaceChildren(renderMime(data, metadata));
  }
}

// ---------------------------------------------------------------------------------------------
// The editor: a textarea with indentation, auto-grow and completion
// ---------------------------------------------------------------------------------------------

/**
 * Replaces `textarea`'s text between `start` and `end`, keeping the browser's undo history
 * where it can.
 * @param {HTMLTextAreaElement} textarea
 * @param {string} text
 * @param {number} [start]
 * @param {number} [end]
 */
function insertText(textarea, text, start = textarea.selectionStart, end = textarea.selectionEnd) {
  textarea.focus();
  textarea.setSelectionRange(start, end);
  // execCommand keeps undo working; setRangeText is the standard fallback.
  if (!document.execCommand?.('insertText', false, text)) {
    textarea.setRangeText(text, start, end, 'end');
    textarea.dispatchEvent(new Event('input', { bubbles: true }));
  }
}

/**
 * Where the line holding `index` starts.
 * @param {string} text
 * @param {number} index
 */
function lineStart(text, index) {
  return text.lastIndexOf('\n', index - 1) + 1;
}

/**
 * The width of one character of the textarea's monospace font, in pixels.
 * @param {HTMLTextAreaElement} textarea
 * @returns {number}
 */
function charWidth(textarea) {
  const context = document.createElement('canvas').getContext('2d');
  if (!context) return 8;
  context.font = getComputedStyle(textarea).font;
  return context.measureText('0'.repeat(20)).width / 20;
}

/** The pick list of completions under the cursor. */
class CompletionList {
  /** @type {string[]} */ matches = [];
  selected = 0;
  /** @type {{start: number, end: number} | null} The text the pick replaces. */
  range = null;

  /**
   * @param {HTMLUListElement} element
   * @param {HTMLTextAreaElement} textarea
   */
  constructor(element, textarea) {
    this.element = element;
    this.textarea = textarea;
    element.addEventListener('mousedown', (e) => {
      // Keep the focus in the editor; pick what was clicked.
      e.preventDefault();
      const item = /** @type {HTMLElement} */ (e.target).closest('li');
      if (item) this.pick(Number(item.dataset.index));
    });
  }

  /** @returns {boolean} Whether the list is shown. */
  get open() {
    return !this.element.hidden;
  }

  /**
   * Shows the matches under the cursor.
   * @param {string[]} matches
   * @param {{start: number, end: number}} range
   */
  show(matches, range) {
    this.matches = matches.slice(0, 200);
    this.range = range;
    this.selected = 0;
    this.element.replaceChildren(
      ...this.matches.map((match, index) => {
        const li = document.createElement('li');
        li.textContent = match;
        li.dataset.index = String(index);
        li.setAttribute('role', 'option');
        return li;
      }),
    );
    const { textarea } = this;
    const style = getComputedStyle(textarea);
    const before = textarea.value.slice(0, range.start);
    const line = before.split('\n').length;
    const column = range.start - lineStart(textarea.value, range.start);
    const lineHeight = parseFloat(style.lineHeight) || 18;
    const top = textarea.offsetTop + parseFloat(style.paddingTop) + line * lineHeight;
    const left = textarea.offsetLeft + parseFloat(style.paddingLeft) + column * charWidth(textarea);
    this.element.style.top = `${top - textarea.scrollTop}px`;
    this.element.style.left = `${left - textarea.scrollLeft}px`;
    this.element.hidden = false;
    this.#highlight();
  }

  /** Hides the list. */
  close() {
    this.element.hidden = true;
    this.matches = [];
    this.range = null;
  }

  /** @param {number} delta Moves the selection. */
  move(delta) {
    const n = this.matches.length;
    this.selected = (this.selected + delta + n) % n;
    this.#highlight();
  }

  /** @param {number} [index] Inserts a match (default: the selected one). */
  pick(index = this.selected) {
    const match = this.matches[index];
    const range = this.range;
    this.close();
    if (match !== undefined && range) insertText(this.textarea, match, range.start, range.end);
  }

  #highlight() {
    for (const li of this.element.children) {
      const on = Number(/** @type {HTMLElement} */ (li).dataset.index) === this.selected;
      li.classList.toggle('selected', on);
      li.setAttribute('aria-selected', String(on));
      if (on) li.scrollIntoView({ block: 'nearest' });
    }
  }
}

/**
 * The longest common prefix of some strings.
 * @param {string[]} words
 * @returns {string}
 */
function commonPrefix(words) {
  if (words.length === 0) return '';
  let prefix = words[0];
  for (const word of words) {
    while (!word.startsWith(prefix)) prefix = prefix.slice(0, -1);
  }
  return prefix;
}

// ---------------------------------------------------------------------------------------------
// Cells
// ---------------------------------------------------------------------------------------------

/** @typedef {{source: string, runId: string | null, count: number | null}} SavedCell */

/**
 * What a cell's run is doing or how it ended (the cell's `data-state`).
 * @typedef {'idle' | 'queued' | 'running' | 'ok' | 'error' | 'aborted' | 'timeout' | 'rejected'}
 *   CellState
 */

/** One cell: an editor, its execution count, its outputs. */
class Cell {
  /** @type {string | null} The wire id of the cell's latest run (its events carry it). */
  runId = null;
  /** Escape was the last key: the next Tab moves the focus on instead of indenting. */
  #escaped = false;

  /**
   * @param {Notebook} notebook
   * @param {Partial<SavedCell>} [saved]
   */
  constructor(notebook, saved = {}) {
    this.notebook = notebook;
    const template = /** @type {HTMLTemplateElement} */ (document.getElementById('cell-template'));
    this.element = /** @type {HTMLElement} */ (template.content.firstElementChild.cloneNode(true));
    this.textarea = /** @type {HTMLTextAreaElement} */ (this.element.querySelector('textarea'));
    this.countElement = /** @type {HTMLElement} */ (this.element.querySelector('.exec-count'));
    const output = /** @type {HTMLElement} */ (this.element.querySelector('.output'));
    this.output = new OutputArea(output);
    this.completions = new CompletionList(
      /** @type {HTMLUListElement} */ (this.element.querySelector('.completions')),
      this.textarea,
    );
    this.textarea.value = saved.source ?? '';
    this.runId = saved.runId ?? null;
    this.setCount(saved.count ?? null);
    this.textarea.addEventListener('input', () => {
      this.autoGrow();
      this.completions.close();
      notebook.saveSoon();
    });
    this.textarea.addEventListener('keydown', (e) => this.#onKey(e));
    this.textarea.addEventListener('blur', () => this.completions.close());
    this.textarea.addEventListener('focus', () => notebook.select(this));
    this.element.querySelector('.cell-tools')?.addEventListener('click', (e) => {
      const action = /** @type {HTMLElement} */ (e.target).closest('button')?.dataset.action;
      if (action) notebook.act(this, action);
    });
  }

  /** @returns {string} The cell's code. */
  get source() {
    return this.textarea.value;
  }

  /** @returns {SavedCell} What a reload needs to rebuild the cell. */
  save() {
    return { source: this.source, runId: this.runId, count: this.count };
  }

  /** Fits the editor's height to its text. */
  autoGrow() {
    this.textarea.style.height = 'auto';
    this.textarea.style.height = `${this.textarea.scrollHeight + 2}px`;
  }

  /** @param {number | '*' | null} count Shows `[n]`, `[*]` (running) or `[ ]`. */
  setCount(count) {
    this.count = typeof count === 'number' ? count : null;
    this.countElement.textContent = `[${count ?? ' '}]:`;
    this.countElement.dataset.count = count === null ? '' : String(count);
  }

  /** @param {CellState} state Shown as the cell's `data-state`. */
  setState(state) {
    this.element.dataset.state = state;
  }

  /**
   * Focuses the editor.
   * @param {'start' | 'end'} [where]
   */
  focus(where = 'end') {
    const at = where === 'start' ? 0 : this.textarea.value.length;
    this.textarea.focus();
    this.textarea.setSelectionRange(at, at);
  }

  /**
   * Shows one protocol event of the cell's latest run.
   * @param {Record<string, any>} event
   */
  handle(event) {
    switch (event.type) {
      case 'accepted':
        this.setState(event.position > 0 ? 'queued' : 'running');
        break;
      case 'status':
        if (event.state === 'busy') this.setState('running');
        break;
      case 'input_request':
        this.output.ask(String(event.prompt ?? ''), Boolean(event.password)).then((value) => {
          if (value === null || this.runId !== event.id) return;
          try {
            this.notebook.sandbox.sendInput(value);
          } catch (error) {
            this.output.note(String(/** @type {Error} */ (error).message));
          }
        });
        break;
      case 'done':
        this.output.cancelPrompts();
        this.setCount(typeof event.execution_count === 'number' ? event.execution_count : null);
        this.setState(event.status);
        this.notebook.saveSoon();
        break;
      default:
        this.output.handle(event);
    }
  }

  /** @param {KeyboardEvent} e */
  #onKey(e) {
    const { completions } = this;
    const mod = e.ctrlKey || e.metaKey;
    const escaped = this.#escaped;
    this.#escaped = e.key === 'Escape' && !completions.open;
    if (escaped && e.key === 'Tab') return; // keyboard users leave the editor: Escape, Tab
    if (completions.open) {
      if (e.key === 'ArrowDown' || e.key === 'ArrowUp') {
        e.preventDefault();
        completions.move(e.key === 'ArrowDown' ? 1 : -1);
        return;
      }
      if ((e.key === 'Enter' && !e.shiftKey && !mod) || (e.key === 'Tab' && !e.shiftKey)) {
        e.preventDefault();
        completions.pick();
        return;
      }
      if (e.key === 'Escape') {
        e.preventDefault();
        completions.close();
        return;
      }
    }
    if (e.key === 'Enter' && e.shiftKey) {
      e.preventDefault();
      this.notebook.run(this, 'next');
    } else if (e.key === 'Enter' && mod) {
      e.preventDefault();
      this.notebook.run(this, 'stay');
    } else if (e.key === 'Enter' && e.altKey) {
      e.preventDefault();
      this.notebook.run(this, 'insert');
    } else if (e.key === 'Enter') {
      e.preventDefault();
      this.#newline();
    } else if (e.key === 'Tab' && e.shiftKey) {
      e.preventDefault();
      this.#dedent();
    } else if (e.key === 'Tab' && !mod && !e.altKey) {
      e.preventDefault();
      this.#tab();
    } else if (e.key === 'Backspace' && !mod && !e.altKey) {
      this.#backspace(e);
    } else if ((e.key === 'ArrowUp' || e.key === 'ArrowDown') && !e.shiftKey && !mod && !e.altKey) {
      this.#leave(e, e.key === 'ArrowUp' ? -1 : 1);
    }
  }

  /**
   * Arrow up on the first line (down on the last) moves to the cell above (below).
   * @param {KeyboardEvent} e
   * @param {-1 | 1} delta
   */
  #leave(e, delta) {
    const { value, selectionStart, selectionEnd } = this.textarea;
    if (selectionStart !== selectionEnd) return;
    const rest = delta < 0 ? value.slice(0, selectionStart) : value.slice(selectionEnd);
    const target = this.notebook.neighbour(this, delta);
    if (rest.includes('\n') || !target) return;
    e.preventDefault();
    target.focus(delta < 0 ? 'end' : 'start');
  }

  /** Enter: a new line indented like this one, one level deeper after a `:`. */
  #newline() {
    const { value, selectionStart } = this.textarea;
    const line = value.slice(lineStart(value, selectionStart), selectionStart);
    let indent = /^[ \t]*/.exec(line)?.[0] ?? '';
    if (/:\s*(#.*)?$/.test(line)) indent += INDENT;
    insertText(this.textarea, `\n${indent}`);
  }

  /** Tab: completes after code, indents otherwise (every selected line, for a selection). */
  #tab() {
    const { value, selectionStart, selectionEnd } = this.textarea;
    const selected = value.slice(selectionStart, selectionEnd);
    if (selected.includes('\n')) {
      this.#reindent((line) => INDENT + line);
      return;
    }
    const before = value.slice(lineStart(value, selectionStart), selectionStart);
    if (selectionStart === selectionEnd && /\S$/.test(before)) {
      this.#complete();
      return;
    }
    const column = before.length;
    insertText(this.textarea, ' '.repeat(INDENT.length - (column % INDENT.length)));
  }

  /** Shift-Tab: removes one level of indentation from the current or selected lines. */
  #dedent() {
    this.#reindent((line) => line.replace(new RegExp(`^ {1,${INDENT.length}}|^\\t`), ''));
  }

  /**
   * Rewrites the lines the selection touches and keeps them selected.
   * @param {(line: string) => string} change
   */
  #reindent(change) {
    const { value, selectionStart, selectionEnd } = this.textarea;
    const start = lineStart(value, selectionStart);
    // A selection that ends right after a newline does not take in the next line.
    const last = selectionEnd === selectionStart ? selectionEnd : selectionEnd - 1;
    const endOfLine = value.indexOf('\n', last);
    const end = endOfLine === -1 ? value.length : endOfLine;
    const lines = value.slice(start, end).split('\n');
    const changed = lines.map(change).join('\n');
    const collapsed = selectionStart === selectionEnd;
    const firstDelta = change(lines[0]).length - lines[0].length;
    insertText(this.textarea, changed, start, end);
    if (collapsed) {
      const at = Math.max(start, selectionStart + firstDelta);
      this.textarea.setSelectionRange(at, at);
    } else {
      this.textarea.setSelectionRange(start, start + changed.length);
    }
  }

  /**
   * Backspace in leading spaces removes back to the previous indentation level.
   * @param {KeyboardEvent} e
   */
  #backspace(e) {
    const { value, selectionStart, selectionEnd } = this.textarea;
    if (selectionStart !== selectionEnd) return;
    const before = value.slice(lineStart(value, selectionStart), selectionStart);
    if (before.length === 0 || !/^ +$/.test(before)) return;
    const remove = before.length % INDENT.length || INDENT.length;
    e.preventDefault();
    insertText(this.textarea, '', selectionStart - remove, selectionStart);
  }

  /** Asks the kernel for completions at the cursor: inserts a single match, else offers a list. */
  async #complete() {
    const { textarea } = this;
    const code = textarea.value;
    const cursor = textarea.selectionStart;
    let reply;
    try {
      reply = await this.notebook.sandbox.complete(code, cursor);
    } catch (error) {
      this.notebook.notify(`Completion failed: ${/** @type {Error} */ (error).message}`);
      return;
    }
    // Ignore an answer to a question the user has typed past.
    if (textarea.value !== code || textarea.selectionStart !== cursor) return;
    const matches = [...new Set(reply.matches)];
    const range = { start: reply.cursorStart, end: reply.cursorEnd };
    const typed = code.slice(range.start, range.end);
    // After a closing bracket or a string there is no name to complete: the kernel would offer
    // everything it knows.
    if (matches.length === 0 || (typed === '' && /[)\]}'"]$/.test(code.slice(0, cursor)))) return;
    if (matches.length === 1) {
      insertText(textarea, matches[0], range.start, range.end);
      return;
    }
    const prefix = commonPrefix(matches);
    if (typed !== '' && prefix.length > typed.length) {
      insertText(textarea, prefix, range.start, range.end);
      range.end = range.start + prefix.length;
    }
    this.completions.show(matches, range);
  }
}

// ---------------------------------------------------------------------------------------------
// The notebook
// ---------------------------------------------------------------------------------------------

/** The cells of one session, its toolbar and its status. */
class Notebook {
  /** @type {Cell[]} */ cells = [];
  /** @type {Cell | null} */ current = null;
  /** @type {ReturnType<typeof setTimeout> | undefined} */ #saveTimer;

  /**
   * @param {HTMLElement} root Where the cells go.
   * @param {Sandbox} sandbox The session.
   */
  constructor(root, sandbox) {
    this.root = root;
    this.sandbox = sandbox;
    sandbox.on('event', (event) => this.#route(event));
    sandbox.on('kernel', () => this.#showStatus());
    sandbox.on('connection', ({ state, error }) => {
      this.#showStatus();
      if (state === 'closed' && error) {
        this.notify(
          error instanceof NotFoundError
            ? 'This session has ended (the server no longer knows it): start a new session.'
            : `Disconnected: ${error.message}`,
        );
      } else if (state === 'open') {
        this.notify(null);
      }
    });
    sandbox.on('resumed', ({ dropped }) => {
      if (dropped > 0) {
        this.notify(`${dropped} events were lost while disconnected: some output may be missing.`);
      }
    });
    this.#showStatus();
  }

  /**
   * Fills the notebook from saved cells (or one empty cell).
   * @param {SavedCell[] | null} saved
   */
  load(saved) {
    for (const cell of saved?.length ? saved : [{ source: '', runId: null, count: null }]) {
      this.add(cell, null);
    }
    this.cells[0].focus();
  }

  /**
   * Adds a cell after `after` (or at the end).
   * @param {Partial<SavedCell>} [saved]
   * @param {Cell | null} [after]
   * @returns {Cell}
   */
  add(saved = {}, after = null) {
    const cell = new Cell(this, saved);
    const index = after ? this.cells.indexOf(after) + 1 : this.cells.length;
    this.cells.splice(index, 0, cell);
    const next = this.cells[index + 1];
    this.root.insertBefore(cell.element, next ? next.element : null);
    cell.autoGrow();
    this.saveSoon();
    return cell;
  }

  /**
   * A cell's neighbour.
   * @param {Cell} cell
   * @param {number} delta -1: the one above, 1: the one below.
   * @returns {Cell | undefined}
   */
  neighbour(cell, delta) {
    return this.cells[this.cells.indexOf(cell) + delta];
  }

  /** @param {Cell} cell Marks the cell the toolbar acts on. */
  select(cell) {
    for (const c of this.cells) c.element.classList.toggle('selected', c === cell);
    this.current = cell;
  }

  /**
   * Carries out a cell's toolbar button.
   * @param {Cell} cell
   * @param {string} action
   */
  act(cell, action) {
    const index = this.cells.indexOf(cell);
    switch (action) {
      case 'run':
        this.run(cell, 'stay');
        break;
      case 'add-below':
        this.add({}, cell).focus();
        break;
      case 'delete': {
        this.cells.splice(index, 1);
        cell.element.remove();
        if (this.cells.length === 0) this.add();
        (this.cells[index] ?? this.cells[index - 1]).focus();
        break;
      }
      case 'move-up':
      case 'move-down': {
        const target = index + (action === 'move-up' ? -1 : 1);
        if (target < 0 || target >= this.cells.length) break;
        this.cells.splice(index, 1);
        this.cells.splice(target, 0, cell);
        const next = this.cells[target + 1];
        this.root.insertBefore(cell.element, next ? next.element : null);
        cell.focus();
        break;
      }
    }
    this.saveSoon();
  }

  /**
   * Runs a cell.
   * @param {Cell} cell
   * @param {'stay' | 'next' | 'insert'} then Where the cursor goes: stays, moves to the next
   *   cell (made if there is none), or into a new cell inserted below.
   */
  run(cell, then) {
    cell.completions.close();
    if (then === 'insert') this.add({}, cell).focus();
    if (then === 'next') (this.neighbour(cell, 1) ?? this.add({}, cell)).focus();
    if (cell.source.trim() === '') {
      cell.output.reset();
      return;
    }
    const runId = `cell-${crypto.getRandomValues(new Uint32Array(2)).join('')}`;
    cell.runId = runId;
    cell.output.reset();
    cell.setCount('*');
    cell.setState('queued');
    this.saveNow();
    // Events reach the cell through #route (the same path a reload's replay takes); the
    // promise only says whether the server took the cell.
    this.sandbox.runCode(cell.source, { id: runId, allowStdin: true }).catch((error) => {
      if (cell.runId !== runId) return;
      cell.output.note(String(error.message ?? error));
      cell.setCount(null);
      cell.setState('rejected');
    });
  }

  /** Runs every cell, top to bottom (they queue on the server). */
  runAll() {
    for (const cell of this.cells) this.run(cell, 'stay');
  }

  /**
   * Shows or hides a message above the cells.
   * @param {string | null} message
   */
  notify(message) {
    const notice = $('#notice');
    notice.textContent = message ?? '';
    notice.hidden = !message;
  }

  /** Saves the cells shortly (typing saves once it pauses). */
  saveSoon() {
    clearTimeout(this.#saveTimer);
    this.#saveTimer = setTimeout(() => this.saveNow(), 300);
  }

  /** Saves the cells to sessionStorage now. */
  saveNow() {
    clearTimeout(this.#saveTimer);
    try {
      const cells = JSON.stringify(this.cells.map((c) => c.save()));
      sessionStorage.setItem(cellsKey(this.sandbox.sessionId), cells);
    } catch {
      // Storage full or disabled: the notebook works, a reload just starts empty.
    }
  }

  /**
   * Sends an event to the cell whose latest run it belongs to.
   * @param {Record<string, any>} event
   */
  #route(event) {
    if (typeof event.id !== 'string') return;
    const cell = this.cells.find((c) => c.runId === event.id);
    cell?.handle(event);
  }

  /** Shows the kernel's state, or the connection's when it is not open. */
  #showStatus() {
    const status = $('#kernel-status');
    const connection = this.sandbox.connectionState;
    const state =
      connection === 'reconnecting'
        ? 'reconnecting'
        : connection === 'closed'
          ? 'disconnected'
          : this.sandbox.kernelState;
    status.textContent = state;
    status.dataset.state = state;
    document.body.dataset.kernel = state;
  }
}

// ---------------------------------------------------------------------------------------------
// Start: token, session, notebook
// ---------------------------------------------------------------------------------------------

/** @returns {string | null} The session id in the address (`#session=<id>`). */
function sessionFromHash() {
  const match = /(?:^#|&)session=([^&]+)/.exec(location.hash);
  return match ? decodeURIComponent(match[1]) : null;
}

/**
 * The saved cells of a session, if this tab has them.
 * @param {string} sessionId
 * @returns {SavedCell[] | null}
 */
function savedCells(sessionId) {
  try {
    const saved = JSON.parse(sessionStorage.getItem(cellsKey(sessionId)) ?? 'null');
    return Array.isArray(saved) ? saved : null;
  } catch {
    return null;
  }
}

/**
 * Shows the token form.
 * @param {string | null} error Why it is asked again.
 */
function showLogin(error) {
  $('#notebook').hidden = true;
  $('#help').hidden = true;
  const form = $('#login');
  form.hidden = false;
  const message = $('#login-error');
  message.textContent = error ?? '';
  message.hidden = !error;
  $('#token').focus();
}

/** Reconnect for as long as the server may take to come back. */
const RECONNECT = { maxAttempts: Infinity, initialDelayMs: 250, maxDelayMs: 5000 };

/**
 * Opens the session named in the address, or starts one, and shows its notebook.
 * @param {string} token
 */
async function start(token) {
  const url = location.origin;
  const status = $('#kernel-status');
  status.textContent = 'connecting';
  status.dataset.state = 'connecting';
  let sandbox = null;
  let saved = null;
  let notice = null;
  try {
    const wanted = sessionFromHash();
    if (wanted) {
      // Ask the list first: it checks the token, and a gone session is not an error.
      const known = (await Sandbox.list({ url, token })).some((s) => s.id === wanted);
      if (known) {
        saved = savedCells(wanted);
        // With this tab's cells, replay the session's events to rebuild their outputs.
        sandbox = await Sandbox.connect({
          url,
          token,
          sessionId: wanted,
          since: saved ? 0 : undefined,
          reconnect: RECONNECT,
        });
      } else {
        notice = `Session ${wanted} no longer exists: this is a new one.`;
        sessionStorage.removeItem(cellsKey(wanted));
      }
    }
    sandbox ??= await Sandbox.create({ url, token, reconnect: RECONNECT });
  } catch (error) {
    status.textContent = 'disconnected';
    status.dataset.state = 'disconnected';
    if (error instanceof AuthError) {
      sessionStorage.removeItem(TOKEN_KEY);
      showLogin('That token was not accepted.');
    } else {
      showLogin(`Cannot reach the server: ${/** @type {Error} */ (error).message}`);
    }
    return;
  }

  history.replaceState(null, '', `#session=${encodeURIComponent(sandbox.sessionId)}`);
  $('#session-id').textContent = sandbox.sessionId;
  $('#login').hidden = true;
  const root = $('#notebook');
  root.replaceChildren();
  root.hidden = false;
  $('#help').hidden = false;

  const notebook = new Notebook(root, sandbox);
  notebook.load(saved);
  notebook.notify(notice);
  bindToolbar(notebook, token);
}

/** Removes the page-wide listeners of the previous notebook. @type {AbortController | null} */
let toolbarBinding = null;

/**
 * Connects the toolbar's buttons (and saving when the page goes away) to a notebook.
 * @param {Notebook} notebook
 * @param {string} token
 */
function bindToolbar(notebook, token) {
  toolbarBinding?.abort();
  toolbarBinding = new AbortController();
  const { signal } = toolbarBinding;
  const on = (/** @type {string} */ id, /** @type {() => void} */ fn) =>
    $(id).addEventListener('click', fn, { signal });
  const report = (/** @type {any} */ error) => notebook.notify(String(error?.message ?? error));
  window.addEventListener('pagehide', () => notebook.saveNow(), { signal });
  on('#add-cell', () => notebook.add({}, null).focus());
  on('#run-all', () => notebook.runAll());
  on('#interrupt', () => notebook.sandbox.interrupt().catch(report));
  on('#restart', () => notebook.sandbox.restart().catch(report));
  on('#new-session', async () => {
    if (!window.confirm('Stop this session (its variables are lost) and start a new one?')) return;
    const old = notebook.sandbox.sessionId;
    sessionStorage.removeItem(cellsKey(old));
    history.replaceState(null, '', location.pathname);
    await notebook.sandbox.close({ kill: true }).catch(() => {});
    await start(token);
  });
}

// Toolbar buttons act on the notebook without taking the focus out of the cell being edited.
$('#toolbar').addEventListener('mousedown', (e) => {
  if (/** @type {HTMLElement} */ (e.target).closest('button')) e.preventDefault();
});

$('#login').addEventListener('submit', (e) => {
  e.preventDefault();
  const input = /** @type {HTMLInputElement} */ ($('#token'));
  const token = input.value.trim();
  if (!token) return;
  sessionStorage.setItem(TOKEN_KEY, token);
  input.value = '';
  start(token);
});

// Another session typed into the address: open it.
window.addEventListener('hashchange', () => location.reload());

const storedToken = sessionStorage.getItem(TOKEN_KEY);
if (storedToken) start(storedToken);
else showLogin(null);
