// gradwatch runs list: the server renders it; this refreshes its rows every few seconds from /ui/runs.
"use strict";

(function () {
  const table = document.getElementById("runs");
  if (!table) return;
  const REFRESH_MS = 3000;
  const state = window.__gradwatch = {runs: null, loads: 0, error: null};

  function fmt(v) {
    if (v === null || v === undefined) return "—";
    if (typeof v === "string") return v;  // "NaN", "Infinity", "-Infinity"
    const a = Math.abs(v);
    return a !== 0 && (a >= 1e5 || a < 1e-3) ? v.toExponential(3) : String(Number(v.toPrecision(4)));
  }

  function valueCell(tr, v) {
    const td = tr.insertCell();
    td.textContent = fmt(v);
    if (typeof v === "string") td.className = "nonfinite";
  }

  function render(listed) {
    const body = table.tBodies[0];
    body.replaceChildren();
    if (!listed.runs.length) {
      const tr = body.insertRow(), td = tr.insertCell();
      tr.className = "empty"; td.colSpan = 8; td.textContent = "no runs yet";
    }
    for (const r of listed.runs) {
      const tr = body.insertRow();
      tr.dataset.runId = r.run_id;
      const first = tr.insertCell(), a = document.createElement("a");
      a.href = "/runs/" + encodeURIComponent(r.run_id); a.textContent = r.run_id;
      first.appendChild(a);
      if (r.name) { const sub = document.createElement("div"); sub.className = "sub"; sub.textContent = r.name; first.appendChild(sub); }
      tr.insertCell().textContent = r.project;
      const status = document.createElement("span");
      status.className = "status " + r.status; status.textContent = r.status;
      tr.insertCell().appendChild(status);
      tr.insertCell().textContent = r.last_step === null ? "—" : String(r.last_step);
      valueCell(tr, r.loss);
      valueCell(tr, r.grad_norm);
      const open = tr.insertCell();
      if (!r.open_criticals && !r.open_warnings) { open.className = "none"; open.textContent = "0"; }
      for (const [n, sev] of [[r.open_criticals, "critical"], [r.open_warnings, "warning"]]) {
        if (!n) continue;
        const s = document.createElement("span");
        s.className = "sev " + sev; s.textContent = n + " " + sev;
        open.appendChild(s); open.append(" ");
      }
      tr.insertCell().textContent = r.updated_at.replace("T", " ").replace(/\.\d+/, "").replace(/(Z|\+00:00)$/, " UTC");
    }
    const count = document.getElementById("runs-count");
    count.textContent = listed.count > listed.runs.length ? listed.runs.length + " of " + listed.count : String(listed.count);
  }

  async function load() {
    try {
      const q = new URLSearchParams();
      if (table.dataset.project) q.set("project", table.dataset.project);
      if (table.dataset.status) q.set("status", table.dataset.status);
      const r = await fetch("/ui/runs?" + q.toString(), {credentials: "same-origin", headers: {Accept: "application/json"}});
      if (r.status === 401) { window.location.assign("/login?next=/"); return; }
      if (!r.ok) throw new Error("HTTP " + r.status);
      const listed = await r.json();
      state.runs = listed.runs; state.loads += 1; state.error = null;
      render(listed);
    } catch (err) {
      state.error = String(err);
    }
    setTimeout(load, REFRESH_MS);
  }
  load();
})();
