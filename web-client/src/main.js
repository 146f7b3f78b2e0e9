// hub dashboard: one Socket.IO connection to the hub that served this page.

import { io } from "socket.io-client";

import { MinuteChart } from "./chart.js";
import { clock, KNOWN_TYPES, level, levelClass, SAMPLES, summary, typeClass } from "./format.js";
import { bearerOf, claimsOf, clearAuth, cookieToken, loadAuth, saveAuth } from "./session.js";

const $ = (id) => document.getElementById(id);

// The hub may be mounted under a prefix (/hub/dashboard/ → /hub/socket.io/).
const BASE = location.pathname.replace(/\/dashboard(\/.*)?$/, "");
const SEEN_MAX = 5000;
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
  types: [...KNOWN_TYPES],
  enabled: new Set(KNOWN_TYPES),
  lastId: null, // the resume point: the greatest event id seen
  seen: new Set(),
  seenOrder: [],
  paused: false,
  held: [], // events that arrived while paused, oldest first
  pending: [], // events waiting for the next frame, oldest first
  cap: 500,
  counters: new Map(),
  providers: new Map(),
  costs: [],
  everConnected: false,
  stopped: false, // signed out or refused: do not reconnect
  renderQueued: false,
};

const chart = new MinuteChart($("chart"), colourOf);

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
  setConnection("reconnecting", "connecting…");
  connect();
  probePublish();
}

async function loadTypes() {
  // The hub's configured types (extra ones included) are listed in its OpenAPI document.
  try {
    const response = await fetch(`${BASE}/openapi.json`);
    const doc = await response.json();
    const names = doc.components.schemas.PublishRequest.properties.type.enum;
    if (Array.isArray(names) && names.length) {
      state.types = names;
      state.enabled = new Set(names);
    }
  } catch {
    // Keep the built-in types.
  }
}

function connect() {
  const socket = io(location.origin, {
    path: `${BASE}/socket.io/`,
    transports: ["websocket", "polling"],
    tryAllTransports: true,
    reconnectionDelay: 500,
    reconnectionDelayMax: 5000,
    randomizationFactor: 0.5,
    // Evaluated on every (re)connect: the hub resumes after the last id we saw, with the
    // types the filters currently allow, so the page misses nothing across a restart.
    auth: (cb) => {
      const payload = { event_types: [...state.enabled] };
      if (state.auth.mode === "token") payload.token = state.auth.token;
      if (state.lastId) payload.last_event_id = state.lastId;
      cb(payload);
    },
  });
  state.socket = socket;

  socket.on("connect", () => {
    setConnection("connected");
    if (state.everConnected && !state.lastId) note("Reconnected.");
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
    setConnection(navigator.onLine ? "reconnecting" : "offline");
    // After a server-side disconnect (instance shutting down, slow consumer) socket.io
    // does not reconnect by itself; every other reason it retries with backoff.
    if (reason === "io server disconnect") retrySoon();
  });

  socket.io.on("reconnect_attempt", (attempt) => {
    if (!state.stopped) setConnection("reconnecting", `reconnecting (attempt ${attempt})…`);
  });

  socket.on("resumed", (info) => {
    const n = info?.replayed ?? 0;
    const text = `Reconnected — caught up ${n} event${n === 1 ? "" : "s"} missed while away.`;
    banner("resumed", "ok", text);
    $("feed-note").textContent = text;
  });

  socket.on("history_truncated", (info) => {
    banner("truncated", "warn",
      `Some events were missed: the hub no longer retains everything after ${info?.last_event_id}; `
      + `catching up from ${info?.first_retained_id ?? "the oldest retained event"}.`);
  });

  socket.on("token_expired", () => refuse("Your token expired. Sign in again."));

  socket.on("token_expiring", (info) => refreshToken(socket, info));

  socket.on("error", (err) => banner("server-error", "bad", `Hub error: ${err?.message ?? err}`));

  socket.on("connection_established", (info) => showInstance(info?.instance_id));

  socket.onAny((name, envelope) => {
    if (envelope && typeof envelope === "object" && envelope.id && envelope.type === name) {
      receive(envelope);
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
  const [am, as] = a.split("-").map(Number);
  const [bm, bs] = b.split("-").map(Number);
  return am - bm || as - bs;
}

function receive(event) {
  if (state.seen.has(event.id)) return; // a duplicate at the seam of replay and live
  state.seen.add(event.id);
  state.seenOrder.push(event.id);
  if (state.seenOrder.length > SEEN_MAX) state.seen.delete(state.seenOrder.shift());
  if (!state.lastId || compareIds(event.id, state.lastId) > 0) state.lastId = event.id;

  state.counters.set(event.type, (state.counters.get(event.type) || 0) + 1);
  if (!state.types.includes(event.type)) state.types.push(event.type);
  chart.add(event);
  if (event.type === "provider_health_change" && event.data?.provider) {
    state.providers.set(event.data.provider, event);
  } else if (event.type === "cost_threshold_alert") {
    state.costs.unshift(event);
    state.costs.length = Math.min(state.costs.length, 8);
  } else if (event.type === "system_status") {
    systemBanner(event);
  }
  const queue = state.paused ? state.held : state.pending;
  queue.push(event);
  if (queue.length > state.cap) queue.splice(0, queue.length - state.cap);
  scheduleRender();
}

function systemBanner(event) {
  const d = event.data || {};
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
  li.hidden = isFiltered(event.type);
  const details = document.createElement("details");
  const head = document.createElement("summary");
  const time = document.createElement("time");
  time.dateTime = event.timestamp;
  time.textContent = clock(event.timestamp);
  time.title = `${event.timestamp} · id ${event.id}`;
  const type = span(`type ${typeClass(event.type)}`, event.type);
  const lvl = level(event);
  const badge = span(`badge ${levelClass(lvl)}`, (lvl === "config_change" ? "config" : lvl.replace(/_/g, " ")) || "—");
  const text = span("sum", summary(event));
  text.title = text.textContent;
  head.append(time, type, badge, text);
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

// -- filters, pause, cap ---------------------------------------------------------------
function renderFilters() {
  const box = $("filters");
  box.replaceChildren(...state.types.map((type) => {
    const label = document.createElement("label");
    label.className = "filter";
    const input = document.createElement("input");
    input.type = "checkbox";
    input.checked = state.enabled.has(type);
    input.dataset.type = type;
    input.addEventListener("change", () => setFilter(type, input.checked));
    const swatch = span("swatch", "");
    swatch.style.background = colourOf(type);
    label.append(input, swatch, document.createTextNode(type));
    return label;
  }));
  applyFilterStyle();
}

function setFilter(type, on) {
  if (on) state.enabled.add(type);
  else state.enabled.delete(type);
  applyFilterStyle();
  // Change the server-side subscription: the hub stops (or starts) sending this type.
  const socket = state.socket;
  if (socket?.connected) {
    socket.emit(on ? "subscribe" : "unsubscribe", { event_types: [type] }, (ack) => {
      if (ack?.error) banner("filter", "bad", `Could not change the subscription: ${ack.error.message}`);
      // What the hub confirms it sends us now (shown to tests and curious users).
      else if (ack?.subscribed_to) $("filters").dataset.subscribed = ack.subscribed_to.join(",");
    });
  }
}

function applyFilterStyle() {
  // Rows of a filtered-out type stay in memory and come back when it is re-enabled. (Not
  // through a generated <style>: the dashboard's Content-Security-Policy forbids inline
  // styles.)
  for (const li of $("feed").children) li.hidden = isFiltered(li.dataset.type);
}

function isFiltered(type) {
  return state.types.includes(type) && !state.enabled.has(type);
}

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
