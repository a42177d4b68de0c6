"use strict";
// Squeeze dashboard. Plain JavaScript, no build step and no third-party code: three views and two small SVG
// charts do not pay for a framework or a chart library. Every user-controlled string (model names, file names,
// notes, error messages) reaches the page as a text node or an attribute value: h() never parses markup.

const KEY = "squeeze.apiKey";
const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
const SVGNS = "http://www.w3.org/2000/svg";
// Tableau 10: distinguishable categorical colours for one model's jobs.
const PALETTE = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac"];
const BIT_COLOURS = { 32: "#4e79a7", 16: "#76b7b2", 8: "#f28e2b", 4: "#e15759" };
const PRESETS = {
  "Prune 50% + int8 dynamic": [
    { op: "prune", method: "magnitude", sparsity: 0.5, scope: "global" },
    { op: "quantize", method: "int8_dynamic" },
  ],
  "int8 dynamic": [{ op: "quantize", method: "int8_dynamic" }],
  "int8 static (calibrated on the dataset)": [{ op: "quantize", method: "int8_static" }],
  "fp16": [{ op: "quantize", method: "fp16" }],
  "Prune 80% + int8 dynamic": [
    { op: "prune", method: "magnitude", sparsity: 0.8, scope: "global" },
    { op: "quantize", method: "int8_dynamic" },
  ],
  "Evaluate only": [],
};

// ---------------------------------------------------------------- DOM helpers

function add(el, children) {
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

function setAttrs(el, attrs) {
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on") && typeof v === "function") el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  return el;
}

/** An HTML element: h("td", {class: "num"}, "text", child, ...). Strings become text nodes. */
function h(tag, attrs, ...children) {
  return add(setAttrs(document.createElement(tag), attrs), children);
}

/** An SVG element, the same way. */
function s(tag, attrs, ...children) {
  return add(setAttrs(document.createElementNS(SVGNS, tag), attrs), children);
}

function sleep(ms, signal) {
  return new Promise((resolve) => {
    const t = setTimeout(resolve, ms);
    signal?.addEventListener("abort", () => { clearTimeout(t); resolve(); }, { once: true });
  });
}

// ---------------------------------------------------------------- API

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

function apiKey() {
  return sessionStorage.getItem(KEY);
}

/** fetch with the key as a Bearer header (never in a URL); errors become ApiError from the error envelope. */
async function api(path, { method = "GET", json, body, headers = {}, signal, key = apiKey() } = {}) {
  const h2 = { ...headers, Authorization: `Bearer ${key}` };
  if (json !== undefined) {
    h2["Content-Type"] = "application/json";
    body = JSON.stringify(json);
  }
  const r = await fetch(path, { method, headers: h2, body, signal, cache: "no-store" });
  if (r.ok) return r;
  let code = "http_error";
  let message = `${r.status} ${r.statusText}`;
  try {
    const env = await r.json();
    if (env && env.error) ({ code, message } = env.error);
  } catch (_) { /* not the envelope: keep the status line */ }
  if (r.status === 401 && key === apiKey()) signOut("The server refused the key: sign in again.");
  throw new ApiError(r.status, code, message);
}

async function getJson(path, opts) {
  return (await api(path, opts)).json();
}

const modelNames = new Map();

async function loadModels() {
  const models = await getJson("/v1/models?limit=500");
  for (const m of models.items) modelNames.set(m.id, m.name);
  return models.items;
}

async function modelName(id) {
  if (!modelNames.has(id)) {
    try { modelNames.set(id, (await getJson(`/v1/models/${encodeURIComponent(id)}`)).name); } catch (_) { modelNames.set(id, id); }
  }
  return modelNames.get(id);
}

/** Every job of the caller (newest first), a few pages at most: enough for one team's comparisons. */
async function allJobs(signal, maxPages = 4) {
  const items = [];
  let cursor = null;
  for (let page = 0; page < maxPages; page++) {
    const q = cursor ? `&cursor=${encodeURIComponent(cursor)}` : "";
    const r = await getJson(`/v1/jobs?limit=500${q}`, { signal });
    items.push(...r.items);
    cursor = r.next_cursor;
    if (!cursor) break;
  }
  return items;
}

/** Follow a job's Server-Sent Events with fetch (EventSource cannot send the Authorization header). */
async function followEvents(jobId, signal, onEvent) {
  let lastId = null;
  for (let attempt = 0; attempt < 100 && !signal.aborted; attempt++) {
    try {
      const headers = lastId ? { "Last-Event-ID": lastId } : {};
      const r = await api(`/v1/jobs/${encodeURIComponent(jobId)}/events`, { headers, signal });
      const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
      let buf = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += value.replace(/\r\n?/g, "\n");
        let end;
        while ((end = buf.indexOf("\n\n")) >= 0) {
          const ev = parseEvent(buf.slice(0, end));
          buf = buf.slice(end + 2);
          if (!ev) continue;
          if (ev.id) lastId = ev.id;
          onEvent(ev);
          if (ev.event === "state" && TERMINAL.has(ev.data.status)) return;
        }
      }
      const job = await getJson(`/v1/jobs/${encodeURIComponent(jobId)}`, { signal });
      if (TERMINAL.has(job.status)) return;
    } catch (e) {
      if (signal.aborted || (e instanceof ApiError && e.status < 500)) return;
    }
    await sleep(1000, signal);
  }
}

function parseEvent(block) {
  const ev = { id: null, event: "message", data: "" };
  for (const line of block.split("\n")) {
    if (!line || line.startsWith(":")) continue;
    const i = line.indexOf(":");
    const field = i < 0 ? line : line.slice(0, i);
    const value = i < 0 ? "" : line.slice(i + 1).replace(/^ /, "");
    if (field === "id") ev.id = value;
    else if (field === "event") ev.event = value;
    else if (field === "data") ev.data += value;
  }
  if (!ev.data) return null;
  try { ev.data = JSON.parse(ev.data); } catch (_) { return null; }
  return ev;
}

/** Download with the header sent: fetch the bytes, then save them from a blob: URL. */
async function download(url, filename) {
  const blob = await (await api(url)).blob();
  const href = URL.createObjectURL(blob);
  const a = h("a", { href, download: filename, hidden: true });
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(href), 10000);
}

// ---------------------------------------------------------------- formatting

function fmtBytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  let v = n;
  while (v >= 1000 && i < units.length - 1) { v /= 1000; i++; }
  return i === 0 ? `${v} B` : `${v.toFixed(v < 10 ? 2 : 1)} ${units[i]}`;
}

const fmtRate = (x) => (x === null || x === undefined ? "–" : x.toFixed(4));
const fmtPct = (x) => (x === null || x === undefined ? "–" : `${(x * 100).toFixed(1)}%`);
const fmtMs = (x) => (x === null || x === undefined ? "–" : `${x.toFixed(2)} ms`);
const fmtInt = (x) => (x === null || x === undefined ? "–" : x.toLocaleString("en"));
const fmtTime = (iso) => (iso ? new Date(iso).toLocaleString() : "–");

/** A job's steps in a few words, e.g. "prune magnitude 50% → quantize int8_dynamic". */
function recipe(spec) {
  const steps = (spec && spec.steps) || [];
  if (!steps.length) return "evaluate only";
  return steps.map((st) => {
    // The server stores specs with every default filled in: keep the scalars that say something.
    const extra = Object.entries(st)
      .filter(([k, v]) => k !== "op" && k !== "method" && v !== null && v !== true && typeof v !== "object")
      .map(([k, v]) => (k === "sparsity" && typeof v === "number" ? `${Math.round(v * 100)}%` : `${k}=${v}`));
    return [st.op || "", st.method, ...extra].filter(Boolean).join(" ");
  }).join(" → ");
}

function statusBadge(status) {
  return h("span", { class: `status status-${status}`, "data-status": status }, status);
}

function progressBar(progress) {
  const fill = h("div", { class: "fill" });
  fill.style.width = `${Math.round(progress * 100)}%`; // CSSOM, not a style attribute: allowed by the CSP
  return h("span", { class: "progress" },
    h("span", { class: "bar", role: "progressbar", "aria-valuemin": 0, "aria-valuemax": 100, "aria-valuenow": Math.round(progress * 100) }, fill),
    h("span", { class: "pct" }, `${Math.round(progress * 100)}%`));
}

function errorText(e) {
  return e instanceof ApiError ? `${e.message} (${e.code})` : String(e.message || e);
}

// ---------------------------------------------------------------- views and routing

let running = null; // AbortController of the view on screen

function signOut(message) {
  sessionStorage.removeItem(KEY);
  running?.abort();
  document.getElementById("view").replaceChildren();
  document.getElementById("nav").hidden = true;
  document.getElementById("login").hidden = false;
  document.getElementById("login-error").textContent = message || "";
}

async function route() {
  running?.abort();
  const view = document.getElementById("view");
  if (!apiKey()) return signOut();
  document.getElementById("login").hidden = true;
  document.getElementById("nav").hidden = false;
  const controller = new AbortController();
  running = controller;
  const [, name, id] = (location.hash || "#/jobs").split("/").map(decodeURIComponent);
  for (const a of document.querySelectorAll("#nav a")) a.classList.toggle("active", a.dataset.view === name);
  const root = h("div", { class: `view view-${name}` });
  view.replaceChildren(root);
  const views = { jobs: id ? jobView : jobsView, new: newJobView, models: id ? modelView : modelsView };
  try {
    await (views[name] || jobsView)(root, controller.signal, id);
  } catch (e) {
    if (!controller.signal.aborted) root.append(h("p", { class: "error", role: "alert" }, errorText(e)));
  }
}

/** Run fn now and again after each delay it returns, until the view changes. */
async function live(signal, fn) {
  while (!signal.aborted) {
    let delay;
    try {
      delay = await fn();
    } catch (e) {
      if (signal.aborted || (e instanceof ApiError && e.status === 401)) return;
      delay = 3000;
    }
    await sleep(delay, signal);
  }
}

// ---- jobs list

async function jobsView(root, signal) {
  const tbody = h("tbody");
  root.append(
    h("h2", {}, "Jobs"),
    h("p", { class: "hint" }, "Live: status and progress refresh every second while a job is queued or running."),
    h("table", { id: "jobs-table", class: "grid" },
      h("thead", {}, h("tr", {}, ["Job", "Model", "Recipe", "Status", "Progress", "Stage", "Created"].map((t) => h("th", {}, t)))),
      tbody));
  await live(signal, async () => {
    const jobs = (await getJson("/v1/jobs?limit=50", { signal })).items;
    const names = await Promise.all(jobs.map((j) => modelName(j.spec.model_id)));
    tbody.replaceChildren(...jobs.map((j, i) => h("tr", { "data-job-id": j.id },
      h("td", {}, h("a", { href: `#/jobs/${encodeURIComponent(j.id)}` }, j.id)),
      h("td", {}, h("a", { href: `#/models/${encodeURIComponent(j.spec.model_id)}` }, names[i])),
      h("td", { class: "recipe" }, recipe(j.spec)),
      h("td", {}, statusBadge(j.status), j.cache_hit ? h("span", { class: "tag" }, "cached") : null),
      h("td", {}, progressBar(j.progress)),
      h("td", { class: "stage" }, j.stage),
      h("td", {}, fmtTime(j.created_at)))));
    if (!jobs.length) tbody.append(h("tr", {}, h("td", { colspan: 7, class: "empty" }, "No jobs yet: upload a model and submit one under New job.")));
    return jobs.some((j) => !TERMINAL.has(j.status)) ? 1000 : 4000;
  });
}

// ---- upload and submit

function uploadForm(id, label, accept, onDone) {
  const file = h("input", { type: "file", id: `${id}-file`, accept, required: true });
  const name = h("input", { type: "text", id: `${id}-name`, placeholder: "display name (optional)", maxlength: 256 });
  const result = h("p", { class: "result", id: `${id}-result`, role: "status" });
  const button = h("button", { type: "submit" }, `Upload ${label}`);
  const form = h("form", { id, class: "card" }, h("h3", {}, `Upload a ${label}`), file, name, button, result);
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    if (!file.files.length) return;
    const body = new FormData();
    body.append("file", file.files[0]);
    if (name.value.trim()) body.append("name", name.value.trim());
    button.disabled = true;
    result.className = "result";
    result.textContent = "Uploading…";
    try {
      const item = await getJson(`/v1/${label}s`, { method: "POST", body });
      result.textContent = `Uploaded ${item.name} as ${item.id}`;
      result.dataset.id = item.id;
      await onDone(item);
    } catch (e) {
      result.className = "result error";
      result.textContent = errorText(e);
    } finally {
      button.disabled = false;
    }
  });
  return form;
}

async function newJobView(root, signal) {
  const modelSel = h("select", { id: "job-model", required: true });
  const datasetSel = h("select", { id: "job-dataset" });
  const presetSel = h("select", { id: "job-preset" }, Object.keys(PRESETS).map((p) => h("option", { value: p }, p)));
  const steps = h("textarea", { id: "job-steps", rows: 8, spellcheck: "false" });
  const device = h("select", { id: "job-device" }, ["auto", "cpu", "cuda"].map((d) => h("option", { value: d }, d)));
  const cache = h("input", { type: "checkbox", id: "job-cache", checked: true });
  const result = h("p", { class: "result", id: "job-result", role: "status" });
  const button = h("button", { type: "submit" }, "Submit job");
  steps.value = JSON.stringify(PRESETS[presetSel.value], null, 2);
  presetSel.addEventListener("change", () => { steps.value = JSON.stringify(PRESETS[presetSel.value], null, 2); });

  async function fillModels(selected) {
    const models = await loadModels();
    modelSel.replaceChildren(...models.map((m) => h("option", { value: m.id }, `${m.name} (${m.format}, ${m.id})`)));
    if (selected) modelSel.value = selected;
  }
  async function fillDatasets(selected) {
    const ds = (await getJson("/v1/datasets?limit=500", { signal })).items;
    datasetSel.replaceChildren(h("option", { value: "" }, "none"),
      ...ds.map((d) => h("option", { value: d.id }, `${d.name} (${d.num_samples} samples, ${d.id})`)));
    if (selected) datasetSel.value = selected;
    else if (ds.length) datasetSel.value = ds[0].id;
  }

  const submit = h("form", { id: "submit-job", class: "card" },
    h("h3", {}, "Submit a job"),
    h("label", {}, "Model ", modelSel),
    h("label", {}, "Dataset ", datasetSel),
    h("label", {}, "Recipe ", presetSel),
    h("label", { class: "block" }, "Steps (JSON, run in order) ", steps),
    h("label", {}, "Device ", device),
    h("label", {}, cache, " reuse an identical earlier job's result"),
    button, result);
  submit.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    let parsed;
    try {
      parsed = JSON.parse(steps.value);
    } catch (e) {
      result.className = "result error";
      result.textContent = `Steps are not valid JSON: ${e.message}`;
      return;
    }
    const spec = { model_id: modelSel.value, steps: parsed, device: device.value, cache: cache.checked };
    if (datasetSel.value) spec.dataset_id = datasetSel.value;
    button.disabled = true;
    result.className = "result";
    result.textContent = "Submitting…";
    try {
      const job = await getJson("/v1/jobs", { method: "POST", json: spec });
      result.textContent = `Submitted ${job.id}`;
      location.hash = "#/jobs";
    } catch (e) {
      result.className = "result error";
      result.textContent = errorText(e);
    } finally {
      button.disabled = false;
    }
  });

  root.append(
    h("h2", {}, "New job"),
    h("div", { class: "cards" },
      uploadForm("upload-model", "model", ".onnx,.pt2,.zip", (m) => fillModels(m.id)),
      uploadForm("upload-dataset", "dataset", ".npz", (d) => fillDatasets(d.id))),
    submit);
  await Promise.all([fillModels(), fillDatasets()]);
}

// ---- models and the trade-off plot

async function modelsView(root, signal) {
  const models = await loadModels();
  root.append(h("h2", {}, "Models"),
    h("p", { class: "hint" }, "Open a model to compare its jobs: size against accuracy, latency as the point size."),
    h("table", { class: "grid", id: "models-table" },
      h("thead", {}, h("tr", {}, ["Name", "Format", "Parameters", "Size", "Uploaded", "Id"].map((t) => h("th", {}, t)))),
      h("tbody", {}, models.length ? models.map((m) => h("tr", { "data-model-id": m.id },
        h("td", {}, h("a", { href: `#/models/${encodeURIComponent(m.id)}` }, m.name)),
        h("td", {}, m.format),
        h("td", { class: "num" }, fmtInt(m.parameters)),
        h("td", { class: "num" }, fmtBytes(m.size_bytes)),
        h("td", {}, fmtTime(m.created_at)),
        h("td", { class: "mono" }, m.id))) : h("tr", {}, h("td", { colspan: 6, class: "empty" }, "No models yet.")))));
}

const Y_METRICS = { accuracy: "Accuracy", cosine: "Cosine similarity", agreement: "Top-1 agreement" };
const X_METRICS = { ratio: "Size (result / original)", bytes: "Size (bytes)" };

async function modelView(root, signal, modelId) {
  const model = await getJson(`/v1/models/${encodeURIComponent(modelId)}`, { signal });
  const ySel = h("select", { id: "plot-y" }, Object.entries(Y_METRICS).map(([k, v]) => h("option", { value: k }, v)));
  const xSel = h("select", { id: "plot-x" }, Object.entries(X_METRICS).map(([k, v]) => h("option", { value: k }, v)));
  const plot = h("div", { id: "tradeoff" });
  const table = h("tbody");
  root.append(
    h("h2", {}, "Model ", h("span", { class: "name" }, model.name)),
    h("p", { class: "hint" }, `${model.format}, ${fmtInt(model.parameters)} parameters, ${fmtBytes(model.size_bytes)} · ${model.id}`),
    h("h3", {}, "Trade-off across this model's jobs"),
    h("div", { class: "controls" }, h("label", {}, "x ", xSel), h("label", {}, "y ", ySel)),
    plot,
    h("h3", {}, "Jobs"),
    h("table", { class: "grid" }, h("thead", {}, h("tr", {}, ["Job", "Recipe", "Status", "Size", "Accuracy", "Cosine", "p50"].map((t) => h("th", {}, t)))), table));
  let jobs = [];
  let yChosen = false;
  const draw = () => plot.replaceChildren(tradeoffPlot(jobs, xSel.value, ySel.value));
  ySel.addEventListener("change", () => { yChosen = true; draw(); });
  xSel.addEventListener("change", draw);
  await live(signal, async () => {
    jobs = (await allJobs(signal)).filter((j) => j.spec.model_id === modelId);
    const done = jobs.filter((j) => j.status === "succeeded" && j.metrics && j.metrics.result);
    if (!yChosen) ySel.value = done.some((j) => j.metrics.result.accuracy != null) ? "accuracy" : "cosine";
    draw();
    table.replaceChildren(...jobs.map((j) => {
      const r = (j.metrics && j.metrics.result) || {};
      return h("tr", {},
        h("td", {}, h("a", { href: `#/jobs/${encodeURIComponent(j.id)}` }, j.id)),
        h("td", { class: "recipe" }, recipe(j.spec)),
        h("td", {}, statusBadge(j.status)),
        h("td", { class: "num" }, fmtBytes(r.size_bytes)),
        h("td", { class: "num" }, fmtRate(r.accuracy)),
        h("td", { class: "num" }, fmtRate(r.cosine)),
        h("td", { class: "num" }, fmtMs(r.latency_ms && r.latency_ms.p50)));
    }));
    return jobs.some((j) => !TERMINAL.has(j.status)) ? 2000 : 10000;
  });
}

/** Ticks at 1, 2 or 5 times a power of ten covering [lo, hi]. */
function ticks(lo, hi, count = 5) {
  const step0 = (hi - lo) / count || 1;
  const mag = 10 ** Math.floor(Math.log10(step0));
  const step = [1, 2, 5, 10].map((m) => m * mag).find((v) => v >= step0);
  const out = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) out.push(Number(v.toFixed(10)));
  return out;
}

/** Points that no other point beats on both axes (smaller x, larger y): the recipes worth choosing. */
function paretoFront(points) {
  return new Set(points.filter((p) => !points.some((q) => q !== p && q.x <= p.x && q.y >= p.y && (q.x < p.x || q.y > p.y))));
}

/** Size (x) against accuracy or cosine (y) for one model's finished jobs; point area grows with latency p50. */
function tradeoffPlot(jobs, xKey, yKey) {
  const points = [];
  let baseline = null;
  for (const j of jobs) {
    const m = j.metrics;
    if (j.status !== "succeeded" || !m || !m.result || !m.baseline) continue;
    const y = m.result[yKey];
    if (y === null || y === undefined) continue;
    const x = xKey === "ratio" ? m.result.size_bytes / m.baseline.size_bytes : m.result.size_bytes;
    points.push({ job: j, x, y, latency: m.result.latency_ms ? m.result.latency_ms.p50 : null, colour: PALETTE[points.length % PALETTE.length] });
    if (!baseline && m.baseline[yKey] != null) {
      baseline = { x: xKey === "ratio" ? 1 : m.baseline.size_bytes, y: m.baseline[yKey], latency: m.baseline.latency_ms ? m.baseline.latency_ms.p50 : null };
    }
  }
  if (!points.length) return h("p", { class: "empty", id: "tradeoff-empty" }, `No finished job with ${Y_METRICS[yKey].toLowerCase()} yet.`);

  const W = 720, H = 380, L = 70, R = 20, T = 20, B = 50;
  const all = baseline ? [...points, baseline] : points;
  const xs = all.map((p) => p.x), ys = all.map((p) => p.y);
  const lats = all.map((p) => p.latency).filter((v) => v !== null);
  const xMax = Math.max(...xs) * 1.08, xMin = 0;
  const yPad = Math.max((Math.max(...ys) - Math.min(...ys)) * 0.15, 0.005);
  const yMin = Math.min(...ys) - yPad, yMax = Math.max(...ys) + yPad;
  const sx = (v) => L + ((v - xMin) / (xMax - xMin)) * (W - L - R);
  const sy = (v) => H - B - ((v - yMin) / (yMax - yMin)) * (H - T - B);
  // Area proportional to latency (not stretched over the range: 0.18 and 0.19 ms should look alike).
  const latHi = Math.max(...lats);
  const radius = (lat) => (lat === null || !(latHi > 0) ? 6 : Math.max(3, 14 * Math.sqrt(lat / latHi)));

  const svg = s("svg", { viewBox: `0 0 ${W} ${H}`, class: "chart", role: "img", "aria-label": "size against quality, one point per job" });
  const axes = s("g", { class: "axes" },
    s("line", { x1: L, y1: H - B, x2: W - R, y2: H - B }),
    s("line", { x1: L, y1: T, x2: L, y2: H - B }));
  for (const t of ticks(xMin, xMax)) {
    axes.append(s("line", { class: "grid", x1: sx(t), y1: T, x2: sx(t), y2: H - B }),
      s("text", { x: sx(t), y: H - B + 16, "text-anchor": "middle" }, xKey === "ratio" ? `${t}×` : fmtBytes(t)));
  }
  for (const t of ticks(yMin, yMax)) {
    axes.append(s("line", { class: "grid", x1: L, y1: sy(t), x2: W - R, y2: sy(t) }),
      s("text", { x: L - 6, y: sy(t) + 4, "text-anchor": "end" }, String(t)));
  }
  axes.append(s("text", { class: "label", x: (L + W - R) / 2, y: H - 8, "text-anchor": "middle" }, X_METRICS[xKey]),
    s("text", { class: "label", x: 14, y: (T + H - B) / 2, "text-anchor": "middle", transform: `rotate(-90 14 ${(T + H - B) / 2})` }, Y_METRICS[yKey]));
  svg.append(axes);

  const front = paretoFront(points);
  const frontLine = [...front].sort((a, b) => a.x - b.x).map((p) => `${sx(p.x)},${sy(p.y)}`).join(" ");
  if (front.size > 1) svg.append(s("polyline", { class: "front", points: frontLine }));
  if (baseline) {
    const r = radius(baseline.latency);
    svg.append(s("rect", { class: "baseline-point", x: sx(baseline.x) - r, y: sy(baseline.y) - r, width: 2 * r, height: 2 * r },
      s("title", {}, `original: ${Y_METRICS[yKey].toLowerCase()} ${fmtRate(baseline.y)}, p50 ${fmtMs(baseline.latency)}`)));
  }
  for (const p of points) {
    const r = p.job.metrics.result;
    const circle = s("circle", {
      class: front.has(p) ? "point best" : "point", cx: sx(p.x), cy: sy(p.y), r: radius(p.latency), fill: p.colour, "data-job-id": p.job.id,
      onclick: () => { location.hash = `#/jobs/${encodeURIComponent(p.job.id)}`; },
    }, s("title", {}, `${recipe(p.job.spec)}\n${fmtBytes(r.size_bytes)}, ${Y_METRICS[yKey].toLowerCase()} ${fmtRate(p.y)}, p50 ${fmtMs(p.latency)}`));
    svg.append(circle);
  }

  const legend = h("ul", { class: "legend", id: "tradeoff-legend" },
    points.map((p) => {
      const sw = h("span", { class: "swatch" });
      sw.style.background = p.colour;
      return h("li", { "data-job-id": p.job.id }, sw,
        h("a", { href: `#/jobs/${encodeURIComponent(p.job.id)}` }, recipe(p.job.spec)),
        h("span", { class: "muted" }, ` · ${fmtBytes(p.job.metrics.result.size_bytes)} · ${yKey} ${fmtRate(p.y)} · p50 ${fmtMs(p.latency)}`),
        front.has(p) ? h("span", { class: "tag best" }, "best trade-off") : null);
    }),
    baseline ? h("li", {}, h("span", { class: "swatch baseline" }), "original model") : null);
  return h("div", { class: "plot" }, svg, legend,
    h("p", { class: "hint" }, "Up and to the left is better. Larger points are slower (latency p50). The dashed line joins the recipes no other job beats on both size and quality."));
}

// ---- job detail

const METRIC_ROWS = [
  ["size_bytes", "Size", fmtBytes, "ratio"],
  ["parameters", "Parameters", fmtInt, "ratio"],
  ["nonzero_parameters", "Non-zero parameters", fmtInt, "ratio"],
  ["sparsity", "Sparsity", fmtPct, "delta"],
  ["accuracy", "Accuracy", fmtRate, "delta"],
  ["agreement", "Top-1 agreement with the original", fmtRate, "delta"],
  ["cosine", "Cosine similarity to the original", fmtRate, "delta"],
  ["max_abs_error", "Max abs error vs the original", (x) => (x == null ? "–" : x.toPrecision(3)), null],
  ["latency_ms.p50", "Latency p50", fmtMs, "ratio"],
  ["latency_ms.p95", "Latency p95", fmtMs, "ratio"],
];

function pick(obj, path) {
  return path.split(".").reduce((o, k) => (o == null ? undefined : o[k]), obj);
}

function metricsTable(metrics) {
  const base = metrics.baseline || {};
  const res = metrics.result || null;
  const cell = (side, key, fmt, v) => h("td", { class: "num", "data-metric": key, "data-side": side, "data-value": v == null ? "" : String(v) }, fmt(v));
  const rows = METRIC_ROWS.map(([key, label, fmt, change]) => {
    const b = pick(base, key);
    const r = res ? pick(res, key) : undefined;
    let c = "";
    if (typeof b === "number" && typeof r === "number") {
      if (change === "ratio" && b) c = `×${(r / b).toFixed(2)}`;
      else if (change === "delta") c = `${r - b >= 0 ? "+" : "−"}${Math.abs(r - b).toFixed(4)}`;
    }
    return h("tr", {}, h("th", { scope: "row" }, label), cell("baseline", key, fmt, b), res ? cell("result", key, fmt, r) : null, res ? h("td", { class: "num change" }, c) : null);
  });
  const batch = pick(base, "latency_ms.batch_size");
  rows.push(h("tr", {}, h("th", { scope: "row" }, "Runtime, device"), h("td", {}, `${base.runtime || "–"}, ${base.device || "–"}`),
    res ? h("td", {}, `${res.runtime || "–"}, ${res.device || "–"}`) : null, res ? h("td", {}) : null));
  return h("table", { class: "grid metrics", id: "metrics-table" },
    h("thead", {}, h("tr", {}, h("th", {}, batch ? `Metric (latency at batch ${batch})` : "Metric"), h("th", {}, "Before"), res ? h("th", {}, "After") : null, res ? h("th", {}, "Change") : null)),
    h("tbody", {}, rows));
}

/** The baseline row a result row came from: the same name, or the name a format suffixed (`6.weight_quantized`). */
function matchBaseline(name, before) {
  const hits = before.filter((b) => name === b.name || name.startsWith(`${b.name}_`) || name.startsWith(`${b.name}.`));
  return hits.sort((a, b) => b.name.length - a.name.length)[0] || null;
}

/**
 * One row per layer of the result: a filled bar for its bytes after (colour: bit width) over an outline of its
 * bytes before; a thin line for the share of zero weights; sensitivity (the metric's change when only that layer
 * is compressed, measured on the baseline's rows) as text.
 */
function layerChart(layers, before) {
  const rows = layers.map((l) => {
    const b = matchBaseline(String(l.name), before);
    return { l, b, sensitivity: l.sensitivity ?? (b ? b.sensitivity : null) };
  });
  const maxBytes = Math.max(...rows.flatMap(({ l, b }) => [l.bytes || 0, (b && b.bytes) || 0]), 1);
  const row = 24, labelW = 250, barW = 280, W = labelW + barW + 400;
  const svg = s("svg", { viewBox: `0 0 ${W} ${rows.length * row + 10}`, class: "chart layers", role: "img", "aria-label": "bytes per layer, before and after" });
  rows.forEach(({ l, b, sensitivity }, i) => {
    const y = 5 + i * row;
    const name = String(l.name);
    const w = Math.max(1, ((l.bytes || 0) / maxBytes) * barW);
    const parts = [
      b && b.bytes ? `${fmtBytes(b.bytes)} → ${fmtBytes(l.bytes)}` : fmtBytes(l.bytes),
      l.bits != null ? `${l.bits}-bit` : null,
      l.sparsity != null ? `${fmtPct(l.sparsity)} zero` : null,
      sensitivity != null ? `sensitivity ${sensitivity >= 0 ? "+" : "−"}${Math.abs(sensitivity).toFixed(4)}` : null,
    ].filter(Boolean);
    svg.append(s("g", { class: "layer", "data-layer": name },
      s("title", {}, `${name} ${JSON.stringify(l.shape ?? "")}: ${fmtInt(l.parameters)} parameters`),
      s("text", { x: labelW - 8, y: y + 15, "text-anchor": "end" }, name.length > 36 ? `…${name.slice(-35)}` : name),
      b && b.bytes ? s("rect", { class: "layer-before", x: labelW, y: y + 2, width: Math.max(1, (b.bytes / maxBytes) * barW), height: row - 6 }) : null,
      s("rect", { class: "layer-bar", x: labelW, y: y + 4, width: w, height: row - 10, fill: BIT_COLOURS[l.bits] || "#b07aa1" }),
      l.sparsity ? s("rect", { class: "layer-zero", x: labelW, y: y + row - 6, width: w * l.sparsity, height: 2 }) : null,
      s("text", { x: labelW + Math.max(w, b && b.bytes ? (b.bytes / maxBytes) * barW : 0) + 6, y: y + 15 }, parts.join(" · "))));
  });
  const bits = [...new Set(layers.map((l) => l.bits).filter((x) => x != null))].sort((x, y) => y - x);
  return h("div", { class: "plot" }, svg, h("ul", { class: "legend" }, bits.map((x) => {
    const sw = h("span", { class: "swatch" });
    sw.style.background = BIT_COLOURS[x] || "#b07aa1";
    return h("li", {}, sw, `${x}-bit after`);
  }), before.length ? h("li", {}, h("span", { class: "swatch outline" }), "size before") : null,
  h("li", { class: "muted" }, "thin line: share of zero weights")));
}

function stepsList(job) {
  const reported = (job.report && job.report.steps) || [];
  const specSteps = job.spec.steps || [];
  const items = (reported.length ? reported : specSteps).map((st, i) => {
    // Scalars only: per-layer lists are in the chart above, and empty or null settings say nothing.
    const details = Object.entries(st.details || specSteps[i] || {})
      .filter(([k, v]) => k !== "op" && k !== "method" && v !== null && typeof v !== "object");
    return h("li", {}, h("strong", {}, `${st.op} / ${st.method}`),
      details.length ? h("span", { class: "muted" }, ` ${details.map(([k, v]) => `${k}: ${v}`).join(", ")}`) : null,
      (st.notes || []).length ? h("ul", { class: "notes" }, st.notes.map((n) => h("li", {}, n))) : null);
  });
  const notes = (job.report && job.report.notes) || [];
  return [
    items.length ? h("ol", { id: "steps" }, items) : h("p", { class: "empty", id: "steps" }, "No steps: the model is evaluated as it is."),
    notes.length ? h("div", {}, h("h4", {}, "Notes"), h("ul", { class: "notes", id: "notes" }, notes.map((n) => h("li", {}, n)))) : null,
  ];
}

function artifactsTable(job) {
  if (!job.artifacts.length) return h("p", { class: "empty" }, "No artifacts yet.");
  return h("table", { class: "grid", id: "artifacts-table" },
    h("thead", {}, h("tr", {}, ["Kind", "Format", "File", "Size", "sha256", ""].map((t) => h("th", {}, t)))),
    h("tbody", {}, job.artifacts.map((a) => {
      const button = h("button", { type: "button", class: "download", "data-artifact-id": a.id }, "Download");
      button.addEventListener("click", async () => {
        button.disabled = true;
        try { await download(a.download_url, a.filename); } catch (e) { button.after(h("span", { class: "error" }, errorText(e))); }
        button.disabled = false;
      });
      return h("tr", {}, h("td", {}, a.kind), h("td", {}, a.format), h("td", {}, a.filename), h("td", { class: "num" }, fmtBytes(a.size_bytes)),
        h("td", { class: "mono", title: a.sha256 }, `${a.sha256.slice(0, 12)}…`), h("td", {}, button));
    })));
}

async function jobView(root, signal, jobId) {
  const job = await getJson(`/v1/jobs/${encodeURIComponent(jobId)}`, { signal });
  const name = await modelName(job.spec.model_id);
  const state = h("div", { class: "state", id: "job-state" });
  const showState = (status, progress, stage) => state.replaceChildren(statusBadge(status), progressBar(progress), h("span", { class: "stage" }, stage));
  showState(job.status, job.progress, job.stage);
  const log = h("ol", { class: "log", id: "job-log" });
  const metrics = job.metrics;
  const layers = metrics && (metrics.layers || (metrics.result && metrics.result.layers));
  add(root, [
    h("h2", {}, "Job ", h("span", { class: "mono" }, job.id)),
    state,
    job.error ? h("p", { class: "error", role: "alert" }, `${job.error.code}: ${job.error.message}`) : null,
    h("p", {}, "Model ", h("a", { href: `#/models/${encodeURIComponent(job.spec.model_id)}`, id: "job-model-link" }, name),
      " · ", h("span", { class: "recipe" }, recipe(job.spec)),
      " · created ", fmtTime(job.created_at), job.cache_hit ? h("span", { class: "tag" }, "cached result") : null),
    h("h3", {}, "Before and after"),
    metrics && metrics.baseline ? metricsTable(metrics) : h("p", { class: "empty", id: "metrics-table" }, "Metrics appear when the job has run."),
    h("h3", {}, "Per layer"),
    Array.isArray(layers) && layers.length ? layerChart(layers, (metrics.baseline && metrics.baseline.layers) || []) : h("p", { class: "empty", id: "layers-empty" }, "no per-layer data"),
    h("h3", {}, "Steps"),
    stepsList(job),
    h("h3", {}, "Artifacts"),
    artifactsTable(job),
    h("details", {}, h("summary", {}, "Spec"), h("pre", { id: "job-spec" }, JSON.stringify(job.spec, null, 2))),
    h("h3", {}, "Events"),
    log]);
  const wasRunning = !TERMINAL.has(job.status);
  await followEvents(job.id, signal, (ev) => {
    if (ev.event === "progress") showState("running", ev.data.progress, ev.data.stage);
    else if (ev.event === "state") state.querySelector(".status").replaceWith(statusBadge(ev.data.status));
    log.append(h("li", { class: `event event-${ev.event}` }, h("span", { class: "muted" }, fmtTime(ev.data.at)), " ", eventText(ev)));
  });
  if (wasRunning && !signal.aborted) route(); // redraw with the final metrics and artifacts
}

function eventText(ev) {
  if (ev.event === "progress") return `${Math.round(ev.data.progress * 100)}% ${ev.data.stage || ""}`;
  if (ev.event === "state") return `state: ${ev.data.status}`;
  if (ev.event === "log") return ev.data.message || "";
  return ev.event;
}

// ---------------------------------------------------------------- start

document.addEventListener("DOMContentLoaded", () => {
  document.getElementById("login-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const input = document.getElementById("login-key");
    const key = input.value.trim();
    const error = document.getElementById("login-error");
    error.textContent = "";
    try {
      await api("/v1/models?limit=1", { key });
    } catch (e) {
      error.textContent = errorText(e);
      return;
    }
    input.value = "";
    sessionStorage.setItem(KEY, key);
    modelNames.clear();
    if (!location.hash || location.hash === "#/") location.hash = "#/jobs";
    else route();
  });
  document.getElementById("logout").addEventListener("click", () => signOut());
  window.addEventListener("hashchange", route);
  route();
});
