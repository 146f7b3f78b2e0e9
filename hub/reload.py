"""Live reload of token keys and allowed origins (SIGHUP, ``POST /admin/reload``).

A reload re-reads the files the settings name — ``JWT_PUBLIC_KEY`` given as a path,
``JWT_SECRET_FILE``, ``HUB_ALLOWED_ORIGINS_FILE`` — builds a new
:class:`~hub.auth.TokenVerifier` and :class:`~hub.auth.OriginPolicy` and swaps them in:
connections and requests that start afterwards (and token refreshes, which verify with
``hub.verifier``) use them; open connections stay open. What changed is announced as
``system_status`` with ``status: config_change`` and ``changed`` naming the settings,
never their values. A bad file keeps the whole old configuration: the reason is logged,
returned and shown by ``/ws/health`` (degraded) until a reload succeeds.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from hub.auth import OriginPolicy, TokenVerifier
from hub.config import Settings
from hub.errors import ConfigError
from hub.keys import JwksKeys

log = logging.getLogger("hub.reload")

JWT_KEYS = "jwt_keys"
ALLOWED_ORIGINS = "allowed_origins"


class Reloadable(Protocol):
    settings: Settings
    verifier: TokenVerifier
    origins: OriginPolicy
    jwks: JwksKeys | None

    async def announce_config_change(self, changed: list[str]) -> None: ...


@dataclass
class ReloadResult:
    ok: bool
    changed: list[str] = field(default_factory=list)
    error: str | None = None


class Reloader:
    def __init__(self, hub: Reloadable, on_result: Callable[[str], None] | None = None
                 ) -> None:
        self.hub = hub
        self._on_result = on_result or (lambda result: None)
        self.error: str | None = None  # why the last reload failed; None after a success
        self.reloads = 0
        self.last_at: float | None = None

    async def reload(self, source: str) -> ReloadResult:
        hub, settings = self.hub, self.hub.settings
        self.reloads += 1
        self.last_at = time.time()
        try:
            settings.validate()  # re-reads and checks every file the settings name
            if settings.jwt_public_key:
                _check_public_key(settings.verify_key)
            verifier = TokenVerifier(settings, hub.jwks)
            origins = settings.origins
            policy = OriginPolicy(origins, settings.trusted_proxies)
        except ConfigError as exc:
            self.error = str(exc)
            log.error("reload (%s) failed, the previous configuration stays in force: %s",
                      source, exc)
            self._on_result("failed")
            return ReloadResult(False, error=self.error)
        changed: list[str] = []
        if verifier.keys != hub.verifier.keys:
            changed.append(JWT_KEYS)
        if (policy.any, policy.allowed) != (hub.origins.any, hub.origins.allowed):
            changed.append(ALLOWED_ORIGINS)
        hub.verifier, hub.origins = verifier, policy
        self.error = None
        self._on_result("ok")
        if hub.jwks is not None:
            # A reload is also the operator's way to pick up a rotated JWKS at once.
            before = hub.jwks.kids
            await hub.jwks.fetch()
            if hub.jwks.kids != before:
                changed.append(JWT_KEYS)
        log.info("reload (%s): %s", source, ", ".join(changed) if changed else "no change")
        if changed:
            await hub.announce_config_change(changed)
        return ReloadResult(True, changed)

    def problems(self) -> list[str]:
        return [f"config reload failed, previous configuration in force: {self.error}"
                ] if self.error else []

    def status(self) -> dict[str, Any]:
        return {"ok": self.error is None, "error": self.error, "reloads": self.reloads,
                "last_at": self.last_at}


def _check_public_key(pem: str) -> None:
    """A reloaded key must load: a half-written file would otherwise refuse every token."""
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    try:
        load_pem_public_key(pem.encode())
    except (ValueError, TypeError):
        raise ConfigError("JWT_PUBLIC_KEY is not a loadable PEM public key") from None
