"""Who is calling (CONTRACT §6, Authentication): a bearer token turned into a `Principal`.

`[auth] mode` picks the authenticator:

- `none`: no credentials; every caller is `ANONYMOUS`, who may do everything.
- `token`: static tokens from the config, each mapped to a principal and its scopes. A token is
  compared with every configured one in constant time (of their SHA-256 digests), so neither
  the timing nor the order of the table tells which one nearly matched.
- `jwt`: JSON Web Tokens, verified with PyJWT: HS* with a shared secret, or RS*/PS*/ES*/EdDSA
  with a public key or a JWKS file. Only the configured algorithms are accepted: `alg: none`,
  and an HS256 token signed with the public key, never pass. `exp` and `sub` are required;
  `nbf`, and `aud` and `iss` when configured, are checked, all with `jwt_leeway` seconds of
  skew. The principal is `sub`; the scopes come from `jwt_scopes_claim`, a space-separated
  string or a list (scopes aioqueue does not know are ignored: a token may serve several APIs).

PyJWT rather than joserfc: it is the most used JWT library in Python (Flask-JWT-Extended,
Django REST framework SimpleJWT, FastAPI's docs all build on it), maintained since 2011, and
does exactly this much: verify a signature with an allow-list of algorithms, and check claims.

Errors never repeat the token: `Unauthorized` and `TokenExpired` messages say what is wrong
with it, not what it was.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import jwt
import orjson

from aioqueue.config import AuthSettings, principal_ok
from aioqueue.errors import ConfigError, Forbidden, NotFound, TokenExpired, Unauthorized
from aioqueue.scopes import EVERYTHING, Scopes

if TYPE_CHECKING:
    from aioqueue.jobs import Job

#: A bearer token longer than this is refused unread (a JWT is a few hundred bytes).
MAX_TOKEN_BYTES = 8192


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling, and the policy of CONTRACT §6 asked of them: each `check_*` returns or
    raises the error the caller gets. Another principal's job is `NotFound`, worded as for an
    unknown id, so that ids cannot be probed; a job of one's own without the scope is
    `Forbidden`."""

    #: Who; None when auth is off (nobody in particular, allowed everything).
    name: str | None
    scopes: Scopes
    #: When the credentials stop being valid (a JWT's `exp`); None: they do not expire.
    expires_at: float | None = None

    @property
    def sees_everything(self) -> bool:
        """Every job and every traceback: auth off, or `jobs:admin`."""
        return self.name is None or self.scopes.admin

    def _check_sees(self, job: Job) -> None:
        if not (self.sees_everything or job.owner == self.name):
            raise NotFound(f"no job {job.id[:100]!r}")

    def check_read(self, job: Job) -> None:
        self._check_sees(job)
        if not (self.scopes.read or self.scopes.admin):
            raise Forbidden("reading jobs needs the scope jobs:read")

    def check_change(self, job: Job) -> None:
        """Cancel or retry: the submitter of a job of its own (that it may still submit)."""
        self._check_sees(job)
        if not self.scopes.may_submit(job.task):
            raise Forbidden(f"changing a job of {job.task!r} needs jobs:submit:{job.task}")

    def check_submit(self, task: str) -> None:
        if not self.scopes.may_submit(task):
            raise Forbidden(f"submitting {task[:100]!r} needs jobs:submit or jobs:submit:TASK")

    def check_admin(self, what: str) -> None:
        """Dead letters and `/v1/queues`: every job's, so for `jobs:admin` (or with auth off)."""
        if not self.sees_everything:
            raise Forbidden(f"{what} needs the scope jobs:admin")

    def list_owner(self) -> str | None:
        """Whose jobs a listing shows: everyone's (None) or this principal's own."""
        if self.sees_everything:
            return None
        if not self.scopes.read:
            raise Forbidden("listing jobs needs the scope jobs:read")
        return self.name

    def check_publish(self, topic: str) -> None:
        if not self.scopes.may_publish(topic):
            raise Forbidden(f"publishing to {topic[:100]!r} needs a topics:publish scope of it")

    def check_subscribe(self, pattern: str) -> None:
        if not self.scopes.may_subscribe(pattern):
            raise Forbidden(
                f"subscribing to {pattern[:100]!r} needs a topics:subscribe scope covering all of"
                " it"
            )


ANONYMOUS = Principal(None, EVERYTHING)


class Authenticator:
    """Turns a bearer token into a Principal, or raises `Unauthorized` / `TokenExpired`."""

    def authenticate(self, token: str) -> Principal:
        raise NotImplementedError


def bearer(header: str | None) -> str | None:
    """The token of an `Authorization: Bearer TOKEN` header; None if there is no header.
    Raises `Unauthorized` for another scheme or an empty token."""
    if header is None:
        return None
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("expected the header 'Authorization: Bearer TOKEN'")
    return token.strip()


def _checked(token: str) -> str:
    if len(token) > MAX_TOKEN_BYTES:
        raise Unauthorized(f"the token is longer than {MAX_TOKEN_BYTES} bytes")
    return token


class TokenAuthenticator(Authenticator):
    def __init__(self, tokens: tuple[dict[str, Any], ...]) -> None:
        self._table = [
            (_digest(entry["token"]), Principal(entry["principal"], Scopes.parse(entry["scopes"])))
            for entry in tokens
        ]

    def authenticate(self, token: str) -> Principal:
        digest = _digest(_checked(token))
        found = None
        for known, principal in self._table:  # every entry, whether found or not
            if hmac.compare_digest(digest, known):
                found = principal
        if found is None:
            raise Unauthorized("the token is not one this service knows")
        return found


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


class JwtAuthenticator(Authenticator):
    """Verified tokens are remembered (by digest, `CACHE_SIZE` at most) until they expire: a
    client sends the same token with every request, and PyJWT's verification costs more than
    the rest of a read (bench/auth.py)."""

    CACHE_SIZE = 1024

    def __init__(self, settings: AuthSettings) -> None:
        self._settings = settings
        self._algorithms = list(settings.jwt_algorithms)
        self._verified: collections.OrderedDict[bytes, Principal] = collections.OrderedDict()
        self._key: Any = None
        self._jwks: jwt.PyJWKSet | None = None
        if settings.jwt_algorithms[0].startswith("HS"):
            self._key = settings.jwt_secret
        elif settings.jwt_public_key is not None:
            self._key = _public_key(settings.jwt_public_key, settings.jwt_algorithms)
        else:
            assert settings.jwt_jwks_file is not None  # config.load checked one is set
            self._jwks = _jwks(settings.jwt_jwks_file)

    def authenticate(self, token: str) -> Principal:
        digest = _digest(_checked(token))
        known = self._verified.get(digest)
        if known is None:
            known = self._verify(token)
            self._verified[digest] = known
            if len(self._verified) > self.CACHE_SIZE:
                self._verified.popitem(last=False)
        else:
            self._verified.move_to_end(digest)
        assert known.expires_at is not None  # `exp` is required
        if time.time() > known.expires_at + self._settings.jwt_leeway:
            del self._verified[digest]
            raise TokenExpired("the token has expired")
        return known

    def _verify(self, token: str) -> Principal:
        settings = self._settings
        try:
            claims = jwt.decode(
                token,
                self._key_for(token),
                algorithms=self._algorithms,
                audience=settings.jwt_audience,
                issuer=settings.jwt_issuer,
                leeway=settings.jwt_leeway,
                options={
                    "require": ["exp", "sub"],
                    # PyJWT refuses any token with an `aud` when no audience is configured.
                    "verify_aud": settings.jwt_audience is not None,
                },
            )
        except jwt.ExpiredSignatureError:
            raise TokenExpired("the token has expired") from None
        except jwt.PyJWTError as exc:
            raise Unauthorized(f"the token is not valid: {_reason(exc)}") from None
        subject = claims["sub"]
        if not isinstance(subject, str) or not principal_ok(subject):
            raise Unauthorized("the token's sub must be 1 to 200 printable characters")
        return Principal(subject, _scopes(claims.get(settings.jwt_scopes_claim)), claims["exp"])

    def _key_for(self, token: str) -> Any:
        if self._jwks is None:
            return self._key
        kid = jwt.get_unverified_header(token).get("kid")
        keys = self._jwks.keys
        if kid is None and len(keys) == 1:
            return keys[0]
        for key in keys:
            if key.key_id == kid and kid is not None:
                return key
        raise jwt.InvalidKeyError("no key of the JWKS file has the token's kid")


def _reason(exc: jwt.PyJWTError) -> str:
    # PyJWT's messages name the claim or the check, never the token's content.
    text = str(exc) or type(exc).__name__
    return text[:200]


def _scopes(claim: object) -> Scopes:
    if isinstance(claim, str):
        return Scopes.parse(claim.split())
    if isinstance(claim, list):
        return Scopes.parse(scope for scope in claim if isinstance(scope, str))
    return Scopes()


#: The key type each family of public-key algorithms needs.
_KEY_TYPES = {"RS": "RSA", "PS": "RSA", "ES": "EC", "Ed": "OKP"}


def _public_key(value: str, algorithms: tuple[str, ...]) -> Any:
    """The PEM text of `auth.jwt_public_key`, or of the file it names, checked against the
    algorithms: an EC key for RS256 (or the reverse) is a start-up error, not a 401 later."""
    from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    pem = value
    if not value.lstrip().startswith("-----BEGIN"):
        try:
            with open(value, encoding="ascii") as file:
                pem = file.read()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"auth.jwt_public_key: cannot read {value!r}: {exc}") from None
    try:
        key = load_pem_public_key(pem.encode("ascii"))
    except (ValueError, TypeError, UnicodeEncodeError) as exc:
        raise ConfigError(f"auth.jwt_public_key: not a PEM public key: {exc}") from None
    kinds = {"RSA": rsa.RSAPublicKey, "EC": ec.EllipticCurvePublicKey}
    okp = (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)
    for algorithm in algorithms:
        kind = _KEY_TYPES[algorithm[:2]]
        if not isinstance(key, kinds.get(kind, okp)):
            raise ConfigError(f"auth.jwt_public_key is not an {kind} key, which {algorithm} needs")
    return key


def _jwks(path: str) -> jwt.PyJWKSet:
    try:
        with open(path, "rb") as file:
            data = orjson.loads(file.read())
        return jwt.PyJWKSet.from_dict(data)
    except (OSError, orjson.JSONDecodeError, jwt.PyJWTError) as exc:
        raise ConfigError(f"auth.jwt_jwks_file: cannot use {path!r}: {exc}") from None


def authenticator(settings: AuthSettings) -> Authenticator | None:
    """The authenticator of `[auth] mode`; None when auth is off. Raises ConfigError (one line)
    for a key or file it cannot use."""
    if settings.mode == "token":
        return TokenAuthenticator(settings.tokens)
    if settings.mode == "jwt":
        return JwtAuthenticator(settings)
    return None
