// ltcp dashboard: polls /api/v1/state and draws it.
//
// Every name on this page may come from a client (SNI picks destination names),
// so nothing received is ever parsed as HTML: elements are built with
// createElement and filled with textContent only.
"use strict";

const POLL_MS = 2000;
const FETCH_TIMEOUT_MS = 5000;
const DETAILED = 50; // destinations per router drawn with their endpoints; the rest in one line
const HISTORY = 150; // samples kept per sparkline: five minutes at one every two seconds
const SVG = "http://www.w3.org/2000/svg";

const history = new Map(); // key -> {at, accepted, received, sent, rates: {accepts: [], in: [], out: []}}

function el(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (className) node.className = className;
  return node;
}

function row(cells, header) {
  const tr = document.createElement("tr");
  for (const cell of cells) {
    const td = el(header ? "th" : "td");
    if (cell instanceof Node) td.appendChild(cell);
    else if (cell && typeof cell === "object") {
      td.textContent = cell.text;
      if (cell.className) td.className = cell.className;
    } else td.textContent = cell === undefined || cell === null ? "" : String(cell);
    tr.appendChild(td);
  }
  return tr;
}

function table(headings, rows, numeric) {
  const t = el("table");
  const head = row(headings, true);
  for (const i of numeric || []) head.children[i].className = "num";
  t.appendChild(head);
  for (const cells of rows) {
    const tr = row(cells);
    for (const i of numeric || []) tr.children[i].classList.add("num");
    t.appendChild(tr);
  }
  return t;
}

function bytes(n) {
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1000 && i < units.length - 1) { n /= 1000; i++; }
  return (i ? n.toFixed(1) : Math.round(n)) + " " + units[i];
}

function duration(seconds) {
  if (seconds < 60) return Math.round(seconds) + " s";
  if (seconds < 3600) return Math.round(seconds / 60) + " min";
  if (seconds < 86400) return (seconds / 3600).toFixed(1) + " h";
  return (seconds / 86400).toFixed(1) + " d";
}

function counts(map) {
  const parts = Object.entries(map || {}).filter(([, n]) => n).map(([k, n]) => k + ": " + n);
  return parts.length ? parts.join(", ") : "none";
}

function spark(values) {
  const svg = document.createElementNS(SVG, "svg");
  svg.setAttribute("class", "spark");
  svg.setAttribute("viewBox", "0 0 120 24");
  svg.setAttribute("preserveAspectRatio", "none");
  if (values.length > 1) {
    const top = Math.max(...values, 1e-9);
    const step = 120 / (HISTORY - 1);
    const start = 120 - step * (values.length - 1);
    const points = values.map((v, i) => (start + i * step).toFixed(1) + "," + (23 - (v / top) * 22).toFixed(1));
    const line = document.createElementNS(SVG, "polyline");
    line.setAttribute("points", points.join(" "));
    svg.appendChild(line);
  }
  return svg;
}

// Rates from the difference between this sample and the last one of the same server.
function rates(key, at, server) {
  const before = history.get(key);
  const now = {at, accepted: server.accepted, received: server.received_bytes, sent: server.sent_bytes,
               rates: before ? before.rates : {accepts: [], in: [], out: []}};
  // (Counters that went down, after a restart, start a new baseline rather than a negative rate.)
  if (before && at > before.at && server.accepted >= before.accepted &&
      server.received_bytes >= before.received && server.sent_bytes >= before.sent) {
    const dt = at - before.at;
    for (const [name, value] of [["accepts", (server.accepted - before.accepted) / dt],
                                 ["in", (server.received_bytes - before.received) / dt],
                                 ["out", (server.sent_bytes - before.sent) / dt]]) {
      now.rates[name].push(value);
      if (now.rates[name].length > HISTORY) now.rates[name].shift();
    }
  }
  history.set(key, now);
  const last = (list) => (list.length ? list[list.length - 1] : null);
  return {accepts: last(now.rates.accepts), in: last(now.rates.in), out: last(now.rates.out), series: now.rates};
}

function instance(state) {
  const info = state.instance;
  const byState = {};
  for (const w of info.workers) byState[w.state] = (byState[w.state] || 0) + 1;
  const items = [
    ["version", info.version], ["pid", info.pid], ["uptime", duration(info.uptime_secs)],
    ["workers", info.workers.length ? counts(byState) : "in this process"],
    ["streams", info.workers.length ? info.workers.reduce((sum, w) => sum + (w.streams || 0), 0) : "-"],
    ["reloads", counts(info.reloads)], ["restarts", info.restarts], ["memory", bytes(info.rss_bytes)],
  ];
  const list = document.getElementById("instance");
  list.replaceChildren(...items.map(([k, v]) => {
    const div = el("div");
    div.append(el("dt", k), el("dd", v));
    return div;
  }));
  if (state.draining) list.appendChild(el("div", "draining", "draining"));
}

// Why a listener is held back (the "paused" of /routers.json), as the configuration says it.
const HELD_BACK = {max_concurrency: "maxConcurrency", stream_budget: "descriptor budget",
                   out_of_descriptors: "out of descriptors"};

function listening(s) {
  const shown = s.listening ? el("span", "yes", "yes") : el("span", "no", "no");
  if (!s.paused) return shown;
  const cell = el("span");
  cell.append(shown, el("span", "held back: " + (HELD_BACK[s.paused] || s.paused), "badge"));
  return cell;
}

function server(router, s, at) {
  const r = rates(router.label + " " + s.address, at, s);
  const show = (v, f) => (v === null ? "-" : f(v));
  return [
    {text: s.address, className: "name"}, {text: s.dst_name, className: "name"}, listening(s),
    s.active, show(r.accepts, (v) => v.toFixed(1)), spark(r.series.accepts),
    show(r.in, (v) => bytes(v) + "/s"), show(r.out, (v) => bytes(v) + "/s"), counts(s.failures),
  ];
}

function destination(router, d) {
  const box = el("section", null, "destination");
  box.dataset.name = d.name;
  const title = el("h3");
  title.append(el("span", d.name, "name"));
  box.appendChild(title);
  const known = (router.discovery.names || {})[d.name] || {};
  const facts = [
    ["resolved", d.resolved ? "yes" : "not yet", d.resolved ? "yes" : "no"],
    ["waiters", d.waiters],
    ["last update", d.last_update ? duration(Date.now() / 1000 - d.last_update) + " ago" : "never"],
    ["discovery", known.outcome ? known.outcome + (known.ttl !== undefined ? ", TTL " + known.ttl + " s" : "")
                                : router.interpreter],
    ["endpoints", counts(d.endpoint_states)],
    ["connect failures", counts(d.connect_failures)],
  ];
  const list = el("dl");
  for (const [k, v, className] of facts) {
    const div = el("div");
    div.append(el("dt", k), el("dd", v, className));
    list.appendChild(div);
  }
  box.appendChild(list);
  const rows = d.endpoints.map((e) => [
    {text: e.address, className: "name"}, e.weight, {text: e.state, className: "state state-" + e.state},
    e.open, e.pending, e.connects, e.connect_failures,
  ]);
  box.appendChild(table(["endpoint", "weight", "state", "open", "connecting", "connects", "connect failures"],
                        rows, [1, 3, 4, 5, 6]));
  const total = Object.values(d.endpoint_states).reduce((a, b) => a + b, 0);
  if (total > d.endpoints.length) box.appendChild(el("p", "(" + d.endpoints.length + " of " + total + " listed)", "muted"));
  return box;
}

function routers(state) {
  const main = document.getElementById("routers");
  main.replaceChildren(...state.routers.map((router) => {
    const card = el("section", null, "router");
    card.dataset.label = router.label;
    const title = el("h2", router.label);
    title.appendChild(el("span", router.interpreter, "kind"));
    card.appendChild(title);
    card.appendChild(table(
      ["server", "destination", "listening", "streams", "accepts/s", "", "in", "out", "failures"],
      router.servers.map((s) => server(router, s, state.time)), [3, 4, 6, 7]));
    const discovery = el("p", "discovery lookups: " + counts(router.discovery.requests) +
                              "; route cache: " + counts(router.route_cache), "muted");
    card.appendChild(discovery);
    for (const d of router.destinations.slice(0, DETAILED)) card.appendChild(destination(router, d));
    if (router.destinations.length > DETAILED) {
      card.appendChild(el("p", "and " + (router.destinations.length - DETAILED) +
                                " more destinations (all of them in /routers.json)", "muted"));
    }
    if (!router.destinations.length) card.appendChild(el("p", "no destination in use yet", "muted"));
    return card;
  }));
}

// One request at a time: the next is scheduled when this one is over, and a slow one is given up.
async function poll() {
  const status = document.getElementById("status");
  const abort = new AbortController();
  const timer = setTimeout(() => abort.abort(), FETCH_TIMEOUT_MS);
  try {
    const response = await fetch("/api/v1/state", {cache: "no-store", signal: abort.signal});
    if (!response.ok) throw new Error("HTTP " + response.status);
    const state = await response.json();
    instance(state);
    routers(state);
    status.className = "status";
    status.textContent = "updated " + new Date(state.time * 1000).toLocaleTimeString();
    document.body.dataset.updates = String(Number(document.body.dataset.updates || 0) + 1);
  } catch (error) {
    status.className = "status error";
    status.textContent = "cannot reach ltcp: " + (error.name === "AbortError" ? "no answer in time" : error.message);
  } finally {
    clearTimeout(timer);
    setTimeout(poll, POLL_MS);
  }
}

poll();
