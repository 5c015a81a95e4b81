// The flexolmo-trace page: trace a response (or generate one), show its spans, documents
// and experts; and, for data owners, a source's contribution and its on/off switch.
// Plain DOM, no build step, nothing fetched but this service's /api. Text from the
// service is always inserted with textContent, never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k === "on") for (const [ev, fn] of Object.entries(v)) node.addEventListener(ev, fn);
    else if (v !== null && v !== undefined && v !== false) node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

// The owner key (the source owner's, or the admin key `flexolmo serve` printed): owner routes
// need it. Kept in this tab's sessionStorage only, never on disk or in localStorage.
const ownerKey = () => ($("owner-key") && $("owner-key").value.trim()) || sessionStorage.getItem("owner-key") || "";
const ownerHeaders = () => (ownerKey() ? { Authorization: `Bearer ${ownerKey()}` } : {});

// Before an owner action: without a key, ask for one instead of sending the request.
function askForKey(what) {
  if (ownerKey()) return false;
  status("owner-status", `Enter the owner key above to ${what}: the source owner's key or the admin key ` +
    "(owner actions need one).", true);
  $("owner-key").focus();
  return true;
}

// The capability token of this tab's stored traces: the service hands it back with the first
// stored trace (header X-Flexolmo-Token); sent with every request, it alone reads them back.
// Kept in this tab's sessionStorage only, as the owner key is.
const TOKEN_HEADER = "X-Flexolmo-Token";
const traceToken = () => sessionStorage.getItem("trace-token") || "";

async function api(method, path, body, extraHeaders = {}) {
  const res = await fetch(path, {
    method,
    headers: { ...(body ? { "Content-Type": "application/json" } : {}),
      ...(traceToken() ? { [TOKEN_HEADER]: traceToken() } : {}), ...extraHeaders },
    body: body ? JSON.stringify(body) : undefined,
  });
  if (res.headers.get(TOKEN_HEADER)) sessionStorage.setItem("trace-token", res.headers.get(TOKEN_HEADER));
  const data = await res.json().catch(() => ({}));
  if (!res.ok) {
    const d = data.detail;
    const msg = typeof d === "string" ? d : Array.isArray(d) ? d.map((x) => x.msg).join("; ") : res.statusText;
    throw new Error(`${res.status}: ${msg}`);
  }
  return data;
}

function status(id, text, isError = false) {
  const node = $(id);
  node.textContent = text;
  node.classList.toggle("error", isError);
}

const pct = (x) => `${(100 * x).toFixed(0)}%`;

// Character offsets from the service count code points (Python); JS strings count UTF-16
// units, so slice arrays of code points.
function cut(text, a, b) {
  const cps = Array.from(text);
  return [cps.slice(0, a).join(""), cps.slice(a, b).join(""), cps.slice(b).join("")];
}

// ---------------------------------------------------------------------------------------
// trace view

let current = null; // the trace on screen

async function runTrace(path, body, label) {
  status("trace-status", `${label}…`);
  for (const b of document.querySelectorAll("#trace-view button")) b.disabled = true;
  try {
    const t = await api("POST", path, body);
    status("trace-status", "");
    showTrace(t);
    loadMine();
  } catch (e) {
    status("trace-status", e.message, true);
  } finally {
    for (const b of document.querySelectorAll("#trace-view button")) b.disabled = false;
  }
}

// A pasted trace streams (POST /api/trace/stream, server-sent events): the spans are shown
// as soon as they are found, the experts filled in when they arrive, for the same trace id.
async function streamTrace(body) {
  status("trace-status", "Tracing…");
  for (const b of document.querySelectorAll("#trace-view button")) b.disabled = true;
  try {
    const res = await fetch("/api/trace/stream", {
      method: "POST", body: JSON.stringify(body),
      headers: { "Content-Type": "application/json", ...(traceToken() ? { [TOKEN_HEADER]: traceToken() } : {}) } });
    if (res.headers.get(TOKEN_HEADER)) sessionStorage.setItem("trace-token", res.headers.get(TOKEN_HEADER));
    if (!res.ok) {
      const d = (await res.json().catch(() => ({}))).detail;
      throw new Error(`${res.status}: ${typeof d === "string" ? d : Array.isArray(d) ? d.map((x) => x.msg).join("; ") : res.statusText}`);
    }
    const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += value;
      let cut_at;
      while ((cut_at = buf.indexOf("\n\n")) >= 0) {
        const block = buf.slice(0, cut_at);
        buf = buf.slice(cut_at + 2);
        const kind = (block.match(/^event: (.*)$/m) || [])[1];
        const data = JSON.parse((block.match(/^data: (.*)$/m) || [, "null"])[1]);
        if (kind === "spans") {
          showTrace(data);
          status("trace-status", `${data.spans.length} spans found; finding the experts…`);
        } else if (kind === "experts") {
          fillExperts(data);
          status("trace-status", "");
          loadMine();
        } else if (kind === "error") {
          if (current && current.trace_id === data.trace_id) {  // the spans stay; the experts will not come
            current.experts_pending = false;
            current.experts_missing = data.detail;
            showTrace(current);
          }
          throw new Error(`${data.status}: ${data.detail}`);
        }
      }
    }
  } catch (e) {
    status("trace-status", e.message, true);
  } finally {
    for (const b of document.querySelectorAll("#trace-view button")) b.disabled = false;
  }
}

function fillExperts(part) {
  if (!current || current.trace_id !== part.trace_id) return;
  for (const s of part.spans) Object.assign(current.spans[s.index], s);
  current.timings_ms = part.timings_ms;
  delete current.experts_pending;
  const open = document.querySelector("#response mark.selected");
  showTrace(current);
  if (open) showGroup(Number(open.dataset.group));
}

function showTrace(t) {
  current = t;
  $("result").hidden = false;
  $("detail").hidden = true;
  if (t.experts_pending) {  // the line of figures waits for the whole trace (its total time)
    $("result-meta").replaceChildren();
  } else {
    showMeta(t);
  }
  $("result-prompt").replaceChildren(t.prompt ? el("p", { class: "prompt" }, el("b", {}, "Prompt: "), t.prompt) : "");
  showResponse(t);
}

function showMeta(t) {
  const skipped = Object.entries(t.sources_skipped).map(([k, v]) => `${k} (${v})`);
  $("result-meta").replaceChildren(
    `${t.generated ? "Generated" : "Pasted"} · ${t.n_tokens} tokens · ${t.spans.length} spans in ${t.groups.length} groups · `,
    `searched ${t.sources_searched.join(", ") || "nothing"}`,
    skipped.length ? ` · not searched: ${skipped.join(", ")}` : "",
    t.experts_off.length ? ` · experts off: ${t.experts_off.join(", ")}` : "",
    ` · ${Math.round(t.timings_ms.total || t.timings_ms.first_part || 0)} ms · trace ${t.trace_id}`,
  );
}

function showResponse(t) {
  const cps = Array.from(t.response);
  const parts = [];
  let pos = 0;
  for (const g of t.groups) {
    if (g.char_start > pos) parts.push(cps.slice(pos, g.char_start).join(""));
    // spans usually start with the space before a word: keep it (and trailing space) outside the mark
    const [, lead, body, trail] = cps.slice(g.char_start, g.char_end).join("").match(/^(\s*)([\s\S]*?)(\s*)$/);
    parts.push(lead, el("mark", {
      class: `g${g.index % 6}`, tabindex: "0", title: `${g.spans.length} span(s): click for documents and experts`,
      "data-group": g.index,
      on: { click: () => showGroup(g.index), keydown: (e) => { if (e.key === "Enter") showGroup(g.index); } },
    }, body), trail);
    pos = Math.max(pos, g.char_end);
  }
  if (pos < cps.length) parts.push(cps.slice(pos).join(""));
  $("response").replaceChildren(...parts);
  if (!t.spans.length) $("response").append(el("p", { class: "muted" }, "No span of this response was found in the training data."));
}

function showGroup(index) {
  const g = current.groups[index];
  for (const m of document.querySelectorAll("#response mark")) m.classList.toggle("selected", Number(m.dataset.group) === index);
  const spans = g.spans.map((i) => current.spans[i]).sort((a, b) => (b.end - b.start) - (a.end - a.start));
  $("detail").hidden = false;
  $("detail").replaceChildren(
    el("h2", {}, spans.length > 1 ? `${spans.length} overlapping spans` : "Span"),
    ...spans.map(spanCard),
  );
  $("detail").scrollIntoView({ behavior: "smooth", block: "nearest" });
}

function spanCard(s) {
  const found = Object.entries(s.count_by_source).filter(([, n]) => n > 0);
  return el("article", { class: "span" },
    el("blockquote", {}, s.text.trim()),
    s.top_expert !== null && s.experts.length
      ? el("p", { class: "top-expert" }, el("b", {}, `top: ${s.experts[s.top_expert].source}`),
        ` (by ${s.top_expert_by || "routing"})`,
        s.top_by_routing !== null && s.top_by_counterfactual !== null && s.top_by_routing !== s.top_by_counterfactual
          ? el("span", { class: "muted" }, ` · routing alone would say ${s.experts[s.top_by_routing].source}`) : "")
      : "",
    el("p", { class: "muted" },
      `${s.end - s.start} tokens · ${s.count} occurrence${s.count === 1 ? "" : "s"}: `,
      found.map(([src, n]) => `${src} ${n}`).join(", "),
      s.agreement === null ? "" : s.agreement ? " · top expert's source contains it ✓" : " · top expert's source does not contain it ✗"),
    el("div", { class: "columns" },
      el("div", {}, el("h3", {}, "Documents"), documentsList(s)),
      el("div", {}, el("h3", {}, "Experts"), expertsTable(s)),
    ),
  );
}

function documentsList(s) {
  if (!s.documents.length) return el("p", { class: "muted" }, "No documents shown (the sources show counts only).");
  // the same text under several doc_ids is one entry, "repeated N times"
  const same = (i) => s.documents.filter((x) => x.repeat_of === i).map((x) => x.doc_id);
  return el("ul", { class: "docs" }, s.documents.map((d, i) => [d, i]).filter(([d]) => d.repeat_of === null || d.repeat_of === undefined).map(([d, i]) => {
    const head = el("div", { class: "doc-head" },
      el("span", { class: "source" }, d.source), " ",
      el("code", {}, d.doc_id ?? "—"),
      d.title ? el("span", { class: "muted" }, ` ${d.title}`) : "",
      d.blocked ? el("span", { class: "badge blocked" }, "blocked") : el("span", { class: `badge ${d.bucket}` }, `${d.bucket} relevance`),
      d.repeats > 1 ? el("span", { class: "badge repeated", title: `same text as ${same(i).join(", ")}` }, `repeated ${d.repeats} times`) : "",
    );
    let body;
    if (d.blocked) body = el("p", { class: "muted" }, "Taken down by its owner: no text is shown.");
    else if (d.snippet && d.snippet_span) {
      const [a, b, c] = cut(d.snippet, d.snippet_span[0], d.snippet_span[1]);
      body = el("p", { class: "snippet" }, "…", a, el("mark", {}, b), c, "…");
    } else if (d.snippet) body = el("p", { class: "snippet" }, "…", d.snippet, "…");  // a stored trace: no span offsets
    else body = el("p", { class: "muted" }, "No text (source policy).");
    return el("li", { class: d.blocked ? "doc is-blocked" : "doc" }, head, body);
  }));
}

function expertsTable(s) {
  if (current && current.experts_pending) return el("p", { class: "muted experts-pending" }, "Finding the experts…");
  if (!s.experts.length) {
    return el("p", { class: "muted experts-none" }, current && current.experts_missing
      ? `Experts not linked: ${current.experts_missing}`
      : current && current.settings && current.settings.link_experts === false
        ? "Experts not linked: this trace asked for spans and documents only."
        : "No experts: no model is loaded, or it is a dense model (spans and documents only).");
  }
  const rows = [...s.experts].sort((a, b) => b.routing_share - a.routing_share);
  return el("table", { class: "experts" },
    el("thead", {}, el("tr", {}, el("th", {}, "expert"), el("th", {}, "routing share"), el("th", { title: "drop in the span's log-probability with this expert off" }, "drop if off"))),
    el("tbody", {}, rows.map((e) => el("tr", { class: e.active ? "" : "off" },
      el("td", {}, e.source, e.active ? "" : " (off)"),
      el("td", {}, el("div", { class: "bar" }, el("div", { style: `width:${pct(e.routing_share)}` })), ` ${pct(e.routing_share)}`),
      el("td", { class: "num" }, e.counterfactual === null ? "—" : e.counterfactual.toFixed(2)),
    ))),
  );
}

// The bodies are the API's: `options` a TraceOptions, `generation` a GenerationOptions; a field
// left out takes the service's setting.
const traceOptions = () => ({ link_experts: $("trace-experts").checked, counterfactual: $("trace-cf").checked });
$("trace-experts").addEventListener("change", () => { $("trace-cf").disabled = !$("trace-experts").checked; });

$("trace-form").addEventListener("submit", (e) => {
  e.preventDefault();
  streamTrace({ text: $("trace-text").value, prompt: $("trace-prompt").value || null,
    options: traceOptions() });
});
$("generate-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const tokens = $("gen-tokens").value;
  runTrace("/api/generate", { prompt: $("gen-prompt").value,
    generation: tokens ? { max_new_tokens: Number(tokens) } : {}, options: traceOptions() }, "Generating");
});

// This tab's stored traces (read back with its token): listed, and shown again from the store.
async function loadMine() {
  if (!traceToken()) return;
  try {
    const res = await api("GET", "/api/traces?limit=20");
    const col = (name) => res.columns.indexOf(name);
    $("my-traces").hidden = !res.rows.length;
    $("my-traces").replaceChildren(el("h2", {}, "Your stored traces (this tab)"),
      el("ul", {}, res.rows.map((r) => el("li", {},
        el("button", { class: "secondary", "data-trace": r[col("trace_id")], on: { click: () => showStored(r[col("trace_id")]) } }, "show"),
        ` ${String(r[col("created_at")]).replace("T", " ")} · `, el("span", { class: "muted" }, r[col("response")])))));
  } catch (e) {
    $("my-traces").hidden = true;  // nothing stored yet
  }
}

async function showStored(id) {
  try {
    showTrace(fromStore((await api("GET", `/api/traces/${encodeURIComponent(id)}`)).tables));
  } catch (e) {
    status("trace-status", e.message, true);
  }
}

// A stored trace's rows (GET /api/traces/{id}) in the shape of a trace answer, for showTrace.
function fromStore(tables) {
  const rows = (name) => tables[name].rows.map((r) => Object.fromEntries(tables[name].columns.map((c, i) => [c, r[i]])));
  const of = (name, i) => rows(name).filter((x) => x.span_index === i);
  const t = rows("traces")[0];
  const spans = rows("spans").sort((a, b) => a.span_index - b.span_index).map((s) => ({
    ...s, start: s.start_token, end: s.end_token,
    count_by_source: Object.fromEntries(of("span_sources", s.span_index).map((x) => [x.source, x.count])),
    experts: of("span_experts", s.span_index).sort((a, b) => a.expert - b.expert),
    documents: of("span_documents", s.span_index).sort((a, b) => a.position - b.position),
  }));
  const groups = [];
  spans.forEach((s, i) => {
    const g = groups.find((x) => x.index === s.group_index) ||
      groups[groups.push({ index: s.group_index, char_start: s.char_start, char_end: s.char_end, spans: [] }) - 1];
    g.char_start = Math.min(g.char_start, s.char_start);
    g.char_end = Math.max(g.char_end, s.char_end);
    g.spans.push(i);
  });
  groups.sort((a, b) => a.char_start - b.char_start).forEach((g, k) => { g.index = k; });
  return { ...t, spans, groups, sources_skipped: {}, timings_ms: JSON.parse(t.timings_ms || "{}") };
}

// The forms' defaults and limits come from the option models in the API's schema
// (/openapi.json), the tokens' cap from this service's budget (/api/health).
async function loadOptionDefaults() {
  const schemas = (await api("GET", "/openapi.json")).components.schemas;
  const tokens = schemas.GenerationOptions.properties.max_new_tokens;
  $("gen-tokens").min = tokens.minimum;
  $("gen-tokens").max = tokens.maximum;
  $("gen-tokens").value = tokens.default;
  $("trace-cf").checked = schemas.TraceOptions.properties.counterfactual.default;
  $("trace-experts").checked = schemas.TraceOptions.properties.link_experts.default;
}

// ---------------------------------------------------------------------------------------
// owner view

async function loadSources() {
  const sources = await api("GET", "/api/sources");
  const sel = $("owner-source");
  const keep = sel.value;
  sel.replaceChildren(...sources.map((s) => el("option", { value: s.name }, `${s.name}${s.available ? "" : " (off)"}`)));
  if (keep) sel.value = keep;
  return sources;
}

async function showOwner() {
  const name = $("owner-source").value;
  if (!name) return;
  status("owner-status", "");
  try {
    const s = await api("GET", `/api/sources/${encodeURIComponent(name)}`);
    showPolicy(s);
    showTakedowns(name, await api("GET", `/api/sources/${encodeURIComponent(name)}/takedowns`));
  } catch (e) {
    status("owner-status", e.message, true);
  }
  if (!ownerKey()) {
    $("owner-contribution").replaceChildren(el("h2", {}, "Contribution"),
      el("p", { class: "muted" }, "Enter the owner key above to see what this source contributed."));
    return;
  }
  try {
    showContribution(await api("GET", `/api/sources/${encodeURIComponent(name)}/contribution`, null, ownerHeaders()));
  } catch (e) {
    $("owner-contribution").replaceChildren(el("h2", {}, "Contribution"), el("p", { class: "muted" }, e.message));
  }
}

function showPolicy(s) {
  const toggle = el("button", {
    class: s.active ? "danger" : "",
    on: { click: () => setPolicy(s.name, { active: !s.active }) },
  }, s.active ? "Switch off" : "Switch on");
  const vis = el("select", { on: { change: (e) => {
    const want = e.target.value;
    if (!ownerKey()) e.target.value = s.visibility;  // unchanged until a key is given
    setPolicy(s.name, { visibility: want });
  } } },
    ["full", "snippets", "counts"].map((v) => el("option", { value: v, selected: v === s.visibility }, v)));
  $("owner-policy").replaceChildren(
    el("dl", {},
      el("dt", {}, "owner"), el("dd", {}, s.owner),
      el("dt", {}, "domain"), el("dd", {}, s.domain),
      el("dt", {}, "licence"), el("dd", {}, s.licence),
      el("dt", {}, "documents"), el("dd", {}, `${s.n_docs_train} train, ${s.n_docs_valid} validation`),
      el("dt", {}, "expires"), el("dd", {}, s.expires ?? "never"),
      el("dt", {}, "status"), el("dd", {}, el("span", { class: `badge ${s.available ? "on" : "blocked"}` }, s.available ? "searched and routed" : (s.active ? "expired" : "switched off"))),
      el("dt", {}, "visibility"), el("dd", {}, vis),
    ),
    toggle,
    el("p", { class: "muted" }, `last changed ${s.updated_at.replace("T", " ")} by ${s.updated_by}`),
  );
}

async function setPolicy(name, change) {
  if (askForKey("change this source's policy")) return;
  status("owner-status", "Saving… (the tracer reopens with the new policy)");
  try {
    await api("PATCH", `/api/sources/${encodeURIComponent(name)}`, change, ownerHeaders());
    await loadSources();
    await showOwner();
    await loadOptionDefaults().catch((e) => status("trace-status", e.message, true)).finally(loadHealth);
    status("owner-status", "Saved: later traces follow the new policy.");
  } catch (e) {
    status("owner-status", e.message, true);
  }
}

function showContribution(c) {
  const fmt = (x, f) => (x === null ? "—" : f(x));
  $("owner-contribution").replaceChildren(
    el("h2", {}, `Contribution of ${c.source}`),
    el("div", { class: "stats" },
      stat(`${c.traces_matched} / ${c.n_traces}`, "stored traces matched"),
      stat(c.spans_matched, "spans found in it"),
      stat(c.documents_matched, "distinct documents retrieved"),
      stat(c.blocked_hits, "blocked hits"),
      stat(fmt(c.mean_routing_share, pct), "mean routing share of its expert"),
      stat(fmt(c.mean_counterfactual, (x) => x.toFixed(2)), "mean log-prob drop with its expert off"),
      stat(fmt(c.agreement_rate, pct), "of its spans routed mostly to its expert"),
    ),
    contributionCharts(c),
    c.top_spans.length ? el("table", { class: "top-spans" },
      el("thead", {}, el("tr", {}, el("th", {}, "tokens"), el("th", {}, "count"), el("th", {}, "top expert"), el("th", {}, "span"))),
      el("tbody", {}, c.top_spans.map((s) => el("tr", {},
        el("td", { class: "num" }, s.n_tokens), el("td", { class: "num" }, s.count),
        el("td", {}, s.top_expert_source ?? "—"), el("td", { class: "span-text" }, s.text))))) : el("p", { class: "muted" }, "No span of a stored trace was found in this source."),
  );
}

const stat = (value, label) => el("div", { class: "stat" }, el("b", {}, String(value)), el("span", {}, label));

function showTakedowns(name, list) {
  const docId = el("input", { type: "text", placeholder: "doc_id", required: true });
  const reason = el("input", { type: "text", placeholder: "reason", required: true });
  const form = el("form", { class: "inline", on: { submit: async (e) => {
    e.preventDefault();
    if (askForKey("take a document down")) return;
    status("owner-status", "Taking the document down…");
    try {
      await api("POST", `/api/sources/${encodeURIComponent(name)}/takedowns`, { doc_id: docId.value, reason: reason.value }, ownerHeaders());
      const done = docId.value;
      await showOwner();
      status("owner-status", `Taken down: ${done}. Later traces show it as blocked.`);
    } catch (err) {
      status("owner-status", err.message, true);
    }
  } } }, docId, reason, el("button", { type: "submit", class: "danger" }, "Take down"));
  $("owner-takedowns").replaceChildren(
    el("h2", {}, "Takedowns"),
    list.length ? el("ul", {}, list.map((t) => el("li", {}, el("code", {}, t.doc_id), ` — ${t.reason} (${t.requested_by}, ${String(t.created_at).replace("T", " ")})`)))
      : el("p", { class: "muted" }, "No document taken down."),
    form,
  );
}

$("owner-source").addEventListener("change", showOwner);
$("owner-key").value = sessionStorage.getItem("owner-key") || "";
$("owner-key").addEventListener("change", () => { sessionStorage.setItem("owner-key", $("owner-key").value.trim()); showOwner(); });

// ---------------------------------------------------------------------------------------
// tabs and health

for (const tab of document.querySelectorAll(".tab")) {
  tab.addEventListener("click", async () => {
    for (const t of document.querySelectorAll(".tab")) t.classList.toggle("active", t === tab);
    for (const v of document.querySelectorAll(".view")) v.hidden = v.id !== tab.dataset.view;
    if (tab.dataset.view === "search-view") loadSearchSources();
    if (tab.dataset.view === "owner-view") {
      try { await loadSources(); await showOwner(); } catch (e) { status("owner-status", e.message, true); }
    }
  });
}

async function loadHealth() {
  try {
    const h = await api("GET", "/api/health");
    if (h.limits.max_new_tokens) $("gen-tokens").max = Math.min(Number($("gen-tokens").max) || Infinity, h.limits.max_new_tokens);
    $("health").textContent = h.tracer_open
      ? `${h.sources_searched.length} sources searched${h.model ? " · model loaded" : " · no model"}`
      : `tracer not open: ${h.error}`;
    $("health").classList.toggle("error", !h.tracer_open);
  } catch (e) {
    $("health").textContent = e.message;
  }
}
loadOptionDefaults().catch((e) => status("trace-status", e.message, true)).finally(loadHealth);
loadMine();
