// digitlab drawing page: draw with pointer events, send the canvas as PNG to /v1/predict
// (the same MNIST-style preprocessing as `digitlab predict`), show the answer.
"use strict";

const pad = document.getElementById("pad");
const ctx = pad.getContext("2d");
const seen = document.getElementById("seen");
const seenCtx = seen.getContext("2d");
const digitEl = document.getElementById("digit");
const confidenceEl = document.getElementById("confidence");
const barsEl = document.getElementById("bars");
const statusEl = document.getElementById("status");

const DEBOUNCE_MS = 150; // predict this long after the pen last moved...
const MAX_WAIT_MS = 400; // ...or at least this often during a long stroke
const BRUSH = pad.width / 14; // MNIST strokes are about 1/14 of the digit field wide

let drawing = false;
let last = null;
let inked = false;
let timer = null;
let waitingSince = 0; // when the oldest unanswered change was drawn
let sent = 0; // sequence number of the latest request; older answers are dropped
let inflight = null;

// ---------------------------------------------------------------- bars

const bars = [];
for (let d = 0; d < 10; d++) {
  const li = document.createElement("li");
  li.innerHTML = `<span class="name">${d}</span><span class="track"><span class="fill"></span></span>` +
    `<span class="pct">–</span>`;
  barsEl.appendChild(li);
  bars.push({ li, fill: li.querySelector(".fill"), pct: li.querySelector(".pct") });
}

// ---------------------------------------------------------------- drawing

function resetPad() {
  ctx.fillStyle = "#000"; // opaque black: a transparent canvas would be composited onto white
  ctx.fillRect(0, 0, pad.width, pad.height);
  ctx.strokeStyle = "#fff";
  ctx.fillStyle = "#fff";
  ctx.lineWidth = BRUSH;
  ctx.lineCap = "round";
  ctx.lineJoin = "round";
  inked = false;
}

function point(event) {
  const rect = pad.getBoundingClientRect();
  return {
    x: ((event.clientX - rect.left) / rect.width) * pad.width,
    y: ((event.clientY - rect.top) / rect.height) * pad.height,
  };
}

function dot(p) {
  ctx.beginPath();
  ctx.arc(p.x, p.y, BRUSH / 2, 0, 2 * Math.PI);
  ctx.fill();
}

function segment(a, b) {
  ctx.beginPath();
  ctx.moveTo(a.x, a.y);
  ctx.lineTo(b.x, b.y);
  ctx.stroke();
}

pad.addEventListener("pointerdown", (event) => {
  event.preventDefault();
  pad.setPointerCapture(event.pointerId);
  drawing = true;
  last = point(event);
  dot(last);
  inked = true;
  schedule();
});

pad.addEventListener("pointermove", (event) => {
  if (!drawing) return;
  // coalesced events keep fast strokes smooth where the browser batches them
  const events = event.getCoalescedEvents ? event.getCoalescedEvents() : [event];
  for (const e of events.length ? events : [event]) {
    const p = point(e);
    segment(last, p);
    last = p;
  }
  schedule();
});

function endStroke() {
  if (!drawing) return;
  drawing = false;
  last = null;
  schedule();
}
pad.addEventListener("pointerup", endStroke);
pad.addEventListener("pointercancel", endStroke);

// Clear acts on pointerup: on a phone, a tap right after a quick stroke may never become a
// "click" (the browser can fold it into the stroke's gesture); click stays for the keyboard.
const clearButton = document.getElementById("clear");
clearButton.addEventListener("pointerup", (event) => {
  if (event.button === 0 || event.pointerType !== "mouse") clear();
});
clearButton.addEventListener("click", (event) => {
  if (event.detail === 0) clear(); // Enter/Space; pointer clicks were handled on pointerup
});
document.addEventListener("keydown", (event) => {
  if (event.key === "Escape" || event.key === "Delete") clear();
});

function clear() {
  clearTimeout(timer);
  timer = null;
  if (inflight) inflight.abort();
  sent++;
  resetPad();
  showEmpty();
  setBusy(false);
}

// ---------------------------------------------------------------- predicting

function schedule() {
  const now = performance.now();
  if (timer === null) waitingSince = now;
  clearTimeout(timer);
  setBusy(true);
  timer = setTimeout(predict, Math.max(0, Math.min(DEBOUNCE_MS, waitingSince + MAX_WAIT_MS - now)));
}

// data-busy="0" once the answer for the current drawing is shown (tests wait for it)
function setBusy(busy) {
  document.body.dataset.busy = busy ? "1" : "0";
}

async function predict() {
  timer = null;
  if (!inked) {
    setBusy(false);
    return;
  }
  const seq = ++sent;
  if (inflight) inflight.abort();
  const controller = new AbortController();
  inflight = controller;
  const blob = await new Promise((resolve) => pad.toBlob(resolve, "image/png"));
  const form = new FormData();
  form.append("file", blob, "drawing.png");
  try {
    const response = await fetch("/v1/predict", { method: "POST", body: form, signal: controller.signal });
    const body = await response.json();
    if (seq !== sent) return; // a newer drawing is on its way
    if (response.ok) show(body);
    else showStatus(body.detail || `error ${response.status}`);
    if (!drawing && timer === null) setBusy(false); // else a newer drawing is about to be sent
  } catch (err) {
    if (err.name !== "AbortError") {
      showStatus("cannot reach the server");
      setBusy(false);
    }
  } finally {
    if (inflight === controller) inflight = null;
  }
}

// The one way a probability is written, in the sentence and on the bars alike: one decimal,
// never "100%" or "0%" for what is only nearly certain or nearly impossible.
function percent(p) {
  if (p >= 1) return "100%";
  if (p <= 0) return "0%";
  if (p >= 0.9995) return ">99.9%";
  if (p < 0.0005) return "<0.1%";
  return `${(100 * p).toFixed(1)}%`;
}

const UNSURE_TEXT = {
  "too little ink": "That doesn't look like a digit (too little ink)",
  "not digit-shaped": "That doesn't look like a digit",
  "several digits": "That looks like several digits: draw one",
  "low confidence": "Not sure: that doesn't look like any one digit",
};

function show(result) {
  const best = result.digit;
  const unsure = result.uncertain === true;
  digitEl.textContent = unsure ? "?" : String(best);
  confidenceEl.textContent = unsure
    ? UNSURE_TEXT[result.reason] || "That doesn't look like a digit"
    : `${percent(result.probability)} sure`;
  document.body.dataset.uncertain = unsure ? "1" : "0";
  result.probabilities.forEach((p, d) => {
    bars[d].fill.style.width = `${(100 * p).toFixed(1)}%`;
    bars[d].pct.textContent = percent(p);
    bars[d].li.classList.toggle("best", d === best && !unsure);
  });
  drawSeen(result.image);
  showStatus("");
  // for tests and curious readers: the latest shown answer ("?" when unsure)
  document.body.dataset.digit = unsure ? "?" : String(best);
  document.body.dataset.predictions = String(Number(document.body.dataset.predictions || 0) + 1);
}

function drawSeen(rows) {
  const data = seenCtx.createImageData(28, 28);
  rows.forEach((row, y) => row.forEach((v, x) => {
    const i = 4 * (28 * y + x);
    data.data[i] = data.data[i + 1] = data.data[i + 2] = v;
    data.data[i + 3] = 255;
  }));
  seenCtx.putImageData(data, 0, 0);
}

function showEmpty() {
  digitEl.textContent = "–";
  confidenceEl.textContent = "draw to start";
  for (const bar of bars) {
    bar.fill.style.width = "0";
    bar.pct.textContent = "–";
    bar.li.classList.remove("best");
  }
  seenCtx.fillStyle = "#000";
  seenCtx.fillRect(0, 0, 28, 28);
  showStatus("");
  delete document.body.dataset.digit;
  delete document.body.dataset.uncertain;
}

function showStatus(text) {
  statusEl.textContent = text;
}

// ---------------------------------------------------------------- model line

async function loadModelInfo() {
  const el = document.getElementById("model-info");
  try {
    const info = await (await fetch("/v1/model")).json();
    const acc = info.metrics && typeof info.metrics.val_acc === "number"
      ? ` · ${(100 * info.metrics.val_acc).toFixed(2)}% validation accuracy` : "";
    el.textContent = `${info.preset || info.model} model${acc} · ${info.backend}`;
    el.title = `fingerprint ${info.fingerprint}, ${Number(info.parameters).toLocaleString()} parameters`;
  } catch (err) {
    el.textContent = "model info unavailable";
  }
}

resetPad();
showEmpty();
setBusy(false);
loadModelInfo();
