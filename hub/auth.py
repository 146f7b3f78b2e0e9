"""Token extraction, JWT verification and the browser ``Origin`` check. No I/O here."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import jwt

from hub.config import Settings
from hub.exceptions import AuthError

__all__ = ["AuthError", "Principal", "TokenVerifier", "issue_token", "origin_allowed",
           "strip_bearer", "token_from_cookie", "token_from_headers"]

COOKIE_NAME = "ks_access_token"
# A JWT bigger than this is refused before it is parsed: nobody needs 8 KiB of claims.
MAX_TOKEN_BYTES = 8 * 1024


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is on the other end of a connection or request, from their verified token."""

    user_id: str
    roles: frozenset[str]
    tenant: str | None
    expires_at: float | None
    is_admin: bool
    can_publish: bool

    def may_see(self, tenant: str | None) -> bool:
        """Tenant isolation: an event with a tenant reaches only that tenant and admins."""
        return tenant is None or self.is_admin or tenant == self.tenant


def strip_bearer(value: str) -> str:
    value = value.strip()
    if value[:7].lower() == "bearer ":
        return value[7:].strip()
    return value


def token_from_cookie(cookie_header: str) -> str | None:
    """The ``ks_access_token`` cookie, with or without ``Bearer ``, URL-encoded or not.

    Split by hand: ``SimpleCookie`` drops a whole header at one value it dislikes, and a
    ``Bearer <jwt>`` value (with its space) is exactly such a value."""
    for part in cookie_header.split(";"):
        name, sep, value = part.strip().partition("=")
        if sep and name.strip() == COOKIE_NAME:
            return strip_bearer(unquote(value.strip().strip('"'))) or None
    return None


def token_from_headers(headers: Mapping[str, str]) -> str | None:
    """``Authorization: Bearer <jwt>`` first, then the ``ks_access_token`` cookie.

    ``headers`` must be case-insensitive or use lower-case names."""
    authorization = headers.get("authorization")
    if authorization and authorization[:7].lower() == "bearer ":
        return strip_bearer(authorization) or None
    cookie = headers.get("cookie")
    if cookie:
        return token_from_cookie(cookie)
    return None


class TokenVerifier:
    """Verifies hub tokens with the configured key, algorithms, issuer and audience."""

    def __init__(self, settings: Settings) -> None:
        self._key = settings.verify_key
        self._algorithms = list(settings.algorithms)
        self._issuer = settings.jwt_issuer
        self._audience = settings.jwt_audience
        self._leeway = settings.jwt_leeway_s
        self._role_claim = settings.role_claim
        self._tenant_claim = settings.tenant_claim
        self._admin_roles = frozenset(settings.admin_roles)
        self._publisher_roles = frozenset(settings.publisher_roles)

    @property
    def leeway(self) -> float:
        return self._leeway

    def verify(self, token: str | None) -> Principal:
        """Return the token's principal or raise :class:`AuthError` whose code is the reason."""
        if not token:
            raise AuthError("no token", code="missing_token")
        if len(token) > MAX_TOKEN_BYTES:
            raise AuthError("token too large", code="malformed_token")
        options: Any = {"require": ["sub"], "verify_aud": self._audience is not None}
        try:
            claims = jwt.decode(
                token,
                self._key,
                algorithms=self._algorithms,
                issuer=self._issuer,
                audience=self._audience,
                leeway=self._leeway,
                options=options,
            )
        except jwt.ExpiredSignatureError:
            raise AuthError("token expired", code="token_expired") from None
        except jwt.ImmatureSignatureError:
            raise AuthError("token not yet valid", code="token_not_yet_valid") from None
        except (jwt.InvalidIssuerError, jwt.InvalidAudienceError):
            raise AuthError("token issuer or audience not accepted", code="wrong_claims") from None
        except jwt.InvalidSignatureError:
            raise AuthError("bad token signature", code="bad_signature") from None
        except jwt.InvalidAlgorithmError:
            raise AuthError("token algorithm not allowed", code="bad_algorithm") from None
        except jwt.MissingRequiredClaimError as exc:
            raise AuthError(f"token lacks the {exc.claim!r} claim", code="wrong_claims") from None
        except jwt.InvalidTokenError:
            raise AuthError("malformed token", code="malformed_token") from None
        return self._principal(claims)

    def _principal(self, claims: Mapping[str, Any]) -> Principal:
        roles = _roles(claims.get(self._role_claim)) | _roles(claims.get("roles"))
        tenant = claims.get(self._tenant_claim)
        exp = claims.get("exp")
        return Principal(
            user_id=str(claims["sub"]),
            roles=roles,
            tenant=str(tenant) if tenant is not None else None,
            expires_at=float(exp) if isinstance(exp, int | float) else None,
            is_admin=bool(roles & self._admin_roles),
            can_publish=bool(roles & self._publisher_roles),
        )


def _roles(value: object) -> frozenset[str]:
    if isinstance(value, str):
        return frozenset({value})
    if isinstance(value, list | tuple):
        return frozenset(str(v) for v in value)
    return frozenset()


def issue_token(
    settings: Settings,
    *,
    sub: str,
    role: str | None = None,
    tenant: str | None = None,
    ttl_s: float = 3600,
    private_key: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> str:
    """Sign a token the hub accepts (``hub token``). HS* uses JWT_SECRET; RS/ES needs a key."""
    now = int(time.time())
    claims: dict[str, Any] = {"sub": sub, "iat": now, "exp": now + int(ttl_s)}
    if role:
        claims[settings.role_claim] = role
    if tenant:
        claims[settings.tenant_claim] = tenant
    if settings.jwt_issuer:
        claims["iss"] = settings.jwt_issuer
    if settings.jwt_audience:
        claims["aud"] = settings.jwt_audience
    claims.update(extra or {})
    algorithm = settings.algorithms[0]
    if settings.jwt_secret:
        return jwt.encode(claims, settings.jwt_secret, algorithm=algorithm)
    if not private_key:
        raise AuthError("signing needs JWT_SECRET, or --private-key with JWT_PUBLIC_KEY",
                        code="no_signing_key")
    return jwt.encode(claims, private_key, algorithm=algorithm)


def origin_allowed(origin: str | None, host: str | None, allowed: Iterable[str]) -> bool:
    """Browsers send ``Origin``; anything else (servers, CLIs) sends none and passes.

    With an allow-list, only its entries pass; without one, only the hub's own origin (the
    ``Host`` the browser connected to) does: cookie auth would otherwise let any site open
    a socket with the visitor's credentials (cross-site WebSocket hijacking)."""
    if origin is None:
        return True
    allowed = tuple(allowed)
    if allowed:
        return "*" in allowed or origin.rstrip("/") in {a.rstrip("/") for a in allowed}
    if not host:
        return False
    return urlsplit(origin).netloc.lower() == host.lower()
