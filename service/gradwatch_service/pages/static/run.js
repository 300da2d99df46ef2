// gradwatch run page: loss and gradient norm (log scale, incidents and non-finite steps marked), per-layer
// gradient norms as a heatmap with the root-cause layer outlined, and the update-to-weight ratio. Reads
// /ui/runs/{id}/data (the API's downsampled series) and refreshes while the run is running. No dependencies.
// What is drawn is also kept in window.__gradwatch, so tests (and curious people) can check it.
"use strict";

(function () {
  const root = document.getElementById("run");
  if (!root) return;
  const runId = root.dataset.runId;
  const maxPoints = Number(root.dataset.maxPoints) || 1000;
  const REFRESH_MS = 2000;
  const LEFT = 150, RIGHT = 16, TOP = 26, BOTTOM = 26;
  const COLORS = {loss: "#2563eb", grad_norm: "#d97706", ratio: "#0d9488", critical: "#dc2626",
                  warning: "#f59e0b", nonfinite: "#9333ea", grid: "#e5e7eb", axis: "#6b7280", text: "#111827"};
  const ZERO = "#c4c9d1";  // a heatmap cell whose norm is 0 (a dead layer), or a layer with no positive value
  const state = window.__gradwatch = {runId: runId, loads: 0, loaded: false, error: null, run: null,
                                      incidents: [], charts: {}};

  function num(v) {
    if (v === null || v === undefined) return null;
    if (v === "NaN") return NaN;
    if (v === "Infinity") return Infinity;
    if (v === "-Infinity") return -Infinity;
    return v;
  }
  function isBad(v) { return v !== null && !Number.isFinite(v); }
  function fmt(v) {
    if (v === null) return "—";
    if (Number.isNaN(v)) return "NaN";
    if (!Number.isFinite(v)) return v > 0 ? "Infinity" : "-Infinity";
    const a = Math.abs(v);
    return a !== 0 && (a >= 1e5 || a < 1e-3) ? v.toExponential(2) : String(Number(v.toPrecision(4)));
  }

  function tick(v) {  // an axis label: 0.01, 1, 100, 1e+6
    return v >= 1e-3 && v < 1e5 ? String(Number(v.toPrecision(2))) : v.toExponential(0).replace("e+", "e");
  }

  function canvasFor(id) {
    const canvas = document.getElementById(id);
    const dpr = window.devicePixelRatio || 1;
    const w = Math.max(320, canvas.clientWidth), h = canvas.clientHeight || Number(canvas.getAttribute("height"));
    canvas.width = Math.round(w * dpr);
    canvas.height = Math.round(h * dpr);
    const ctx = canvas.getContext("2d");
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, w, h);
    ctx.font = "11px system-ui, sans-serif";
    return {ctx: ctx, w: w, h: h, pw: w - LEFT - RIGHT, ph: h - TOP - BOTTOM};
  }

  function stepDomain(data) {
    let lo = Infinity, hi = -Infinity;
    for (const s of data.series) {
      if (s.steps.length) { lo = Math.min(lo, s.steps[0]); hi = Math.max(hi, s.steps[s.steps.length - 1]); }
    }
    if (data.run.last_step !== null) hi = Math.max(hi, data.run.last_step);
    if (!Number.isFinite(lo)) { lo = 0; hi = 0; }
    return [lo, hi + 1];  // step s is drawn over [s, s + 1): the last step has a width too
  }

  function xOf(c, dom, step) { return LEFT + (step - dom[0]) / (dom[1] - dom[0]) * c.pw; }

  function logDomain(lists) {
    let lo = Infinity, hi = -Infinity;
    for (const values of lists) {
      for (const v of values) if (v !== null && Number.isFinite(v) && v > 0) { lo = Math.min(lo, v); hi = Math.max(hi, v); }
    }
    if (!Number.isFinite(lo)) return [-3, 0];
    let a = Math.log10(lo), b = Math.log10(hi);
    if (b - a < 0.5) { a -= 0.25; b += 0.25; }
    const pad = (b - a) * 0.05;
    return [a - pad, b + pad];
  }

  function yOf(c, ydom, v) { return TOP + c.ph - (Math.log10(v) - ydom[0]) / (ydom[1] - ydom[0]) * c.ph; }

  function axes(c, dom, ydom) {
    const ctx = c.ctx;
    ctx.strokeStyle = COLORS.grid; ctx.fillStyle = COLORS.axis; ctx.lineWidth = 1;
    if (ydom) {
      const span = ydom[1] - ydom[0];
      const mult = span < 1.5 ? [1, 2, 5] : [1];
      const every = Math.max(1, Math.ceil(span / 8));
      ctx.textAlign = "right"; ctx.textBaseline = "middle";
      for (let e = Math.floor(ydom[0]); e <= Math.ceil(ydom[1]); e++) {
        if (e % every !== 0) continue;
        for (const m of mult) {
          const v = m * Math.pow(10, e), y = yOf(c, ydom, v);
          if (y < TOP - 0.5 || y > TOP + c.ph + 0.5) continue;
          ctx.beginPath(); ctx.moveTo(LEFT, y); ctx.lineTo(LEFT + c.pw, y); ctx.stroke();
          ctx.fillText(tick(v), LEFT - 6, y);
        }
      }
    }
    ctx.textAlign = "center"; ctx.textBaseline = "top";
    const n = Math.max(2, Math.floor(c.pw / 110));
    const raw = (dom[1] - dom[0]) / n, mag = Math.pow(10, Math.floor(Math.log10(raw)));
    const stepEvery = [1, 2, 5, 10].map(function (k) { return k * mag; }).find(function (k) { return k >= raw; });
    for (let s = Math.ceil(dom[0] / stepEvery) * stepEvery; s <= dom[1]; s += stepEvery) {
      ctx.fillText(String(Math.round(s)), xOf(c, dom, s), TOP + c.ph + 6);
    }
    ctx.strokeStyle = COLORS.axis;
    ctx.strokeRect(LEFT + 0.5, TOP + 0.5, c.pw, c.ph);
  }

  function nonfiniteMarks(c, dom, steps) {  // one band per run of steps less than 3 px apart
    const ctx = c.ctx;
    ctx.fillStyle = COLORS.nonfinite; ctx.globalAlpha = 0.25;
    let i = 0;
    while (i < steps.length) {
      let j = i;
      while (j + 1 < steps.length && xOf(c, dom, steps[j + 1]) - xOf(c, dom, steps[j] + 1) < 3) j++;
      const x0 = Math.floor(xOf(c, dom, steps[i])), x1 = Math.ceil(xOf(c, dom, steps[j] + 1));
      ctx.fillRect(x0, TOP, Math.max(2, x1 - x0), c.ph);
      i = j + 1;
    }
    ctx.globalAlpha = 1;
    if (steps.length) {
      ctx.textAlign = "left"; ctx.textBaseline = "bottom"; ctx.fillStyle = COLORS.nonfinite;
      ctx.fillText("non-finite from step " + steps[0], Math.min(xOf(c, dom, steps[0]) + 3, LEFT + c.pw - 140), TOP - 2);
    }
  }

  function incidentMarks(c, dom, incidents, labels) {
    const ctx = c.ctx;
    const sorted = incidents.slice().sort(function (a, b) { return a.opened_step - b.opened_step; });
    sorted.forEach(function (inc, i) {
      const x = Math.round(xOf(c, dom, inc.opened_step)) + 0.5;
      ctx.strokeStyle = COLORS[inc.severity] || COLORS.critical; ctx.lineWidth = 1.5;
      ctx.setLineDash([5, 3]);
      ctx.beginPath(); ctx.moveTo(x, TOP); ctx.lineTo(x, TOP + c.ph); ctx.stroke();
      ctx.setLineDash([]);
      if (labels) {
        ctx.fillStyle = ctx.strokeStyle; ctx.textAlign = x > LEFT + c.pw - 120 ? "right" : "left";
        ctx.textBaseline = "top";
        ctx.fillText(inc.signature + " @" + inc.opened_step, x + (ctx.textAlign === "left" ? 4 : -4), TOP + 4 + (i % 4) * 13);
      }
    });
    ctx.lineWidth = 1;
  }

  function line(c, dom, ydom, steps, values, color) {
    const ctx = c.ctx;
    ctx.strokeStyle = color; ctx.lineWidth = 1.5; ctx.beginPath();
    let open = false;
    for (let i = 0; i < steps.length; i++) {
      const v = values[i];
      if (v === null || !Number.isFinite(v) || v <= 0) { open = false; continue; }
      const x = xOf(c, dom, steps[i]), y = yOf(c, ydom, v);
      if (open) ctx.lineTo(x, y); else { ctx.moveTo(x, y); if (steps.length === 1) ctx.lineTo(x + 1, y); }
      open = true;
    }
    ctx.stroke(); ctx.lineWidth = 1;
  }

  function legend(c, items) {
    const ctx = c.ctx;
    let x = LEFT;
    ctx.textAlign = "left"; ctx.textBaseline = "middle";
    for (const [label, color] of items) {
      ctx.fillStyle = color; ctx.fillRect(x, 8, 14, 3);
      ctx.fillStyle = COLORS.text; ctx.fillText(label, x + 18, 10);
      x += 24 + ctx.measureText(label).width + 12;
    }
  }

  function message(c, text) {
    c.ctx.fillStyle = COLORS.axis; c.ctx.textAlign = "center"; c.ctx.textBaseline = "middle";
    c.ctx.fillText(text, LEFT + c.pw / 2, TOP + c.ph / 2);
  }

  function badSteps(list) {
    const out = new Set();
    for (const s of list) s.values.forEach(function (v, i) { if (isBad(v)) out.add(s.steps[i]); });
    return Array.from(out).sort(function (a, b) { return a - b; });
  }

  function drawMain(data, scalars, dom) {
    const c = canvasFor("chart-main");
    const shown = ["loss", "grad_norm"].filter(function (f) { return scalars[f]; });
    const ydom = logDomain(shown.map(function (f) { return scalars[f].values; }));
    axes(c, dom, ydom);
    const bad = badSteps(shown.map(function (f) { return scalars[f]; }));
    nonfiniteMarks(c, dom, bad);
    incidentMarks(c, dom, data.incidents, true);
    for (const f of shown) line(c, dom, ydom, scalars[f].steps, scalars[f].values, COLORS[f]);
    legend(c, [["loss", COLORS.loss], ["grad norm", COLORS.grad_norm]]);
    if (!shown.some(function (f) { return scalars[f].steps.length; })) message(c, "no steps yet");
    state.charts.main = {domain: dom, nonfinite_steps: bad,
                         incidents: data.incidents.map(function (i) { return i.opened_step; }),
                         series: Object.fromEntries(shown.map(function (f) { return [f, scalars[f].raw]; }))};
  }

  function median(values) {
    const v = values.filter(function (x) { return x !== null && Number.isFinite(x) && x > 0; }).sort(function (a, b) { return a - b; });
    return v.length ? v[Math.floor(v.length / 2)] : null;
  }

  function heatColor(r) {  // r: log10 of value / the layer's median, clamped to [-2, 2]
    const t = Math.max(-1, Math.min(1, r / 2));
    if (t >= 0) return "rgb(" + Math.round(245 - 25 * t) + "," + Math.round(245 - 205 * t) + "," + Math.round(245 - 205 * t) + ")";
    return "rgb(" + Math.round(245 + 205 * t) + "," + Math.round(245 + 120 * t) + "," + Math.round(245 + 15 * t) + ")";
  }

  function drawHeatmap(data, layerGrad, dom) {
    const canvas = document.getElementById("chart-heatmap");
    const layers = data.layers.filter(function (l) { return layerGrad[l]; });
    const rows = Math.max(1, layers.length);
    const rowH = Math.max(3, Math.min(18, Math.floor(420 / rows)));
    canvas.style.height = (rows * rowH + TOP + BOTTOM) + "px";
    const c = canvasFor("chart-heatmap");
    const ctx = c.ctx;
    const cells = {};
    if (!layers.length) { message(c, "no per-layer gradient norms logged"); state.charts.heatmap = {layers: [], root_cause: null}; return; }
    layers.forEach(function (name, r) {
      const s = layerGrad[name], m = median(s.values), y = TOP + r * rowH;
      cells[name] = {median: m, steps: s.raw.steps, values: s.raw.values};
      for (let i = 0; i < s.steps.length; i++) {
        const v = s.values[i];
        if (v === null) continue;
        const x0 = Math.floor(xOf(c, dom, s.steps[i]));  // whole pixels: no seams between cells
        const x1 = Math.ceil(xOf(c, dom, i + 1 < s.steps.length ? s.steps[i + 1] : s.steps[i] + 1));
        ctx.fillStyle = !Number.isFinite(v) ? COLORS.nonfinite : (v > 0 && m ? heatColor(Math.log10(v / m)) : ZERO);
        ctx.fillRect(x0, y, Math.max(1, x1 - x0), rowH);
      }
      ctx.fillStyle = name === data.root_cause ? COLORS.critical : COLORS.text;
      ctx.font = (name === data.root_cause ? "bold " : "") + Math.min(11, rowH) + "px system-ui, sans-serif";
      ctx.textAlign = "right"; ctx.textBaseline = "middle";
      if (rowH >= 7 || name === data.root_cause) {
        let label = name;
        while (ctx.measureText(label).width > LEFT - 14 && label.length > 4) label = "…" + label.slice(2);
        ctx.fillText(label, LEFT - 6, y + rowH / 2);
      }
    });
    ctx.font = "11px system-ui, sans-serif";
    incidentMarks(c, dom, data.incidents, false);
    const r = layers.indexOf(data.root_cause);
    if (r >= 0) {
      ctx.strokeStyle = COLORS.critical; ctx.lineWidth = 2;
      ctx.strokeRect(LEFT - 1, TOP + r * rowH - 1, c.pw + 2, rowH + 2);
      ctx.lineWidth = 1;
    }
    const c2 = {ctx: ctx, pw: c.pw, ph: rows * rowH};
    axes(c2, dom, null);
    ctx.textAlign = "left"; ctx.textBaseline = "middle"; ctx.fillStyle = COLORS.text;
    let x = LEFT;
    for (const [label, color] of [["÷ median: 0.01", heatColor(-2)], ["1", heatColor(0)], ["100", heatColor(2)],
                                  ["zero", ZERO], ["non-finite", COLORS.nonfinite], ["root cause", null]]) {
      if (color) { ctx.fillStyle = color; ctx.fillRect(x, 5, 12, 10); } else { ctx.strokeStyle = COLORS.critical; ctx.lineWidth = 2; ctx.strokeRect(x, 5, 12, 10); ctx.lineWidth = 1; }
      ctx.strokeStyle = COLORS.grid; ctx.strokeRect(x + 0.5, 5.5, 12, 10);
      ctx.fillStyle = COLORS.text; ctx.fillText(label, x + 16, 10);
      x += 28 + ctx.measureText(label).width;
    }
    if (data.layers.length < data.run.layers.length) {
      ctx.fillStyle = COLORS.axis; ctx.textAlign = "right";
      ctx.fillText(data.layers.length + " of " + data.run.layers.length + " layers", LEFT + c.pw, 10);
    }
    state.charts.heatmap = {layers: layers, root_cause: data.root_cause, cells: cells};
  }

  function nearest(s, step) {  // the value of series s at the stored step nearest to `step`
    let lo = 0, hi = s.steps.length - 1;
    if (hi < 0) return null;
    while (lo < hi) { const mid = (lo + hi) >> 1; if (s.steps[mid] < step) lo = mid + 1; else hi = mid; }
    if (lo > 0 && Math.abs(s.steps[lo - 1] - step) < Math.abs(s.steps[lo] - step)) lo -= 1;
    return s.values[lo];
  }

  function drawRatio(data, scalars, layerWeight, dom) {
    const c = canvasFor("chart-ratio");
    const upd = scalars.update_norm;
    const weights = data.layers.map(function (l) { return layerWeight[l]; }).filter(function (s) { return s && s.steps.length; });
    const steps = [], values = [];
    if (upd && weights.length) {
      upd.steps.forEach(function (step, i) {
        let sq = 0, known = 0;
        for (const w of weights) { const v = nearest(w, step); if (v !== null) { sq += v * v; known++; } }
        const u = upd.values[i];
        if (u === null || !known) return;
        steps.push(step); values.push(u / Math.sqrt(sq));
      });
    }
    const ydom = logDomain([values]);
    axes(c, dom, ydom);
    nonfiniteMarks(c, dom, steps.filter(function (s, i) { return isBad(values[i]); }));
    incidentMarks(c, dom, data.incidents.filter(function (i) { return i.signature === "update_ratio"; }), true);
    line(c, dom, ydom, steps, values, COLORS.ratio);
    legend(c, [["update norm ÷ weight norm" + (data.layers.length < data.run.layers.length ? " (weights of the layers shown)" : ""), COLORS.ratio]]);
    if (!steps.length) message(c, upd ? "no weight norms logged" : "no update norms logged");
    state.charts.ratio = {steps: steps, values: values.map(function (v) { return Number.isFinite(v) ? v : String(v); })};
  }

  function decoded(s) { return {steps: s.steps, values: s.values.map(num), raw: {steps: s.steps, values: s.values}}; }

  function render(data) {
    const scalars = {}, layerGrad = {}, layerWeight = {};
    for (const s of data.series) {
      if (s.layer === null) scalars[s.field] = decoded(s);
      else if (s.field === "layer_grad_norms") layerGrad[s.layer] = decoded(s);
      else if (s.field === "layer_weight_norms") layerWeight[s.layer] = decoded(s);
    }
    const dom = stepDomain(data);
    drawMain(data, scalars, dom);
    drawHeatmap(data, layerGrad, dom);
    drawRatio(data, scalars, layerWeight, dom);
  }

  function renderHead(data) {
    const status = document.getElementById("run-status");
    status.textContent = data.run.status;
    status.className = "status " + data.run.status;
    document.getElementById("run-steps").textContent = String(data.run.n_steps);
    document.getElementById("run-last-step").textContent = data.run.last_step === null ? "—" : String(data.run.last_step);
    const body = document.querySelector("#incidents tbody");
    body.replaceChildren();
    if (!data.incidents.length) {
      const tr = body.insertRow(), td = tr.insertCell();
      tr.className = "empty"; td.colSpan = 6; td.textContent = "no incidents";
    }
    for (const i of data.incidents) {
      const tr = body.insertRow();
      tr.className = i.status; tr.dataset.incident = i.id;
      tr.insertCell().textContent = String(i.opened_step);
      const sev = document.createElement("span");
      sev.className = "sev " + i.severity; sev.textContent = i.severity;
      tr.insertCell().appendChild(sev);
      tr.insertCell().textContent = i.signature;
      tr.insertCell().textContent = i.layer || "—";
      tr.insertCell().textContent = i.status + (i.resolved_step === null ? "" : " at " + i.resolved_step);
      tr.insertCell().textContent = i.message;
    }
  }

  async function load() {
    let data = null;
    try {
      const url = "/ui/runs/" + encodeURIComponent(runId) + "/data?max_points=" + maxPoints;
      const r = await fetch(url, {credentials: "same-origin", headers: {Accept: "application/json"}});
      if (r.status === 401) { window.location.assign("/login?next=" + encodeURIComponent(window.location.pathname)); return; }
      if (!r.ok) throw new Error("HTTP " + r.status);
      data = await r.json();
      state.error = null;
      document.getElementById("load-error").hidden = true;
    } catch (err) {
      state.error = String(err);
      const box = document.getElementById("load-error");
      box.textContent = "could not load the run (" + state.error + "); retrying";
      box.hidden = false;
      setTimeout(load, REFRESH_MS * 2);
      return;
    }
    state.data = data; state.run = data.run; state.incidents = data.incidents;
    renderHead(data);
    render(data);
    state.loads += 1; state.loaded = true; state.loadedAt = Date.now();
    if (state.loads === 1) state.firstDrawnMs = performance.now();  // since navigation started
    if (data.run.status === "running") setTimeout(load, REFRESH_MS);
  }

  let resizeTimer = null;
  window.addEventListener("resize", function () {
    clearTimeout(resizeTimer);
    resizeTimer = setTimeout(function () { if (state.data) render(state.data); }, 150);
  });
  load();
})();
