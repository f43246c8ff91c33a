// The operator's dashboard: polls GET /v1/admin/dashboard with an admin key and draws the
// last hour on canvases. No libraries, no CDN: it works offline. The key stays in this tab
// (sessionStorage); a link may carry it as #key=... (never sent to the server in the URL).
"use strict";

const COLORS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#4b5563"];
const CHARTS = [
  { id: "ttft", title: "Time to first token (ms)", series: [["ttft_p50_ms", "p50"], ["ttft_p95_ms", "p95"]] },
  { id: "itl", title: "Inter-token latency (ms)", series: [["itl_p50_ms", "p50"], ["itl_p95_ms", "p95"]] },
  { id: "tps", title: "Generated tokens per second", series: [["tokens_per_s", "tokens/s"]] },
  { id: "batch", title: "Decode batch (mean rows per step)", series: [["decode_batch", "rows"]] },
  { id: "kv", title: "KV cache reserved (share of budget)", series: [["kv_used", "KV"]], max: 1 },
  { id: "queue", title: "Queue depth and running", series: [["queue", "waiting"], ["running", "running"]] },
  { id: "cache", title: "Cache hit rates", series: [["prompt_cache_hit_rate", "prompt cache"], ["embedding_cache_hit_rate", "embedding cache"]], max: 1 },
  { id: "memory", title: "Server memory (MiB)", series: [["rss_mib", "RSS"]] },
  { id: "tenants", title: "Requests per key (per sample)", tenants: true },
];

const $ = (sel) => document.querySelector(sel);
let key = sessionStorage.getItem("npugate-admin-key") || "";
if (location.hash.startsWith("#key=")) {
  key = decodeURIComponent(location.hash.slice(5));
  history.replaceState(null, "", location.pathname);
}

function status(text, kind) {
  const el = $("#status");
  el.textContent = text;
  el.className = kind || "";
}

function fmt(v, unit) {
  if (v === null || v === undefined || Number.isNaN(v)) return "–";
  if (unit === "%") return (100 * v).toFixed(1) + " %";
  if (unit === "MiB") return (v / 1048576).toFixed(0) + " MiB";
  return Math.abs(v) >= 100 ? v.toFixed(0) : v.toFixed(v % 1 ? 1 : 0);
}

function tiles(data) {
  const last = data.points[data.points.length - 1] || {};
  const items = [
    ["status", data.status], ["uptime", Math.round(data.uptime_s) + " s"],
    ["memory", fmt(data.rss_bytes, "MiB")], ["tokens/s", fmt(last.tokens_per_s)],
    ["TTFT p50", fmt(last.ttft_p50_ms) + " ms"], ["TTFT p95", fmt(last.ttft_p95_ms) + " ms"],
    ["ITL p50", fmt(last.itl_p50_ms) + " ms"], ["ITL p95", fmt(last.itl_p95_ms) + " ms"],
    ["decode batch", fmt(last.decode_batch)], ["KV reserved", fmt(last.kv_used, "%")],
    ["queue", fmt(last.queue)], ["prompt cache hits", fmt(last.prompt_cache_hit_rate, "%")],
    ["embedding cache hits", fmt(last.embedding_cache_hit_rate, "%")],
    ["models loaded", String(data.models.filter((m) => m.status === "ready").length)],
  ];
  $("#tiles").replaceChildren(...items.map(([label, value]) => {
    const tile = document.createElement("div");
    tile.className = "tile";
    tile.dataset.label = label;
    tile.innerHTML = '<div class="label"></div><div class="value"></div>';
    tile.querySelector(".label").textContent = label;
    tile.querySelector(".value").textContent = value;
    return tile;
  }));
}

function figure(chart) {
  let fig = document.getElementById("chart-" + chart.id);
  if (!fig) {
    fig = document.createElement("figure");
    fig.id = "chart-" + chart.id;
    fig.innerHTML = "<figcaption></figcaption><canvas></canvas><div class=legend></div>";
    fig.querySelector("figcaption").textContent = chart.title;
    $("#charts").append(fig);
  }
  return fig;
}

function draw(fig, lines, fixedMax) {
  const canvas = fig.querySelector("canvas");
  const ratio = window.devicePixelRatio || 1;
  const w = canvas.clientWidth, h = canvas.clientHeight;
  canvas.width = w * ratio;
  canvas.height = h * ratio;
  const ctx = canvas.getContext("2d");
  ctx.scale(ratio, ratio);
  ctx.clearRect(0, 0, w, h);
  const times = lines.flatMap((l) => l.points.map((p) => p[0]));
  const values = lines.flatMap((l) => l.points.map((p) => p[1]));
  const t0 = Math.min(...times), t1 = Math.max(...times);
  const top = fixedMax || Math.max(0, ...values) * 1.1 || 1;
  const x = (t) => 36 + (w - 44) * (t1 > t0 ? (t - t0) / (t1 - t0) : 1);
  const y = (v) => h - 16 - (h - 24) * (v / top);
  ctx.strokeStyle = "#d0d4da";
  ctx.fillStyle = "#5f6368";
  ctx.font = "10px system-ui";
  for (const v of [0, top / 2, top]) {
    ctx.beginPath();
    ctx.moveTo(36, y(v));
    ctx.lineTo(w - 8, y(v));
    ctx.stroke();
    ctx.fillText(fmt(v), 2, y(v) + 3);
  }
  const span = t1 - t0;
  if (times.length) ctx.fillText(span < 120 ? Math.round(span) + " s" : Math.round(span / 60) + " min", w - 40, h - 3);
  lines.forEach((line, i) => {
    ctx.strokeStyle = COLORS[i % COLORS.length];
    ctx.lineWidth = 1.5;
    ctx.beginPath();
    line.points.forEach(([t, v], j) => (j ? ctx.lineTo(x(t), y(v)) : ctx.moveTo(x(t), y(v))));
    ctx.stroke();
  });
  fig.querySelector(".legend").replaceChildren(...lines.map((line, i) => {
    const span = document.createElement("span");
    span.style.color = COLORS[i % COLORS.length];
    span.textContent = "■ " + line.label;
    return span;
  }));
}

function charts(data) {
  const points = data.points.map((p) => ({ ...p, rss_mib: p.rss_bytes / 1048576 }));
  for (const chart of CHARTS) {
    let lines;
    if (chart.tenants) {
      const names = [...new Set(points.flatMap((p) => Object.keys(p.tenants || {})))];
      lines = names.map((name) => ({
        label: name,
        points: points.map((p) => [p.t, (p.tenants[name] || { requests: 0 }).requests]),
      }));
    } else {
      lines = chart.series.map(([field, label]) => ({
        label,
        points: points.filter((p) => p[field] !== null && p[field] !== undefined).map((p) => [p.t, p[field]]),
      }));
    }
    draw(figure(chart), lines, chart.max);
  }
}

function tables(data) {
  $("#models tbody").replaceChildren(...data.models.map((m) => {
    const row = document.createElement("tr");
    for (const v of [m.id, m.task, m.status, m.provider || "–", fmt(m.memory_bytes, "MiB")]) {
      const cell = document.createElement("td");
      cell.textContent = v;
      row.append(cell);
    }
    return row;
  }));
  const sums = {};
  for (const p of data.points) {
    for (const [name, u] of Object.entries(p.tenants || {})) {
      const s = (sums[name] = sums[name] || { requests: 0, prompt_tokens: 0, generated_tokens: 0 });
      s.requests += u.requests;
      s.prompt_tokens += u.prompt_tokens;
      s.generated_tokens += u.generated_tokens;
    }
  }
  $("#keys tbody").replaceChildren(...Object.entries(sums).map(([name, s]) => {
    const row = document.createElement("tr");
    row.dataset.key = name;
    for (const v of [name, s.requests, s.prompt_tokens, s.generated_tokens]) {
      const cell = document.createElement("td");
      cell.textContent = String(v);
      row.append(cell);
    }
    return row;
  }));
}

let every = 5000;  // the server's sample interval, once known
let timer = null;

async function refresh() {
  clearTimeout(timer);
  timer = setTimeout(refresh, every);
  if (!key) return;
  try {
    const resp = await fetch("/v1/admin/dashboard", { headers: { Authorization: "Bearer " + key } });
    if (resp.status === 401 || resp.status === 403) {
      const body = await resp.json();
      status(body.error.message, "bad");
      return;
    }
    const data = await resp.json();
    every = Math.max(1000, data.sample_every_s * 1000);
    tiles(data);
    charts(data);
    tables(data);
    document.body.dataset.points = String(data.points.length);
    status("live: " + data.points.length + " samples, every " + data.sample_every_s + " s", "ok");
  } catch (err) {
    status("server unreachable: " + err.message, "bad");
  }
}

$("#key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  key = $("#admin-key").value.trim();
  sessionStorage.setItem("npugate-admin-key", key);
  refresh();
});
if (key) sessionStorage.setItem("npugate-admin-key", key);
refresh();
