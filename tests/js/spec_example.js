// The spec's client example, verbatim but for where the URL and token come from and for
// printing each received message as one JSON line (so the test can read them).
const WebSocket = require("ws");
const url = process.env.HUB_WS_URL || "ws://localhost:8000/ws/events";
const token = process.env.HUB_TOKEN;
const subscribe = process.env.HUB_SUBSCRIBE;

const ws = new WebSocket(url, [], {
  headers: { Authorization: `Bearer ${token}` }
});
ws.onopen = () => {
  if (subscribe) {
    ws.send(JSON.stringify({ action: "subscribe", event_types: subscribe.split(",") }));
  }
};
ws.onmessage = (event) => {
  const data = JSON.parse(event.data);
  console.log(JSON.stringify({ kind: "message", message: data }));
};
ws.onerror = (err) => console.error("WebSocket error:", err.message);
ws.onclose = (e) => {
  console.log(JSON.stringify({ kind: "close", code: e.code, reason: e.reason }));
  process.exit(0);
};
