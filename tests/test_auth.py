"""Authenticators: static tokens, and JWTs verified with PyJWT (HS*, RS*, ES*, a JWKS file).

Each refusal is the right error, and no error message repeats the token it refused.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from aioqueue.auth import JwtAuthenticator, TokenAuthenticator, authenticator, bearer
from aioqueue.config import AuthSettings, load
from aioqueue.errors import ConfigError, TokenExpired, Unauthorized

SECRET = "test-secret-0123456789abcdef0123456789"
TOKEN = "tok-alice-0123456789abcdef"


def settings(**auth: str) -> AuthSettings:
    environ = {f"AIOQUEUE_AUTH__{key.upper()}": value for key, value in auth.items()}
    return load(environ=environ).auth


def hs256(**auth: str) -> JwtAuthenticator:
    return JwtAuthenticator(settings(mode="jwt", jwt_secret=SECRET, **auth))


def claims(**extra: Any) -> dict[str, Any]:
    return {"sub": "alice", "exp": time.time() + 60, **extra}


def refused(auth: Any, token: str, error: type[Exception] = Unauthorized) -> str:
    with pytest.raises(error) as info:
        auth.authenticate(token)
    message = str(info.value)
    assert token not in message
    return message


def pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> str:
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return public.decode()


RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())


# Static tokens ----------------------------------------------------------------------------------


def test_a_token_maps_to_its_principal_and_scopes() -> None:
    auth = TokenAuthenticator(
        (
            {"token": TOKEN, "principal": "alice", "scopes": ["jobs:read"]},
            {"token": TOKEN + "-b", "principal": "bob", "scopes": ["jobs:admin"]},
        )
    )
    alice = auth.authenticate(TOKEN)
    assert (alice.name, alice.scopes.read, alice.scopes.admin, alice.expires_at) == (
        "alice",
        True,
        False,
        None,
    )
    assert auth.authenticate(TOKEN + "-b").name == "bob"
    for wrong in (TOKEN[:-1], TOKEN + "x", TOKEN.upper(), "\udcff" * 20, "x" * 9000):
        refused(auth, wrong)


@pytest.mark.parametrize(
    ("header", "token"),
    [
        (None, None),
        ("Bearer abc", "abc"),
        ("bearer   abc  ", "abc"),
    ],
)
def test_bearer(header: str | None, token: str | None) -> None:
    assert bearer(header) == token


@pytest.mark.parametrize("header", ["Basic YWxpY2U6cHc=", "Bearer", "Bearer   ", "abc", ""])
def test_bearer_refuses_other_schemes(header: str) -> None:
    with pytest.raises(Unauthorized):
        bearer(header)


# JWT, HS256 -------------------------------------------------------------------------------------


def test_a_jwt_gives_sub_and_the_scopes_claim_as_a_string_or_a_list() -> None:
    auth = hs256()
    expires = time.time() + 60
    token = jwt.encode(claims(exp=expires, scope="jobs:read topics:subscribe:a.#"), SECRET)
    alice = auth.authenticate(token)
    assert alice.name == "alice" and alice.scopes.read and alice.scopes.may_subscribe("a.b")
    assert alice.expires_at == pytest.approx(expires, abs=1)
    listed = jwt.encode(claims(perms=["jobs:admin", 7]), SECRET)
    assert hs256(jwt_scopes_claim="perms").authenticate(listed).scopes.admin
    assert not auth.authenticate(jwt.encode(claims(scope=7), SECRET)).scopes.read


def test_alg_none_is_refused() -> None:
    token = jwt.encode(claims(), None, algorithm="none")  # type: ignore[arg-type]
    assert "alg" in refused(hs256(), token)


def test_a_forged_or_altered_token_is_refused() -> None:
    auth = hs256()
    assert "Signature" in refused(auth, jwt.encode(claims(), SECRET + "x"))
    head, _, signature = jwt.encode(claims(), SECRET).split(".")
    other = base64.urlsafe_b64encode(json.dumps(claims(sub="root")).encode()).rstrip(b"=")
    refused(auth, f"{head}.{other.decode()}.{signature}")
    for garbage in ("x", "a.b.c", "....", "e30.e30.e30"):
        refused(auth, garbage)


def test_an_expired_token_is_token_expired_past_the_leeway() -> None:
    auth = hs256(jwt_leeway="5")
    assert auth.authenticate(jwt.encode(claims(exp=time.time() - 2), SECRET)).name == "alice"
    refused(auth, jwt.encode(claims(exp=time.time() - 10), SECRET), TokenExpired)


def test_nbf_aud_iss_and_required_claims_are_checked() -> None:
    auth = hs256(jwt_audience="aioqueue", jwt_issuer="https://idp.example", jwt_leeway="0")
    good = claims(aud="aioqueue", iss="https://idp.example")
    assert auth.authenticate(jwt.encode(good, SECRET)).name == "alice"
    for bad in (
        {**good, "aud": "other"},
        {**good, "iss": "https://evil.example"},
        {**good, "nbf": time.time() + 60},
        {key: value for key, value in good.items() if key != "aud"},
        {key: value for key, value in good.items() if key != "exp"},
        {key: value for key, value in good.items() if key != "sub"},
        {**good, "sub": ""},
        {**good, "sub": "x" * 201},
    ):
        refused(auth, jwt.encode(bad, SECRET))


def test_an_aud_is_ignored_when_no_audience_is_configured() -> None:
    assert hs256().authenticate(jwt.encode(claims(aud="anything"), SECRET)).name == "alice"


# JWT, public keys -------------------------------------------------------------------------------


def test_rs256_with_a_pem_and_the_hs256_confusion_refused() -> None:
    public = pem(RSA_KEY)
    auth = authenticator(settings(mode="jwt", jwt_algorithms='["RS256"]', jwt_public_key=public))
    assert auth is not None
    assert auth.authenticate(jwt.encode(claims(), RSA_KEY, algorithm="RS256")).name == "alice"
    # The classic attack: an HS256 token whose "secret" is the public key the server holds.
    head = base64.urlsafe_b64encode(b'{"alg":"HS256","typ":"JWT"}').rstrip(b"=")
    body = base64.urlsafe_b64encode(json.dumps(claims()).encode()).rstrip(b"=")
    signed = head + b"." + body
    mac = hmac.new(public.encode(), signed, hashlib.sha256).digest()
    forged = (signed + b"." + base64.urlsafe_b64encode(mac).rstrip(b"=")).decode()
    assert "alg" in refused(auth, forged)
    # And a token of another algorithm family, signed with a real key of it.
    refused(auth, jwt.encode(claims(), EC_KEY, algorithm="ES256"))


def test_es256_with_a_pem_file(tmp_path: Path) -> None:
    path = tmp_path / "public.pem"
    path.write_text(pem(EC_KEY))
    auth = authenticator(settings(mode="jwt", jwt_algorithms='["ES256"]', jwt_public_key=str(path)))
    assert auth is not None
    assert auth.authenticate(jwt.encode(claims(), EC_KEY, algorithm="ES256")).name == "alice"


@pytest.mark.parametrize(
    ("algorithms", "key", "message"),
    [
        ('["RS256"]', pem(EC_KEY), "is not an RSA key, which RS256 needs"),
        ('["ES256"]', pem(RSA_KEY), "is not an EC key, which ES256 needs"),
        ('["RS256"]', "-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----", "not a PEM"),
        ('["RS256"]', "/no/such/file.pem", "cannot read"),
    ],
)
def test_a_key_that_does_not_fit_its_algorithms_stops_start_up(
    algorithms: str, key: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        authenticator(settings(mode="jwt", jwt_algorithms=algorithms, jwt_public_key=key))


def test_a_jwks_file_picks_the_key_by_kid(tmp_path: Path) -> None:
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    keys = []
    for kid, key in (("one", RSA_KEY), ("two", other)):
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
        keys.append({**jwk, "kid": kid, "alg": "RS256", "use": "sig"})
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": keys}))
    auth = authenticator(settings(mode="jwt", jwt_algorithms='["RS256"]', jwt_jwks_file=str(path)))
    assert auth is not None
    token = jwt.encode(claims(), other, algorithm="RS256", headers={"kid": "two"})
    assert auth.authenticate(token).name == "alice"
    refused(auth, jwt.encode(claims(), other, algorithm="RS256", headers={"kid": "one"}))
    refused(auth, jwt.encode(claims(), other, algorithm="RS256", headers={"kid": "three"}))
    refused(auth, jwt.encode(claims(), other, algorithm="RS256"))  # no kid, two keys


def test_an_unreadable_jwks_file_stops_start_up(tmp_path: Path) -> None:
    path = tmp_path / "jwks.json"
    path.write_text("{not json")
    with pytest.raises(ConfigError, match=r"auth\.jwt_jwks_file: cannot use"):
        authenticator(settings(mode="jwt", jwt_algorithms='["RS256"]', jwt_jwks_file=str(path)))


def test_a_remembered_token_still_expires(monkeypatch: pytest.MonkeyPatch) -> None:
    auth = hs256(jwt_leeway="5")
    expires = time.time() + 60
    token = jwt.encode(claims(exp=expires), SECRET)
    assert auth.authenticate(token).name == "alice"
    assert auth.authenticate(token).name == "alice"  # from the cache
    monkeypatch.setattr("aioqueue.auth.time.time", lambda: expires + 4)
    assert auth.authenticate(token).name == "alice"  # within the leeway
    monkeypatch.setattr("aioqueue.auth.time.time", lambda: expires + 6)
    refused(auth, token, TokenExpired)


def test_the_cache_of_verified_tokens_is_bounded() -> None:
    auth = hs256()
    auth.CACHE_SIZE = 3
    tokens = [jwt.encode(claims(sub=f"user{n}"), SECRET) for n in range(5)]
    for token in tokens:
        auth.authenticate(token)
    assert len(auth._verified) == 3
    assert [auth.authenticate(token).name for token in tokens] == [f"user{n}" for n in range(5)]
