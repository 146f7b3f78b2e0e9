// Runs the dashboard's pure formatting (web-client/src/format.js) over envelopes read as a
// JSON list on stdin; prints one JSON result per envelope: what a row would show, or the
// error it threw. tests/test_dashboard.py feeds it the proxy's real shapes and broken ones.
import { readFileSync } from "node:fs";

import {
  badgeText, isCritical, level, localTime, searchText, summary, threatContext,
} from "../../web-client/src/format.js";

const envelopes = JSON.parse(readFileSync(0, "utf8"));
const now = new Date(process.env.HUB_NOW || Date.now());
const results = envelopes.map((event) => {
  try {
    return {
      summary: summary(event),
      level: level(event),
      badge: badgeText(level(event)),
      context: threatContext(event),
      critical: isCritical(event),
      time: localTime(event?.timestamp, now),
      search: searchText(event),
    };
  } catch (err) {
    return { error: String(err?.stack || err) };
  }
});
process.stdout.write(JSON.stringify(results));
