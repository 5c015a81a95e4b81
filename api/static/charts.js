// An owner's contribution as three small SVG charts (the CLI draws the same as a PNG:
// `flexolmo report contribution --source S --plot out.png`): spans matched per day, and the
// source's expert per domain of the text: mean routing share, mean log-prob drop when off.
"use strict";

const SVG = "http://www.w3.org/2000/svg";

function svg(tag, attrs = {}, text = null) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== null) node.textContent = String(text);
  return node;
}

// bars: [{label, value}], format: value -> label text
function barChart(title, bars, format, cls) {
  const W = 300, H = 170, left = 8, bottom = 40, top = 14;
  const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, class: `chart ${cls}`, role: "img", "aria-label": title });
  root.append(svg("title", {}, title));
  if (!bars.length) {
    root.append(svg("text", { x: W / 2, y: H / 2, "text-anchor": "middle", class: "muted" }, "nothing yet"));
    return root;
  }
  const max = Math.max(...bars.map((b) => Math.abs(b.value)), 1e-9);
  const hasNeg = bars.some((b) => b.value < 0);
  const plotH = H - bottom - top;
  const zero = top + (hasNeg ? plotH / 2 : plotH);
  const scale = (hasNeg ? plotH / 2 : plotH) / max;
  const bw = (W - left * 2) / bars.length;
  root.append(svg("line", { x1: left, x2: W - left, y1: zero, y2: zero, class: "axis" }));
  bars.forEach((b, i) => {
    const h = Math.abs(b.value) * scale;
    const x = left + i * bw + bw * 0.15;
    root.append(svg("rect", { x, y: b.value >= 0 ? zero - h : zero, width: bw * 0.7, height: Math.max(h, 1), class: "col" },
      null));
    root.lastChild.append(svg("title", {}, `${b.label}: ${format(b.value)}`));
    root.append(svg("text", { x: x + bw * 0.35, y: (b.value >= 0 ? zero - h : zero + h) + (b.value >= 0 ? -3 : 11),
      "text-anchor": "middle", class: "value" }, format(b.value)));
    root.append(svg("text", { x: x + bw * 0.35, y: H - bottom + 14, "text-anchor": "middle", class: "label" },
      b.label.length > 12 ? `${b.label.slice(0, 11)}…` : b.label));
  });
  return root;
}

function contributionCharts(c) {
  const fig = (title, chart) => el("figure", { class: "chart-box" }, chart, el("figcaption", {}, title));
  return el("div", { class: "charts" },
    fig("Spans matched per day", barChart("spans matched per day",
      (c.over_time || []).map((r) => ({ label: r.day.slice(5), value: r.spans })), (v) => String(v), "time")),
    fig("Routing share of its expert, per domain", barChart("routing share per domain",
      (c.by_domain || []).map((r) => ({ label: r.domain, value: r.routing_share })), (v) => `${Math.round(100 * v)}%`, "share")),
    fig("Log-prob drop with its expert off, per domain", barChart("counterfactual drop per domain",
      (c.by_domain || []).filter((r) => r.counterfactual !== null).map((r) => ({ label: r.domain, value: r.counterfactual })),
      (v) => v.toFixed(2), "drop")),
  );
}
