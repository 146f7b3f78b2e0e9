// Who is signed in: a pasted token kept in this page's memory only (gone on reload; never
// in sessionStorage, where any script on the origin, or a later visitor of the tab,
// could read it back), or the ks_access_token cookie that the browser sends by itself.

const KEY = "hub.dashboard.auth";
const COOKIE = "ks_access_token";

let current = null;

export function loadAuth() {
  if (current) return current;
  return cookieToken() ? { mode: "cookie" } : null;
}

export function saveAuth(auth) {
  current = auth;
}

export function clearAuth() {
  current = null;
}

/** The cookie's token when the page can read it (not HttpOnly), else null. */
export function cookieToken() {
  for (const part of document.cookie.split(";")) {
    const [name, ...rest] = part.trim().split("=");
    if (name === COOKIE) {
      let value = rest.join("=");
      try {
        value = decodeURIComponent(value);
      } catch {
        // Not URL-encoded.
      }
      return value.replace(/^Bearer\s+/i, "") || null;
    }
  }
  return null;
}

/** The token to send as a bearer for HTTP calls (POST /events), if the page has one. */
export function bearerOf(auth) {
  if (!auth) return null;
  return auth.mode === "token" ? auth.token : cookieToken();
}

/** The JWT's claims, for display only (the hub verifies the signature, not us). */
export function claimsOf(token) {
  if (!token) return null;
  try {
    const part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    const binary = atob(part.padEnd(part.length + ((4 - (part.length % 4)) % 4), "="));
    return JSON.parse(new TextDecoder().decode(Uint8Array.from(binary, (c) => c.charCodeAt(0))));
  } catch {
    return null;
  }
}
