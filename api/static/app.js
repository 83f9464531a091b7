/* lorasearch web page: upload a LoRA, list its nearest indexed LoRAs, show the family's collection map.
 *
 * Plain browser JavaScript, no framework, nothing loaded from elsewhere. Talks to the API beside it:
 * POST /v1/query, GET /v1/map, /v1/families, /v1/stats, /v1/loras/{id}. Every string from the server
 * goes into the page as text (textContent), never as HTML.
 */
"use strict";

const SVG_NS = "http://www.w3.org/2000/svg";
const HIT_PX = 10;          // how close (CSS px) the pointer must be to a point to pick it
const MAX_K = 100;

const state = {
  files: [],                // what the next query uploads
  query: null,              // last /v1/query response
  neighbours: new Map(),    // id -> {rank, score, name} of the last query's results
  map: null,                // last /v1/map response
  proj: null,               // {xs, ys, r, w, h} screen positions of map.points
  selected: null,           // id shown in the detail panel
  hover: null,              // id under the pointer / keyboard focus
  markers: new Map(),       // id -> [x, y] where a neighbour's numbered marker is drawn
  queryAbort: null,
  mapAbort: null,
};

const $ = (id) => document.getElementById(id);

/* ------------------------------------------------------------------ small DOM helpers */

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

function svg(tag, attrs) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
  return node;
}

function fact(dl, term, value) {
  if (value === null || value === undefined || value === "") return;
  dl.append(el("dt", { text: term }), el("dd", {}, value));
}

/* Long file names: allow line breaks after _ - . / so they wrap at word-like boundaries. */
function breakable(text) {
  const frag = document.createDocumentFragment();
  for (const part of String(text).split(/(?<=[_\-./])(?![_\-./])/)) frag.append(part, document.createElement("wbr"));
  return frag;
}

function fmtScore(s) {
  if (typeof s !== "number" || !Number.isFinite(s)) return "—";
  return Math.abs(s) < 0.00005 ? "0.0000" : s.toFixed(4);  // no "-0.0000"
}

function fmtBytes(n) {
  if (typeof n !== "number") return null;
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
  return `${n.toFixed(i && n < 10 ? 1 : 0)} ${units[i]}`;
}

function fmtRank(r) {
  if (!r) return null;
  if (typeof r === "number") return String(r);
  const lo = r.min ?? r.rank_min, hi = r.max ?? r.rank_max;
  if (lo === null || lo === undefined) return null;
  return lo === hi || hi === undefined || hi === null ? String(lo) : `${lo}–${hi}`;
}

function shortSha(sha) {
  return sha ? String(sha).slice(0, 12) : null;
}

function whereFrom(r) {
  if (r.repo) {
    const rev = r.revision ? `@${String(r.revision).slice(0, 7)}` : "";
    return `${r.repo}${rev}${r.path ? " / " + r.path : ""}`;
  }
  return r.path || r.source || "";
}

function labelChips(labels) {
  if (!Array.isArray(labels) || labels.length === 0) return null;
  return el("span", { class: "chips" }, labels.map((l) => el("span", { class: "chip", text: l })));
}

/* ------------------------------------------------------------------ API */

async function api(path, options) {
  let resp;
  try {
    resp = await fetch(path, { headers: { Accept: "application/json" }, ...options });
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new Error(`Network error: ${err.message || err} (is the server running?)`);
  }
  let body = null;
  const text = await resp.text();
  try { body = text ? JSON.parse(text) : null; } catch (_) { body = null; }
  if (!resp.ok) {
    const e = body && body.error ? body.error : null;
    const msg = e && e.message ? e.message : (text && !body ? text.slice(0, 300) : resp.statusText || "request failed");
    const error = new Error(`${resp.status}: ${msg}`);
    error.status = resp.status;
    error.code = e && e.code;
    throw error;
  }
  return body;
}

/* ------------------------------------------------------------------ status, errors */

function showError(msg, code) {
  const box = $("error");
  box.replaceChildren(el("strong", { text: "Error " }), msg);
  if (code) box.title = code; else box.removeAttribute("title");
  box.hidden = false;
}

function clearError() {
  $("error").hidden = true;
  $("error").replaceChildren();
}

function setStatus(msg, busy) {
  $("status").textContent = msg || "";
  document.body.classList.toggle("busy", Boolean(busy));
  $("search").setAttribute("aria-busy", busy ? "true" : "false");
}

/* ------------------------------------------------------------------ choosing files */

function pickFiles(list) {
  const files = [...list];
  const weights = files.filter((f) => !/\.json$/i.test(f.name));
  const configs = files.filter((f) => /\.json$/i.test(f.name));
  if (files.length === 0) return { error: "No file chosen." };
  if (weights.length === 0) return { error: "Choose the weights file too (a .safetensors file), not only its config." };
  if (weights.length > 1) {
    const peft = weights.filter((f) => f.name === "adapter_model.safetensors");
    if (peft.length !== 1) {
      return { error: `${weights.length} weight files chosen; choose one LoRA at a time (one .safetensors, plus its adapter_config.json for PEFT).` };
    }
    weights.splice(0, weights.length, peft[0]);
  }
  if (configs.length > 1) {
    const named = configs.filter((f) => f.name === "adapter_config.json");
    configs.splice(0, configs.length, ...(named.length ? [named[0]] : [configs[0]]));
  }
  return { files: [...weights, ...configs] };
}

function setFiles(list) {
  const picked = pickFiles(list);
  if (picked.error) {
    state.files = [];
    $("search").disabled = true;
    $("chosen").replaceChildren();
    showError(picked.error);
    return;
  }
  state.files = picked.files;
  $("search").disabled = false;
  $("chosen").replaceChildren(el("span", { class: "chosen-label", text: "Chosen: " }),
    ...state.files.flatMap((f, i) => [i ? " + " : "", el("code", { text: f.name }), ` (${fmtBytes(f.size)})`]));
  runQuery();
}

function entryFile(entry) {
  return new Promise((resolve, reject) => entry.file(resolve, reject));
}

function readAll(reader) {
  return new Promise((resolve, reject) => {
    const out = [];
    const next = () => reader.readEntries((batch) => {
      if (batch.length === 0) resolve(out); else { out.push(...batch); next(); }
    }, reject);
    next();
  });
}

async function filesFromEntries(entries) {
  const out = [];
  for (const entry of entries) {
    if (entry.isFile) out.push(await entryFile(entry));
    else if (entry.isDirectory) {
      // A PEFT folder: its weights and config sit at the top level.
      for (const child of await readAll(entry.createReader())) {
        if (child.isFile && (/\.safetensors$/i.test(child.name) || child.name === "adapter_config.json")) {
          out.push(await entryFile(child));
        }
      }
    }
  }
  return out;
}

function bindDrop() {
  const drop = $("drop");
  const over = (on) => (ev) => { ev.preventDefault(); drop.classList.toggle("over", on); };
  drop.addEventListener("dragenter", over(true));
  drop.addEventListener("dragover", over(true));
  drop.addEventListener("dragleave", over(false));
  drop.addEventListener("drop", async (ev) => {
    ev.preventDefault();
    drop.classList.remove("over");
    const dt = ev.dataTransfer;
    // Entries must be taken during the event; reading them can wait.
    const entries = [...(dt.items || [])].map((i) => (i.webkitGetAsEntry ? i.webkitGetAsEntry() : null));
    try {
      const files = entries.length && entries.every(Boolean) && entries.some((e) => e.isDirectory)
        ? await filesFromEntries(entries) : [...dt.files];
      setFiles(files);
    } catch (err) {
      showError(`Could not read the dropped files: ${err.message || err}`);
    }
  });
  // A file dropped beside the zone must not make the browser navigate away.
  window.addEventListener("dragover", (ev) => ev.preventDefault());
  window.addEventListener("drop", (ev) => ev.preventDefault());
  $("file").addEventListener("change", (ev) => { if (ev.target.files.length) setFiles(ev.target.files); });
}

/* ------------------------------------------------------------------ querying */

function currentK() {
  const k = Math.round(Number($("k").value));
  const ok = Number.isFinite(k) ? Math.min(Math.max(k, 1), MAX_K) : 10;
  $("k").value = ok;
  return ok;
}

async function runQuery() {
  if (state.files.length === 0) return;
  clearError();
  if (state.queryAbort) state.queryAbort.abort();
  const abort = new AbortController();
  state.queryAbort = abort;
  const form = new FormData();
  for (const f of state.files) form.append("file", f, f.name);
  // hashes=true: the page shows the uploaded file's SHA-256 (the API skips hashing unless asked)
  const params = new URLSearchParams({ k: String(currentK()), view: $("view").value, hashes: "true" });
  setStatus(`Searching for ${state.files[0].name}…`, true);
  try {
    const data = await api(`/v1/query?${params}`, { method: "POST", body: form, signal: abort.signal });
    if (abort.signal.aborted) return;
    state.query = data;
    renderQuery(data);
    renderResults(data);
    setStatus(`${data.results.length} result${data.results.length === 1 ? "" : "s"} for ${state.files[0].name}.`, false);
    await showFamily(data.family);
  } catch (err) {
    if (err.name === "AbortError") return;
    state.query = null;
    state.neighbours = new Map();
    $("query-card").hidden = true;
    $("results").replaceChildren();
    $("results-meta").textContent = "";
    $("results-note").textContent = "No results: the query failed.";
    drawOverlay();
    showError(err.message, err.code);
    setStatus("", false);
  } finally {
    if (state.queryAbort === abort) state.queryAbort = null;
  }
}

function renderQuery(data) {
  const info = data.query_lora || {};
  $("query-name").replaceChildren(breakable(info.path || data.query || state.files[0].name));
  const dl = $("query-info");
  dl.replaceChildren();
  fact(dl, "Family", data.family || info.family);
  fact(dl, "Format", info.format);
  fact(dl, "Rank", fmtRank(info.rank));
  fact(dl, "Modules", info.modules);
  fact(dl, "Dtype", info.dtype);
  fact(dl, "Size", fmtBytes(info.bytes));
  if (info.needs_base) fact(dl, "Needs base", "yes (part of the update depends on the base weights)");
  if (info.file_sha256) fact(dl, "SHA-256", el("code", { title: info.file_sha256, text: shortSha(info.file_sha256) }));
  if (info.config) fact(dl, "Config", el("code", { text: info.config }));
  $("query-card").hidden = false;
}

function renderResults(data) {
  const list = $("results");
  list.replaceChildren();
  state.neighbours = new Map();
  const results = Array.isArray(data.results) ? data.results : [];
  results.forEach((r, i) => state.neighbours.set(r.id, { rank: i + 1, score: r.score, name: r.name }));
  const view = data.view || $("view").value;
  $("results-meta").textContent = results.length
    ? `${view} view · ${data.exact ? "exact scores" : "approximate scores"}`
    : "";
  $("results-note").textContent = results.length ? "" : (data.message || "No indexed LoRA is comparable to this one.");
  for (const [i, r] of results.entries()) list.append(resultItem(r, i + 1));
}

function resultItem(r, rank) {
  const score = typeof r.score === "number" ? r.score : null;
  const bar = el("span", { class: "bar", "aria-hidden": "true" },
    el("span", { class: "bar-fill", style: `width:${Math.max(0, Math.min(1, score ?? 0)) * 100}%` }));
  const exact = r.exact === undefined ? null
    : el("span", { class: r.exact ? "badge exact" : "badge approx", title: r.exact
      ? "exact cosine of the full weight updates" : "estimated from sketches", text: r.exact ? "exact" : "approx." });
  const item = el("li", { class: "result", "data-id": r.id },
    el("span", { class: "rank", "aria-hidden": "true", text: rank }),
    el("div", { class: "r-main" },
      el("div", { class: "r-name" },
        el("button", { type: "button", class: "linkish", title: "Show on the map and see details",
          "aria-label": `#${rank} ${r.name}, score ${fmtScore(score)}: show details`,
          onclick: () => select(r.id, true) }, breakable(r.name))),
      whereFrom(r) ? el("div", { class: "r-where", title: whereFrom(r), text: whereFrom(r) }) : null,
      el("div", { class: "r-meta" },
        r.format ? el("span", { class: "badge", text: r.format }) : null,
        exact,
        r.file_sha256 ? el("code", { class: "sha", title: `sha256 ${r.file_sha256}`, text: shortSha(r.file_sha256) }) : null,
        typeof r.shared_modules === "number" ? el("span", { class: "muted", text: `${r.shared_modules} shared modules` }) : null,
        labelChips(r.labels))),
    el("div", { class: "r-score" }, el("span", { class: "score", text: fmtScore(score) }), bar));
  item.addEventListener("mouseenter", () => setHover(r.id));
  item.addEventListener("mouseleave", () => setHover(null));
  return item;
}

/* ------------------------------------------------------------------ families, stats */

async function loadStats() {
  try {
    const s = await api("/v1/stats");
    const fams = s.families ? Object.keys(s.families).length : 0;
    $("stats").textContent = `${s.loras} LoRA${s.loras === 1 ? "" : "s"} indexed in ${fams} famil${fams === 1 ? "y" : "ies"}`;
  } catch (err) {
    $("stats").textContent = `Store unavailable (${err.message})`;
  }
}

async function loadFamilies() {
  try {
    const data = await api("/v1/families");
    const fams = Array.isArray(data) ? data : (data.families || []);
    const select = $("family");
    const keep = select.value;
    select.replaceChildren(el("option", { value: "", text: "—" }));
    for (const f of fams) {
      const name = typeof f === "string" ? f : f.family;
      const label = typeof f === "string" || f.count === undefined ? name : `${name} (${f.count})`;
      select.append(el("option", { value: name, text: label }));
    }
    if (keep) select.value = keep;
    if (!select.value && fams.length === 1 && !state.map) showFamily(select.options[1].value);
  } catch (_) {
    /* the stats line already says when the store is down */
  }
}

function ensureFamilyOption(family) {
  const select = $("family");
  if (![...select.options].some((o) => o.value === family)) select.append(el("option", { value: family, text: family }));
  select.value = family;
}

/* ------------------------------------------------------------------ the map */

async function showFamily(family) {
  if (!family) return;
  ensureFamilyOption(family);
  if (state.mapAbort) state.mapAbort.abort();
  const abort = new AbortController();
  state.mapAbort = abort;
  $("map-meta").textContent = `Loading the map of ${family}…`;
  try {
    const m = await api(`/v1/map?${new URLSearchParams({ family })}`, { signal: abort.signal });
    state.map = m;
    state.selected = null;
    $("detail").hidden = true;
    if (m.stale) recheckStaleMap(family, MAP_RECHECKS);
  } catch (err) {
    if (err.name === "AbortError") return;
    state.map = { family, points: [], missing: err.status === 404 ? "none" : err.message };
  } finally {
    if (state.mapAbort === abort) state.mapAbort = null;
  }
  drawMap();
}

function mapMeta(m) {
  if (m.missing === "none") return `No map for ${m.family} yet: maps are computed when LoRAs are indexed.`;
  if (m.missing) return `The map of ${m.family} could not be loaded (${m.missing}).`;
  const n = m.points.length;
  const method = m.method === "umap" ? "UMAP" : (m.method || "").toUpperCase();
  const total = m.count && m.count > n ? m.count : n;
  const unplaced = Array.isArray(m.unplaced) ? m.unplaced.length : 0;
  const shown = unplaced > 0 ? ` (${unplaced} not placed yet: the map is being updated)`
    : total > n ? ` (${n} shown)` : "";
  const note = m.note ? ` · ${m.note}` : "";
  const how = method ? ` · ${method}` : "";
  return `${m.family}: ${total} LoRA${total === 1 ? "" : "s"}${shown} · ${m.view || "style"} view${how}${note}`;
}

/* A map the server says is behind the store (LoRAs added or deleted since its layout): ask again a few
 * times while the background refresh runs, as long as the same family is shown. */
const MAP_RECHECK_MS = 2500;
const MAP_RECHECKS = 12;
function recheckStaleMap(family, left) {
  if (left <= 0) return;
  setTimeout(async () => {
    if (!state.map || state.map.family !== family || !state.map.stale || state.mapAbort) return;
    try {
      const m = await api(`/v1/map?${new URLSearchParams({ family })}`);
      if (!state.map || state.map.family !== family) return;
      state.map = m;
      drawMap();
      if (m.stale) recheckStaleMap(family, left - 1);
    } catch (err) {
      /* keep the map we have */
    }
  }, MAP_RECHECK_MS);
}

function colours() {
  const cs = getComputedStyle(document.documentElement);
  const v = (name, dflt) => (cs.getPropertyValue(name).trim() || dflt);
  return { dot: v("--dot", "#8a94a6"), dotEdge: v("--dot-edge", "#ffffff") };
}

function drawMap() {
  const box = $("map");
  const canvas = $("map-canvas");
  const m = state.map;
  const w = Math.max(200, Math.round(box.clientWidth));
  const h = Math.round(Math.min(Math.max(w * 0.78, 260), 620));
  box.style.height = `${h}px`;
  const dpr = window.devicePixelRatio || 1;
  canvas.width = Math.round(w * dpr);
  canvas.height = Math.round(h * dpr);
  canvas.style.width = `${w}px`;
  canvas.style.height = `${h}px`;
  const ctx = canvas.getContext("2d");
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, w, h);
  const points = m && Array.isArray(m.points) ? m.points : [];
  canvas.dataset.points = String(points.length);
  $("map-empty").hidden = points.length > 0;
  if (m) $("map-meta").textContent = mapMeta(m);
  if (m && points.length === 0) $("map-empty").textContent = mapMeta(m);
  $("map").setAttribute("aria-label", m && points.length
    ? `Collection map of ${points.length} ${m.family} LoRAs; the query's nearest LoRAs are numbered by rank`
    : "Collection map (empty)");
  const pad = 22;
  const s = Math.max(1, Math.min(w - 2 * pad, h - 2 * pad) / 2);
  const xs = new Float32Array(points.length);
  const ys = new Float32Array(points.length);
  points.forEach((p, i) => { xs[i] = w / 2 + Number(p.x) * s; ys[i] = h / 2 - Number(p.y) * s; });
  const r = points.length > 5000 ? 1.6 : points.length > 500 ? 2.6 : 4.5;
  state.proj = { xs, ys, r, w, h };
  const c = colours();
  ctx.fillStyle = c.dot;
  ctx.globalAlpha = points.length > 5000 ? 0.5 : 0.75;
  ctx.beginPath();
  for (let i = 0; i < points.length; i += 1) {
    ctx.moveTo(xs[i] + r, ys[i]);
    ctx.arc(xs[i], ys[i], r, 0, 2 * Math.PI);
  }
  ctx.fill();
  ctx.globalAlpha = 1;
  drawOverlay();
}

function pointIndex(id) {
  const points = state.map ? state.map.points : [];
  for (let i = 0; i < points.length; i += 1) if (points[i].id === id) return i;
  return -1;
}

/* Neighbours, hover and selection are SVG on top of the canvas: focusable and easy to inspect. */
function drawOverlay() {
  const root = $("map-svg");
  const p = state.proj;
  const focused = root.contains(document.activeElement) ? document.activeElement.dataset.id : null;
  root.replaceChildren();
  if (!p || !state.map) return;
  root.setAttribute("viewBox", `0 0 ${p.w} ${p.h}`);
  root.setAttribute("width", p.w);
  root.setAttribute("height", p.h);
  root.append(svg("g", { id: "map-rings" }));
  const sameFamily = state.query && state.query.family === state.map.family;
  const hits = sameFamily ? [...state.neighbours.entries()].sort((a, b) => a[1].rank - b[1].rank) : [];
  const placed = [];
  for (const [id, nb] of hits) {
    const i = pointIndex(id);
    if (i >= 0) placed.push({ id, nb, x: p.xs[i], y: p.ys[i], mx: p.xs[i], my: p.ys[i] });
  }
  const onMap = placed.length;
  fanOut(placed);
  state.markers = new Map(placed.map((h) => [h.id, [h.mx, h.my]]));
  for (const h of placed) {
    if (h.mx !== h.x || h.my !== h.y) {
      root.append(svg("line", { class: "leader", x1: h.x.toFixed(1), y1: h.y.toFixed(1), x2: h.mx.toFixed(1), y2: h.my.toFixed(1) }));
      root.append(svg("circle", { class: "anchor", cx: h.x.toFixed(1), cy: h.y.toFixed(1), r: 3 }));
    }
  }
  for (const { id, nb, mx, my } of [...placed].reverse()) {
    const top = nb.rank === 1;
    const g = svg("g", { class: top ? "hit top" : "hit", "data-id": id, "data-rank": nb.rank, tabindex: 0,
      role: "button", "aria-label": `#${nb.rank} ${nb.name}, score ${fmtScore(nb.score)}`,
      transform: `translate(${mx.toFixed(1)} ${my.toFixed(1)})` });
    g.append(svg("circle", { r: top ? 11 : 9 }));
    const t = svg("text", { "text-anchor": "middle", dy: "0.35em" });
    t.textContent = String(nb.rank);
    g.append(t);
    g.addEventListener("focus", () => setHover(id));
    g.addEventListener("blur", () => setHover(null));
    g.addEventListener("keydown", (ev) => {
      if (ev.key === "Enter" || ev.key === " ") { ev.preventDefault(); select(id, false); }
    });
    root.append(g);
  }
  root.dataset.hits = String(onMap);
  const missing = hits.length - onMap;
  if (sameFamily && missing > 0) {
    $("map-meta").textContent = `${mapMeta(state.map)} · ${missing} result${missing === 1 ? " is" : "s are"} not on the map yet`;
  }
  if (focused) root.querySelector(`.hit[data-id="${CSS.escape(focused)}"]`)?.focus();
  drawRings();
}

/* Hover and selection rings only: the markers stay, so keyboard focus on a marker survives. */
function drawRings() {
  const layer = document.getElementById("map-rings");
  const p = state.proj;
  if (!layer || !p) { showTooltip(); return; }
  layer.replaceChildren();
  for (const [id, cls] of [[state.selected, "ring selected"], [state.hover, "ring hover"]]) {
    if (id === null || id === undefined) continue;
    const i = pointIndex(id);
    if (i >= 0) layer.append(svg("circle", { class: cls, cx: p.xs[i].toFixed(1), cy: p.ys[i].toFixed(1), r: 15 }));
  }
  showTooltip();
}

/* Neighbours at (nearly) the same spot, e.g. copies of one LoRA, are spread on a small circle
 * around it with leader lines, so every rank stays visible. Sets mx/my on each item. */
function fanOut(items) {
  const groups = [];
  for (const h of items) {
    const g = groups.find((gr) => (gr[0].x - h.x) ** 2 + (gr[0].y - h.y) ** 2 < 18 ** 2);
    if (g) g.push(h); else groups.push([h]);
  }
  for (const g of groups) {
    if (g.length < 2) continue;
    const rad = Math.max(20, g.length * 5.5);
    g.forEach((h, j) => {
      const a = -Math.PI / 2 + (2 * Math.PI * j) / g.length;
      h.mx = g[0].x + rad * Math.cos(a);
      h.my = g[0].y + rad * Math.sin(a);
    });
  }
}

function nearestPoint(mx, my) {
  const p = state.proj;
  if (!p) return -1;
  let best = -1;
  let bestD = (Math.max(HIT_PX, p.r + 4)) ** 2;
  for (let i = 0; i < p.xs.length; i += 1) {
    const d = (p.xs[i] - mx) ** 2 + (p.ys[i] - my) ** 2;
    if (d <= bestD) { bestD = d; best = i; }
  }
  return best;
}

function setHover(id) {
  if (state.hover === id) return;
  state.hover = id;
  document.querySelectorAll(".result.hovered").forEach((n) => n.classList.remove("hovered"));
  if (id !== null) document.querySelector(`.result[data-id="${CSS.escape(String(id))}"]`)?.classList.add("hovered");
  drawRings();
}

function showTooltip() {
  const tip = $("tooltip");
  const id = state.hover;
  const i = id === null ? -1 : pointIndex(id);
  if (i < 0 || !state.proj) { tip.hidden = true; return; }
  const pt = state.map.points[i];
  const nb = state.query && state.query.family === state.map.family ? state.neighbours.get(id) : null;
  tip.replaceChildren(...[
    el("strong", { text: pt.name }),
    nb ? el("span", { class: "tip-line", text: `#${nb.rank} · score ${fmtScore(nb.score)}` }) : null,
    pt.format ? el("span", { class: "tip-line muted", text: pt.format }) : null,
    labelChips(pt.labels),
  ].filter(Boolean));
  tip.hidden = false;
  const { w } = state.proj;
  const [x, y] = (state.markers && state.markers.get(id)) || [state.proj.xs[i], state.proj.ys[i]];
  const tw = tip.offsetWidth;
  const left = Math.min(Math.max(x - tw / 2, 4), w - tw - 4);
  const top = y - tip.offsetHeight - 16 < 4 ? y + 16 : y - tip.offsetHeight - 16;
  tip.style.left = `${left}px`;
  tip.style.top = `${top}px`;
}

function bindMap() {
  const box = $("map");
  const local = (ev) => {
    const rect = box.getBoundingClientRect();
    return [ev.clientX - rect.left, ev.clientY - rect.top];
  };
  // A numbered marker (possibly fanned out beside its point) wins over the nearest plain point.
  const target = (ev) => {
    const hit = ev.target.closest && ev.target.closest(".hit");
    if (hit) return Number(hit.dataset.id);
    const i = nearestPoint(...local(ev));
    return i >= 0 ? state.map.points[i].id : null;
  };
  box.addEventListener("mousemove", (ev) => {
    const id = target(ev);
    box.classList.toggle("pointing", id !== null);
    setHover(id);
  });
  box.addEventListener("mouseleave", () => setHover(null));
  box.addEventListener("click", (ev) => {
    const id = target(ev);
    if (id !== null) select(id, false);
  });
  let pending = false;
  const redraw = () => {
    if (pending) return;
    pending = true;
    requestAnimationFrame(() => {
      pending = false;
      // only a new width needs a new drawing (the details panel opening below must not rebuild the markers)
      if (state.map && (!state.proj || Math.round(box.clientWidth) !== state.proj.w)) drawMap();
    });
  };
  if (window.ResizeObserver) new ResizeObserver(redraw).observe(box);
  else window.addEventListener("resize", redraw);
  matchMedia("(prefers-color-scheme: dark)").addEventListener?.("change", () => state.map && drawMap());
}

/* ------------------------------------------------------------------ details of one LoRA */

async function select(id, scroll) {
  state.selected = id;
  drawRings();
  const panel = $("detail");
  panel.hidden = false;
  panel.replaceChildren(el("p", { class: "muted", text: "Loading…" }));
  try {
    const d = await api(`/v1/loras/${encodeURIComponent(id)}`);
    if (state.selected !== id) return;
    const nb = state.neighbours.get(id);
    const dl = el("dl", { class: "facts" });
    if (nb && state.query && state.query.family === d.family) fact(dl, "Score", `${fmtScore(nb.score)} (#${nb.rank})`);
    fact(dl, "Family", d.family);
    fact(dl, "Format", d.format);
    fact(dl, "Rank", fmtRank({ min: d.rank_min, max: d.rank_max }));
    fact(dl, "Modules", d.modules);
    fact(dl, "Dtype", d.dtype);
    fact(dl, "Size", fmtBytes(d.bytes));
    fact(dl, "From", whereFrom(d));
    if (Array.isArray(d.sources) && d.sources.length > 1) fact(dl, "Also seen", `${d.sources.length - 1} more place(s)`);
    if (d.file_sha256) fact(dl, "SHA-256", el("code", { class: "wrap", text: d.file_sha256 }));
    fact(dl, "Labels", labelChips(d.labels));
    fact(dl, "Indexed", d.added_at);
    panel.replaceChildren(
      el("div", { class: "detail-head" },
        el("h3", {}, breakable(d.name)),
        el("button", { type: "button", class: "close", "aria-label": "Close details", text: "×",
          onclick: () => { state.selected = null; panel.hidden = true; drawRings(); } })),
      dl);
    if (scroll && state.map && pointIndex(id) >= 0) $("map").scrollIntoView({ block: "nearest", behavior: "smooth" });
  } catch (err) {
    if (state.selected === id) panel.replaceChildren(el("p", { class: "error-inline", text: err.message }));
  }
}

/* ------------------------------------------------------------------ start */

function init() {
  bindDrop();
  bindMap();
  $("query-form").addEventListener("submit", (ev) => { ev.preventDefault(); runQuery(); });
  $("view").addEventListener("change", () => runQuery());
  $("k").addEventListener("change", () => runQuery());
  $("family").addEventListener("change", (ev) => showFamily(ev.target.value));
  loadStats();
  loadFamilies();
}

if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
else init();
