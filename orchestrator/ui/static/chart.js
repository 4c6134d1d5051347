// A small canvas line chart for bucketed metrics: a min..max band per bucket (so a one-step spike
// stays visible at any zoom) under a mean line; drag to zoom, markers for events.
// The element exposes what it plotted on data- attributes, so tests and benchmarks can read it.
"use strict";

const PAD = { left: 58, right: 12, top: 10, bottom: 24 };

function niceTicks(lo, hi, count) {
  if (!(hi > lo)) return [lo];
  const raw = (hi - lo) / count;
  const mag = Math.pow(10, Math.floor(Math.log10(raw)));
  const step = [1, 2, 5, 10].map((m) => m * mag).find((s) => s >= raw) || raw;
  const ticks = [];
  for (let t = Math.ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) ticks.push(t);
  return ticks;
}

function fmt(v) {
  if (v === null || v === undefined) return "NaN";
  const a = Math.abs(v);
  if (a !== 0 && (a >= 1e6 || a < 1e-3)) return v.toExponential(2);
  return String(Number(v.toPrecision(4)));
}

class LineChart {
  constructor(root, { onZoom, height = 220 } = {}) {
    this.root = root;
    this.onZoom = onZoom;
    this.canvas = document.createElement("canvas");
    this.canvas.className = "chart-canvas";
    this.canvas.style.height = height + "px";
    this.sel = document.createElement("div");
    this.sel.className = "chart-selection";
    this.tip = document.createElement("div");
    this.tip.className = "chart-tip";
    root.classList.add("chart");
    root.append(this.canvas, this.sel, this.tip);
    this.data = { series: [], markers: [] };
    this.draws = 0;
    this._mouse();
  }

  setData(data) {
    this.data = data;
    this.draw();
  }

  _extent() {
    let xlo = Infinity, xhi = -Infinity, ylo = Infinity, yhi = -Infinity;
    let maxV = -Infinity, maxStep = null, maxLast = null, count = 0;
    for (const s of this.data.series) {
      for (const p of s.points) {
        count++;
        const top = p.max ?? p.value, bottom = p.min ?? p.value, last = p.last_step ?? p.step;
        if (top !== null && top > yhi) yhi = top;
        if (bottom !== null && bottom < ylo) ylo = bottom;
        if (top !== null && top > maxV) { maxV = top; maxStep = p.step; maxLast = last; }
        if (p.step < xlo) xlo = p.step;
        if (last > xhi) xhi = last;
      }
    }
    if (this.data.lo !== undefined && this.data.lo !== null) xlo = this.data.lo;
    if (this.data.hi !== undefined && this.data.hi !== null) xhi = this.data.hi;
    if (!isFinite(ylo)) { ylo = 0; yhi = 1; }
    if (yhi === ylo) { yhi += 0.5; ylo -= 0.5; }
    const pad = (yhi - ylo) * 0.05;
    if (!isFinite(xlo)) { xlo = 0; xhi = 1; }
    if (xhi <= xlo) xhi = xlo + 1;
    return { xlo, xhi, ylo: ylo - pad, yhi: yhi + pad, maxV, maxStep, maxLast, count };
  }

  draw() {
    const c = this.canvas, dpr = window.devicePixelRatio || 1;
    const w = c.clientWidth || 600, h = c.clientHeight || 220;
    c.width = Math.round(w * dpr);
    c.height = Math.round(h * dpr);
    const g = c.getContext("2d");
    g.setTransform(dpr, 0, 0, dpr, 0, 0);
    g.clearRect(0, 0, w, h);
    const e = this._extent();
    this.extent = e;
    const pw = w - PAD.left - PAD.right, ph = h - PAD.top - PAD.bottom;
    const X = (s) => PAD.left + ((s - e.xlo) / (e.xhi - e.xlo)) * pw;
    const Y = (v) => PAD.top + (1 - (v - e.ylo) / (e.yhi - e.ylo)) * ph;
    this.X = X;
    // axes and grid
    g.font = "11px sans-serif";
    g.fillStyle = "#555";
    g.strokeStyle = "#e4e4e4";
    g.lineWidth = 1;
    g.textAlign = "right";
    g.textBaseline = "middle";
    for (const t of niceTicks(e.ylo, e.yhi, 5)) {
      g.beginPath(); g.moveTo(PAD.left, Y(t)); g.lineTo(w - PAD.right, Y(t)); g.stroke();
      g.fillText(fmt(t), PAD.left - 4, Y(t));
    }
    g.textAlign = "center";
    g.textBaseline = "top";
    for (const t of niceTicks(e.xlo, e.xhi, Math.max(2, Math.floor(pw / 90)))) {
      g.fillText(fmt(t), X(t), h - PAD.bottom + 4);
    }
    g.save();
    g.beginPath(); g.rect(PAD.left, PAD.top, pw, ph); g.clip();
    // markers (events, restarts) under the data
    for (const m of this.data.markers || []) {
      if (m.step < e.xlo || m.step > e.xhi) continue;
      g.strokeStyle = m.color || "#d33";
      g.setLineDash([3, 3]);
      g.beginPath(); g.moveTo(X(m.step), PAD.top); g.lineTo(X(m.step), PAD.top + ph); g.stroke();
      g.setLineDash([]);
    }
    for (const s of this.data.series) this._series(g, s, X, Y);
    g.restore();
    g.strokeStyle = "#999";
    g.strokeRect(PAD.left, PAD.top, pw, ph);
    this.draws++;
    const d = this.root.dataset;
    d.points = String(e.count);
    d.max = e.maxV === -Infinity ? "" : String(e.maxV);
    d.maxStep = e.maxStep === null ? "" : String(e.maxStep);
    d.maxLastStep = e.maxLast === null ? "" : String(e.maxLast);
    d.lo = String(e.xlo);
    d.hi = String(e.xhi);
    d.full = String(!!this.data.full);
    d.series = String(this.data.series.length);
    d.draws = String(this.draws);
  }

  _series(g, s, X, Y) {
    const pts = s.points;
    if (!pts.length) return;
    if (s.band !== false) {  // min..max per bucket: a spike inside a bucket still shows
      g.fillStyle = s.color;
      g.globalAlpha = 0.25;
      for (const p of pts) {
        if (p.min === null || p.max === null || p.min === undefined) continue;
        // a bucket covers steps step..last_step: half a step either side, at least one pixel
        const x0 = X(p.step - 0.5), x1 = Math.max(x0 + 1, X((p.last_step ?? p.step) + 0.5));
        const y0 = Y(p.max), y1 = Y(p.min);
        // a one-pixel bucket holding a spike must still catch the eye: narrow bands are drawn stronger
        g.globalAlpha = x1 - x0 < 3 ? 0.6 : 0.25;
        g.fillRect(x0, y0, Math.max(2, x1 - x0), Math.max(1, y1 - y0));
      }
      g.globalAlpha = 1;
    }
    g.strokeStyle = s.color;
    g.lineWidth = s.width || 1.5;
    g.setLineDash(s.dashed ? [5, 4] : []);
    g.beginPath();
    let open = false;
    for (const p of pts) {
      if (p.value === null) { open = false; continue; }  // NaN: a gap, not a fake value
      const x = (X(p.step) + X(p.last_step ?? p.step)) / 2, y = Y(p.value);
      if (open) g.lineTo(x, y); else g.moveTo(x, y);
      open = true;
    }
    g.stroke();
    g.setLineDash([]);
  }

  stepAt(px) {
    const e = this.extent, w = this.canvas.clientWidth;
    const f = (px - PAD.left) / (w - PAD.left - PAD.right);
    return Math.round(e.xlo + Math.min(1, Math.max(0, f)) * (e.xhi - e.xlo));
  }

  _mouse() {
    let start = null;
    const rel = (ev) => ev.clientX - this.canvas.getBoundingClientRect().left;
    this.canvas.addEventListener("mousedown", (ev) => { start = rel(ev); ev.preventDefault(); });
    window.addEventListener("mousemove", (ev) => {
      if (start === null) return this._hover(ev);
      const x = rel(ev);
      this.sel.style.display = "block";
      this.sel.style.left = Math.min(start, x) + "px";
      this.sel.style.width = Math.abs(x - start) + "px";
    });
    window.addEventListener("mouseup", (ev) => {
      if (start === null) return;
      const x = rel(ev), x0 = start;
      start = null;
      this.sel.style.display = "none";
      if (Math.abs(x - x0) > 4 && this.onZoom) {
        const a = this.stepAt(Math.min(x, x0)), b = this.stepAt(Math.max(x, x0));
        if (b > a) this.onZoom(a, b);
      }
    });
    this.canvas.addEventListener("mouseleave", () => { this.tip.style.display = "none"; });
  }

  _hover(ev) {
    const r = this.canvas.getBoundingClientRect();
    if (!this.extent || ev.clientX < r.left || ev.clientX > r.right || ev.clientY < r.top || ev.clientY > r.bottom) {
      this.tip.style.display = "none";
      return;
    }
    const step = this.stepAt(ev.clientX - r.left);
    const lines = [];
    for (const s of this.data.series) {
      const p = s.points.find((q) => (q.last_step ?? q.step) >= step);
      if (p) lines.push(`${s.label}: ${fmt(p.value)}` + (p.max !== undefined && p.max !== p.min ? ` [${fmt(p.min)}..${fmt(p.max)}]` : ""));
    }
    this.tip.textContent = `step ${step}\n` + lines.join("\n");
    this.tip.style.display = lines.length ? "block" : "none";
    this.tip.style.left = Math.min(ev.clientX - r.left + 12, r.width - 200) + "px";
    this.tip.style.top = "4px";
  }
}

window.LineChart = LineChart;
window.fmtNumber = fmt;
