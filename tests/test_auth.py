"""Token extraction and verification, the JWT matrix, the Origin check (no sockets)."""

from __future__ import annotations

import time

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from hub.auth import (
    MAX_TOKEN_BYTES,
    TokenVerifier,
    issue_token,
    origin_allowed,
    token_from_cookie,
    token_from_headers,
)
from hub.errors import AuthError
from tests.conftest import SECRET, make_settings, make_token


def _rsa_keys() -> tuple[str, str]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
    public = key.public_key().public_bytes(serialization.Encoding.PEM,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
    return private, public.decode()


RSA_PRIVATE, RSA_PUBLIC = _rsa_keys()


def verifier(**overrides: object) -> TokenVerifier:
    return TokenVerifier(make_settings(**overrides))


def reason(token: str | None, v: TokenVerifier | None = None) -> str:
    with pytest.raises(AuthError) as caught:
        (v or verifier()).verify(token)
    return caught.value.code


def test_valid_token_gives_the_principal() -> None:
    principal = verifier().verify(make_token("alice", role="admin", tenant_id="acme"))
    assert principal.user_id == "alice"
    assert principal.is_admin and principal.can_publish
    assert principal.tenant == "acme"
    assert principal.may_see("acme") and principal.may_see("other") and principal.may_see(None)


def test_viewer_sees_only_its_tenant() -> None:
    principal = verifier().verify(make_token("v", role="viewer", tenant_id="acme"))
    assert not principal.is_admin and not principal.can_publish
    assert principal.may_see("acme") and principal.may_see(None)
    assert not principal.may_see("globex")


def test_roles_list_claim_is_read() -> None:
    principal = verifier().verify(make_token("r", role=None, roles=["viewer", "admin"]))
    assert principal.is_admin


def _unsigned(claims: str) -> str:
    header = jwt.utils.base64url_encode(b'{"alg":"none","typ":"JWT"}').decode()
    return f"{header}.{jwt.utils.base64url_encode(claims.encode()).decode()}."


@pytest.mark.parametrize(("token", "code"), [
    (None, "missing_token"),
    ("", "missing_token"),
    (make_token(secret="forged-secret-forged-secret-forged-secret"), "bad_signature"),
    (make_token(ttl=-10), "token_expired"),
    (make_token(nbf=int(time.time()) + 3600), "token_not_yet_valid"),
    (_unsigned(f'{{"sub":"x","exp":{int(time.time()) + 60}}}'), "bad_algorithm"),
    (make_token(algorithm="HS512", secret=SECRET * 2), "bad_algorithm"),
    ("a.b.c", "malformed_token"),
    ("not a token at all", "malformed_token"),
    ("x" * (MAX_TOKEN_BYTES + 1), "malformed_token"),
    (jwt.encode({"exp": int(time.time()) + 60}, SECRET, algorithm="HS256"), "wrong_claims"),
], ids=["none", "empty", "forged", "expired", "future-nbf", "alg-none", "other-alg",
        "malformed", "garbage", "oversized", "no-sub"])
def test_jwt_matrix(token: str | None, code: str) -> None:
    assert reason(token) == code


def test_issuer_and_audience_are_checked_when_configured() -> None:
    v = verifier(jwt_issuer="koreshield", jwt_audience="hub")
    assert v.verify(make_token(iss="koreshield", aud="hub")).user_id == "alice"
    assert reason(make_token(iss="someone-else", aud="hub"), v) == "wrong_claims"
    assert reason(make_token(iss="koreshield", aud="other"), v) == "wrong_claims"
    assert reason(make_token(), v) == "wrong_claims"
    # Unset, they are not checked.
    assert verifier().verify(make_token(iss="anyone", aud="anything")).user_id == "alice"


def test_rs256_and_hs_rs_key_confusion() -> None:
    v = verifier(jwt_secret=None, jwt_public_key=RSA_PUBLIC)
    good = jwt.encode({"sub": "p", "exp": int(time.time()) + 60}, RSA_PRIVATE, algorithm="RS256")
    assert v.verify(good).user_id == "p"
    # The classic attack: sign HS256 with the public key as the HMAC secret.
    import hashlib
    import hmac
    import json

    header = jwt.utils.base64url_encode(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = jwt.utils.base64url_encode(
        json.dumps({"sub": "mallory", "exp": int(time.time()) + 60}).encode())
    signing_input = header + b"." + body
    signature = jwt.utils.base64url_encode(
        hmac.new(RSA_PUBLIC.encode(), signing_input, hashlib.sha256).digest())
    assert reason((signing_input + b"." + signature).decode(), v) == "bad_algorithm"


def test_es256_public_key() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    public = key.public_key().public_bytes(serialization.Encoding.PEM,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
    v = verifier(jwt_secret=None, jwt_public_key=public.decode())
    token = jwt.encode({"sub": "e", "exp": int(time.time()) + 60}, key, algorithm="ES256")
    assert v.verify(token).user_id == "e"


def test_leeway_accepts_slightly_expired_tokens() -> None:
    token = make_token(ttl=-5)
    assert reason(token) == "token_expired"
    assert verifier(jwt_leeway_s=30).verify(token).user_id == "alice"


def test_issue_token_round_trips() -> None:
    settings = make_settings(jwt_issuer="iss", jwt_audience="aud")
    token = issue_token(settings, sub="bob", role="admin", tenant="acme", ttl_s=60)
    principal = TokenVerifier(settings).verify(token)
    assert (principal.user_id, principal.tenant, principal.is_admin) == ("bob", "acme", True)


def test_issue_token_with_only_a_public_key_needs_a_private_key() -> None:
    settings = make_settings(jwt_secret=None, jwt_public_key=RSA_PUBLIC)
    with pytest.raises(AuthError):
        issue_token(settings, sub="x")
    token = issue_token(settings, sub="x", private_key=RSA_PRIVATE)
    assert TokenVerifier(settings).verify(token).user_id == "x"


@pytest.mark.parametrize(("header", "expected"), [
    ("ks_access_token=abc", "abc"),
    ("theme=dark; ks_access_token=abc; other=1", "abc"),
    ("ks_access_token=Bearer abc", "abc"),
    ("ks_access_token=Bearer%20abc", "abc"),
    ('ks_access_token="abc"', "abc"),
    ("ks_access_token=", None),
    ("other=abc", None),
    ("garbage;;;==", None),
])
def test_cookie_extraction(header: str, expected: str | None) -> None:
    assert token_from_cookie(header) == expected


def test_authorization_header_wins_over_cookie() -> None:
    headers = {"authorization": "Bearer from-header", "cookie": "ks_access_token=from-cookie"}
    assert token_from_headers(headers) == "from-header"
    assert token_from_headers({"cookie": "ks_access_token=from-cookie"}) == "from-cookie"
    assert token_from_headers({"authorization": "Basic dXNlcg=="}) is None


@pytest.mark.parametrize(("origin", "host", "allowed", "ok"), [
    (None, "hub:8000", (), True),
    ("http://hub:8000", "hub:8000", (), True),
    ("https://evil.example", "hub:8000", (), False),
    ("http://hub:8000", None, (), False),
    ("https://dash.example.com", "hub:8000", ("https://dash.example.com",), True),
    ("https://dash.example.com/", "hub:8000", ("https://dash.example.com",), True),
    ("http://hub:8000", "hub:8000", ("https://dash.example.com",), False),
    ("https://anything", "hub:8000", ("*",), True),
])
def test_origin_check(origin: str | None, host: str | None, allowed: tuple[str, ...],
                      ok: bool) -> None:
    assert origin_allowed(origin, host, allowed) is ok
