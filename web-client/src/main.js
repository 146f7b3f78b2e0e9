// hub dashboard: the latest events from the hub's history, then live ones over one
// Socket.IO connection to the hub that served this page.
//
// The view is one selection — the event types turned on and a minimum severity — that the
// hub applies (GET /events for the history, the connection's auth for live events; the
// page filters nothing itself, except the search box over what is loaded). Changing the
// selection reloads the view: read the history with the new selection, then reconnect
// resuming right after the history's newest id, so the hub replays what was published in
// between and nothing is missed or shown twice.

import { io } from "socket.io-client";

import { CriticalAlerts } from "./alerts.js";
import { MinuteChart } from "./chart.js";
import {
  badgeText, clock, isCritical, KNOWN_TYPES, level, levelClass, localTime, SAMPLES, searchText,
  SEVERITIES, summary, threatContext, typeClass,
} from "./format.js";
import { bearerOf, claimsOf, clearAuth, cookieToken, loadAuth, saveAuth } from "./session.js";

const $ = (id) => document.getElementById(id);

// The hub may be mounted under a prefix (/hub/dashboard/ → /hub/socket.io/).
const BASE = location.pathname.replace(/\/dashboard(\/.*)?$/, "");
const SEEN_MAX = 5000;
const HISTORY_MAX = 1000; // GET /events gives at most 1000 events a request
const COLOURS = {
  threat_detected: "#c678dd",
  provider_health_change: "#56b6c2",
  cost_threshold_alert: "#e5c07b",
  system_status: "#61afef",
};
const EXTRA_COLOURS = ["#98c379", "#d19a66", "#be5046", "#7f848e", "#e06c75"];

const state = {
  auth: null,
  socket: null,
  types: [...KNOWN_TYPES], // every type the page knows of, in display order
  disabled: new Set(), // types turned off; none: every type, new ones included
  minSeverity: "",
  lastId: null, // the resume point: the newest id the view has covered
  seen: new Set(), // ids counted in the side panels, once each whatever the view
  seenOrder: [],
  viewIds: new Set(), // ids in the current view, so that none shows twice
  viewOrder: [],
  loadSeq: 0, // bumped by each load of the view; a load overtaken by another gives up
  quietResume: false, // the resume right after a load is routine, not a reconnect
  loading: false, // from a load's start to its connection's connect
  paused: false,
  held: [], // events that arrived while paused, oldest first
  pending: [], // events waiting for the next frame, oldest first
  cap: 500,
  query: "",
  counters: new Map(),
  providers: new Map(),
  costs: [],
  everConnected: false,
  stopped: false, // signed out or refused: do not reconnect
  renderQueued: false,
};

const chart = new MinuteChart($("chart"), colourOf);
const alerts = new CriticalAlerts({
  describe: (event) => ({
    title: `Critical ${event.type.replace(/_/g, " ")}`,
    body: [summary(event), ...threatContext(event).map(([k, v]) => `${k} ${v}`)].join(" · "),
  }),
  problem: (text) => banner("alerts", "warn", text),
  changed: renderAlertButtons,
});

function colourOf(type) {
  if (COLOURS[type]) return COLOURS[type];
  const i = Math.max(0, state.types.indexOf(type));
  return EXTRA_COLOURS[i % EXTRA_COLOURS.length];
}

// -- sign-in ---------------------------------------------------------------------------
function showSignIn(message) {
  $("signin").hidden = false;
  $("app").hidden = true;
  $("sign-out").hidden = true;
  $("who").textContent = "";
  const error = $("signin-error");
  error.hidden = !message;
  error.textContent = message || "";
  setConnection("offline");
}

$("signin-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const token = $("token-input").value.trim().replace(/^Bearer\s+/i, "");
  if (!token) {
    showSignIn("Paste a token first.");
    return;
  }
  start({ mode: "token", token });
});

$("cookie-button").addEventListener("click", () => start({ mode: "cookie" }));

$("sign-out").addEventListener("click", () => {
  state.stopped = true;
  clearAuth();
  if (state.socket) state.socket.disconnect();
  location.reload();
});

function refuse(message) {
  state.stopped = true;
  state.loadSeq++; // a load under way stops
  clearAuth();
  if (state.socket) {
    state.socket.disconnect();
    state.socket = null;
  }
  showSignIn(message);
}

// -- connection ------------------------------------------------------------------------
async function start(auth) {
  state.auth = auth;
  state.stopped = false;
  saveAuth(auth);
  $("signin").hidden = true;
  $("app").hidden = false;
  $("sign-out").hidden = false;
  const claims = claimsOf(bearerOf(auth));
  $("who").textContent = claims
    ? `${claims.sub ?? "?"}${claims.role ? ` (${claims.role})` : ""}`
    : auth.mode === "cookie" ? "signed in with cookie" : "";
  await loadTypes();
  renderFilters();
  renderCounters();
  load();
  probePublish();
}

async function loadTypes() {
  // The hub's configured types (extra ones included) are listed in its OpenAPI document.
  try {
    const response = await fetch(`${BASE}/openapi.json`);
    const doc = await response.json();
    const names = doc.components.schemas.PublishRequest.properties.type.enum;
    if (Array.isArray(names) && names.length) learnTypes(names);
  } catch {
    // Keep the built-in types.
  }
}

/** The types the view asks for: null for every type (those the hub learns later too). */
function selectedTypes() {
  return state.disabled.size ? state.types.filter((t) => !state.disabled.has(t)) : null;
}

function selectionFilter() {
  return state.minSeverity ? { min_severity: state.minSeverity } : null;
}

/** (Re)load the view for the current selection: its history, then live events. */
async function load() {
  const seq = ++state.loadSeq;
  state.loading = true;
  // The previous selection's stream stops first; what it would have sent is in the history.
  if (state.socket?.connected || state.socket?.active) state.socket.disconnect();
  setConnection("reconnecting", "loading history…");
  clearView();
  const types = selectedTypes();
  if (types && !types.length) {
    note("No event types selected.");
    state.lastId = null; // nothing to resume: the connection carries no types
    state.quietResume = false;
    connect();
    return;
  }
  const page = await fetchHistory(types);
  if (seq !== state.loadSeq || state.stopped) return; // overtaken by a newer load
  if (page) {
    for (const event of page.events) receive(event, false);
    // Resume after the newest id the history read (not only the newest it matched): the
    // hub replays just what was published since. An empty history: from the start.
    state.lastId = page.next_after || newest(page.events) || "0-0";
    const n = page.events.length;
    note(n ? `Latest ${n} event${n === 1 ? "" : "s"} from the history, then live ones.`
      : "No matching events in the history; waiting for live ones.");
  }
  state.quietResume = Boolean(state.lastId);
  connect();
}

async function fetchHistory(types) {
  const params = new URLSearchParams({ limit: String(Math.min(state.cap, HISTORY_MAX)) });
  if (types) params.set("types", types.join(","));
  if (state.minSeverity) params.set("min_severity", state.minSeverity);
  const headers = {};
  // A pasted token goes as a bearer; with the cookie the browser sends it by itself.
  if (state.auth.mode === "token") headers.Authorization = `Bearer ${state.auth.token}`;
  try {
    const response = await fetch(`${BASE}/events?${params}`, { headers, cache: "no-store" });
    const body = await response.json().catch(() => ({}));
    if (response.ok && Array.isArray(body.events)) {
      document.querySelector('.banner[data-key="history"]')?.remove();
      return body;
    }
    const why = body?.error?.message || response.statusText || String(response.status);
    historyProblem(`the hub answered ${response.status} (${why})`);
  } catch (err) {
    historyProblem(`the hub is unreachable (${err.message})`);
  }
  return null;
}

function historyProblem(why) {
  banner("history", "warn", `Could not load the history: ${why}. Showing live events only.`);
  note("History unavailable: live events only.");
}

function connect() {
  if (state.socket) {
    state.socket.connect();
    return;
  }
  const socket = io(location.origin, {
    path: `${BASE}/socket.io/`,
    transports: ["websocket", "polling"],
    tryAllTransports: true,
    reconnectionDelay: 500,
    reconnectionDelayMax: 5000,
    randomizationFactor: 0.5,
    // Evaluated on every (re)connect: the view's selection, and a resume after the last
    // id covered, so the page misses nothing across a reload, a restart or a network cut.
    auth: (cb) => {
      const payload = {};
      if (state.auth.mode === "token") payload.token = state.auth.token;
      const types = selectedTypes();
      if (types) payload.event_types = types;
      const filter = selectionFilter();
      if (filter) payload.filter = filter;
      if (state.lastId) payload.last_event_id = state.lastId;
      cb(payload);
    },
  });
  state.socket = socket;

  socket.on("connect", () => {
    setConnection("connected");
    if (state.everConnected && !state.lastId && !state.loading) note("Reconnected.");
    state.loading = false;
    state.everConnected = true;
    loadInstance();
  });

  socket.on("connect_error", (err) => {
    if (err.message === "unauthorized" || err.data?.code === 4003) {
      const why = err.data?.message || err.data?.reason || "invalid token";
      refuse(`Sign-in failed: the hub refused this token (${why}).`);
    } else if (err.data) {
      // Refused by the hub for another reason (e.g. too many connections): try later.
      banner("refused", "warn", `The hub refused the connection: ${err.message}. Retrying…`);
      setConnection("reconnecting");
      retrySoon();
    } else {
      setConnection(navigator.onLine ? "reconnecting" : "offline");
    }
  });

  socket.on("disconnect", (reason) => {
    if (state.stopped) return;
    state.quietResume = false;
    if (state.loading) return; // the view is reloading, and says so
    setConnection(navigator.onLine ? "reconnecting" : "offline");
    // After a server-side disconnect (instance shutting down, slow consumer) socket.io
    // does not reconnect by itself; every other reason it retries with backoff.
    if (reason === "io server disconnect") retrySoon();
  });

  socket.io.on("reconnect_attempt", (attempt) => {
    if (!state.stopped) setConnection("reconnecting", `reconnecting (attempt ${attempt})…`);
  });

  socket.on("resumed", (info) => {
    if (state.quietResume) {
      state.quietResume = false; // the hand-over from the history to live events
      return;
    }
    const n = info?.replayed ?? 0;
    const text = `Reconnected — caught up ${n} event${n === 1 ? "" : "s"} missed while away.`;
    banner("resumed", "ok", text);
    note(text);
  });

  socket.on("history_truncated", (info) => {
    banner("truncated", "warn",
      `Some events were missed: the hub no longer retains everything after ${info?.last_event_id}; `
      + `catching up from ${info?.first_retained_id ?? "the oldest retained event"}.`);
  });

  socket.on("token_expired", () => refuse("Your token expired. Sign in again."));

  socket.on("token_expiring", (info) => refreshToken(socket, info));

  socket.on("error", (err) => banner("server-error", "bad", `Hub error: ${err?.message ?? err}`));

  socket.on("connection_established", (info) => {
    showInstance(info?.instance_id);
    const types = Array.isArray(info?.event_types) ? info.event_types.map(String) : [];
    // What the hub confirms it sends this connection (shown to tests and curious users).
    $("filters").dataset.subscribed = [...types].sort().join(",");
    if (!selectedTypes()) learnTypes(types);
  });

  socket.onAny((name, envelope) => {
    if (envelope && typeof envelope === "object" && envelope.id && envelope.type === name) {
      receive(envelope, true);
    }
  });
}

function retrySoon() {
  const delay = 250 + Math.random() * 750;
  setTimeout(() => {
    if (!state.stopped && state.socket && !state.socket.connected) state.socket.connect();
  }, delay);
}

function setConnection(status, text) {
  const el = $("conn");
  el.dataset.state = status;
  $("conn-text").textContent = text || status;
  if (status !== "connected") $("instance").textContent = "";
}

async function loadInstance() {
  try {
    const response = await fetch(`${BASE}/ws/health`, { cache: "no-store" });
    const health = await response.json();
    if (state.socket?.connected) showInstance(health.instance_id);
  } catch {
    // Health unavailable; the indicator just omits the instance.
  }
}

function showInstance(id) {
  if (id) $("instance").textContent = `via ${id}`;
}

window.addEventListener("offline", () => setConnection("offline"));
window.addEventListener("online", () => {
  if (state.socket && !state.socket.connected && !state.stopped) {
    setConnection("reconnecting");
    state.socket.connect();
  }
});

// -- events ----------------------------------------------------------------------------
function compareIds(a, b) {
  const [am, as] = String(a).split("-").map(Number);
  const [bm, bs] = String(b).split("-").map(Number);
  return am - bm || as - bs;
}

function newest(events) {
  return events.reduce((id, e) => (!id || compareIds(e.id, id) > 0 ? e.id : id), null);
}

function remember(set, order, id) {
  set.add(id);
  order.push(id);
  if (order.length > SEEN_MAX) set.delete(order.shift());
}

/** An event for the view: from the history (`live` false) or the connection. */
function receive(event, live) {
  if (typeof event?.id !== "string" || typeof event.type !== "string") return;
  if (state.viewIds.has(event.id)) return; // at the seam of history, replay and live
  remember(state.viewIds, state.viewOrder, event.id);
  if (live && (!state.lastId || compareIds(event.id, state.lastId) > 0)) state.lastId = event.id;
  if (!state.types.includes(event.type)) learnTypes([event.type]);

  if (!state.seen.has(event.id)) {
    remember(state.seen, state.seenOrder, event.id);
    state.counters.set(event.type, (state.counters.get(event.type) || 0) + 1);
    chart.add(event);
    if (event.type === "provider_health_change" && typeof event.data?.provider === "string") {
      state.providers.set(event.data.provider, event);
    } else if (event.type === "cost_threshold_alert") {
      state.costs.unshift(event);
      state.costs.length = Math.min(state.costs.length, 8);
    }
  }
  if (live) {
    // Only what happens now: the history's old news raise no banner and no alert.
    if (event.type === "system_status") systemBanner(event);
    if (isCritical(event)) alerts.add(event);
  }
  const queue = state.paused && live ? state.held : state.pending;
  queue.push(event);
  if (queue.length > state.cap) queue.splice(0, queue.length - state.cap);
  scheduleRender();
}

function clearView() {
  $("feed").replaceChildren();
  state.pending = [];
  state.held = [];
  state.viewIds = new Set();
  state.viewOrder = [];
  scheduleRender();
}

function systemBanner(event) {
  const d = event.data || {};
  if (typeof d.status !== "string") return; // the proxy's alert shape: a row is enough
  const who = d.instance_id ? `Instance ${d.instance_id}` : "The hub";
  const texts = {
    online: [`${who} is online${d.version ? ` (version ${d.version})` : ""}.`, "ok"],
    shutdown: [`${who} is shutting down; the dashboard will reconnect and catch up.`, "warn"],
    config_change: [`${who}: configuration changed${d.message ? ` — ${d.message}` : ""}.`, "info"],
    degraded: [`${who} is degraded${d.message ? `: ${d.message}` : ""}.`, "warn"],
  };
  const [text, kind] = texts[d.status] || [`${who}: ${d.status}${d.message ? ` — ${d.message}` : ""}`, "info"];
  banner("system", kind, text);
}

function scheduleRender() {
  if (state.renderQueued) return;
  state.renderQueued = true;
  requestAnimationFrame(render);
}

function render() {
  state.renderQueued = false;
  const feed = $("feed");
  if (state.pending.length) {
    const fragment = document.createDocumentFragment();
    for (let i = state.pending.length - 1; i >= 0; i--) fragment.append(row(state.pending[i]));
    state.pending = [];
    feed.prepend(fragment);
    while (feed.childElementCount > state.cap) feed.lastElementChild.remove();
  }
  $("feed-empty").hidden = feed.childElementCount > 0;
  $("pause").textContent = state.paused
    ? `Resume${state.held.length ? ` (${state.held.length} new)` : ""}` : "Pause";
  renderSearchCount();
  renderCounters();
  chart.render();
  renderProviders();
  renderCosts();
}

function row(event) {
  const li = document.createElement("li");
  li.className = "ev new";
  li.dataset.type = event.type;
  li.dataset.id = event.id;
  li.event = event; // for the export
  li.searchText = searchText(event);
  li.hidden = !matchesSearch(li);
  const details = document.createElement("details");
  const head = document.createElement("summary");
  const time = document.createElement("time");
  const when = localTime(event.timestamp);
  time.dateTime = event.timestamp;
  if (when.date) time.append(span("date", when.date));
  time.append(span("clock", when.time));
  time.title = when.utc ? `UTC ${when.utc}` : "";
  const type = span(`type ${typeClass(event.type)}`, event.type);
  type.title = event.type;
  const lvl = level(event);
  const badge = span(`badge ${levelClass(lvl)}`, badgeText(lvl));
  badge.title = lvl;
  const text = span("sum", summary(event));
  text.title = text.textContent;
  head.append(time, type, badge, text);
  const context = threatContext(event);
  if (context.length) {
    const meta = span("meta", "");
    for (const [label, value] of context) {
      const item = span(`kv kv-${label}`, "");
      item.append(span("k", label), document.createTextNode(" "), span("v", value));
      item.title = `${label}: ${value}`;
      meta.append(item);
    }
    head.append(meta);
  }
  const pre = document.createElement("pre");
  pre.textContent = JSON.stringify(event, null, 2);
  details.append(head, pre);
  li.append(details);
  return li;
}

function span(className, text) {
  const s = document.createElement("span");
  s.className = className;
  s.textContent = text;
  return s;
}

// -- side panels -----------------------------------------------------------------------
function renderCounters() {
  const list = $("counters");
  list.replaceChildren(...state.types.map((type) => {
    const li = document.createElement("li");
    li.dataset.type = type;
    const name = span(typeClass(type), type);
    name.style.color = colourOf(type);
    li.append(name, span("n", String(state.counters.get(type) || 0)));
    return li;
  }));
}

function renderProviders() {
  if (!state.providers.size) return;
  const grid = $("providers");
  const names = [...state.providers.keys()].sort();
  grid.replaceChildren(...names.map((name) => {
    const event = state.providers.get(name);
    const status = event.data.new_status;
    const tile = document.createElement("div");
    tile.className = `provider st-${status}`;
    tile.dataset.provider = name;
    tile.title = `${event.data.old_status} → ${status} at ${event.timestamp}`;
    tile.append(span("name", name), document.createElement("br"),
      span(`badge ${levelClass(status)}`, status), document.createElement("br"),
      span("muted small", `since ${clock(event.timestamp)}`));
    return tile;
  }));
}

function renderCosts() {
  if (!state.costs.length) return;
  $("costs").replaceChildren(...state.costs.map((event) => {
    const li = document.createElement("li");
    li.append(span(`badge ${levelClass(event.data.severity)}`, event.data.severity),
      span("", summary(event)), span("muted small", clock(event.timestamp)));
    return li;
  }));
}

// -- banners ---------------------------------------------------------------------------
// The hub says the token expires soon (token_expiring): hand it a newer one in-band so the
// page stays connected. With the cookie, re-read it (whatever signed us in renews it); an
// HttpOnly cookie the page cannot read reaches the hub only in a handshake, so reconnect
// (resuming after the last event seen, nothing lost), once per expiry. A pasted token
// cannot be renewed by the page: say so, with time to sign in again.
function refreshToken(socket, info) {
  const cookie = state.auth?.mode === "cookie";
  const fresh = cookie ? cookieToken() : null;
  const when = info?.exp ? ` at ${new Date(info.exp * 1000).toLocaleTimeString()}` : " soon";
  if (fresh) {
    socket.emit("refresh", { token: fresh }, (ack) => {
      if (ack?.error) {
        banner("expiring", "warn", `Your token expires${when} and could not be refreshed `
          + `(${ack.error.message}).`);
        return;
      }
      if (info?.exp && !(ack?.exp > info.exp)) {
        // The cookie has not been renewed yet (same expiry): try again shortly, until then.
        const left = info.exp * 1000 - Date.now();
        if (left > 0 && state.socket === socket) {
          setTimeout(() => refreshToken(socket, info), Math.min(500, left / 2));
        }
        return;
      }
      document.querySelector('.banner[data-key="expiring"]')?.remove();
      const conn = $("conn");
      conn.dataset.refreshes = String(Number(conn.dataset.refreshes || 0) + 1);
      conn.dataset.exp = String(ack?.exp ?? "");
    });
    return;
  }
  if (cookie && state.reconnectedFor !== info?.exp) {
    state.reconnectedFor = info?.exp;
    socket.disconnect();
    socket.connect();
    return;
  }
  banner("expiring", "warn", `Your token expires${when}. Sign in again with a new one to stay `
    + "connected.");
}

function banner(key, kind, text) {
  let el = document.querySelector(`.banner[data-key="${key}"]`);
  if (!el) {
    el = document.createElement("div");
    el.dataset.key = key;
    const message = span("text", "");
    const close = document.createElement("button");
    close.type = "button";
    close.className = "ghost close";
    close.textContent = "×";
    close.setAttribute("aria-label", "Dismiss");
    close.addEventListener("click", () => el.remove());
    el.append(message, close);
    $("banners").append(el);
  }
  el.className = `banner ${kind}`;
  el.setAttribute("role", kind === "bad" || kind === "warn" ? "alert" : "status");
  el.querySelector(".text").textContent = text;
}

function note(text) {
  $("feed-note").textContent = text;
}

// -- the selection: types and minimum severity (applied by the hub) --------------------
function learnTypes(names) {
  const fresh = names.filter((n) => typeof n === "string" && n && !state.types.includes(n));
  if (!fresh.length) return;
  state.types.push(...fresh);
  renderFilters();
}

function renderFilters() {
  const box = $("filters");
  box.replaceChildren(...state.types.map((type) => {
    const label = document.createElement("label");
    label.className = "filter";
    const input = document.createElement("input");
    input.type = "checkbox";
    input.checked = !state.disabled.has(type);
    input.dataset.type = type;
    input.addEventListener("change", () => setType(type, input.checked));
    const swatch = span("swatch", "");
    swatch.style.background = colourOf(type);
    label.append(input, swatch, span("name", type));
    label.title = type;
    return label;
  }));
}

function setType(type, on) {
  if (on) state.disabled.delete(type);
  else state.disabled.add(type);
  load();
}

const severity = $("min-severity");
severity.replaceChildren(...SEVERITIES.map(([value, label]) => {
  const option = document.createElement("option");
  option.value = value;
  option.textContent = label;
  return option;
}));
severity.addEventListener("change", () => {
  state.minSeverity = severity.value;
  load();
});

// -- search over what is loaded, export ------------------------------------------------
function matchesSearch(li) {
  return !state.query || li.searchText.includes(state.query);
}

$("search").addEventListener("input", () => {
  state.query = $("search").value.trim().toLowerCase();
  for (const li of $("feed").children) li.hidden = !matchesSearch(li);
  renderSearchCount();
});

function renderSearchCount() {
  const feed = $("feed");
  const search = $("search");
  if (!state.query) {
    delete search.dataset.matches;
    return;
  }
  let shown = 0;
  for (const li of feed.children) if (!li.hidden) shown++;
  search.dataset.matches = String(shown);
  search.title = `${shown} of ${feed.childElementCount} loaded rows match`;
}

/** The rows shown (search applied), oldest first, as NDJSON: one envelope a line. */
$("export").addEventListener("click", () => {
  const events = [...$("feed").children].filter((li) => !li.hidden).map((li) => li.event).reverse();
  const text = events.map((e) => JSON.stringify(e)).join("\n") + (events.length ? "\n" : "");
  const url = URL.createObjectURL(new Blob([text], { type: "application/x-ndjson" }));
  const link = document.createElement("a");
  link.href = url;
  link.download = `hub-events-${new Date().toISOString().replace(/[:.]/g, "-")}.ndjson`;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10_000);
  note(`Exported ${events.length} row${events.length === 1 ? "" : "s"}.`);
});

// -- alerts ----------------------------------------------------------------------------
function renderAlertButtons() {
  for (const [id, on] of [["notify", alerts.notify], ["sound", alerts.sound]]) {
    $(id).setAttribute("aria-pressed", String(on));
  }
  $("notify").textContent = alerts.notify ? "Notify critical: on" : "Notify critical";
  $("sound").textContent = alerts.sound ? "Sound: on" : "Sound";
}

$("notify").addEventListener("click", () => alerts.toggleNotify());
$("sound").addEventListener("click", () => alerts.toggleSound());
renderAlertButtons();

// -- pause, cap, clear -----------------------------------------------------------------
$("pause").addEventListener("click", () => {
  state.paused = !state.paused;
  $("pause").setAttribute("aria-pressed", String(state.paused));
  if (!state.paused) {
    state.pending.push(...state.held);
    state.held = [];
  }
  note(state.paused ? "Paused: new events are held until you resume." : "");
  scheduleRender();
});

$("cap").addEventListener("change", () => {
  state.cap = Number($("cap").value);
  scheduleRender();
});

$("clear").addEventListener("click", () => {
  $("feed").replaceChildren();
  state.held = [];
  state.pending = [];
  scheduleRender();
});

// -- send a test event -----------------------------------------------------------------
async function probePublish() {
  // POST /events with an empty body: 422 means the token may publish (and nothing is
  // published), 403 that its role may not, 401 that it is not a bearer token we hold.
  const token = bearerOf(state.auth);
  if (!token) return;
  try {
    const response = await fetch(`${BASE}/events`, {
      method: "POST",
      headers: { Authorization: `Bearer ${token}`, "Content-Type": "application/json" },
      body: "{}",
    });
    if (response.status === 422) showPublishForm();
  } catch {
    // The hub is unreachable; the form stays hidden.
  }
}

function showPublishForm() {
  const select = $("publish-type");
  select.replaceChildren(...state.types.map((type) => {
    const option = document.createElement("option");
    option.value = option.textContent = type;
    return option;
  }));
  const fill = () => {
    $("publish-data").value = JSON.stringify(SAMPLES[select.value] || {}, null, 2);
  };
  select.addEventListener("change", fill);
  fill();
  $("publish").hidden = false;
}

$("publish-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const result = $("publish-result");
  result.className = "small";
  let data;
  try {
    data = JSON.parse($("publish-data").value);
  } catch (err) {
    result.className = "small error";
    result.textContent = `Data is not valid JSON: ${err.message}`;
    return;
  }
  result.textContent = "Sending…";
  try {
    const response = await fetch(`${BASE}/events`, {
      method: "POST",
      headers: {
        Authorization: `Bearer ${bearerOf(state.auth)}`, "Content-Type": "application/json",
      },
      body: JSON.stringify({ type: $("publish-type").value, data }),
    });
    const body = await response.json().catch(() => ({}));
    if (response.status === 202) {
      result.className = "small ok-text";
      result.textContent = `Published ${body.id}`;
    } else {
      const error = body.error || {};
      result.className = "small error";
      result.textContent = `Refused (${response.status}): ${error.message || response.statusText}`
        + (error.field ? ` — field ${error.field}` : "");
    }
  } catch (err) {
    result.className = "small error";
    result.textContent = `Could not reach the hub: ${err.message}`;
  }
});

// -- boot ------------------------------------------------------------------------------
const saved = loadAuth();
if (saved && (saved.mode === "cookie" || saved.token)) start(saved);
else showSignIn();
if (!cookieToken()) $("cookie-button").title = "Works when the hub's sign-in set an HttpOnly ks_access_token cookie";
