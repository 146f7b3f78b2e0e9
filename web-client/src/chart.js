// Events per minute over the last 15 minutes, stacked by type, as a small SVG.

const MINUTES = 15;
const SVG_NS = "http://www.w3.org/2000/svg";

export class MinuteChart {
  constructor(element, colourOf) {
    this.element = element;
    this.colourOf = colourOf;
    this.buckets = new Map(); // minute number → Map(type → count)
  }

  add(event) {
    const t = Date.parse(event.timestamp);
    const minute = Math.floor((Number.isNaN(t) ? Date.now() : t) / 60000);
    if (minute <= nowMinute() - MINUTES) return;
    let bucket = this.buckets.get(minute);
    if (!bucket) this.buckets.set(minute, (bucket = new Map()));
    bucket.set(event.type, (bucket.get(event.type) || 0) + 1);
  }

  render() {
    const last = nowMinute();
    for (const minute of this.buckets.keys()) {
      if (minute <= last - MINUTES) this.buckets.delete(minute);
    }
    const width = 330, height = 120, left = 26, bottom = 16, top = 6;
    const columns = [];
    let max = 1;
    for (let m = last - MINUTES + 1; m <= last; m++) {
      const bucket = this.buckets.get(m) || new Map();
      let total = 0;
      for (const n of bucket.values()) total += n;
      max = Math.max(max, total);
      columns.push({ minute: m, bucket, total });
    }
    const scale = niceMax(max);
    const plotH = height - bottom - top;
    const slot = (width - left) / MINUTES;
    const svg = el("svg", { viewBox: `0 0 ${width} ${height}`, role: "img" });
    svg.setAttribute("aria-label", `events per minute, at most ${max}`);
    for (const frac of [0, 0.5, 1]) {
      const y = top + plotH * (1 - frac);
      svg.append(el("line", { x1: left, x2: width, y1: y, y2: y, class: "grid-line" }));
      const label = el("text", { x: left - 4, y: y + 3, "text-anchor": "end", class: "axis" });
      label.textContent = String(Math.round(scale * frac));
      svg.append(label);
    }
    columns.forEach((col, i) => {
      let y = top + plotH;
      const x = left + i * slot + 2;
      for (const [type, n] of col.bucket) {
        const h = (n / scale) * plotH;
        y -= h;
        const rect = el("rect", { x, y, width: slot - 4, height: h, rx: 1, fill: this.colourOf(type) });
        const title = el("title", {});
        title.textContent = `${type}: ${n}`;
        rect.append(title);
        svg.append(rect);
      }
    });
    for (const [i, text] of [[0, "-15m"], [MINUTES - 1, "now"]]) {
      const label = el("text", {
        x: left + i * slot + slot / 2, y: height - 3, "text-anchor": "middle", class: "axis",
      });
      label.textContent = text;
      svg.append(label);
    }
    this.element.replaceChildren(svg);
  }
}

function nowMinute() {
  return Math.floor(Date.now() / 60000);
}

function niceMax(n) {
  for (const step of [2, 4, 10, 20, 40, 100, 200, 400, 1000, 2000, 4000, 10000, 20000]) {
    if (n <= step) return step;
  }
  return n;
}

function el(name, attrs) {
  const node = document.createElementNS(SVG_NS, name);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  return node;
}
