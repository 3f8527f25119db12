// ltcp dashboard: polls /api/v1/state and draws it.
//
// Every name on this page may come from a client (SNI picks destination names),
// so nothing received is ever parsed as HTML: elements are built with
// createElement and filled with textContent only.
//
// Rates and their histories are ltcp's own, from its samples of the counts on its
// own clock: the page displays them, whatever its polling rhythm.
"use strict";

const POLL_MS = 2000;
const FETCH_TIMEOUT_MS = 5000;
const DETAILED = 50; // destinations per router drawn with their endpoints; the rest in one line
const SVG = "http://www.w3.org/2000/svg";
const CHART = {width: 240, height: 56, top: 12, bottom: 44}; // the history chart, in SVG units

function el(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (className) node.className = className;
  return node;
}

function svg(tag, attributes, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, String(value));
  if (text !== undefined) node.textContent = text;
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
  for (const i of numeric || []) head.children[i].classList.add("num");
  t.appendChild(head);
  for (const cells of rows) {
    const tr = row(cells);
    for (const i of numeric || []) tr.children[i].classList.add("num");
    t.appendChild(tr);
  }
  return t;
}

function facts(items) {
  const list = el("dl");
  for (const [k, v, className] of items) {
    const div = el("div");
    div.append(el("dt", k), el("dd", v, className));
    list.appendChild(div);
  }
  return list;
}

function bytes(n) {
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1000 && i < units.length - 1) { n /= 1000; i++; }
  return (i ? n.toFixed(1) : Math.round(n)) + " " + units[i];
}

function perSecond(n) {
  return (n >= 100 ? Math.round(n) : n.toFixed(1)) + "/s";
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

// A rate as ltcp computed it (null: not known yet, ltcp has one sample so far).
function shownRate(value, format) {
  return value === null || value === undefined ? "-" : format(value);
}

// A history of rates ([[seconds ago, rate], ...], up to `span` seconds): the line, its scale (the top
// value and zero), the time axis (as long as the history, a minute at least), and the last value at its end.
function chart(points, span, format) {
  const {width, height, top, bottom} = CHART;
  const plot = width - 48; // room on the right for the last value
  const box = svg("svg", {class: "history", viewBox: `0 0 ${width} ${height}`, role: "img"});
  box.dataset.points = String(points.length);
  const highest = Math.max(...points.map(([, v]) => v), 0);
  const shown = Math.min(span, Math.max(60, ...points.map(([ago]) => Math.ceil(ago / 60) * 60)));
  const x = (ago) => plot * (1 - Math.min(ago, shown) / shown);
  const y = (v) => bottom - (highest ? (v / highest) * (bottom - top) : 0);
  box.append(svg("line", {class: "axis", x1: 0, y1: bottom, x2: plot, y2: bottom}),
             svg("text", {class: "scale", x: 0, y: top - 3}, "max " + format(highest)),
             svg("text", {class: "scale", x: 0, y: height - 1}, duration(shown) + " ago"),
             svg("text", {class: "scale", x: plot, y: height - 1, "text-anchor": "end"}, "now"));
  if (!points.length) return box;
  const line = points.map(([ago, v]) => x(ago).toFixed(1) + "," + y(v).toFixed(1)).join(" ");
  box.appendChild(svg("polyline", {points: points.length > 1 ? line : line + " " + line}));
  const [ago, last] = points[points.length - 1];
  box.append(svg("circle", {cx: x(ago).toFixed(1), cy: y(last).toFixed(1), r: 2}),
             svg("text", {class: "last", x: plot + 4, y: y(last) + 4}, format(last)));
  return box;
}

function instance(state) {
  const info = state.instance;
  const byState = {};
  for (const w of info.workers) byState[w.state] = (byState[w.state] || 0) + 1;
  const stale = info.workers.filter((w) => w.stale);
  const items = [
    ["version", info.version], ["pid", info.pid], ["uptime", duration(info.uptime_secs)],
    ["workers", info.workers.length ? counts(byState) : "in this process"],
    ["streams", info.workers.length ? info.workers.reduce((sum, w) => sum + (w.streams || 0), 0) : "-"],
    ["reloads", counts(info.reloads)], ["restarts", info.restarts], ["memory", bytes(info.rss_bytes)],
  ];
  if (stale.length) {
    items.push(["not answering", stale.map((w) => "worker " + w.pid + ": counts from " +
                                                   duration(w.snapshot_age_secs) + " ago").join(", "), "stale"]);
  }
  const list = document.getElementById("instance");
  list.replaceChildren(...facts(items).children);
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

function server(s, span) {
  const rates = s.rates || {};
  return [
    {text: s.address, className: "name"}, {text: s.dst_name, className: "name"},
    listening(s),
    s.active, {text: shownRate(rates.accepted, perSecond), className: "accepts"},
    chart((s.history || {}).accepted || [], span, perSecond),
    shownRate(rates.received_bytes, (v) => bytes(v) + "/s"), shownRate(rates.sent_bytes, (v) => bytes(v) + "/s"),
    counts(s.failures),
  ];
}

function destination(router, d) {
  const box = el("section", null, "destination");
  box.dataset.destination = d.name;
  const title = el("h3");
  title.append(el("span", d.name, "name"));
  box.appendChild(title);
  const known = (router.discovery.names || {})[d.name] || {};
  box.appendChild(facts([
    ["streams", shownRate((d.rates || {}).streams, perSecond), "rate"],
    ["open", d.active],
    ["resolved", d.resolved ? "yes" : "not yet", d.resolved ? "yes" : "no"],
    ["waiters", d.waiters],
    ["balancer", d.load_balancer || "p2c"],
    ["waiting for room", d.waiting_for_room || 0],
    ["last update", d.last_update ? duration(Date.now() / 1000 - d.last_update) + " ago" : "never"],
    ["discovery", known.outcome ? known.outcome + (known.ttl !== undefined ? ", TTL " + known.ttl + " s" : "")
                                : router.interpreter],
    ["endpoints", counts(d.endpoint_states)],
    ["connect failures", counts(d.connect_failures)],
  ]));
  // The weight, and during a slow start the share of it the endpoint has reached so far.
  const weight = (e) => e.weight_share !== undefined && e.weight_share < 1
    ? e.weight + " (" + Math.round(e.weight_share * 100) + "%)" : e.weight;
  const rows = d.endpoints.map((e) => [
    {text: e.address, className: "name"}, weight(e), {text: e.state, className: "state state-" + e.state},
    e.open, e.pending, e.connects, e.connect_failures, shownRate(e.score, (n) => n.toFixed(2)),
    shownRate(e.throughput, (n) => bytes(n) + "/s"), shownRate(e.connect_ms, (n) => n.toFixed(1) + " ms"),
  ]);
  box.appendChild(table(["endpoint", "weight", "state", "open", "connecting", "connects", "connect failures",
                         "score", "throughput", "connect time"], rows, [1, 3, 4, 5, 6, 7, 8, 9]));
  const total = Object.values(d.endpoint_states).reduce((a, b) => a + b, 0);
  if (total > d.endpoints.length) box.appendChild(el("p", "(" + d.endpoints.length + " of " + total + " listed)", "muted"));
  return box;
}

// An older generation's part of a router, while its workers finish their streams.
function draining(generation, router) {
  const box = el("section", null, "generation");
  box.appendChild(el("h3", "generation " + generation + " (draining, " + router.interpreter + "): " +
                           router.streams + " open streams"));
  const t = table(["destination", "open streams", "endpoints"], [], [1]);
  for (const d of router.destinations) {
    const tr = row([{text: d.name, className: "name"}, d.active, counts(d.endpoint_states)]);
    tr.children[1].classList.add("num");
    tr.dataset.destination = d.name;
    tr.dataset.generation = String(generation);
    t.appendChild(tr);
  }
  box.appendChild(t);
  return box;
}

function routers(state) {
  const main = document.getElementById("routers");
  const older = state.draining_generations || [];
  main.replaceChildren(...state.routers.map((router) => {
    const card = el("section", null, "router");
    card.dataset.label = router.label;
    const title = el("h2", router.label);
    title.appendChild(el("span", router.interpreter, "kind"));
    card.appendChild(title);
    card.appendChild(table(
      ["server", "destination", "listening", "streams", "accepts", "accepts, last " + duration(state.history_secs),
       "in", "out", "failures"],
      router.servers.map((s) => server(s, state.history_secs)), [3, 4, 6, 7]));
    card.appendChild(el("p", "discovery lookups: " + counts(router.discovery.requests) +
                             "; route cache: " + counts(router.route_cache), "muted"));
    for (const d of router.destinations.slice(0, DETAILED)) card.appendChild(destination(router, d));
    if (router.destinations.length > DETAILED) {
      card.appendChild(el("p", "and " + (router.destinations.length - DETAILED) +
                                " more destinations (all of them in /routers.json)", "muted"));
    }
    const parts = older.flatMap((g) => g.routers.filter((r) => r.label === router.label)
                                               .map((r) => draining(g.generation, r)));
    card.append(...parts);
    if (!router.destinations.length && !parts.length) card.appendChild(el("p", "no destination in use yet", "muted"));
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
    status.textContent = "updated " + new Date(state.time * 1000).toLocaleTimeString() +
                         "; rates over the last " + state.rates_window_secs + " s";
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
