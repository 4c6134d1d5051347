// The UI's pages: runs table, run page, compare, lineage. Routing is by location.hash.
// Every user string goes into the DOM through textContent (el() below), never as HTML.
"use strict";

const COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2"];
const RUNS_REFRESH_MS = 3000;
const RUN_REFRESH_MS = 5000;
let pageTimer = null;  // the current page's refresh timer, cleared on navigation
let pageId = 0;        // bumps on navigation so late answers for an old page are dropped

function el(tag, attrs, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") e.className = v;
    else if (k === "text") e.textContent = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else if (k === "dataset") Object.assign(e.dataset, v);
    else e.setAttribute(k, v === true ? "" : String(v));
  }
  for (const kid of kids.flat(Infinity)) {
    if (kid === null || kid === undefined || kid === false) continue;
    e.append(kid instanceof Node ? kid : document.createTextNode(String(kid)));
  }
  return e;
}

async function api(path) {
  const r = await fetch("/api/" + path, { headers: { Accept: "application/json" } });
  const body = await r.json().catch(() => ({ error: `HTTP ${r.status}` }));
  if (!r.ok) throw new Error(body.error || `HTTP ${r.status}`);
  return body;
}

const num = (v) => (v === null || v === undefined ? "-" : window.fmtNumber(v));
// one formatter for every date: toLocaleString() builds a new one per call (slow over 1,000 rows)
const DATE_FMT = new Intl.DateTimeFormat(undefined, { dateStyle: "short", timeStyle: "medium" });
const when = (t) => (t ? DATE_FMT.format(new Date(t * 1000)) : "-");
function duration(s) {
  if (s === null || s === undefined) return "-";
  s = Math.max(0, Math.round(s));
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), sec = s % 60;
  return h ? `${h}h${String(m).padStart(2, "0")}m` : m ? `${m}m${String(sec).padStart(2, "0")}s` : `${sec}s`;
}
const runLink = (id, text) => el("a", { href: "#/run/" + encodeURIComponent(id), text: text || id });
const statusBadge = (s) => el("span", { class: "status status-" + s, text: s });
const tagList = (tags) => Object.entries(tags || {}).map(([k, v]) => el("span", { class: "tag", text: v ? `${k}=${v}` : k }));

// replaceChildren with nested arrays and nulls flattened away (replaceChildren would stringify them)
function mount(parent, ...kids) {
  parent.replaceChildren(...kids.flat(Infinity).filter((k) => k !== null && k !== undefined && k !== false));
}
function setStatus(text) { document.getElementById("status-line").textContent = text; }
function later(fn, ms) { clearTimeout(pageTimer); pageTimer = setTimeout(fn, ms); }

// --- runs table --------------------------------------------------------------------------

const RUN_COLUMNS = [
  ["", null], ["status", "status"], ["name", "name"], ["id", "id"], ["tags", null], ["parent", "parent"],
  ["last loss", "last_loss"], ["best loss", "best_loss"], ["tokens/s", "tokens_per_s"], ["step", "last_step"],
  ["started", "created_at"], ["duration", "duration"], ["restarts", "restarts"],
];
const RUNS_PAGE = 200;  // rows drawn at a time: a 1,000-row table costs the browser a second of layout
const runsState = { sort: "created_at", dir: -1, filter: "", status: "", selected: new Set(), data: null, limit: RUNS_PAGE };

function pageRuns(id) {
  const app = document.getElementById("app");
  const filter = el("input", { type: "search", id: "runs-filter", placeholder: "filter: name, id, tag, status", value: runsState.filter });
  const status = el("select", { id: "runs-status" }, ["", "running", "completed", "failed", "interrupted", "stopped", "lost"].map(
    (s) => el("option", { value: s, text: s || "any status", selected: s === runsState.status })));
  const compareBtn = el("button", { id: "compare-selected", text: "Compare selected" });
  const count = el("span", { class: "muted", id: "runs-count" });
  const thead = el("tr", {}, RUN_COLUMNS.map(([label, key]) => el("th", {
    class: key ? "sortable" : null, dataset: key ? { key } : {}, text: label,
    onclick: key ? () => { runsState.dir = runsState.sort === key ? -runsState.dir : 1; runsState.sort = key; render(); } : null,
  })));
  const tbody = el("tbody");
  const table = el("table", { id: "runs-table" }, el("thead", {}, thead), tbody);
  const more = el("button", { id: "runs-more", onclick: () => { runsState.limit += RUNS_PAGE * 4; render(); } });
  mount(app, el("h1", { text: "Runs" }), el("div", { class: "toolbar" }, filter, status, compareBtn, count), table, more);
  filter.addEventListener("input", () => { runsState.filter = filter.value; render(); });
  status.addEventListener("change", () => { runsState.status = status.value; render(); });
  compareBtn.addEventListener("click", () => {
    const ids = [...runsState.selected];
    if (ids.length >= 2) location.hash = "#/compare?runs=" + ids.map(encodeURIComponent).join(",");
    else setStatus("select two or more runs to compare");
  });

  function render() {
    const data = runsState.data;
    if (!data) return;
    const f = runsState.filter.toLowerCase();
    let rows = data.runs.map((r) => ({ ...r, duration: (r.ended_at || data.now) - r.created_at }));
    rows = rows.filter((r) => (!runsState.status || r.status === runsState.status) && (!f ||
      [r.name, r.id, r.status, r.parent || "", ...Object.entries(r.tags).map(([k, v]) => `${k}=${v}`)].join(" ").toLowerCase().includes(f)));
    const k = runsState.sort, d = runsState.dir;
    rows.sort((a, b) => {
      const x = a[k], y = b[k];
      if (x === y) return 0;
      if (x === null || x === undefined) return 1;
      if (y === null || y === undefined) return -1;
      return (x < y ? -1 : 1) * d;
    });
    for (const th of thead.children) {
      th.classList.toggle("sorted-asc", th.dataset.key === k && d === 1);
      th.classList.toggle("sorted-desc", th.dataset.key === k && d === -1);
    }
    const frag = document.createDocumentFragment();
    for (const r of rows.slice(0, runsState.limit)) {
      const box = el("input", { type: "checkbox", class: "select-run", checked: runsState.selected.has(r.id) });
      box.addEventListener("change", () => { box.checked ? runsState.selected.add(r.id) : runsState.selected.delete(r.id); });
      frag.append(el("tr", { dataset: { runId: r.id } },
        el("td", {}, box), el("td", {}, statusBadge(r.status)), el("td", {}, runLink(r.id, r.name)),
        el("td", { class: "muted", text: r.id }), el("td", {}, tagList(r.tags)),
        el("td", {}, r.parent ? [runLink(r.parent), el("span", { class: "fork-step", text: ` @${r.fork_step}` })] : "-"),
        el("td", { class: "num", text: num(r.last_loss) }), el("td", { class: "num", text: num(r.best_loss) }),
        el("td", { class: "num", text: num(r.tokens_per_s) }), el("td", { class: "num", text: r.last_step ?? "-" }),
        el("td", { text: when(r.created_at) }), el("td", { class: "num", text: duration(r.duration) }),
        el("td", { class: "num", text: r.restarts ?? "-" })));
    }
    tbody.replaceChildren(frag);
    const shown = Math.min(rows.length, runsState.limit);
    table.dataset.rows = String(rows.length);
    table.dataset.shown = String(shown);
    count.textContent = `${rows.length} of ${data.runs.length} runs` + (shown < rows.length ? `, first ${shown} shown` : "");
    more.textContent = `show ${Math.min(RUNS_PAGE * 4, rows.length - shown)} more`;
    more.hidden = shown >= rows.length;
    performance.mark("runs-rendered");  // read by bench/ui_responsiveness.py
  }

  let last = "";
  async function refresh() {
    try {
      const data = await api("runs");
      if (id !== pageId) return;
      const text = JSON.stringify(data.runs);
      runsState.data = data;
      if (text !== last) { last = text; render(); }
      setStatus(`updated ${new Date().toLocaleTimeString()}`);
    } catch (e) {
      setStatus("refresh failed: " + e.message);
    }
    if (id === pageId && !document.hidden) later(refresh, RUNS_REFRESH_MS);
    else if (id === pageId) later(refresh, RUNS_REFRESH_MS * 4);
  }
  render();
  refresh();
}

// --- one metric chart (used by the run page and compare) ---------------------------------

// sources: [{run, label, color, rank?}]; a fork's inherited history is drawn dashed.
function metricCard(key, sources, { markers = [], ranks = false, live = () => false } = {}) {
  const box = el("div", { class: "chart-host" });
  const note = el("span", { class: "note" });
  const rankBox = el("input", { type: "checkbox", class: "per-rank" });
  const head = el("div", { class: "card-head" }, el("span", { class: "title", text: key }),
    ranks ? el("label", { class: "note" }, rankBox, " per rank") : null,
    el("button", { class: "zoom-in", title: "zoom in", text: "+" }),
    el("button", { class: "zoom-out", title: "zoom out", text: "\u2212" }),
    el("button", { class: "zoom-reset", title: "whole run", text: "reset" }), note);
  const card = el("div", { class: "card metric-card", dataset: { key } }, head, box);
  const state = { lo: null, hi: null, span: null, seq: 0 };
  const chart = new LineChart(box, { onZoom: (a, b) => load(a, b) });

  async function fetchOne(src, rank, lo, hi) {
    const width = Math.max(200, Math.min(2000, Math.round(box.clientWidth || 800)));
    let q = `run/${encodeURIComponent(src.run)}/metric?key=${encodeURIComponent(key)}&buckets=${width}`;
    if (rank !== null && rank !== undefined) q += `&rank=${rank}`;
    if (lo !== null) q += `&lo=${lo}&hi=${hi}`;
    return api(q);
  }

  async function load(lo = state.lo, hi = state.hi) {
    const seq = ++state.seq;
    state.lo = lo; state.hi = hi;
    note.textContent = "loading\u2026";
    try {
      const series = [];
      let full = true, span = null;
      for (const [i, src] of sources.entries()) {
        const base = await fetchOne(src, src.rank ?? null, lo, hi);
        span = span || base.span;
        if (base.span && span) span = [Math.min(span[0], base.span[0]), Math.max(span[1], base.span[1])];
        const color = src.color || COLORS[i % COLORS.length];
        if (base.inherited.length) series.push({ label: src.label + " (inherited)", color: "#888", dashed: true, points: base.inherited });
        if (rankBox.checked && base.ranks.length > 1) {
          const per = await Promise.all(base.ranks.slice(0, 16).map((r) => fetchOne(src, r, lo, hi)));
          per.forEach((m, j) => series.push({ label: `rank ${base.ranks[j]}`, color: COLORS[j % COLORS.length], band: false, points: m.points }));
        } else {
          series.push({ label: src.label, color, points: base.points });
        }
        full = full && base.full;
      }
      if (seq !== state.seq) return;  // a newer zoom superseded this one
      state.span = span;
      const zoomed = lo !== null;
      chart.setData({ series, markers, full, lo: zoomed ? lo : null, hi: zoomed ? hi : null });
      note.textContent = (full ? "full resolution" : "bucketed") + (zoomed ? ` \u00b7 steps ${lo}\u2013${hi}` : "");
    } catch (e) {
      note.textContent = "error: " + e.message;
    }
  }

  function zoomBy(factor) {
    const e = chart.extent;
    if (!e) return;
    const mid = (e.xlo + e.xhi) / 2, half = Math.max(1, ((e.xhi - e.xlo) * factor) / 2);
    let a = Math.round(mid - half), b = Math.round(mid + half);
    if (state.span && a <= state.span[0] && b >= state.span[1]) return load(null, null);
    load(a, Math.max(b, a + 1));
  }
  head.querySelector(".zoom-in").addEventListener("click", () => zoomBy(0.5));
  head.querySelector(".zoom-out").addEventListener("click", () => zoomBy(2));
  head.querySelector(".zoom-reset").addEventListener("click", () => load(null, null));
  box.addEventListener("dblclick", () => load(null, null));
  rankBox.addEventListener("change", () => load());
  card.load = load;
  card.refresh = () => { if (state.lo === null && live()) load(); };
  return card;
}

// Load charts as they scroll into view: a run with many sys/* keys costs nothing until seen.
const lazy = new IntersectionObserver((entries) => {
  for (const en of entries) if (en.isIntersecting) { lazy.unobserve(en.target); en.target.load(); }
}, { rootMargin: "200px" });

// --- run page ----------------------------------------------------------------------------

function kvTable(rows) {
  return el("table", { class: "kv" }, rows.filter(([, v]) => v !== null && v !== undefined && v !== "")
    .map(([k, v]) => el("tr", {}, el("th", { text: k }), el("td", {}, v))));
}

function lineageTree(node) {
  const item = (n) => el("li", { class: n.current ? "current" : null, dataset: { runId: n.id } },
    n.current ? el("span", { class: "node-name", text: n.name }) : runLink(n.id, n.name), " ",
    el("span", { class: "muted", text: n.id }), " ", statusBadge(n.status),
    n.fork_step !== null ? el("span", { class: "fork-step", text: ` forked at step ${n.fork_step}` }) : null,
    n.children.length ? el("ul", {}, n.children.map(item)) : null);
  return el("div", { class: "tree", id: "lineage" }, el("ul", {}, item(node)));
}

function keyGroup(k) {
  if (k.startsWith("sys/")) return "System";
  if (k.startsWith("ckpt/")) return "Checkpoint timings";
  if (k.startsWith("train/") || k.startsWith("eval/")) return "Training";
  return "Other";
}
const KEY_ORDER = ["train/loss", "eval/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "train/step_time_s"];
const keyRank = (k) => (KEY_ORDER.includes(k) ? KEY_ORDER.indexOf(k) : 100);

async function pageRun(id, ref) {
  const app = document.getElementById("app");
  mount(app, el("p", { class: "muted", text: "loading\u2026" }));
  let run;
  try { run = await api("run/" + encodeURIComponent(ref)); } catch (e) {
    mount(app, el("p", { class: "error", text: e.message }));
    return;
  }
  if (id !== pageId) return;
  const meta = run.meta || {}, git = meta.git || {}, versions = meta.versions || {};
  const hosts = [...new Set((meta.workers || []).map((w) => w.hostname || w.node_ip || "?"))].join(", ");
  const info = kvTable([
    ["id", run.id], ["status", statusBadge(run.status)], ["started", when(run.created_at)], ["ended", when(run.ended_at)],
    ["duration", duration((run.ended_at || run.now) - run.created_at)], ["workers", run.world_size],
    ["driver host", run.host], ["worker hosts", hosts],
    ["git commit", run.git_commit ? run.git_commit + (git.dirty ? " (uncommitted changes)" : "") : null],
    ["versions", Object.entries(versions).map(([k, v]) => `${k} ${typeof v === "object" ? JSON.stringify(v) : v}`).join(", ")],
    ["command", run.command], ["forked from", run.parent ? [runLink(run.parent), ` at step ${run.fork_step}`] : null],
    ["tags", Object.keys(run.tags || {}).length ? tagList(run.tags) : null], ["error", run.error],
  ]);
  const summary = run.summary ? kvTable(Object.entries(run.summary).map(([k, v]) => [k, typeof v === "number" ? num(v) : JSON.stringify(v)])) : null;
  const live = () => run.status === "running";

  const markers = [];
  for (const e of run.events) if (e.step !== null) markers.push({ step: e.step, color: "#d62728", label: e.message });
  for (const a of run.attempts) if (a.failed_step !== null) markers.push({ step: a.failed_step, color: "#ff7f0e", label: `attempt ${a.attempt} failed` });
  for (const a of run.attempts) if (a.attempt > 0 && a.resumed_from_step !== null) markers.push({ step: a.resumed_from_step, color: "#2ca02c", label: `attempt ${a.attempt} resumed` });

  const groups = {};
  const keys = run.metric_keys.filter((k) => !k.includes("fingerprint")).sort((a, b) => keyRank(a) - keyRank(b) || (a < b ? -1 : 1));
  for (const k of keys) (groups[keyGroup(k)] ||= []).push(k);
  const cards = [];
  const chartSections = ["Training", "System", "Checkpoint timings", "Other"].filter((g) => groups[g]).map((g) => {
    const gridCards = groups[g].map((k) => metricCard(k, [{ run: run.id, label: run.name }], { markers, ranks: true, live }));
    cards.push(...gridCards);
    const legend = g === "Training" && markers.length ?
      el("p", { class: "muted", text: "dashed lines: red = alert or diagnosis, orange = attempt failed, green = resumed from a checkpoint; drag to zoom" }) : null;
    return [el("h2", { text: g }), legend, el("div", { class: "grid" }, gridCards)];
  });

  const eventsTable = run.events.length ? el("table", { id: "events" }, el("tr", {}, ["time", "step", "rank", "severity", "kind", "message"].map((h) => el("th", { text: h }))),
    run.events.map((e) => el("tr", {}, el("td", { text: when(e.time) }), el("td", { class: "num", text: e.step ?? "-" }),
      el("td", { class: "num", text: e.rank ?? "-" }), el("td", { class: "sev-" + e.severity, text: e.severity }),
      el("td", { text: e.kind }), el("td", { text: e.message })))) : el("p", { class: "muted", text: "no alerts or diagnoses" });
  const attempts = run.attempts.length ? el("table", { id: "attempts" },
    el("tr", {}, ["attempt", "started", "ended", "status", "resumed from", "failed at", "steps lost", "recovery", "cause", "message"].map((h) => el("th", { text: h }))),
    run.attempts.map((a) => el("tr", {}, el("td", { class: "num", text: a.attempt }), el("td", { text: when(a.started_at) }),
      el("td", { text: when(a.ended_at) }), el("td", { text: a.status || "running" }), el("td", { class: "num", text: a.resumed_from_step ?? "-" }),
      el("td", { class: "num", text: a.failed_step ?? "-" }), el("td", { class: "num", text: a.steps_lost ?? "-" }),
      el("td", { class: "num", text: a.recovery_s !== null ? a.recovery_s.toFixed(1) + "s" : "-" }),
      el("td", { text: a.cause || "" }), el("td", { text: [a.message, a.rank !== null ? `rank ${a.rank}` : "", a.node || ""].filter(Boolean).join(" \u00b7 ") })))) :
    el("p", { class: "muted", text: "no attempts recorded" });
  const ckpt = el("div", { id: "checkpoints" }, el("p", { class: "muted", text: "loading\u2026" }));
  const notes = run.notes.map((n) => el("li", {}, el("span", { class: "muted", text: when(n.time) + " " }), n.text));
  const compareLink = run.parent ? el("a", { href: `#/compare?runs=${encodeURIComponent(run.parent)},${encodeURIComponent(run.id)}`, text: "compare with parent" }) : null;

  mount(app, 
    el("h1", {}, run.name, " ", statusBadge(run.status)),
    el("div", { class: "toolbar" }, el("span", { class: "muted", text: run.id }), compareLink),
    el("div", { class: "top" }, el("div", {}, info),
      el("div", {}, summary ? [el("h2", { text: "Summary" }), summary] : null,
        el("h2", { text: "Lineage" }), lineageTree(run.lineage))),
    chartSections.length ? chartSections : el("p", { class: "muted", text: "no metrics yet" }),
    el("h2", { text: "Alerts and diagnoses" }), eventsTable,
    el("h2", { text: "Attempts and restarts" }), attempts,
    el("h2", { text: "Checkpoints" }), ckpt,
    notes.length ? [el("h2", { text: "Notes" }), el("ul", {}, notes)] : null,
    el("h2", { text: "Config" }), el("pre", { class: "config", text: JSON.stringify(run.config, null, 2) }),
  );
  cards.forEach((c) => lazy.observe(c));
  loadCheckpoints(run.id, ckpt);
  // live: charts that are not zoomed reload in place; new keys, events or a status change re-render the page
  const shape = (r) => JSON.stringify([r.status, r.metric_keys, r.events.length, r.attempts.length]);
  const tick = async () => {
    if (id !== pageId) return;
    const now = await api("run/" + encodeURIComponent(run.id)).catch(() => run);
    if (id !== pageId) return;
    if (shape(now) !== shape(run)) return pageRun(id, run.id);
    cards.forEach((c) => c.refresh());
    later(tick, RUN_REFRESH_MS);
  };
  if (live()) later(tick, RUN_REFRESH_MS);
}

async function loadCheckpoints(runId, box) {
  const rep = await api(`run/${encodeURIComponent(runId)}/checkpoints`).catch((e) => ({ available: false, error: e.message }));
  if (!rep.available) { box.replaceChildren(el("p", { class: "muted", text: "checkpoint report unavailable: " + rep.error })); return; }
  if (!rep.checkpoints.length) { box.replaceChildren(el("p", { class: "muted", text: `no checkpoints (${rep.uri})` })); return; }
  const mb = (b) => (b === null || b === undefined ? "-" : (b / 1048576).toFixed(1) + " MB");
  const s = (x) => (x === null || x === undefined ? "-" : x.toFixed(2) + "s");
  box.replaceChildren(el("p", { class: "muted", text: rep.uri + (rep.location_error ? ` (unreachable: ${rep.location_error})` : "") }),
    el("table", {}, el("tr", {}, ["step", "status", "size", "blocked", "upload", "kept", "error"].map((h) => el("th", { text: h }))),
      rep.checkpoints.map((c) => el("tr", {}, el("td", { class: "num", text: c.step }), el("td", { text: c.status }),
        el("td", { class: "num", text: mb(c.bytes) }), el("td", { class: "num", text: s(c.blocked_s) }),
        el("td", { class: "num", text: s(c.upload_s) }), el("td", { text: c.present ? "yes" : "no" }), el("td", { text: c.error || "" })))));
}

// --- compare -----------------------------------------------------------------------------

async function pageCompare(id, refs) {
  const app = document.getElementById("app");
  mount(app, el("p", { class: "muted", text: "loading\u2026" }));
  let cmp;
  try { cmp = await api("compare?runs=" + refs.map(encodeURIComponent).join(",")); } catch (e) {
    mount(app, el("p", { class: "error", text: e.message }));
    return;
  }
  if (id !== pageId) return;
  const sources = cmp.runs.map((r, i) => ({ run: r.id, label: r.name + " " + r.id, color: COLORS[i % COLORS.length] }));
  const legend = el("div", { class: "legend" }, sources.map((s) => el("span", {}, el("span", { class: "swatch", dataset: { color: s.color } }), runLink(s.run, s.label))));
  legend.querySelectorAll(".swatch").forEach((sw) => { sw.style.background = sw.dataset.color; });
  const keys = cmp.metric_keys.filter((k) => !k.includes("fingerprint"));
  const first = keys.includes("train/loss") ? "train/loss" : keys[0];
  const select = el("select", { id: "compare-key" }, keys.map((k) => el("option", { value: k, text: k, selected: k === first })));
  const holder = el("div", { id: "compare-chart" });
  const show = (k) => { const c = metricCard(k, sources); holder.replaceChildren(c); c.load(); };
  select.addEventListener("change", () => show(select.value));
  const metricRows = Object.entries(cmp.metrics).flatMap(([k, per]) => ["last", "best"].map((what) =>
    el("tr", {}, el("th", { text: `${k} ${what}` }), cmp.runs.map((r) => el("td", { class: "num", text: num((per[r.id] || {})[what]) })))));
  const onlyDiff = el("input", { type: "checkbox", id: "only-diff", checked: true });
  const cfgBody = el("tbody");
  const drawCfg = () => cfgBody.replaceChildren(...cmp.config.filter((c) => c.differs || !onlyDiff.checked).map((c) =>
    el("tr", { class: c.differs ? "differs" : null, dataset: { key: c.key } }, el("th", { text: c.key }),
      c.values.map((v) => el("td", { text: v === undefined || v === null ? "-" : JSON.stringify(v) })))));
  onlyDiff.addEventListener("change", drawCfg);
  const head = el("tr", {}, el("th"), cmp.runs.map((r) => el("th", {}, runLink(r.id, r.name))));
  mount(app, el("h1", { text: `Compare ${cmp.runs.length} runs` }), legend,
    el("div", { class: "toolbar" }, "metric ", select), holder,
    el("h2", { text: "Key metrics" }), el("table", { id: "compare-metrics" }, head.cloneNode(true), metricRows),
    el("h2", { text: "Config" }), el("label", {}, onlyDiff, " only differences (highlighted)"),
    el("table", { id: "config-diff" }, el("thead", {}, head), cfgBody));
  drawCfg();
  if (first) show(first);
}

// --- routing -----------------------------------------------------------------------------

function route() {
  const id = ++pageId;
  clearTimeout(pageTimer);
  const h = location.hash.replace(/^#/, "") || "/";
  const [path, q] = h.split("?");
  const params = new URLSearchParams(q || "");
  if (path.startsWith("/run/")) return pageRun(id, decodeURIComponent(path.slice(5)));
  if (path === "/compare") return pageCompare(id, (params.get("runs") || "").split(",").filter(Boolean));
  return pageRuns(id);
}

window.addEventListener("hashchange", route);
route();
