// A dashboard-style socket.io-client: prints every hub event and connect_error as JSON lines.
const { io } = require("socket.io-client");
const url = process.env.HUB_URL;
const types = process.env.HUB_TYPES ? process.env.HUB_TYPES.split(",") : undefined;
const transports = (process.env.HUB_TRANSPORTS || "websocket,polling").split(",");

const socket = io(url, { auth: { token: process.env.HUB_TOKEN }, transports, reconnection: false });
const out = (obj) => console.log(JSON.stringify(obj));
socket.on("connect", async () => {
  if (types) {
    const ack = await socket.emitWithAck("subscribe", { event_types: types });
    out({ kind: "ack", ack });
  }
  out({ kind: "connected", transport: socket.io.engine.transport.name });
});
for (const type of ["threat_detected", "provider_health_change", "cost_threshold_alert", "system_status"]) {
  socket.on(type, (envelope) => out({ kind: "event", name: type, envelope }));
}
socket.on("connect_error", (err) => {
  out({ kind: "connect_error", message: err.message, data: err.data });
  process.exit(0);
});
socket.on("disconnect", (reason) => { out({ kind: "disconnect", reason }); process.exit(0); });
