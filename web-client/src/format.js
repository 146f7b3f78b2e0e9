// How an event reads: its one-line summary, its level (severity) and that level's colour.

export const KNOWN_TYPES = [
  "threat_detected",
  "provider_health_change",
  "cost_threshold_alert",
  "system_status",
];

// The severity-like word of each event, mapped onto five badge colours.
const LEVEL_CLASS = {
  critical: "lv-critical",
  high: "lv-bad", error: "lv-bad", unhealthy: "lv-bad",
  medium: "lv-warn", warning: "lv-warn", degraded: "lv-warn", shutdown: "lv-warn",
  low: "lv-ok", healthy: "lv-ok", online: "lv-ok",
  info: "lv-info", config_change: "lv-info", unknown: "lv-info",
};

export function level(event) {
  const d = event.data || {};
  for (const key of ["severity", "new_status", "status"]) {
    if (typeof d[key] === "string" && d[key]) return d[key];
  }
  return "";
}

export function levelClass(value) {
  return LEVEL_CLASS[value] || "lv-info";
}

export function typeClass(type) {
  return KNOWN_TYPES.includes(type) ? `t-${type}` : "t-other";
}

export function summary(event) {
  const d = event.data || {};
  switch (event.type) {
    case "threat_detected": {
      const pct = typeof d.confidence === "number" ? ` (${Math.round(d.confidence * 100)}%)` : "";
      const tenant = d.tenant_id ? ` · tenant ${d.tenant_id}` : "";
      return `${d.attack_type ?? "?"} · ${d.action_taken ?? "?"}${pct}${tenant}`;
    }
    case "provider_health_change":
      return `${d.provider ?? "?"}: ${d.old_status ?? "?"} → ${d.new_status ?? "?"}`;
    case "cost_threshold_alert": {
      const amounts = d.current_cost != null && d.threshold != null
        ? ` (${d.current_cost} / ${d.threshold})` : "";
      return `${d.message ?? ""}${amounts}`;
    }
    case "system_status":
      return [d.instance_id, d.message].filter(Boolean).join(" · ");
    default:
      return JSON.stringify(d).slice(0, 200);
  }
}

export function clock(timestamp) {
  // "2025-01-15T10:30:00.123Z" → local "10:30:00"
  const t = new Date(timestamp);
  if (Number.isNaN(t.getTime())) return String(timestamp ?? "");
  return t.toLocaleTimeString([], { hour12: false });
}

// Example data for the "send a test event" form, one per built-in type.
export const SAMPLES = {
  threat_detected: {
    severity: "high", attack_type: "prompt_injection", confidence: 0.92, action_taken: "blocked",
  },
  provider_health_change: { provider: "openai", old_status: "healthy", new_status: "degraded" },
  cost_threshold_alert: {
    severity: "warning", message: "daily budget at 80%", threshold: 100, current_cost: 80.5,
  },
  system_status: { status: "config_change", message: "test event from the dashboard" },
};
