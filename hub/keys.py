"""Token keys that change while hub runs: a JWKS endpoint's keys (``JWT_JWKS_URL``).

PyJWT's ``PyJWKClient`` fetches and parses the set; hub keeps the cache itself, because
the client's own cache does not fit a server (PyJWT 2.15, jwt/jwks_client.py):

- its fetch is a blocking ``urllib`` call inside ``get_signing_key``: run on the event
  loop it would stall every connection for up to the timeout. Here every fetch runs in a
  thread (``asyncio.to_thread``), and one fetch in flight is shared by every waiter;
- its cooldown between unknown-``kid`` refetches starts only at a *successful* fetch, so
  with the endpoint down each made-up ``kid`` costs a fetch; here every attempt counts, so
  a flood of made-up ``kid`` values costs at most one fetch per ``HUB_JWKS_MIN_REFETCH_S``;
- its set cache expires after ``lifespan`` and a failed refetch then leaves no keys; here
  the last set fetched stays in force until a fetch succeeds (health says it is stale).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

import jwt
from jwt import PyJWK, PyJWKClient

log = logging.getLogger("hub.keys")


class JwksKeys:
    """The signing keys of one JWKS endpoint, by ``kid``."""

    def __init__(self, url: str, *, min_refetch_s: float = 30.0, refresh_s: float = 300.0,
                 timeout_s: float = 5.0, on_fetch: Callable[[str], None] | None = None
                 ) -> None:
        self._on_fetch = on_fetch or (lambda result: None)
        # The client's own set cache is off: this class is the cache.
        self._client = PyJWKClient(url, cache_jwk_set=False, timeout=timeout_s)
        self.min_refetch_s = min_refetch_s
        self.refresh_s = refresh_s
        self._keys: dict[str, PyJWK] = {}
        self._last_attempt: float | None = None  # monotonic
        self.fetched_at: float | None = None  # wall clock of the last successful fetch
        self.error: str | None = None  # why the last fetch failed; None after a success
        self.fetches = 0  # attempts, successful or not
        self._inflight: asyncio.Task[bool] | None = None
        self._task: asyncio.Task[None] | None = None

    def get(self, kid: object) -> PyJWK | None:
        return self._keys.get(kid) if isinstance(kid, str) else None

    @property
    def kids(self) -> frozenset[str]:
        return frozenset(self._keys)

    async def fetch(self) -> bool:
        """Fetch the set now (or join the fetch in flight); True when it succeeded."""
        if self._inflight is None:
            self._inflight = asyncio.ensure_future(self._fetch())
        task = self._inflight
        return await asyncio.shield(task)

    async def _fetch(self) -> bool:
        self._last_attempt = time.monotonic()
        self.fetches += 1
        try:
            keys = await asyncio.to_thread(self._fetch_blocking)
        except (jwt.PyJWTError, OSError, ValueError, TypeError) as exc:
            if self.error is None:
                log.warning("JWKS fetch failed, %d cached keys stay in force: %s",
                            len(self._keys), _short(exc))
            self.error = _short(exc)
            self._on_fetch("failed")
            return False
        finally:
            self._inflight = None
        if self.error is not None:
            log.info("JWKS fetched again (%d keys)", len(keys))
        elif set(keys) != set(self._keys):
            log.info("JWKS keys now: %d (%d new)", len(keys), len(set(keys) - set(self._keys)))
        self._keys, self.error, self.fetched_at = keys, None, time.time()
        self._on_fetch("ok")
        return True

    def _fetch_blocking(self) -> dict[str, PyJWK]:
        jwk_set = self._client.get_jwk_set(refresh=True)
        return {key.key_id: key for key in jwk_set.keys
                if key.key_id and key.public_key_use in ("sig", None)}

    async def refresh_for(self, kid: object) -> None:
        """A token names ``kid``: refetch if it is unknown, at most once per interval."""
        if not isinstance(kid, str) or kid in self._keys:
            return
        if self._inflight is not None:
            await self.fetch()
            return
        if (self._last_attempt is not None
                and time.monotonic() - self._last_attempt < self.min_refetch_s):
            return
        await self.fetch()

    # -- lifecycle ----------------------------------------------------------------------
    async def start(self) -> None:
        """The first fetch (start-up continues without keys when it fails), then a
        refetch every ``refresh_s`` in the background."""
        if not await self.fetch():
            log.warning("JWKS endpoint unreachable at start-up: serving degraded, tokens "
                        "are refused until a fetch succeeds")
        self._task = asyncio.create_task(self._refresh_loop(), name="hub-jwks-refresh")

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_s)
            await self.fetch()

    async def stop(self) -> None:
        for task in (self._task, self._inflight):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        self._task = self._inflight = None

    # -- health -------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        return {
            "keys": len(self._keys),
            "ok": self.error is None and self.fetched_at is not None,
            "error": self.error,
            "fetched_at": self.fetched_at,
            "age_s": round(time.time() - self.fetched_at, 3) if self.fetched_at else None,
        }

    def problems(self) -> list[str]:
        if self.error is None and self.fetched_at is not None:
            return []
        if self.fetched_at is None:
            return [f"jwks: no keys fetched yet ({self.error or 'pending'})"]
        return [f"jwks: endpoint unreachable, {len(self._keys)} cached keys in force "
                f"({self.error})"]


def _short(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."
