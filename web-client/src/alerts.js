// Alerts for critical events: a browser notification and a short tone, each off until the
// user turns it on. Turning notifications on is what asks the browser's permission (never
// at page load); the tone is made with WebAudio (no sound file to ship or to allow in the
// CSP), and its AudioContext is created in the click that turns it on, since browsers
// start audio only from a user gesture.
//
// The choices are kept in localStorage (they are preferences, not secrets), so a reload
// during a shift keeps them; a notification choice whose permission was since withdrawn
// comes back off.

const KEY = "hub.dashboard.alerts";
const BATCH_MS = 150; // critical events this close together make one notification

export class CriticalAlerts {
  /** `describe(event)` → {title, body}; `problem(text)` shows why something is off. */
  constructor({ describe, problem, changed }) {
    this.describe = describe;
    this.problem = problem;
    this.changed = changed;
    this.notify = false;
    this.sound = false;
    this.audio = null;
    this.queue = [];
    this.timer = null;
    let saved = {};
    try {
      saved = JSON.parse(localStorage.getItem(KEY) || "{}") || {};
    } catch {
      // Unreadable preferences: both stay off.
    }
    this.notify = saved.notify === true && notificationsGranted();
    if (saved.sound === true) {
      this.sound = true;
      // Suspended until the page gets a gesture; the first click or key wakes it.
      this.audio = makeAudio();
      const wake = () => this.audio?.resume().catch(() => {});
      document.addEventListener("pointerdown", wake, { once: true });
      document.addEventListener("keydown", wake, { once: true });
    }
  }

  save() {
    const prefs = {};
    if (this.notify) prefs.notify = true;
    if (this.sound) prefs.sound = true;
    try {
      if (Object.keys(prefs).length) localStorage.setItem(KEY, JSON.stringify(prefs));
      else localStorage.removeItem(KEY);
    } catch {
      // Storage refused (private mode): the choice lasts for this page only.
    }
    this.changed();
  }

  async toggleNotify() {
    if (this.notify) {
      this.notify = false;
      this.save();
      return;
    }
    if (typeof Notification === "undefined") {
      this.problem("This browser cannot show notifications.");
      return;
    }
    let permission = Notification.permission;
    if (permission === "default") {
      try {
        permission = await Notification.requestPermission();
      } catch {
        permission = "denied";
      }
    }
    if (permission !== "granted") {
      this.problem("Notifications are blocked for this page: allow them in the browser's site "
        + "settings, then turn them on again.");
      return;
    }
    this.notify = true;
    this.save();
  }

  toggleSound() {
    this.sound = !this.sound;
    if (this.sound) {
      this.audio = this.audio || makeAudio();
      if (!this.audio) {
        this.sound = false;
        this.problem("This browser cannot play sounds (no WebAudio).");
        return;
      }
      this.audio.resume().catch(() => {});
      this.tone(); // what it will sound like
    }
    this.save();
  }

  /** A critical event arrived live: alert, once per burst. */
  add(event) {
    if (!this.notify && !this.sound) return;
    this.queue.push(event);
    if (this.timer === null) this.timer = setTimeout(() => this.flush(), BATCH_MS);
  }

  flush() {
    this.timer = null;
    const events = this.queue;
    this.queue = [];
    if (!events.length) return;
    if (this.notify && notificationsGranted()) {
      const latest = events[events.length - 1];
      const { title, body } = this.describe(latest);
      try {
        const note = new Notification(events.length === 1 ? title : `${events.length} critical events`, {
          body: events.length === 1 ? body : `Latest: ${title} — ${body}`,
          tag: "hub-critical",
          renotify: true,
        });
        note.onclick = () => {
          window.focus();
          note.close();
        };
      } catch (err) {
        // Some browsers (Chrome on Android) only notify through a service worker.
        this.problem(`Could not show a notification: ${err.message}`);
      }
    }
    if (this.sound) this.tone();
  }

  tone() {
    const ctx = this.audio;
    if (!ctx) return;
    const start = ctx.currentTime + 0.01;
    [880, 660].forEach((frequency, i) => {
      const at = start + i * 0.18;
      const osc = ctx.createOscillator();
      const gain = ctx.createGain();
      osc.type = "sine";
      osc.frequency.value = frequency;
      gain.gain.setValueAtTime(0.0001, at);
      gain.gain.exponentialRampToValueAtTime(0.25, at + 0.02);
      gain.gain.exponentialRampToValueAtTime(0.0001, at + 0.16);
      osc.connect(gain).connect(ctx.destination);
      osc.start(at);
      osc.stop(at + 0.17);
    });
  }
}

function notificationsGranted() {
  return typeof Notification !== "undefined" && Notification.permission === "granted";
}

function makeAudio() {
  const Context = window.AudioContext || window.webkitAudioContext;
  return Context ? new Context() : null;
}
