// A socket.io-client (default transports: polling, then the upgrade to a WebSocket) that
// refreshes its token in-band: it prints token_expiring and every hub event as JSON lines,
// and for each {"token": "..."} line on stdin emits `refresh` with an ack and prints the ack.
const { io } = require("socket.io-client");
const readline = require("readline");

const socket = io(process.env.HUB_URL, { auth: { token: process.env.HUB_TOKEN }, reconnection: false });
const out = (obj) => console.log(JSON.stringify(obj));
socket.on("connect", () => {
  out({ kind: "connected", id: socket.id, transport: socket.io.engine.transport.name });
  socket.io.engine.on("upgrade", (t) => out({ kind: "upgrade", transport: t.name }));
});
for (const name of ["token_expiring", "token_expired", "token_revoked"]) {
  socket.on(name, (data) => out({ kind: name, data }));
}
for (const type of ["threat_detected", "provider_health_change", "cost_threshold_alert", "system_status"]) {
  socket.on(type, (envelope) => out({ kind: "event", name: type, envelope }));
}
socket.on("connect_error", (err) => {
  out({ kind: "connect_error", message: err.message, data: err.data });
  process.exit(0);
});
socket.on("disconnect", (reason) => { out({ kind: "disconnect", reason }); process.exit(0); });

readline.createInterface({ input: process.stdin }).on("line", async (line) => {
  const { token } = JSON.parse(line);
  try {
    const ack = await socket.timeout(10000).emitWithAck("refresh", { token });
    out({ kind: "refreshed", ack, id: socket.id, transport: socket.io.engine.transport.name });
  } catch (err) {
    out({ kind: "refresh_failed", message: String(err) });
  }
});
