// The vMatrix dashboard. Reads GET /api/v1/stream (server-sent events, read with fetch so the
// token travels as a header, never in a URL) and acts through POST /api/v1/operations. Charts
// are small hand-written SVG: a few polylines need no library, no build step and no network.
"use strict";

const TOKEN_KEY = "vmatrix-operator-token";
const HISTORY_MS = 10 * 60 * 1000;
const $ = (id) => document.getElementById(id);

let token = sessionStorage.getItem(TOKEN_KEY) || "";
let last = null;                // the latest snapshot
const where = new Map();        // instance -> machine, to animate moves
const cpuSeen = new Map();      // instance → {t, cpu}: the last CPU seconds its machine reported
const cpuRate = new Map();      // instance → busy fraction of a core between the last two
let usage = {};                 // instance → {machine, cpu_seconds, memory_bytes} (as /metrics)
const history = [];             // {t, load: {svc: rps}, count: {svc: n}, machines: n}
const events = [];              // the feed, oldest first
let stream = null;              // the running fetch's controller

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else if (v !== undefined && v !== null && v !== false) e.setAttribute(k, v);
  }
  for (const c of children.flat()) {
    if (c !== null && c !== undefined) e.append(c instanceof Node ? c : String(c));
  }
  return e;
}

// Re-drawing replaces elements: keep the focus and any chosen menu value across it (every
// control carries a data-key), so a keyboard user is never thrown out mid-choice.
function redraw(box, build) {
  const active = document.activeElement;
  const focusKey = active && box.contains(active) ? active.getAttribute("data-key") : null;
  const values = new Map();
  for (const sel of box.querySelectorAll("select[data-key]")) if (sel.value) values.set(sel.getAttribute("data-key"), sel.value);
  build();
  for (const [k, v] of values) {
    const sel = box.querySelector(`select[data-key="${CSS.escape(k)}"]`);
    if (sel && [...sel.options].some((o) => o.value === v)) sel.value = v;
  }
  if (focusKey) {
    const again = box.querySelector(`[data-key="${CSS.escape(focusKey)}"]`);
    if (again) again.focus();
  }
}

function hue(name) {
  let h = 0;
  for (const ch of name) h = (h * 31 + ch.charCodeAt(0)) % 360;
  return `hsl(${h} 65% 45%)`;
}

function status(text) { $("status").textContent = text; }

function say(text, refused) {
  const r = $("result");
  r.className = refused ? "refused" : "";
  r.textContent = text;
  clearTimeout(say.timer);
  say.timer = setTimeout(() => { r.textContent = ""; }, 8000);
}

// ---- the token -------------------------------------------------------------------------
function askToken(why) {
  if (why) $("token-why").textContent = why;
  $("token-input").value = "";
  if (!$("token-dialog").open) $("token-dialog").showModal();
  $("token-input").focus();
}

$("token-form").addEventListener("submit", () => {
  token = $("token-input").value.trim();
  sessionStorage.setItem(TOKEN_KEY, token);
  connect();
});
$("token-cancel").addEventListener("click", () => $("token-dialog").close());
$("token-button").addEventListener("click", () => askToken());
$("token-forget").addEventListener("click", () => {
  sessionStorage.removeItem(TOKEN_KEY);
  token = "";
  if (stream) stream.abort();
  stream = null;
  status("token forgotten: what is shown is no longer live");
});

// ---- the stream ------------------------------------------------------------------------
async function connect() {
  if (stream) stream.abort();
  if (!token) {
    status("needs the operator's token");
    askToken();
    return;
  }
  const ctl = new AbortController();
  stream = ctl;
  status("connecting…");
  let res;
  try {
    res = await fetch("/api/v1/stream", { headers: { authorization: "Bearer " + token }, signal: ctl.signal });
  } catch (e) {
    if (ctl.signal.aborted) return;
    status("cannot reach the controller; trying again");
    setTimeout(connect, 2000);
    return;
  }
  if (res.status === 401 || res.status === 403) {
    const why = await message(res);
    status("the token was refused");
    sessionStorage.removeItem(TOKEN_KEY);
    token = "";
    askToken("The controller refused the token: " + why);
    return;
  }
  if (!res.ok) {
    status("the stream failed: " + (await message(res)) + "; trying again");
    setTimeout(connect, 2000);
    return;
  }
  status("live");
  const reader = res.body.getReader();
  const text = new TextDecoder();
  let buf = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += text.decode(value, { stream: true });
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        frame(buf.slice(0, cut));
        buf = buf.slice(cut + 2);
      }
    }
  } catch (e) {
    if (ctl.signal.aborted) return;
  }
  status("the stream ended; reconnecting");
  setTimeout(connect, 1000);
}

function frame(raw) {
  let kind = "message";
  const data = [];
  for (const line of raw.split("\n")) {
    if (line.startsWith("event:")) kind = line.slice(6).trim();
    else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
  }
  if (kind === "snapshot") {
    try { render(JSON.parse(data.join("\n"))); } catch (e) { status("bad message: " + e); }
  } else if (kind === "error") {
    status("the controller says: " + data.join(" "));
  }
}

async function message(res) {
  const body = await res.text();
  try { return JSON.parse(body).error || body; } catch (e) { return body || res.statusText; }
}

// ---- actions ---------------------------------------------------------------------------
async function act(op, what) {
  if (!token) {
    askToken("Actions need the operator's token.");
    say("no token: " + what + " was not sent", true);
    return;
  }
  say(what + " …");
  let res;
  try {
    res = await fetch("/api/v1/operations?wait=120", {
      method: "POST",
      headers: { authorization: "Bearer " + token, "content-type": "application/json" },
      body: JSON.stringify(op),
    });
  } catch (e) {
    say(what + ": the controller did not answer (" + e + ")", true);
    return;
  }
  if (!res.ok) {
    const why = await message(res);
    if (res.status === 401) askToken("The controller refused the token: " + why);
    say(what + " refused: " + why, true);
    return;
  }
  const reply = await res.json();
  const ok = reply.state === "done" || reply.state === "running";
  say(what + ": " + reply.state + (reply.result ? " — " + reply.result : ""), !ok);
}

// ---- rendering -------------------------------------------------------------------------
function specs(snap) {
  const m = new Map();
  for (const s of snap.services.services) m.set(s.name, s);
  return m;
}

function render(snap) {
  last = snap;
  const svc = specs(snap);
  const counts = {};
  for (const i of snap.instances) {
    if (i.purpose === "live" && ["running", "migrating", "activating"].includes(i.state)) {
      counts[i.service] = (counts[i.service] || 0) + 1;
    }
  }
  const load = {};
  for (const [name, l] of Object.entries(snap.load.services || {})) load[name] = l.rps;
  history.push({ t: snap.at_ms, load, count: counts, machines: snap.machines.machines.filter((m) => m.instances > 0).length });
  while (history.length && history[0].t < snap.at_ms - HISTORY_MS) history.shift();
  usage = snap.usage || {};
  for (const [id, u] of Object.entries(usage)) {
    const seen = cpuSeen.get(id);
    if (seen && u.cpu_seconds !== seen.cpu) {
      const dt = (snap.at_ms - seen.t) / 1000;
      if (dt > 0) cpuRate.set(id, Math.max(0, (u.cpu_seconds - seen.cpu) / dt));
    }
    if (!seen || u.cpu_seconds !== seen.cpu) cpuSeen.set(id, { t: snap.at_ms, cpu: u.cpu_seconds });
  }
  for (const e of snap.events) events.push(e);
  while (events.length > 1000) events.shift();
  renderMatrix(snap, svc);
  renderDormant(snap, svc);
  renderLoad(snap, svc);
  renderEvents(snap);
}

// What an instance uses: CPU (share of one core, from its machine's reports) and resident memory.
function useText(id) {
  const u = usage[id];
  if (!u) return "";
  const cpu = cpuRate.has(id) ? Math.round(cpuRate.get(id) * 100) + "% CPU · " : "";
  return cpu + Math.round(u.memory_bytes / 1048576) + " MiB resident";
}

function cell(i, machines) {
  const moved = where.has(i.id) && where.get(i.id) !== i.machine;
  where.set(i.id, i.machine);
  const others = machines.filter((m) => m.name !== i.machine && m.state === "up");
  const choice = el("select", { "aria-label": "Action for " + i.id, "data-key": "act-" + i.id },
    el("option", { value: "" }, "Action…"),
    others.map((m) => el("option", { value: "migrate:" + m.name }, "Migrate to " + m.name)),
    el("option", { value: "suspend" }, "Suspend"),
    el("option", { value: "discard" }, "Discard"));
  const run = () => {
    const v = choice.value;
    if (!v) return;
    if (v.startsWith("migrate:")) act({ op: "migrate", instance: i.id, to: v.slice(8) }, "migrate " + i.id + " to " + v.slice(8));
    else act({ op: v, instance: i.id }, v + " " + i.id);
  };
  const c = el("div", {
    class: "cell state-" + i.state + (moved ? " moved" : ""),
    draggable: i.state === "running" ? "true" : null,
    "data-instance": i.id, "data-service": i.service, "data-state": i.state,
    ondragstart: (ev) => ev.dataTransfer.setData("text/x-vmatrix-instance", i.id),
  },
  el("div", { class: "id" }, i.id),
  el("div", { class: "sub" }, i.state + " · " + (i.version ? i.version.slice(0, 8) : "…") + (i.purpose !== "live" ? " · " + i.purpose : "")),
  el("div", { class: "use" }, useText(i.id)),
  el("div", { class: "acts" }, choice, el("button", { type: "button", onclick: run, "aria-label": "Do the chosen action on " + i.id, "data-key": "do-" + i.id }, "Do")));
  c.style.setProperty("--svc", hue(i.service));
  return c;
}

function renderMatrix(snap, svc) {
  const machines = snap.machines.machines.map((v) => ({ ...v, ...v.machine }))
    .sort((a, b) => a.name.localeCompare(b.name));
  const box = $("matrix");
  // Redrawn only when what it shows changed (CPU figures are updated in place).
  const sig = JSON.stringify([machines.map((m) => [m.name, m.state, m.free, m.role]),
    snap.instances.map((i) => [i.id, i.machine, i.state, i.version, i.purpose])]);
  if (sig === renderMatrix.sig) {
    for (const m of machines) {
      const col = box.querySelector(`[data-machine="${CSS.escape(m.name)}"]`);
      if (!col) continue;
      col.querySelector(".cpu").textContent = "CPU " + Math.round(m.cpu_load * 100) + "%";
      col.querySelector(".cpu-bar > span").style.width = Math.max(0, Math.min(1, m.cpu_load)) * 100 + "%";
    }
    for (const c of box.querySelectorAll(".cell[data-instance]")) {
      c.querySelector(".use").textContent = useText(c.dataset.instance);
    }
    return;
  }
  renderMatrix.sig = sig;
  redraw(box, () => box.replaceChildren(...machines.map((m) => {
    const here = snap.instances.filter((i) => i.machine === m.name && i.state !== "suspended");
    const mem = here.reduce((n, i) => n + ((svc.get(i.service) || {}).memory_mib || 0), 0);
    const drain = m.state === "draining"
      ? el("button", { type: "button", "data-key": "drain-" + m.name, onclick: () => act({ op: "undrain", machine: m.name }, "undrain " + m.name) }, "Undrain " + m.name)
      : el("button", { type: "button", "data-key": "drain-" + m.name, onclick: () => act({ op: "drain", machine: m.name }, "drain " + m.name) }, "Drain " + m.name);
    const col = el("div", {
      class: "machine state-" + m.state, "data-machine": m.name, role: "group", "aria-label": "machine " + m.name,
      ondragover: (ev) => { ev.preventDefault(); col.classList.add("drop-target"); },
      ondragleave: () => col.classList.remove("drop-target"),
      ondrop: (ev) => {
        ev.preventDefault();
        col.classList.remove("drop-target");
        const id = ev.dataTransfer.getData("text/x-vmatrix-instance");
        if (id && where.get(id) !== m.name) act({ op: "migrate", instance: id, to: m.name }, "migrate " + id + " to " + m.name);
      },
    },
    el("h3", {}, m.name, el("span", { class: "badge" + (m.free ? " free" : "") }, m.free ? "free" : m.state)),
    el("div", { class: "meta" }, m.role + " · " + m.vcpus + " vCPU · " + m.memory_mib + " MiB"),
    el("div", { class: "meta cpu" }, "CPU " + Math.round(m.cpu_load * 100) + "%"),
    el("div", { class: "bar cpu-bar", title: "CPU" }, bar(m.cpu_load)),
    el("div", { class: "meta" }, "memory " + mem + " of " + m.memory_mib + " MiB"),
    el("div", { class: "bar", title: "memory" }, bar(m.memory_mib ? mem / m.memory_mib : 0)),
    el("div", { class: "row" }, drain),
    here.map((i) => cell(i, machines)));
    return col;
  })));
}

function bar(f) {
  const s = el("span");
  s.style.width = Math.max(0, Math.min(1, f)) * 100 + "%";
  return s;
}

function renderDormant(snap, svc) {
  const box = $("dormant");
  const sig = JSON.stringify([[...svc.keys()], snap.instances.map((i) => [i.id, i.service, i.state])]);
  if (sig === renderDormant.sig) return;
  renderDormant.sig = sig;
  const items = [];
  for (const [name] of svc) {
    const live = snap.instances.filter((i) => i.service === name && i.state !== "suspended");
    const asleep = snap.instances.filter((i) => i.service === name && i.state === "suspended");
    if (live.length === 0 || asleep.length > 0) {
      const d = el("div", { class: "svc" }, el("strong", {}, name),
        live.length === 0 ? " dormant" : "",
        asleep.map((i) => el("div", {}, i.id + " suspended ",
          el("button", { type: "button", "data-key": "resume-" + i.id, onclick: () => act({ op: "resume", instance: i.id }, "resume " + i.id) }, "Resume " + i.id))));
      d.style.setProperty("border-color", hue(name));
      items.push(d);
    }
  }
  redraw(box, () => box.replaceChildren(...(items.length ? items : [el("p", { class: "hint" }, "none: every service runs")])));
}

function chart(series, label) {
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("class", "chart");
  svg.setAttribute("viewBox", "0 0 300 90");
  svg.setAttribute("preserveAspectRatio", "none");
  svg.setAttribute("role", "img");
  svg.setAttribute("aria-label", label);
  // The time axis spans what the page has seen (a minute at least, ten at most): a page opened
  // a moment ago draws its few points across the chart, not in a corner.
  const end = history.length ? history[history.length - 1].t : Date.now();
  const span = Math.min(HISTORY_MS, Math.max(60000, end - (history.length ? history[0].t : end)));
  const t0 = end - span;
  const max = Math.max(1, ...series.flatMap((s) => s.points.map((p) => p[1])));
  for (const s of series) {
    const pts = s.points.map(([t, v]) => `${((t - t0) / span * 300).toFixed(1)},${(88 - v / max * 84).toFixed(1)}`);
    const line = document.createElementNS(ns, "polyline");
    line.setAttribute("class", s.class);
    line.setAttribute("points", pts.join(" "));
    svg.append(line);
  }
  return svg;
}

function renderLoad(snap, svc) {
  const box = $("load");
  redraw(box, () => box.replaceChildren(...[...svc.values()].map((s) => {
    const l = (snap.load.services || {})[s.name] || { rps: 0, dropped: 0, held: 0 };
    const n = history.length ? (history[history.length - 1].count[s.name] || 0) : 0;
    const dropped = snap.services.dropped[s.name];
    const demand = history.map((h) => [h.t, h.load[s.name] || 0]);
    const capacity = history.map((h) => [h.t, (h.count[s.name] || 0) * s.capacity_rps]);
    const toggle = dropped
      ? el("button", { type: "button", "data-key": "drop-" + s.name, onclick: () => act({ op: "undrop", service: s.name }, "undrop " + s.name) }, "Undrop " + s.name)
      : el("button", { type: "button", "data-key": "drop-" + s.name, onclick: () => act({ op: "drop", service: s.name }, "drop " + s.name) }, "Drop " + s.name);
    return el("div", { class: "svc-load", "data-service": s.name },
      el("div", { class: "row" }, el("strong", {}, s.name),
        el("span", {}, l.rps.toFixed(1) + " req/s · " + n + " instance(s) · priority " + s.priority + (dropped ? " · dropped by " + dropped : "")), toggle),
      chart([{ class: "capacity", points: capacity }, { class: "demand", points: demand }], s.name + ": demand against capacity, up to the last 10 minutes"),
      el("div", { class: "legend" }, "solid: requests/s · dashed: capacity of its running instances"));
  })));
  $("machines-chart").replaceChildren(chart([{ class: "used", points: history.map((h) => [h.t, h.machines]) }], "machines running instances, up to the last 10 minutes"));
  const byPriority = new Map();
  for (const s of svc.values()) {
    const e = byPriority.get(s.priority) || { names: [], dropped: 0 };
    e.names.push(s.name);
    e.dropped += ((snap.load.services || {})[s.name] || {}).dropped || 0;
    byPriority.set(s.priority, e);
  }
  $("drops").tBodies[0].replaceChildren(...[...byPriority.entries()].sort((a, b) => b[0] - a[0]).map(([p, e]) =>
    el("tr", {}, el("td", {}, p), el("td", {}, e.names.join(", ")), el("td", {}, e.dropped))));
}

function renderEvents(snap) {
  const fs = $("filter-service"), fm = $("filter-machine");
  const keep = (sel, names) => {
    const want = sel.value;
    const opts = [el("option", { value: "" }, "all"), ...names.map((n) => el("option", { value: n }, n))];
    sel.replaceChildren(...opts);
    sel.value = names.includes(want) ? want : "";
  };
  const svcNames = snap.services.services.map((s) => s.name);
  const machineNames = snap.machines.machines.map((m) => m.name);
  if (fs.options.length !== svcNames.length + 1) keep(fs, svcNames);
  if (fm.options.length !== machineNames.length + 1) keep(fm, machineNames);
  drawEvents();
}

function drawEvents() {
  const s = $("filter-service").value, m = $("filter-machine").value;
  const match = (e, word) => !word || new RegExp("\\b" + word.replace(/[.*+?^${}()|[\]\\]/g, "\\$&") + "\\b").test(e.what + " " + e.why);
  const shown = events.filter((e) => match(e, s) && match(e, m)).slice(-200).reverse();
  $("events").replaceChildren(...shown.map((e) => el("li", { "data-event": e.id },
    el("time", { datetime: new Date(e.at_ms).toISOString() }, new Date(e.at_ms).toLocaleTimeString()),
    el("strong", {}, e.what), " ",
    el("span", { class: e.outcome.startsWith("failed") ? "failed" : "" }, e.outcome), " ",
    el("span", { class: "why" }, e.why ? "— " + e.why : ""),
    el("span", { class: "why" }, " (" + e.who + ")"))));
}
$("filter-service").addEventListener("change", drawEvents);
$("filter-machine").addEventListener("change", drawEvents);

connect();
