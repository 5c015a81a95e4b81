// The Batches tab: submit a file of responses (JSONL), follow its progress, read its report
// and the longest-match plot. Uses app.js's helpers ($, el, api, status, pct, ownerHeaders):
// batch routes need a key (an owner key or the admin key, entered on the Data owners tab or here).
"use strict";

let batchTimer = null;

async function submitBatch(ev) {
  ev.preventDefault();
  const file = $("batch-file").files[0];
  const jsonl = file ? await file.text() : $("batch-text").value;
  if (!jsonl.trim()) return status("batch-status", "Choose a JSONL file or paste one JSON object per line.", true);
  if (!ownerKey()) return status("batch-status", "Enter a key on the Data owners tab first (batch routes need one).", true);
  status("batch-status", "Submitting…");
  try {
    const r = await api("POST", "/api/batches", { jsonl, spec: { use_model: !$("batch-spans-only").checked } },
      ownerHeaders());
    status("batch-status", `Batch ${r.batch_id} started.`);
    pollBatch(r.batch_id);
  } catch (e) { status("batch-status", e.message, true); }
}

async function pollBatch(id) {
  clearTimeout(batchTimer);
  try {
    const st = await api("GET", `/api/batches/${id}`, null, ownerHeaders());
    const p = st.progress || { done: 0, total: st.n_rows };
    await showBatchReport(id);  // the report first: once the status says done, the final report is on the page
    $("batch-progress").hidden = false;
    $("batch-progress").max = p.total || 1;
    $("batch-progress").value = p.done || 0;
    const eta = p.eta_s == null ? "" : `, ETA ${Math.round(p.eta_s)} s`;
    status("batch-status", `Batch ${id}: ${p.done}/${p.total} rows, ${p.errors || 0} bad, ` +
      `${(p.rate_per_s || 0).toFixed(1)} rows/s${eta} (${p.state || "running"})` + (p.error ? `: ${p.error}` : ""),
      p.state === "failed");
    if (!st.complete && p.state !== "failed") batchTimer = setTimeout(() => pollBatch(id), 1000);
  } catch (e) { status("batch-status", e.message, true); }
}

async function showBatchReport(id) {
  const rep = await api("GET", `/api/batches/${id}/report`, null, ownerHeaders());
  const [n1, n2] = [rep.thresholds[0], rep.thresholds[rep.thresholds.length - 1]];
  const rows = [...rep.sources, rep.overall].map((s) => el("tr", {},
    el("td", {}, s.source), el("td", {}, s.owner || ""), el("td", {}, pct(s[`share_ge_${n1}`])),
    el("td", {}, pct(s[`share_ge_${n2}`])), el("td", {}, pct(s[`token_share_ge_${n1}`]))));
  const box = $("batch-report");
  box.replaceChildren(
    el("h2", {}, `Reproduction per source (${rep.n_ok} responses)`),
    el("table", { class: "batch-sources" },
      el("tr", {}, ...["source", "owner", `responses ≥ ${n1}`, `responses ≥ ${n2}`, `tokens in ≥ ${n1}`].map((h) => el("th", {}, h))),
      ...rows));
  const res = await fetch(`/api/batches/${id}/plot.png`, { headers: ownerHeaders() });
  if (res.ok) {
    const img = el("img", { alt: "longest verbatim match per response", class: "batch-plot" });
    img.src = URL.createObjectURL(await res.blob());
    box.append(img);
  }
  box.hidden = false;
}

$("batch-form").addEventListener("submit", submitBatch);
