// The lambdalake dashboard: calls the public API and draws what an analyst would get from it.
// Ids come from producers and may hold any characters: data only ever reaches the page as
// text (textContent, option values, canvas labels), never as HTML. The page's
// Content-Security-Policy forbids inline script as a second line of defence.
// The API key (when the server sets keys) is typed into a form, kept in this tab's
// sessionStorage and sent as the X-API-Key header: never in a URL.
"use strict";

const params = new URLSearchParams(location.search);
const KEY_STORE = "lambdalake.apiKey";
const REFRESH_MS = 5000;
const HISTORY_DAYS = 90;
let salesChart = null;
let sentimentChart = null;
window.lambdalakeRendered = { sales: 0, forecast: 0, sentiment: 0, refreshes: 0 };

class NeedKey extends Error {}

function apiHeaders() {
  const key = sessionStorage.getItem(KEY_STORE);
  return key ? { "X-API-Key": key } : {};
}

const sleep = ms => new Promise(resolve => setTimeout(resolve, ms));

async function api(path) {
  for (let attempt = 1; ; attempt++) {
    const r = await fetch(path, { headers: apiHeaders() });
    if (r.status === 401) { askForKey(); throw new NeedKey("this server needs an API key"); }
    // A busy server sheds load with 503 + Retry-After: wait that long (with jitter) and retry.
    if (r.status === 503 && r.headers.has("Retry-After") && attempt < 4) {
      await sleep(1000 * (Number(r.headers.get("Retry-After")) || 1) * (0.5 + Math.random()));
      continue;
    }
    if (!r.ok) throw new Error(`${path}: ${r.status} ${await r.text()}`);
    return r.json();
  }
}

function askForKey() {
  sessionStorage.removeItem(KEY_STORE);
  document.getElementById("key-form").hidden = false;
  document.getElementById("key-input").focus();
}

// el("span", { className: "ok" }, "text", child, ...): an element with text children only.
function el(tag, props, ...children) {
  const node = document.createElement(tag);
  Object.assign(node, props || {});
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}

function option(value, label) {
  const o = el("option", {}, label ?? value);
  o.value = value;
  return o;
}

function fx(v, digits) { return v == null || Number.isNaN(Number(v)) ? "–" : Number(v).toFixed(digits); }
function isoDay(d) { return d.toISOString().slice(0, 10); }
function addDays(day, n) { const d = new Date(day + "T00:00:00Z"); d.setUTCDate(d.getUTCDate() + n); return isoDay(d); }
function fmtAge(s) {
  if (s == null) return "–";
  if (s < 120) return `${Math.round(s)} s`;
  if (s < 7200) return `${Math.round(s / 60)} min`;
  return `${(s / 3600).toFixed(1)} h`;
}

async function renderFreshness() {
  const st = await api("/v1/status");
  const b = st.batch, workers = st.speed.workers || [];
  const lag = workers.reduce((a, w) => a + Object.values(w.lag || {}).reduce(
    (x, ps) => x + Object.values(ps).reduce((y, n) => y + Number(n), 0), 0), 0);
  const alive = workers.filter(w => w.alive).length;
  const batchCls = b.run_id ? (b.age_seconds < 7200 ? "ok" : "warn") : "bad";
  const speedCls = alive ? (lag < 10000 ? "ok" : "warn") : "bad";
  const q = Object.values(st.quarantine || {}).reduce((a, r) => a + Object.values(r).reduce((x, n) => x + n, 0), 0);
  document.getElementById("freshness").replaceChildren(
    el("span", { className: batchCls }, `batch run ${b.run_id || "none"} · age ${fmtAge(b.age_seconds)}`),
    " \u00a0|\u00a0 ",
    el("span", { className: speedCls }, `speed workers ${alive}/${workers.length} alive · lag ${lag} events`),
    ` \u00a0|\u00a0 quarantined ${q}`);
}

async function loadSkus() {
  const data = await api("/dashboard/api/skus");
  const sel = document.getElementById("sku");
  const current = sel.value || params.get("sku");
  sel.replaceChildren(...data.skus.map(s => option(s)));
  if (current && data.skus.includes(current)) sel.value = current;
  const store = document.getElementById("store");
  const keep = store.value;
  store.replaceChildren(option("", "all stores"), ...data.stores.map(s => option(s)));
  // Default to one store (alerts are per store); "all stores" shows the SKU's own forecast, reconciled.
  store.value = keep || params.get("store") || data.stores[0] || "";
}

// How the forecast scored on the batch layer's backtest, beside the chart.
function accuracyText(rows) {
  if (!rows.length) return "no backtest for this forecast";
  const pct = v => (v == null ? "–" : `${Math.round(v * 100)} %`);
  const one = a => `MASE ${fx(a.mase, 2)}, 80 % band held ${pct(a.coverage_80)}, 95 % band held ${pct(a.coverage_95)}`;
  if (rows.length === 1) {
    const a = rows[0];
    return `backtest of ${a.model || "–"} on ${a.n_train_days ?? "–"} days: ${one(a)}`;
  }
  return "backtest per store: " + rows.map(a => `${a.store_id} (${a.model || "–"}) ${one(a)}`).join("; ");
}

async function renderSales(sku, store) {
  const storeQ = store ? `&store_id=${encodeURIComponent(store)}` : "";
  const fc = await api(`/v1/forecast/${encodeURIComponent(sku)}?horizon=28${storeQ}`);
  const today = fc.actuals.length ? fc.actuals[fc.actuals.length - 1].date : isoDay(new Date());
  const start = addDays(today, -HISTORY_DAYS);
  const sales = await api(`/v1/sales?sku=${encodeURIComponent(sku)}${storeQ}&granularity=day&start=${start}&end=${today}`);
  const labels = [];
  const last = fc.points.length ? fc.points[fc.points.length - 1].date : today;
  for (let d = start; d <= last; d = addDays(d, 1)) labels.push(d);
  const idx = new Map(labels.map((d, i) => [d, i]));
  const series = () => labels.map(() => null);
  const hist = series(), f = series(), l80 = series(), u80 = series(), l95 = series(), u95 = series(), live = series();
  // A day without sales is a zero, not a gap: the API leaves such periods out.
  for (let i = 0; i < labels.length && labels[i] <= today; i++) hist[i] = 0;
  for (const p of sales.points) { const i = idx.get(String(p.period).slice(0, 10)); if (i != null) hist[i] = p.units; }
  for (const p of fc.points) {
    const i = idx.get(p.date); if (i == null) continue;
    f[i] = p.forecast; l80[i] = p.lower_80; u80[i] = p.upper_80; l95[i] = p.lower_95; u95[i] = p.upper_95;
  }
  const todayIdx = idx.get(today);
  const todayActual = fc.actuals.find(a => a.date === today);
  if (todayIdx != null && todayActual) live[todayIdx] = todayActual.units;
  const datasets = [
    { label: "95 % upper", data: u95, borderWidth: 0, pointRadius: 0, backgroundColor: "rgba(99,132,255,.12)", fill: "+3" },
    { label: "80 % upper", data: u80, borderWidth: 0, pointRadius: 0, backgroundColor: "rgba(99,132,255,.25)", fill: "+1" },
    { label: "80 % lower", data: l80, borderWidth: 0, pointRadius: 0, fill: false },
    { label: "95 % lower", data: l95, borderWidth: 0, pointRadius: 0, fill: false },
    { label: `forecast (${fc.model || "–"})`, data: f, borderColor: "#3b5bdb", borderDash: [5, 4], pointRadius: 0, fill: false },
    { label: "units (batch ⊕ speed)", data: hist, borderColor: "#1d2330", pointRadius: 0, borderWidth: 1.5, fill: false },
    { label: "today, live", data: live, borderColor: "#e8590c", backgroundColor: "#e8590c", pointRadius: 6, showLine: false },
  ];
  if (!salesChart) {
    salesChart = new Chart(document.getElementById("sales-chart"), {
      type: "line", data: { labels, datasets },
      options: { animation: false, spanGaps: false, interaction: { mode: "index", intersect: false },
        plugins: { legend: { labels: { filter: i => !i.text.includes("lower") } } },
        scales: { x: { ticks: { maxTicksLimit: 14 } }, y: { beginAtZero: true } } },
    });
  } else {
    salesChart.data.labels = labels; salesChart.data.datasets = datasets; salesChart.update("none");
  }
  const todayF = fc.points.find(p => p.date === today);
  document.getElementById("sales-summary").textContent =
    `today ${today}: ${todayActual ? todayActual.units : 0} units so far` +
    (todayF ? `; forecast ${fx(todayF.forecast, 1)} (95 %: ${fx(todayF.lower_95, 1)}–${fx(todayF.upper_95, 1)})` : "") +
    ` · as of run ${fc.as_of.run_id}` + (fc.degraded ? " · DEGRADED: a speed worker is unreachable" : "");
  document.getElementById("forecast-accuracy").textContent = accuracyText(fc.accuracy || []);
  document.getElementById("asof").textContent = `run ${sales.as_of.run_id}`;
  window.lambdalakeRendered.sales = hist.filter(v => v != null).length;
  window.lambdalakeRendered.history_days = labels.filter(d => d <= today).length;
  window.lambdalakeRendered.forecast = f.filter(v => v != null).length;
  window.lambdalakeRendered.accuracy = (fc.accuracy || []).length;
}

async function renderSentiment(sku) {
  const s = await api(`/v1/sentiment/${encodeURIComponent(sku)}`);
  const trend = await api(`/v1/sentiment-weeks/${encodeURIComponent(sku)}`);
  const summary = document.getElementById("sentiment-summary");
  if (s.reviews) {
    summary.replaceChildren(
      `${s.reviews} reviews · mean rating ${fx(s.mean_rating, 2)} · mean sentiment ${fx(s.mean_sentiment, 2)} · `,
      el("b", {}, s.positive), " positive, ", el("b", {}, s.neutral), " neutral, ",
      el("b", {}, s.negative), " negative");
  } else {
    summary.replaceChildren("no reviews yet");
  }
  const labels = trend.weeks.map(w => w.week);
  const datasets = [
    { label: "weekly mean sentiment", data: trend.weeks.map(w => w.mean_sentiment), borderColor: "#2f9e44", yAxisID: "y", pointRadius: 2 },
    { label: "reviews per week", data: trend.weeks.map(w => w.reviews), type: "bar", backgroundColor: "rgba(0,0,0,.12)", yAxisID: "y1" },
  ];
  if (!sentimentChart) {
    sentimentChart = new Chart(document.getElementById("sentiment-chart"), {
      type: "line", data: { labels, datasets },
      options: { animation: false, scales: { y: { min: -1, max: 1 }, y1: { position: "right", beginAtZero: true, grid: { display: false } } } },
    });
  } else {
    sentimentChart.data.labels = labels; sentimentChart.data.datasets = datasets; sentimentChart.update("none");
  }
  window.lambdalakeRendered.sentiment = labels.length;
}

let breakdownChart = null;
const PALETTE = ["#1c7ed6", "#f08c00", "#2f9e44", "#e03131", "#7048e8", "#0c8599", "#d6336c", "#5c940d", "#868e96"];

// Units per ISO week by category or region: one call (group_by), stacked bars; ids no
// catalog record names are "(none)". Labels are drawn on the canvas, never parsed as HTML.
async function renderBreakdown() {
  const by = document.getElementById("breakdown").value;
  const start = addDays(isoDay(new Date()), -7 * 12);
  const body = await api(`/v1/sales?granularity=week&group_by=${by}&start=${start}`);
  const weeks = [...new Set(body.points.map(p => p.period))].sort();
  const groups = [...new Set(body.points.map(p => p[by] ?? "(none)"))].sort();
  const units = new Map(body.points.map(p => [`${p.period}|${p[by] ?? "(none)"}`, p.units]));
  const datasets = groups.map((g, i) => ({
    label: g, data: weeks.map(w => units.get(`${w}|${g}`) ?? 0),
    backgroundColor: PALETTE[i % PALETTE.length], stack: "units",
  }));
  if (!breakdownChart) {
    breakdownChart = new Chart(document.getElementById("breakdown-chart"), {
      type: "bar", data: { labels: weeks, datasets },
      options: { animation: false, scales: { x: { stacked: true }, y: { stacked: true, beginAtZero: true } } },
    });
  } else {
    breakdownChart.data.labels = weeks; breakdownChart.data.datasets = datasets; breakdownChart.update("none");
  }
  window.lambdalakeRendered.breakdown = groups;
}

// The API ranks alerts worst first (severity: half-widths of the 95 % interval past the bound);
// the first page is shown, the count is of them all.
const ALERTS_SHOWN = 50;

async function renderAlerts() {
  const a = await api(`/v1/alerts/demand?limit=${ALERTS_SHOWN}`);
  const body = document.querySelector("#alerts tbody");
  body.replaceChildren(...a.items.map(x => el("tr", {},
    el("td", {}, x.sku), el("td", {}, x.store_id || "all"), el("td", {}, x.kind), el("td", {}, x.units),
    el("td", {}, fx(x.forecast, 1)),
    el("td", {}, `${x.lower_95 == null ? "–" : fx(x.lower_95, 1)}–${x.upper_95 == null ? "–" : fx(x.upper_95, 1)}`),
    el("td", {}, fx(x.severity, 1)))));
  const total = a.total ?? a.items.length;
  document.getElementById("alerts-empty").textContent = total
    ? `${total} alert${total === 1 ? "" : "s"}` + (total > a.items.length ? ` (the worst ${a.items.length} shown)` : "")
    : "no alerts right now";
  window.lambdalakeRendered.alerts = total;
}

async function refresh() {
  try {
    await renderFreshness();
    const sku = document.getElementById("sku").value;
    const store = document.getElementById("store").value;
    if (sku) await Promise.all([renderSales(sku, store), renderSentiment(sku)]);
    await renderBreakdown();
    await renderAlerts();
    window.lambdalakeRendered.refreshes += 1;
    document.body.dataset.rendered = JSON.stringify(window.lambdalakeRendered);
  } catch (e) {
    document.getElementById("freshness").textContent = `error: ${e.message}`;
    window.lambdalakeRendered.error = String(e.message);
    document.body.dataset.rendered = JSON.stringify(window.lambdalakeRendered);
  }
}

async function start() {
  try { await loadSkus(); } catch (e) { document.getElementById("freshness").textContent = `error: ${e.message}`; }
  await refresh();
}

async function main() {
  document.getElementById("key-form").addEventListener("submit", async ev => {
    ev.preventDefault();
    const input = document.getElementById("key-input");
    sessionStorage.setItem(KEY_STORE, input.value.trim());
    input.value = "";
    document.getElementById("key-form").hidden = true;
    await start();
  });
  document.getElementById("sku").addEventListener("change", refresh);
  document.getElementById("store").addEventListener("change", refresh);
  document.getElementById("breakdown").addEventListener("change", refresh);
  await start();
  setInterval(() => { if (document.getElementById("key-form").hidden) refresh(); }, REFRESH_MS);
}
main();
