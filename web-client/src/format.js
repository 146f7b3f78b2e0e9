// How an event reads: its one-line summary, its level (severity) and that level's colour,
// its time. Pure functions of the envelope (no DOM), so they run under Node as well
// (tests/js/format_check.mjs feeds them every shape the proxy sends, and broken ones).
//
// Event data is untrusted and loosely typed: the proxy's channel delivers whatever it was
// given, so any field may be missing, null, a number, an object or a list. Nothing here
// may throw on such data, and the strings returned are put on the page as text only.

export const KNOWN_TYPES = [
  "threat_detected",
  "provider_health_change",
  "cost_threshold_alert",
  "system_status",
];

// The severity-like word of each event, mapped onto five badge colours.
const LEVEL_CLASS = {
  critical: "lv-critical",
  high: "lv-bad", error: "lv-bad", unhealthy: "lv-bad", failed: "lv-bad",
  medium: "lv-warn", warning: "lv-warn", degraded: "lv-warn", shutdown: "lv-warn",
  low: "lv-ok", healthy: "lv-ok", online: "lv-ok",
  info: "lv-info", config_change: "lv-info", unknown: "lv-info",
};

// The minimum-severity selector's choices: the hub ranks each name in its type's order
// (threats low < medium < high < critical; alerts info < warning < error < critical).
export const SEVERITIES = [
  ["", "all severities"],
  ["medium", "medium / warning +"],
  ["high", "high / error +"],
  ["critical", "critical only"],
];

const MAX_SUMMARY = 300;

const isObject = (v) => v !== null && typeof v === "object" && !Array.isArray(v);

/** A value as short text: strings as they are, numbers and booleans as written, other
 * things as compact JSON; "" for null and undefined. */
export function str(value) {
  if (value === null || value === undefined) return "";
  if (typeof value === "string") return value;
  if (typeof value === "number" || typeof value === "boolean") return String(value);
  try {
    return JSON.stringify(value) ?? "";
  } catch {
    return "";
  }
}

const words = (value) => str(value).replace(/_/g, " ");
const clip = (text) => (text.length > MAX_SUMMARY ? `${text.slice(0, MAX_SUMMARY - 1)}…` : text);
const join = (...parts) => parts.filter((p) => p !== "" && p != null).join(" · ");

function dataOf(event) {
  return isObject(event?.data) ? event.data : {};
}

/** A health snapshot (system_health_update): {provider: {status, healthy, …}, …}. */
function healthEntries(d) {
  return Object.entries(d).filter(([, v]) => isObject(v));
}

function snapshotLevel(d) {
  const entries = healthEntries(d).filter(([, v]) => v.enabled !== false);
  if (!entries.length) return "";
  const healthy = entries.filter(([, v]) => v.healthy === true || v.status === "healthy").length;
  if (healthy === entries.length) return "healthy";
  return healthy === 0 ? "unhealthy" : "degraded";
}

export function level(event) {
  const d = dataOf(event);
  if (event?.type === "system_health_update") return snapshotLevel(d);
  for (const key of ["severity", "new_status", "status"]) {
    if (typeof d[key] === "string" && d[key]) return d[key];
  }
  return "";
}

export function levelClass(value) {
  return LEVEL_CLASS[value] || "lv-info";
}

export function badgeText(value) {
  return value === "config_change" ? "config" : words(value) || "—";
}

export function typeClass(type) {
  return KNOWN_TYPES.includes(type) ? `t-${type}` : "t-other";
}

/** Critical events raise the page's notification (when the user turned it on). */
export function isCritical(event) {
  return dataOf(event).severity === "critical";
}

/** Provider, endpoint and tenant of a threat, those it has, as [label, value] pairs. */
export function threatContext(event) {
  if (event?.type !== "threat_detected") return [];
  const d = dataOf(event);
  return [["provider", d.provider], ["endpoint", d.endpoint], ["tenant", d.tenant_id]]
    .map(([label, value]) => [label, str(value)])
    .filter(([, value]) => value !== "");
}

// monitoring.py's alert shape ({rule_name, severity, message, timestamp, details}), which
// the proxy sends as cost_threshold_alert, system_status, status_change_alert,
// operational_event, operational_error, report_event and scan_event.
function alertSummary(d) {
  const details = isObject(d.details) ? d.details : {};
  const head = str(d.message) || words(d.rule_name);
  const extra = [];
  if (details.provider != null && (details.old_status != null || details.new_status != null)
      && !head.includes(str(details.provider))) {
    extra.push(`${str(details.provider)}: ${words(details.old_status) || "?"} → ${words(details.new_status) || "?"}`);
  }
  if (details.current != null && details.threshold != null) {
    extra.push(`${str(details.current)} / ${str(details.threshold)}`);
  }
  if (details.error != null) extra.push(`error: ${str(details.error)}`);
  for (const key of ["report_name", "request_id", "report_id", "component"]) {
    if (details[key] != null && details[key] !== "") {
      extra.push(`${key.replace(/_/g, " ")} ${str(details[key])}`);
      break;
    }
  }
  const rule = d.message != null && d.rule_name != null ? `rule ${str(d.rule_name)}` : "";
  return join(head, ...extra, rule);
}

const isAlert = (d) => d.rule_name != null || (d.message != null && isObject(d.details));

function healthSummary(d) {
  const entries = healthEntries(d);
  if (!entries.length) return Object.keys(d).length ? fieldsSummary(d) : "empty health snapshot";
  const enabled = entries.filter(([, v]) => v.enabled !== false);
  const healthy = enabled.filter(([, v]) => v.healthy === true || v.status === "healthy").length;
  const shown = entries.slice(0, 6).map(([name, v]) => {
    let text = `${name} ${words(v.status) || (v.healthy === true ? "healthy" : v.healthy === false ? "unhealthy" : "?")}`;
    if (typeof v.response_time_ms === "number") text += ` ${Math.round(v.response_time_ms)} ms`;
    if (v.enabled === false) text += " (off)";
    return text;
  });
  const more = entries.length > 6 ? `+${entries.length - 6} more` : "";
  return join(`${healthy}/${enabled.length} healthy`, ...shown, more);
}

/** Scalar fields as `key value`, for types the page has no wording for. */
function fieldsSummary(d) {
  if (isAlert(d)) return alertSummary(d);
  const parts = [];
  for (const [key, value] of Object.entries(d)) {
    if (value === null || value === undefined || value === "") continue;
    parts.push(`${key} ${isObject(value) || Array.isArray(value) ? "{…}" : str(value)}`);
    if (parts.length === 8) break;
  }
  return parts.join(" · ");
}

export function summary(event) {
  const d = dataOf(event);
  let text;
  switch (event?.type) {
    case "threat_detected": {
      const pct = typeof d.confidence === "number" ? ` (${Math.round(d.confidence * 100)}%)` : "";
      text = `${str(d.attack_type) || "?"} · ${str(d.action_taken) || "?"}${pct}`;
      break;
    }
    case "provider_health_change":
      text = `${str(d.provider) || "?"}: ${words(d.old_status) || "?"} → ${words(d.new_status) || "?"}`;
      break;
    case "cost_threshold_alert": {
      if (isAlert(d) && d.current_cost == null) {
        text = alertSummary(d);
        break;
      }
      const amounts = d.current_cost != null && d.threshold != null
        ? ` (${str(d.current_cost)} / ${str(d.threshold)})` : "";
      text = `${str(d.message)}${amounts}`;
      break;
    }
    case "system_status":
      if (isAlert(d) && d.status == null) {
        text = alertSummary(d);
      } else {
        text = join(words(d.status),
          d.version != null ? `version ${str(d.version)}` : "", str(d.instance_id), str(d.message));
      }
      break;
    case "system_health_update":
      text = healthSummary(d);
      break;
    case "status_change_alert":
      text = isAlert(d) ? alertSummary(d)
        : `${str(d.provider) || "?"}: ${words(d.old_status) || "?"} → ${words(d.new_status) || "?"}`;
      break;
    default:
      text = fieldsSummary(d);
  }
  return clip(text) || "—";
}

const TIME = { hour: "2-digit", minute: "2-digit", second: "2-digit", hourCycle: "h23" };

/** The event's local time with its zone ("10:30:00 EST"), and its date when it is not
 * today's ("Jan 15"), in the browser's time zone. */
export function localTime(timestamp, now = new Date()) {
  const t = new Date(typeof timestamp === "string" ? timestamp : NaN);
  if (Number.isNaN(t.getTime())) return { time: str(timestamp), date: "", utc: "" };
  const time = t.toLocaleTimeString([], { ...TIME, timeZoneName: "short" });
  const sameDay = t.toDateString() === now.toDateString();
  const date = sameDay ? "" : t.toLocaleDateString([], {
    month: "short", day: "numeric",
    ...(t.getFullYear() === now.getFullYear() ? {} : { year: "numeric" }),
  });
  return { time, date, utc: t.toISOString() };
}

/** A short local time for the side panels ("10:30:00"). */
export function clock(timestamp) {
  const t = new Date(timestamp);
  if (Number.isNaN(t.getTime())) return str(timestamp);
  return t.toLocaleTimeString([], TIME);
}

/** The text the search box looks in: type, summary, id and every value of data. */
export function searchText(event) {
  return `${str(event?.type)} ${summary(event)} ${str(event?.id)} ${str(event?.data)}`.toLowerCase();
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
