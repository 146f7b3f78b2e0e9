// Many socket.io-client sockets with the default transports (long-polling, then the
// upgrade to WebSocket), some holding their upgrade at one step, for
// tests/test_socketio_upgrade.py. Each socket records the `seq` of every threat_detected
// event it receives. Lines out (JSON): {kind:"connected", i}, later {kind:"report", ...}.
// Line in: "end <seq>": report once every socket has seen seq (or after 15 s).
//
// HUB_URLS: comma-separated hub URLs (socket i uses URL i % n); HUB_CLIENTS: how many;
// HUB_HOLDS: comma-separated hold modes cycled over the sockets: "none" (the library's
// own transports), "probe" (the WebSocket waits before sending 2probe), "3probe" (after
// receiving 3probe it waits before sending 5), "5" (after sending 5 it waits before
// handling what arrives); HUB_HOLD_MS: for how long; HUB_STAGGER_MS: between sockets.
const { io } = require("socket.io-client");
const { NodeWebSocket, NodeXHR } = require("engine.io-client");
const readline = require("readline");

const urls = process.env.HUB_URLS.split(",");
const count = Number(process.env.HUB_CLIENTS || "10");
const holds = (process.env.HUB_HOLDS || "none").split(",");
const holdMs = Number(process.env.HUB_HOLD_MS || "300");
const stagger = Number(process.env.HUB_STAGGER_MS || "20");
const out = (obj) => console.log(JSON.stringify(obj));

function heldWebSocket(mode) {
  // A WebSocket transport that pauses its side of the upgrade at one step. Frames written
  // while it holds wait behind the held one, so the order on the wire stays the client's.
  return class HeldWebSocket extends NodeWebSocket {
    doWrite(packet, data) {
      if (this._queue) { this._queue.push([packet, data]); return; }
      const holdBefore = (mode === "probe" && data === "2probe") || (mode === "3probe" && data === "5");
      if (holdBefore) {
        this._queue = [[packet, data]];
        setTimeout(() => {
          const queued = this._queue; this._queue = null;
          for (const [p, d] of queued) { try { super.doWrite(p, d); } catch (e) { /* closed */ } }
        }, holdMs);
        return;
      }
      super.doWrite(packet, data);
      if (mode === "5" && data === "5") {
        this._inbox = [];
        setTimeout(() => {
          const queued = this._inbox; this._inbox = null;
          for (const d of queued) super.onData(d);
        }, holdMs);
      }
    }
    onData(data) {
      if (this._inbox) { this._inbox.push(data); return; }
      super.onData(data);
    }
  };
}

const sockets = [];
let endSeq = null;
let reported = false;

function report() {
  if (reported) return;
  reported = true;
  const lines = [];
  for (const s of sockets) {
    lines.push(JSON.stringify({ kind: "report", i: s.i, hold: s.hold, seqs: s.seqs,
      errors: s.errors, upgraded: s.upgraded,
      transport: s.socket.io.engine ? s.socket.io.engine.transport.name : null }));
    s.socket.disconnect();
  }
  lines.push(JSON.stringify({ kind: "done" }));
  // Writes to a pipe are asynchronous: exit once they are out.
  process.stdout.write(lines.join("\n") + "\n", () => process.exit(0));
}

function checkDone() {
  if (endSeq !== null && sockets.length === count &&
      sockets.every((s) => s.seqs.length && s.seqs[s.seqs.length - 1] >= endSeq)) report();
}

function start(i) {
  const hold = holds[i % holds.length];
  const options = { auth: { token: process.env.HUB_TOKEN }, reconnection: false,
                    forceNew: true };
  if (hold !== "none") options.transports = [NodeXHR, heldWebSocket(hold)];
  const socket = io(urls[i % urls.length], options);
  const state = { i, hold, socket, seqs: [], errors: [], upgraded: false };
  sockets.push(state);
  socket.io.on("open", () => socket.io.engine.on("upgrade", () => { state.upgraded = true; }));
  socket.on("connect", () => out({ kind: "connected", i }));
  socket.on("threat_detected", (envelope) => {
    state.seqs.push(envelope.data.seq);
    checkDone();
  });
  socket.on("connect_error", (err) => state.errors.push("connect_error: " + err.message));
  socket.on("disconnect", (reason) => { if (!reported) state.errors.push("disconnect: " + reason); });
  if (i + 1 < count) setTimeout(() => start(i + 1), stagger);
}

readline.createInterface({ input: process.stdin }).on("line", (line) => {
  const [word, seq] = line.trim().split(" ");
  if (word === "end") {
    endSeq = Number(seq);
    checkDone();
    setTimeout(report, 30000);  // only if something never arrives: a loss
  }
});
start(0);
