// The search view: phrase or CNF counts per source, documents under each source's policy,
// and the next-token distribution after a phrase (POST /api/search, /api/search/next-tokens).
"use strict";

async function loadSearchSources() {
  try {
    const sources = await api("GET", "/api/sources");
    const sel = $("search-source");
    const keep = sel.value;
    sel.replaceChildren(el("option", { value: "" }, "every source"),
      ...sources.filter((s) => s.available).map((s) => el("option", { value: s.name }, s.name)));
    sel.value = keep;
  } catch (e) {
    status("search-status", e.message, true);
  }
}

async function runSearch(kind) {
  const query = $("search-query").value;
  if (!query.trim()) { status("search-status", "Type a phrase first.", true); return; }
  const source = $("search-source").value || null;
  status("search-status", kind === "next" ? "Counting continuations…" : "Searching…");
  for (const b of document.querySelectorAll("#search-view button")) b.disabled = true;
  try {
    if (kind === "next") showNext(await api("POST", "/api/search/next-tokens", { phrase: query, source }));
    else showSearch(await api("POST", "/api/search", { query, source, n_docs: Number($("search-docs").value) || 0 }));
    status("search-status", "");
  } catch (e) {
    status("search-status", e.message, true);
  } finally {
    for (const b of document.querySelectorAll("#search-view button")) b.disabled = false;
  }
}

function showSearch(r) {
  const rows = r.sources.map((s) => el("tr", { "data-source": s.source },
    el("td", {}, el("span", { class: "source" }, s.source)),
    el("td", { class: "num" }, s.count === null ? "—" : `${s.count.toLocaleString()}${s.approx ? " (approx)" : ""}`),
    el("td", {}, s.documents.length ? el("ul", { class: "docs" }, s.documents.map(searchHit)) : "",
      s.note ? el("p", { class: "muted" }, s.note) : ""),
  ));
  const skipped = Object.entries(r.skipped).map(([k, v]) => `${k} (${v})`);
  $("search-result").replaceChildren(el("div", { class: "card" },
    el("p", {}, el("b", {}, r.query), ` · ${r.total.toLocaleString()} match${r.total === 1 ? "" : "es"} over the sources searched`),
    el("table", { class: "search" },
      el("thead", {}, el("tr", {}, el("th", {}, "source"), el("th", {}, "count"), el("th", {}, "documents"))),
      el("tbody", {}, rows)),
    skipped.length ? el("p", { class: "muted" }, `not searched: ${skipped.join(", ")}`) : "",
  ));
}

function searchHit(h) {
  const head = el("div", { class: "doc-head" }, el("code", {}, h.doc_id),
    h.title ? el("span", { class: "muted" }, ` ${h.title}`) : "",
    h.blocked ? el("span", { class: "badge blocked" }, "blocked") : "",
    h.repeats > 1 ? el("span", { class: "badge repeated", title: `same text as ${h.same_text.join(", ")}` }, `repeated ${h.repeats} times`) : "");
  if (h.blocked) return el("li", { class: "doc is-blocked" }, head, el("p", { class: "muted" }, "Taken down by its owner: no text is shown."));
  const [a, b, c] = cut(h.snippet, h.snippet_span[0], h.snippet_span[1]);
  return el("li", { class: "doc" }, head, el("p", { class: "snippet" }, "…", a, el("mark", {}, b), c, "…"));
}

function showNext(r) {
  const counts = Object.entries(r.prompt_count).map(([k, v]) => `${k} ${v === null ? "—" : v}`).join(", ");
  const sources = Object.keys(r.prompt_count);
  $("search-result").replaceChildren(el("div", { class: "card" },
    el("p", {}, "After ", el("b", {}, JSON.stringify(r.phrase)), ` · occurrences: ${counts}`),
    r.tokens.length ? el("table", { class: "next-tokens" },
      el("thead", {}, el("tr", {}, el("th", {}, "next token"), el("th", {}, "share"), ...sources.map((s) => el("th", {}, s)))),
      el("tbody", {}, r.tokens.map((t) => el("tr", {},
        el("td", {}, el("code", {}, JSON.stringify(t.text))),
        el("td", {}, el("div", { class: "bar" }, el("div", { style: `width:${pct(t.prob)}` })), ` ${pct(t.prob)}`),
        ...sources.map((s) => el("td", { class: "num" }, t.by_source[s] ?? ""))))))
      : el("p", { class: "muted" }, "Nothing follows this phrase in the sources that show text."),
    ...Object.entries(r.notes).map(([k, v]) => el("p", { class: "muted" }, `${k}: ${v}`)),
  ));
}

$("search-form").addEventListener("submit", (e) => { e.preventDefault(); runSearch("search"); });
$("next-button").addEventListener("click", () => runSearch("next"));
