#!/usr/bin/env node
// Reference peer: what a user would otherwise run. Node socket.io 4 with the Redis adapter,
// doing hub's job: JWT checked at connect from auth.token, one room per event type, a
// `subscribe` / `unsubscribe` filter with the same semantics as hub, and a publisher.
//
// Native publish path: POST /publish {type, data} on the same HTTP server; it stamps the
// envelope {id, type, timestamp, data} and does io.to(type).emit(type, envelope), which the
// Redis adapter forwards to every other instance.
//
// Env: PORT (required), HOST (127.0.0.1), REDIS_URL (redis://127.0.0.1:6379), JWT_SECRET.
"use strict";

const http = require("http");
const crypto = require("crypto");
const { Server } = require("socket.io");
const { createAdapter } = require("@socket.io/redis-adapter");
const { createClient } = require("redis");
const jwt = require("jsonwebtoken");

const EVENT_TYPES = ["threat_detected", "provider_health_change", "cost_threshold_alert", "system_status"];
const PORT = Number(process.env.PORT);
const HOST = process.env.HOST || "127.0.0.1";
const REDIS_URL = process.env.REDIS_URL || "redis://127.0.0.1:6379";
const SECRET = process.env.JWT_SECRET;
if (!PORT || !SECRET) {
  console.error("node-socketio: PORT and JWT_SECRET are required");
  process.exit(2);
}

// A KeyObject made once: given a string, jsonwebtoken 9 first tries createPublicKey() on it
// for every verify (and fails), which made connects ~4x more expensive than the JWT check.
const KEY = crypto.createSecretKey(Buffer.from(SECRET, "utf8"));
const instanceId = crypto.randomBytes(4).toString("hex");
let seq = 0;

function validTypes(list) {
  if (!Array.isArray(list) || list.length === 0) return null;
  for (const t of list) if (!EVENT_TYPES.includes(t)) return null;
  return list;
}

function readBody(req) {
  return new Promise((resolve, reject) => {
    const chunks = [];
    req.on("data", (c) => chunks.push(c));
    req.on("end", () => resolve(Buffer.concat(chunks).toString("utf8")));
    req.on("error", reject);
  });
}

async function main() {
  const pub = createClient({ url: REDIS_URL });
  const sub = pub.duplicate();
  await Promise.all([pub.connect(), sub.connect()]);

  const server = http.createServer(async (req, res) => {
    if (req.method === "GET" && req.url === "/health") {
      res.writeHead(200, { "content-type": "application/json" });
      res.end(JSON.stringify({ status: "healthy", connections: io.engine.clientsCount }));
      return;
    }
    if (req.method === "POST" && req.url === "/publish") {
      let body;
      try {
        body = JSON.parse(await readBody(req));
      } catch (e) {
        res.writeHead(400).end();
        return;
      }
      if (!EVENT_TYPES.includes(body.type)) {
        res.writeHead(422).end();
        return;
      }
      const envelope = {
        id: `${Date.now()}-${instanceId}-${seq++}`,
        type: body.type,
        timestamp: new Date().toISOString(),
        data: body.data || {},
      };
      io.to(body.type).emit(body.type, envelope);
      res.writeHead(202, { "content-type": "application/json" });
      res.end(JSON.stringify({ id: envelope.id }));
      return;
    }
    // socket.io attaches its own listener for /socket.io/; leave those requests alone.
    if (!req.url.startsWith("/socket.io/")) res.writeHead(404).end();
  });

  const io = new Server(server, { adapter: createAdapter(pub, sub), cors: { origin: false } });

  io.use((socket, next) => {
    const token = socket.handshake.auth && socket.handshake.auth.token;
    try {
      const claims = jwt.verify(token || "", KEY, { algorithms: ["HS256"] });
      socket.data.user = claims.sub;
      next();
    } catch (e) {
      const err = new Error("unauthorized");
      err.data = { code: 4003 };
      next(err);
    }
  });

  io.on("connection", (socket) => {
    const initial = validTypes(socket.handshake.auth && socket.handshake.auth.event_types) || EVENT_TYPES;
    socket.join(initial);
    // Before the first subscribe a socket gets every type; the first narrows, later ones add.
    let narrowed = false;
    const current = () => EVENT_TYPES.filter((t) => socket.rooms.has(t));
    socket.on("subscribe", (msg, ack) => {
      const types = validTypes(msg && msg.event_types);
      if (!types) {
        if (typeof ack === "function") ack({ error: { code: "unknown_event_type", message: "bad event_types" } });
        return;
      }
      if (!narrowed) {
        for (const t of EVENT_TYPES) if (!types.includes(t)) socket.leave(t);
        narrowed = true;
      }
      socket.join(types);
      if (typeof ack === "function") ack({ subscribed_to: current() });
    });
    socket.on("unsubscribe", (msg, ack) => {
      const types = validTypes(msg && msg.event_types);
      if (!types) {
        if (typeof ack === "function") ack({ error: { code: "unknown_event_type", message: "bad event_types" } });
        return;
      }
      narrowed = true;
      for (const t of types) socket.leave(t);
      if (typeof ack === "function") ack({ subscribed_to: current() });
    });
  });

  server.listen(PORT, HOST, () => {
    console.log(`node-socketio listening on ${HOST}:${PORT} pid=${process.pid}`);
  });
  const stop = () => {
    io.close();
    Promise.allSettled([pub.quit(), sub.quit()]).then(() => process.exit(0));
    setTimeout(() => process.exit(0), 2000).unref();
  };
  process.on("SIGTERM", stop);
  process.on("SIGINT", stop);
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
