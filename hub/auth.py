"""Token extraction, JWT verification and the browser ``Origin`` check. No I/O here."""

from __future__ import annotations

import ipaddress
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import jwt

from hub.config import Settings
from hub.errors import AuthError, ErrorCode
from hub.keys import JwksKeys

__all__ = ["AuthError", "OriginPolicy", "Principal", "TokenVerifier", "issue_token",
           "normalise_origin", "origin_allowed", "strip_bearer", "token_from_cookie",
           "token_from_headers"]

COOKIE_NAME = "ks_access_token"
# A JWT bigger than this is refused before it is parsed: nobody needs 8 KiB of claims.
MAX_TOKEN_BYTES = 8 * 1024
# Time claims must be numbers between the epoch and the end of year 9999: a string, a
# boolean, 1e400 or 10**400 is refused rather than ignored, or overflowing a float.
MAX_TIMESTAMP = 253_402_300_799
_TIME_CLAIMS = ("exp", "nbf", "iat")
# Where hub's uvicorn protocols (hub._compat.uvicorn_protocols) leave the TCP peer's
# address in a scope.
PEER_KEY = "hub.peer"


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is on the other end of a connection or request, from their verified token."""

    user_id: str
    roles: frozenset[str]
    tenant: str | None
    expires_at: float | None
    is_admin: bool
    can_publish: bool
    issued_at: float | None = None  # iat: revocations of a user or tenant cover older ones
    jti: str | None = None

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
    """Verifies hub tokens with the configured key, algorithms, issuer and audience.

    The keys are read when it is built (a reload builds a new one): JWT_SECRET or every
    secret of JWT_SECRET_FILE (a rotation window: each is tried), JWT_PUBLIC_KEY, or the
    live keys of ``jwks`` (JWT_JWKS_URL) by the token's ``kid``."""

    def __init__(self, settings: Settings, jwks: JwksKeys | None = None) -> None:
        self._jwks = jwks if settings.jwt_jwks_url else None
        self._keys: tuple[str, ...] = (
            () if settings.jwt_jwks_url
            else (settings.verify_key,) if settings.jwt_public_key else settings.hs_secrets)
        self._algorithms = list(settings.algorithms)
        self._issuer = settings.jwt_issuer
        self._audience = settings.jwt_audience
        self._leeway = settings.jwt_leeway_s
        self._role_claim = settings.role_claim
        self._tenant_claim = settings.tenant_claim
        self._admin_roles = frozenset(settings.admin_roles)
        self._publisher_roles = frozenset(settings.publisher_roles)
        self._require_exp = settings.require_exp
        self._max_lifetime = settings.max_token_lifetime_s
        # Whether a verified token has been revoked (hub.revocations; set by the app).
        self.revoked: Callable[[Principal], object] | None = None

    @property
    def leeway(self) -> float:
        return self._leeway

    @property
    def keys(self) -> tuple[str, ...]:
        """The static keys in force (to tell whether a reload changed them; never logged)."""
        return self._keys

    async def verify_async(self, token: str | None) -> Principal:
        """:meth:`verify`, after refetching the JWKS (off the event loop, rate-limited)
        when the token names a ``kid`` not known yet."""
        if self._jwks is not None and token and len(token) <= MAX_TOKEN_BYTES:
            kid = _kid(token)
            if kid is not None and self._jwks.get(kid) is None:
                await self._jwks.refresh_for(kid)
        return self.verify(token)

    def verify(self, token: str | None) -> Principal:
        """Return the token's principal or raise :class:`AuthError` whose code is the reason."""
        if not token:
            raise AuthError("no token", code=ErrorCode.MISSING_TOKEN)
        if len(token) > MAX_TOKEN_BYTES:
            raise AuthError("token too large", code=ErrorCode.MALFORMED_TOKEN)
        keys: tuple[Any, ...] = self._keys
        if self._jwks is not None:
            kid = _kid(token)
            if kid is None:
                raise AuthError("token names no key (kid) of the JWKS",
                                code=ErrorCode.UNKNOWN_KEY)
            jwk = self._jwks.get(kid)
            if jwk is None:
                raise AuthError("token signed by an unknown key", code=ErrorCode.UNKNOWN_KEY)
            keys = (jwk.key,)
        for index, key in enumerate(keys):
            try:
                claims = self._decode(token, key)
                break
            except AuthError as exc:
                # A rotation window: a bad signature under one secret may verify under the next.
                if exc.code != ErrorCode.BAD_SIGNATURE or index == len(keys) - 1:
                    raise
        else:
            raise AuthError("no token key configured", code=ErrorCode.NO_SIGNING_KEY)
        if not isinstance(claims, dict):
            raise AuthError("malformed token", code=ErrorCode.MALFORMED_TOKEN)
        self._check_times(claims)
        principal = self._principal(claims)
        if self.revoked is not None and self.revoked(principal):
            raise AuthError("token revoked", code=ErrorCode.TOKEN_REVOKED)
        return principal

    def _decode(self, token: str, key: Any) -> Any:
        # PyJWT's own time checks are off: it accepts numeric strings (then never enforced
        # here) and overflows on 1e400; _check_times() is strict about them.
        options: Any = {
            "require": ["sub", "exp"] if self._require_exp else ["sub"],
            "verify_aud": self._audience is not None,
            "verify_exp": False, "verify_nbf": False, "verify_iat": False,
        }
        try:
            return jwt.decode(
                token,
                key,
                algorithms=self._algorithms,
                issuer=self._issuer,
                audience=self._audience,
                options=options,
            )
        except (jwt.InvalidIssuerError, jwt.InvalidAudienceError):
            raise AuthError("token issuer or audience not accepted",
                            code=ErrorCode.WRONG_CLAIMS) from None
        except jwt.InvalidSignatureError:
            raise AuthError("bad token signature", code=ErrorCode.BAD_SIGNATURE) from None
        except jwt.InvalidAlgorithmError:
            raise AuthError("token algorithm not allowed", code=ErrorCode.BAD_ALGORITHM) from None
        except jwt.InvalidKeyError:
            # e.g. an ES256 header against an RSA key: the key cannot verify that algorithm.
            raise AuthError("token algorithm does not match the key", code=ErrorCode.BAD_ALGORITHM
                            ) from None
        except jwt.MissingRequiredClaimError as exc:
            raise AuthError(f"token lacks the {exc.claim!r} claim",
                            code=ErrorCode.WRONG_CLAIMS) from None
        except jwt.PyJWTError:
            # Every other PyJWT error (DecodeError, InvalidTokenError and its kin).
            raise AuthError("malformed token", code=ErrorCode.MALFORMED_TOKEN) from None
        except (ValueError, TypeError, OverflowError):
            # A key or signature the crypto backend chokes on: still just a bad token.
            raise AuthError("malformed token", code=ErrorCode.MALFORMED_TOKEN) from None

    def _check_times(self, claims: Mapping[str, Any]) -> None:
        times: dict[str, float] = {}
        for name in _TIME_CLAIMS:
            if name not in claims:
                continue
            value = claims[name]
            if (isinstance(value, bool) or not isinstance(value, int | float)
                    or not (isinstance(value, int) or math.isfinite(value))
                    or not 0 <= value <= MAX_TIMESTAMP):
                raise AuthError(f"token's {name!r} claim is not a valid NumericDate",
                                code=ErrorCode.WRONG_CLAIMS)
            times[name] = float(value)
        now, leeway = time.time(), self._leeway
        exp, nbf, iat = times.get("exp"), times.get("nbf"), times.get("iat")
        if exp is not None and now > exp + leeway:
            raise AuthError("token expired", code=ErrorCode.TOKEN_EXPIRED)
        if (nbf is not None and nbf > now + leeway) or (iat is not None and iat > now + leeway):
            raise AuthError("token not yet valid", code=ErrorCode.TOKEN_NOT_YET_VALID)
        if exp is not None:
            lifetime = exp - min(iat if iat is not None else now, now)
            if lifetime > self._max_lifetime + leeway:
                raise AuthError("token lifetime exceeds HUB_MAX_TOKEN_LIFETIME_S",
                                code=ErrorCode.WRONG_CLAIMS)

    def _principal(self, claims: Mapping[str, Any]) -> Principal:
        roles = _interned(_roles(claims.get(self._role_claim)) | _roles(claims.get("roles")))
        tenant = claims.get(self._tenant_claim)
        exp = claims.get("exp")
        iat = claims.get("iat")
        jti = claims.get("jti")
        return Principal(
            user_id=str(claims["sub"]),
            roles=roles,
            tenant=str(tenant) if tenant is not None else None,
            expires_at=float(exp) if isinstance(exp, int | float) else None,
            is_admin=bool(roles & self._admin_roles),
            can_publish=bool(roles & self._publisher_roles),
            issued_at=float(iat) if isinstance(iat, int | float) else None,
            jti=str(jti) if isinstance(jti, str | int) and not isinstance(jti, bool) else None,
        )


def _kid(token: str) -> str | None:
    try:
        kid = jwt.get_unverified_header(token).get("kid")
    except (jwt.PyJWTError, ValueError, TypeError):
        return None
    return kid if isinstance(kid, str) else None


_ROLE_SETS: dict[frozenset[str], frozenset[str]] = {}


def _interned(roles: frozenset[str]) -> frozenset[str]:
    """One frozenset per distinct set of roles (~200 bytes on every connection's principal
    otherwise); bounded, since tokens choose their roles."""
    known = _ROLE_SETS.get(roles)
    if known is not None:
        return known
    if len(_ROLE_SETS) < 256:
        _ROLE_SETS[roles] = roles
    return roles


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
    if not 0 < ttl_s <= settings.max_token_lifetime_s:
        raise AuthError(f"the token lifetime must be between 1 s and HUB_MAX_TOKEN_LIFETIME_S "
                        f"({int(settings.max_token_lifetime_s)} s)", code=ErrorCode.BAD_LIFETIME)
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
    secret = settings.signing_secret
    if secret:
        return jwt.encode(claims, secret, algorithm=algorithm)
    if not private_key:
        raise AuthError("signing needs JWT_SECRET or JWT_SECRET_FILE, or --private-key with "
                        "JWT_PUBLIC_KEY",
                        code=ErrorCode.NO_SIGNING_KEY)
    return jwt.encode(claims, private_key, algorithm=algorithm)


_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}
_HTTP_SCHEME = {"ws": "http", "wss": "https", "http": "http", "https": "https"}
Origin = tuple[str, str, int]


def normalise_origin(value: str | None, *, scheme: str | None = None) -> Origin | None:
    """``(scheme, host, port)`` of an origin, or None when it is not one.

    Case-insensitive scheme and host, default ports made explicit, one trailing ``/``
    ignored; a path, query, fragment or user part makes it no origin (``null`` neither).
    ``scheme`` is for a bare ``host[:port]`` (a ``Host`` header)."""
    if not value:
        return None
    text = value.strip()
    if scheme is not None:
        text = f"{scheme}://{text}"
    if text.endswith("/"):
        text = text[:-1]
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:
        return None
    name = _HTTP_SCHEME.get(parts.scheme.lower())
    host = parts.hostname
    if (name is None or not host or parts.path or parts.query or parts.fragment
            or "@" in parts.netloc):
        return None
    return name, host.lower(), port if port is not None else _DEFAULT_PORTS[name]


def _first(value: str | None) -> str | None:
    if value is None:
        return None
    first = value.split(",")[0].strip()
    return first or None


def _forwarded(value: str | None) -> dict[str, str]:
    """The first element of an RFC 7239 ``Forwarded`` header, as lower-case pairs."""
    pairs: dict[str, str] = {}
    first = _first(value)
    if first is None:
        return pairs
    for part in first.split(";"):
        name, sep, item = part.partition("=")
        if sep:
            pairs[name.strip().lower()] = item.strip().strip('"')
    return pairs


class OriginPolicy:
    """The one browser ``Origin`` check of every transport (``/ws/events``, Socket.IO).

    Browsers send ``Origin``; anything else (servers, CLIs) sends none and passes. With an
    allow-list, only its entries pass; without one, only the hub's own origin (scheme,
    host and port of the request: cookie auth would otherwise let any site open a socket
    with the visitor's credentials — cross-site WebSocket hijacking). ``X-Forwarded-Host``,
    ``X-Forwarded-Proto`` and ``Forwarded`` say what the hub's own origin is only when the
    TCP peer is one of ``trusted_proxies``; from anyone else they are ignored."""

    def __init__(self, allowed: Iterable[str], trusted_proxies: Iterable[str] = ()) -> None:
        allowed = tuple(allowed)
        self.any = "*" in allowed
        self.allowed = frozenset(o for o in (normalise_origin(a) for a in allowed if a != "*")
                                 if o is not None)
        trusted_proxies = tuple(trusted_proxies)
        self._any_proxy = "*" in trusted_proxies
        self._proxies = tuple(ipaddress.ip_network(p, strict=False)
                              for p in trusted_proxies if p != "*")

    def trusted_peer(self, peer: str | None) -> bool:
        if self._any_proxy:
            return True
        if not peer or not self._proxies:
            return False
        try:
            address = ipaddress.ip_address(peer)
        except ValueError:
            return False
        return any(address in network for network in self._proxies)

    def own_origin(self, headers: Mapping[str, str], scheme: str, peer: str | None
                   ) -> Origin | None:
        """The origin the client reached: ``Host`` and the connection's scheme, or what a
        trusted proxy says they were."""
        host, proto = headers.get("host"), scheme
        if self.trusted_peer(peer):
            forwarded = _forwarded(headers.get("forwarded"))
            host = forwarded.get("host") or _first(headers.get("x-forwarded-host")) or host
            proto = forwarded.get("proto") or _first(headers.get("x-forwarded-proto")) or proto
        return normalise_origin(host, scheme=_HTTP_SCHEME.get(proto.lower(), "http"))

    def allows(self, origin: str | None, headers: Mapping[str, str], scheme: str,
               peer: str | None) -> bool:
        if origin is None:
            return True
        if self.any:
            return True
        candidate = normalise_origin(origin)
        if candidate is None:
            return False
        if self.allowed:
            return candidate in self.allowed
        return candidate == self.own_origin(headers, scheme, peer)

    def allows_scope(self, scope: Mapping[str, Any]) -> bool:
        """:meth:`allows` for an ASGI HTTP or WebSocket scope (hub._compat.uvicorn_protocols
        leaves the TCP peer in it; without it, e.g. under another server, forwarded headers
        are ignored)."""
        headers: dict[str, str] = {}
        for name, value in scope.get("headers", ()):
            key = name.decode("latin-1").lower()
            if key not in headers:  # the first of repeated headers, as Starlette does
                headers[key] = value.decode("latin-1")
        return self.allows(headers.get("origin"), headers, str(scope.get("scheme", "http")),
                           scope.get(PEER_KEY))


def origin_allowed(origin: str | None, host: str | None, allowed: Iterable[str],
                   scheme: str = "http") -> bool:
    """:class:`OriginPolicy` for one request without proxies (kept for callers of the
    earlier function)."""
    return OriginPolicy(allowed).allows(origin, {"host": host} if host else {}, scheme, None)
