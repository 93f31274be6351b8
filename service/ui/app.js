// convserve's page: plain JavaScript, same-origin requests only, no framework and no build step.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { file: null, predictions: [], target: null, run: 0, model: null };

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

async function api(path, file) {
  // The image goes as the raw body with its own type, exactly as `curl --data-binary` would send it.
  const response = await fetch(path, {
    method: "POST",
    body: file,
    headers: { "Content-Type": file.type || "application/octet-stream", Accept: "application/json" },
  });
  let doc = null;
  try { doc = await response.json(); } catch (e) { doc = null; }
  if (!response.ok) {
    const err = doc && doc.error ? doc.error : { code: String(response.status), message: response.statusText };
    throw new Error(`${err.message} (${err.code}, HTTP ${response.status})`);
  }
  return doc;
}

const pct = (p) => `${(100 * p).toFixed(1)}%`;

function renderBars(predictions) {
  const list = $("bars");
  list.replaceChildren();
  predictions.forEach((p, i) => {
    const item = document.createElement("li");
    const button = document.createElement("button");
    button.type = "button";
    button.className = "bar";
    button.dataset.index = String(p.index);
    button.setAttribute("aria-pressed", i === 0 ? "true" : "false");
    button.setAttribute("aria-label", `${p.label}: ${pct(p.probability)}. Explain this class.`);
    const label = document.createElement("span");
    label.className = "label";
    label.textContent = p.label;
    const track = document.createElement("span");
    track.className = "track";
    const fill = document.createElement("span");
    fill.className = "fill";
    fill.style.width = `${Math.max(0.5, 100 * p.probability)}%`;
    track.append(fill);
    const value = document.createElement("span");
    value.className = "value";
    value.textContent = pct(p.probability);
    button.append(label, track, value);
    button.addEventListener("click", () => pickClass(p.index));
    item.append(button);
    list.append(item);
  });
}

function png(b64) { return `data:image/png;base64,${b64}`; }

async function explain(target) {
  const run = state.run;
  const query = target === null ? "" : `?target=${target}`;
  $("why-info").textContent = "Computing the explanation…";
  try {
    const doc = await api(`/v1/explain${query}`, state.file);
    if (run !== state.run) return;
    $("seen").src = png(doc.input_png);
    $("heat").src = png(doc.heatmap_png);
    $("seen-size").textContent = `(${doc.input_size[1]}×${doc.input_size[0]})`;
    $("why-target").textContent = doc.target.label;
    $("why-info").textContent =
      `Grad-CAM on layer ${doc.layer} (${doc.heatmap.layer_size.join("×")}), ` +
      `${doc.target.label} at ${pct(doc.target.probability)}, ${doc.timing_ms.explain.toFixed(0)} ms`;
    state.target = doc.target.index;
  } catch (e) {
    if (run === state.run) $("why-info").textContent = `No explanation: ${e.message}`;
  }
}

function pickClass(index) {
  for (const b of document.querySelectorAll(".bar")) {
    b.setAttribute("aria-pressed", b.dataset.index === String(index) ? "true" : "false");
  }
  $("why").checked = true;
  updateOverlay();
  explain(index);
}

function updateOverlay() {
  const heat = $("heat");
  heat.hidden = !$("why").checked;
  const value = Number($("opacity").value);
  heat.style.opacity = String(value / 100);
  $("opacity").setAttribute("aria-valuetext", `${value}%`);
}

async function features() {
  if (!state.file || !$("inside").open) return;
  const run = state.run;
  const layer = $("layer").value;
  try {
    const doc = await api(`/v1/features${layer ? `?layer=${encodeURIComponent(layer)}` : ""}`, state.file);
    if (run !== state.run) return;
    const select = $("layer");
    if (select.options.length !== doc.layers.length) {
      select.replaceChildren(...doc.layers.map((name) => new Option(name, name)));
    }
    select.value = doc.layer;
    $("maps").src = png(doc.png);
    const pad = Array.isArray(doc.padding) ? doc.padding.join("×") : doc.padding;
    $("inside-info").textContent =
      `${doc.layer}: ${doc.in_channels} → ${doc.out_channels} channels, kernel ${doc.kernel_size.join("×")}, ` +
      `stride ${doc.stride.join("×")}, padding ${pad}; input ${doc.input_size.join("×")} → output ` +
      `${doc.output_size.join("×")} (showing ${doc.channels_shown} maps)`;
  } catch (e) {
    if (run === state.run) $("inside-info").textContent = `No feature maps: ${e.message}`;
  }
}

async function classify(file) {
  if (!file) return;
  state.run += 1;
  const run = state.run;
  state.file = file;
  showError("");
  $("status").textContent = `Classifying ${file.name || "the pasted image"}…`;
  try {
    const doc = await api("/v1/predict", file);
    if (run !== state.run) return;
    $("result").hidden = false;
    const url = URL.createObjectURL(file);
    $("original").onload = () => URL.revokeObjectURL(url);
    $("original").src = url;
    state.predictions = doc.predictions;
    renderBars(doc.predictions);
    const t = doc.timing_ms;
    $("timing").textContent =
      `Model: ${t.inference.toFixed(1)} ms inference, ${t.total.toFixed(1)} ms in the server ` +
      `(decode ${t.decode.toFixed(1)} ms, queue ${t.queue.toFixed(1)} ms)`;
    $("status").textContent = `${doc.predictions[0].label}: ${pct(doc.predictions[0].probability)}`;
    explain(null);
    features();
  } catch (e) {
    if (run !== state.run) return;
    $("result").hidden = true;
    $("status").textContent = "";
    showError(`That did not work: ${e.message}`);
  }
}

// ---- the model card ---------------------------------------------------------------------------------
function fact(list, name, value) {
  if (value === undefined || value === null || value === "") return;
  const dt = document.createElement("dt");
  dt.textContent = name;
  const dd = document.createElement("dd");
  dd.textContent = String(value);
  list.append(dt, dd);
}

const SVG = "http://www.w3.org/2000/svg";
function svg(tag, attrs) {
  const el = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, String(v));
  return el;
}

function chart(title, history, series) {
  // A line chart of per-epoch values, drawn here from the checkpoint's training.history.
  const W = 320, H = 180, L = 40, R = 10, T = 24, B = 28;
  const values = series.flatMap((s) => history.map((h) => h[s.key]).filter((v) => typeof v === "number"));
  if (!values.length) return null;
  const lo = Math.min(...values), hi = Math.max(...values);
  const span = hi - lo || 1;
  const epochs = history.map((h) => h.epoch);
  const e0 = Math.min(...epochs), e1 = Math.max(...epochs);
  const x = (e) => L + ((e - e0) / (e1 - e0 || 1)) * (W - L - R);
  const y = (v) => T + (1 - (v - lo) / span) * (H - T - B);
  const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", class: "chart" });
  const label = svg("title", {});
  label.textContent = `${title} per epoch`;
  root.append(label);
  const heading = svg("text", { x: L, y: 14, class: "chart-title" });
  heading.textContent = title;
  root.append(heading);
  root.append(svg("line", { x1: L, y1: H - B, x2: W - R, y2: H - B, class: "axis" }));
  root.append(svg("line", { x1: L, y1: T, x2: L, y2: H - B, class: "axis" }));
  for (const [v, yy] of [[hi, y(hi)], [lo, y(lo)]]) {
    const t = svg("text", { x: L - 4, y: yy + 4, "text-anchor": "end", class: "tick" });
    t.textContent = v.toFixed(3);
    root.append(t);
  }
  const xt = svg("text", { x: (L + W - R) / 2, y: H - 6, "text-anchor": "middle", class: "tick" });
  xt.textContent = `epoch ${e0}–${e1}`;
  root.append(xt);
  series.forEach((s, i) => {
    const pts = history.filter((h) => typeof h[s.key] === "number").map((h) => `${x(h.epoch)},${y(h[s.key])}`);
    root.append(svg("polyline", { points: pts.join(" "), class: `line line${i}`, fill: "none" }));
    const key = svg("text", { x: W - R - 4, y: T + 12 + 14 * i, "text-anchor": "end", class: `key key${i}` });
    key.textContent = s.name;
    root.append(key);
  });
  return root;
}

function renderCard(m) {
  state.model = m;
  $("model-name").textContent = `${m.name} v${m.version}`;
  const facts = $("card-facts");
  facts.replaceChildren();
  const pre = m.preprocessing || {};
  fact(facts, "Name", m.name);
  fact(facts, "Version", m.version);
  fact(facts, "Architecture", m.architecture);
  if (typeof m.parameters === "number") fact(facts, "Parameters", m.parameters.toLocaleString("en"));
  fact(facts, "Input", `${m.input_size.width}×${m.input_size.height}, ${m.input_size.channels} channel(s)`);
  fact(facts, "Preprocessing",
    `${pre.mode}, resize ${pre.resize}, size ${pre.size}, ${pre.interpolation}; mean ${pre.mean}, std ${pre.std}`);
  fact(facts, "SHA-256", m.checkpoint && m.checkpoint.sha256);
  fact(facts, "Served on", `${m.device}, ${m.precision}`);
  $("card-labels").textContent = `${m.classes.length} classes: ${m.classes.join(", ")}`;

  const tr = m.training || {};
  const box = $("card-training");
  box.replaceChildren();
  if (Object.keys(tr).length) {
    const h = document.createElement("h3");
    h.textContent = "Training";
    const dl = document.createElement("dl");
    fact(dl, "Data", tr.data);
    fact(dl, "Epochs", tr.epochs);
    const best = tr.best_val || {};
    if (typeof best.top1 === "number") fact(dl, "Best validation top-1", pct(best.top1));
    if (typeof best.top5 === "number") fact(dl, "Best validation top-5", pct(best.top5));
    fact(dl, "Best epoch", tr.best_epoch);
    if (tr.train_images) fact(dl, "Images", `${tr.train_images} train, ${tr.val_images} validation`);
    if (tr.optimizer) fact(dl, "Optimiser", `${tr.optimizer}, lr ${tr.lr}, ${tr.schedule ?? ""}`);
    fact(dl, "Date", tr.date);
    box.append(h, dl);
  }
  const curves = $("card-curves");
  curves.replaceChildren();
  const history = Array.isArray(tr.history) ? tr.history : [];
  if (history.length) {
    const h = document.createElement("h3");
    h.textContent = "Training curves";
    curves.append(h);
    const loss = chart("Loss", history, [{ key: "train_loss", name: "train" }, { key: "val_loss", name: "validation" }]);
    const acc = chart("Validation accuracy", history, [{ key: "val_top1", name: "top-1" }, { key: "val_top5", name: "top-5" }]);
    for (const c of [loss, acc]) if (c) curves.append(c);
  }
  const cal = $("card-calibration");
  cal.replaceChildren();
  if (m.calibration) {
    const h = document.createElement("h3");
    h.textContent = "Calibration";
    const dl = document.createElement("dl");
    const c = m.calibration;
    fact(dl, "Temperature scaling", c.applied ? "applied" : "not applied");
    if (typeof c.temperature === "number") fact(dl, "Temperature", c.temperature.toFixed(3));
    if (typeof c.ece_before === "number") fact(dl, "ECE before", pct(c.ece_before));
    if (typeof c.ece_after === "number") fact(dl, "ECE after", pct(c.ece_after));
    cal.append(h, dl);
  }
  if (m.samples_png) {
    $("samples").src = m.samples_png;
    $("card-samples").hidden = false;
  }
}

async function loadCard() {
  try {
    const response = await fetch("/v1/model");
    renderCard(await response.json());
  } catch (e) {
    showError(`The model card could not be loaded: ${e.message}`);
  }
}

function setUp() {
  const drop = $("drop");
  $("file").addEventListener("change", (e) => classify(e.target.files[0]));
  drop.addEventListener("keydown", (e) => {
    if (e.key === "Enter" || e.key === " ") { e.preventDefault(); $("file").click(); }
  });
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    classify(e.dataTransfer.files[0]);
  });
  document.addEventListener("paste", (e) => {
    const item = [...e.clipboardData.items].find((i) => i.kind === "file");
    if (item) classify(item.getAsFile());
  });
  $("why").addEventListener("change", updateOverlay);
  $("opacity").addEventListener("input", updateOverlay);
  $("layer").addEventListener("change", features);
  $("inside").addEventListener("toggle", features);
  updateOverlay();
  loadCard();
}

document.addEventListener("DOMContentLoaded", setUp);
