#!/usr/bin/env node
// Load client for the hub benchmarks. Opens N WebSocket connections quickly (a bounded number
// of handshakes in flight) speaking either hub's plain protocol (/ws/events) or raw
// Engine.IO v4 / Socket.IO v5 over a websocket, then counts the benchmark's events per
// connection and measures publish-to-receive latency from data.sent_at_ms.
//
// It is driven by the orchestrator (bench/runner.py) over stdio, one JSON object a line:
//   stdout {"phase":"ready", ...}    every connection is open (and subscribed, if asked)
//   stdin  {"cmd":"done"}            the publisher has finished: report when every client has
//                                    every event, or when no progress for --grace ms
//   stdout {"phase":"result", ...}
//   stdin  {"cmd":"status"}          -> stdout {"phase":"status","open":n,...}
//   stdin  {"cmd":"exit"}            close every connection and exit
//
// Benchmark events carry data.run (this run's nonce) and data.seq (0..events-1); any other
// event (e.g. a server's own system_status) is counted as "foreign" and otherwise ignored.
"use strict";

const WebSocket = require("ws");
const readline = require("readline");
const { performance } = require("perf_hooks");
const crypto = require("crypto");

function parseArgs(argv) {
  const opts = {
    proto: "plain",
    urls: [],
    clients: 10,
    events: 10,
    token: "",
    subscribe: "",
    run: "",
    batch: 100,
    grace: 10000,
    connectTimeout: 30000,
    deflate: false,
  };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    const v = () => argv[++i];
    switch (a) {
      case "--proto": opts.proto = v(); break;
      case "--url": opts.urls = v().split(",").filter(Boolean); break;
      case "--clients": opts.clients = Number(v()); break;
      case "--events": opts.events = Number(v()); break;
      case "--token": opts.token = v(); break;
      case "--subscribe": opts.subscribe = v(); break;
      case "--run": opts.run = v(); break;
      case "--batch": opts.batch = Number(v()); break;
      case "--grace": opts.grace = Number(v()); break;
      case "--connect-timeout": opts.connectTimeout = Number(v()); break;
      case "--deflate": opts.deflate = true; break;
      default:
        console.error(`loadclient: unknown argument ${a}`);
        process.exit(2);
    }
  }
  if (!["plain", "sio"].includes(opts.proto) || opts.urls.length === 0) {
    console.error("usage: loadclient.js --proto plain|sio --url ws://h:p[,ws://h:p2] --clients N --events E --token JWT [--subscribe t1,t2] --run NONCE");
    process.exit(2);
  }
  return opts;
}

const opts = parseArgs(process.argv.slice(2));

// With BENCH_JWT_SECRET set, every connection gets its own HS256 token (sub bench-user-<i>):
// 1,000 subscribers are 1,000 users, so per-user connection limits do not bite.
const SECRET = process.env.BENCH_JWT_SECRET || "";
const b64url = (buf) => Buffer.from(buf).toString("base64url");
const JWT_HEAD = b64url(JSON.stringify({ alg: "HS256", typ: "JWT" }));
function tokenFor(idx) {
  if (!SECRET) return opts.token;
  const claims = { sub: `bench-user-${idx}`, role: "viewer", exp: Math.floor(Date.now() / 1000) + 86400 };
  const body = `${JWT_HEAD}.${b64url(JSON.stringify(claims))}`;
  return `${body}.${crypto.createHmac("sha256", SECRET).update(body).digest("base64url")}`;
}
const subscribeTypes = opts.subscribe ? opts.subscribe.split(",") : [];
const now = () => performance.timeOrigin + performance.now();
const emit = (obj) => process.stdout.write(JSON.stringify(obj) + "\n");

const E = opts.events;
const counts = new Uint8Array(opts.clients * E); // per (client, seq): times received, saturating
const latencies = new Float64Array(opts.clients * E);
let nLat = 0;
let unique = 0;
let duplicates = 0;
let foreign = 0;
let outOfOrder = 0;
let firstSent = Infinity;
let lastRecv = 0;
let lastProgress = 0;
let closedDuringRun = 0;
const closeCodes = {};
const errors = {};
const sockets = new Array(opts.clients).fill(null);
let openCount = 0;
let exiting = false;

function noteError(key) {
  errors[key] = (errors[key] || 0) + 1;
}

function onEvent(idx, env, state) {
  const data = env && env.data;
  if (!data || data.run !== opts.run || typeof data.seq !== "number") {
    foreign++;
    return;
  }
  const t = now();
  const seq = data.seq;
  if (seq < 0 || seq >= E) {
    foreign++;
    return;
  }
  const k = idx * E + seq;
  if (counts[k] === 0) {
    unique++;
    lastProgress = t;
    latencies[nLat++] = t - data.sent_at_ms;
    if (data.sent_at_ms < firstSent) firstSent = data.sent_at_ms;
    lastRecv = t;
  } else {
    duplicates++;
  }
  if (counts[k] < 255) counts[k]++;
  if (seq < state.lastSeq) outOfOrder++;
  state.lastSeq = seq;
  if (waiting && unique === openAtStart * E) finish();
}

function connectOne(idx) {
  const base = opts.urls[idx % opts.urls.length];
  return new Promise((resolve) => {
    const state = { lastSeq: -1, ready: false };
    let settled = false;
    const done = (ok, why) => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      if (!ok) {
        noteError(why);
        try { ws.terminate(); } catch (e) { /* already gone */ }
      }
      resolve(ok);
    };
    const timer = setTimeout(() => done(false, "connect_timeout"), opts.connectTimeout);
    const wsOpts = { perMessageDeflate: opts.deflate, handshakeTimeout: opts.connectTimeout };
    const token = tokenFor(idx);
    let ws;
    if (opts.proto === "plain") {
      wsOpts.headers = { Authorization: `Bearer ${token}` };
      ws = new WebSocket(`${base}/ws/events`, wsOpts);
    } else {
      ws = new WebSocket(`${base}/socket.io/?EIO=4&transport=websocket`, wsOpts);
    }
    const markReady = () => {
      state.ready = true;
      sockets[idx] = ws;
      openCount++;
      done(true);
    };
    ws.on("error", (err) => done(false, `error:${err.code || err.message}`));
    ws.on("close", (code) => {
      if (state.ready) {
        openCount--;
        sockets[idx] = null;
        if (!exiting) {
          closedDuringRun++;
          closeCodes[code] = (closeCodes[code] || 0) + 1;
        }
      } else {
        done(false, `closed:${code}`);
      }
    });
    if (opts.proto === "plain") {
      ws.on("message", (buf) => {
        let msg;
        try { msg = JSON.parse(buf.toString()); } catch (e) { noteError("bad_json"); return; }
        if (state.ready) {
          if (msg.data && msg.type !== "subscription_updated" && msg.type !== "pong") onEvent(idx, msg, state);
          return;
        }
        if (msg.type === "connection_established") {
          if (subscribeTypes.length) ws.send(JSON.stringify({ action: "subscribe", event_types: subscribeTypes }));
          else markReady();
        } else if (msg.type === "subscription_updated") {
          markReady();
        } else if (msg.type === "error") {
          done(false, `server_error:${msg.data && msg.data.code}`);
        }
      });
    } else {
      ws.on("message", (buf) => {
        const s = buf.toString();
        const c = s.charCodeAt(0);
        if (c === 0x34 /* '4' message */) {
          const p = s.charCodeAt(1);
          if (p === 0x32 /* '2' event */) {
            if (!state.ready) return;
            let arr;
            try { arr = JSON.parse(s.slice(2)); } catch (e) { noteError("bad_json"); return; }
            onEvent(idx, arr[1], state);
          } else if (p === 0x30 /* '0' connect ack */) {
            if (subscribeTypes.length) ws.send("421" + JSON.stringify(["subscribe", { event_types: subscribeTypes }]));
            else markReady();
          } else if (p === 0x33 /* '3' ack */) {
            if (!state.ready) {
              // "431[{...}]": ack id 1 is our subscribe
              let arr;
              try { arr = JSON.parse(s.slice(s.indexOf("["))); } catch (e) { arr = null; }
              if (arr && arr[0] && arr[0].subscribed_to) markReady();
              else done(false, "subscribe_refused");
            }
          } else if (p === 0x34 /* '4' connect error */) {
            done(false, "connect_error");
          } else if (p === 0x31 /* '1' disconnect */) {
            ws.close();
          }
        } else if (c === 0x32 /* '2' ping */) {
          ws.send("3");
        } else if (c === 0x30 /* '0' open */) {
          ws.send("40" + JSON.stringify({ token }));
        } else if (c === 0x31 /* '1' close */) {
          ws.close();
        }
      });
    }
  });
}

let connectStart = 0;
let connectEnd = 0;
let openAtStart = 0;
let waiting = false;
let graceTimer = null;
let resultSent = false;

async function connectAll() {
  connectStart = now();
  let next = 0;
  let failed = 0;
  const worker = async () => {
    while (next < opts.clients) {
      const idx = next++;
      if (!(await connectOne(idx))) failed++;
    }
  };
  await Promise.all(Array.from({ length: Math.min(opts.batch, opts.clients) }, worker));
  connectEnd = now();
  emit({
    phase: "ready",
    clients: opts.clients,
    connected: openCount,
    failed_connects: failed,
    connect_s: (connectEnd - connectStart) / 1000,
    errors,
  });
}

function percentile(sorted, q) {
  if (sorted.length === 0) return null;
  const i = Math.min(sorted.length - 1, Math.max(0, Math.ceil(q * sorted.length) - 1));
  return sorted[i];
}

function finish() {
  if (resultSent) return;
  resultSent = true;
  waiting = false;
  if (graceTimer) clearInterval(graceTimer);
  const lat = latencies.subarray(0, nLat).slice().sort();
  let sum = 0;
  for (let i = 0; i < lat.length; i++) sum += lat[i];
  // Missing is counted over the clients that were open when publishing began.
  let clientsComplete = 0;
  for (let c = 0; c < opts.clients; c++) {
    let all = true;
    for (let s = 0; s < E; s++) if (counts[c * E + s] === 0) { all = false; break; }
    if (all) clientsComplete++;
  }
  const expected = openAtStart * E;
  const span = lastRecv > 0 && firstSent < Infinity ? (lastRecv - firstSent) / 1000 : null;
  emit({
    phase: "result",
    proto: opts.proto,
    clients: opts.clients,
    connected: openAtStart,
    events: E,
    expected,
    delivered: unique,
    missing: Math.max(0, expected - unique),
    duplicates,
    foreign,
    out_of_order: outOfOrder,
    clients_complete: clientsComplete,
    complete: unique === expected && duplicates === 0 && openAtStart === opts.clients,
    closed_during_run: closedDuringRun,
    close_codes: closeCodes,
    errors,
    latency_ms: {
      p50: percentile(lat, 0.5),
      p90: percentile(lat, 0.9),
      p99: percentile(lat, 0.99),
      max: lat.length ? lat[lat.length - 1] : null,
      mean: lat.length ? sum / lat.length : null,
    },
    first_sent_ms: firstSent < Infinity ? firstSent : null,
    last_recv_ms: lastRecv || null,
    span_s: span,
    deliveries_per_s: span && span > 0 ? unique / span : null,
  });
}

function onCommand(line) {
  let cmd;
  try { cmd = JSON.parse(line); } catch (e) { return; }
  if (cmd.cmd === "done") {
    waiting = true;
    lastProgress = now();
    if (unique === openAtStart * E) { finish(); return; }
    graceTimer = setInterval(() => {
      if (now() - lastProgress > opts.grace) finish();
    }, 100);
  } else if (cmd.cmd === "status") {
    emit({ phase: "status", open: openCount, delivered: unique, closed_during_run: closedDuringRun });
  } else if (cmd.cmd === "exit") {
    exiting = true;
    for (const ws of sockets) if (ws) ws.terminate();
    setTimeout(() => process.exit(0), 50);
  }
}

process.stdout.on("error", () => process.exit(0));
connectAll().then(() => {
  openAtStart = openCount;
  const rl = readline.createInterface({ input: process.stdin });
  rl.on("line", onCommand);
  rl.on("close", () => { exiting = true; process.exit(0); });
});
