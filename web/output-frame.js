// Runs inside each sandboxed frame that shows a cell's text/html output (an opaque origin: it
// can reach nothing of the notebook's). It only tells the notebook how tall the content is, so
// the frame can fit it; the notebook accepts the message only from its own frames.
// The notebook inlines this file; the server's Content-Security-Policy allows it by its SHA-256
// hash (src/api/web.rs), computed from this exact text.
'use strict';

(() => {
  let last = -1;
  const report = () => {
    const height = Math.ceil(document.documentElement.getBoundingClientRect().height);
    if (height !== last) {
      last = height;
      parent.postMessage({ kernelboxFrameHeight: height }, '*');
    }
  };
  new ResizeObserver(report).observe(document.documentElement);
  addEventListener('load', report);
})();
