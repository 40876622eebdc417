"""Bearer credentials: the cron secret (constant-time) and HS256 user JWTs (SPEC §8, §10)."""

from __future__ import annotations

import hmac
import time
from dataclasses import dataclass
from typing import Any

import jwt

from shared.settings import Settings

MIN_JWT_SECRET_BYTES = 32


class AuthError(Exception):
    """Missing or invalid credentials (401)."""


class AuthMisconfigured(Exception):
    """The server has no usable secret (503)."""


@dataclass(frozen=True, slots=True)
class Principal:
    user_id: str
    claims: dict[str, Any]


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, else None."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    try:
        token.encode("utf-8")
    except UnicodeEncodeError:
        return None  # bytes that are not UTF-8 (lone surrogates from the HTTP parser): no token at all
    return token.strip()


def cron_secret_matches(settings: Settings, token: str | None) -> bool:
    """Constant-time comparison with CRON_SECRET; AuthMisconfigured while it is unset."""
    if not settings.cron_secret:
        raise AuthMisconfigured("CRON_SECRET is not set")
    if token is None:
        return False
    return hmac.compare_digest(token.encode(), settings.cron_secret.encode())


def jwt_secret_usable(settings: Settings) -> bool:
    secret = settings.auth_jwt_secret
    return secret is not None and len(secret.encode()) >= MIN_JWT_SECRET_BYTES


def issue_token(settings: Settings, user_id: str, ttl_seconds: int = 3600) -> str:
    """A signed HS256 token for `user_id` (the `revkernel token` command)."""
    if not jwt_secret_usable(settings):
        raise AuthMisconfigured(f"AUTH_JWT_SECRET must be set and at least {MIN_JWT_SECRET_BYTES} bytes")
    now = int(time.time())
    claims: dict[str, Any] = {"sub": user_id, "iat": now, "exp": now + ttl_seconds}
    if settings.auth_jwt_audience:
        claims["aud"] = settings.auth_jwt_audience
    if settings.auth_jwt_issuer:
        claims["iss"] = settings.auth_jwt_issuer
    assert settings.auth_jwt_secret is not None
    return jwt.encode(claims, settings.auth_jwt_secret, algorithm="HS256")


def verify_token(settings: Settings, token: str | None) -> Principal:
    """Verify signature, `exp` and `sub` (and `aud`/`iss` when configured)."""
    if not jwt_secret_usable(settings):
        raise AuthMisconfigured("AUTH_JWT_SECRET is missing or shorter than 32 bytes")
    if token is None:
        raise AuthError("missing bearer token")
    assert settings.auth_jwt_secret is not None
    try:
        claims = jwt.decode(
            token,
            settings.auth_jwt_secret,
            algorithms=["HS256"],
            audience=settings.auth_jwt_audience,
            issuer=settings.auth_jwt_issuer,
            # `iat` is informational (SPEC §10 requires `sub` and `exp` only): PyJWT refuses an `iat`
            # in the future, so a token minted on a host whose clock ran a few seconds ahead was 401.
            options={
                "require": ["exp", "sub"],
                "verify_aud": bool(settings.auth_jwt_audience),
                "verify_iat": False,
            },
        )
    except jwt.PyJWTError as exc:
        raise AuthError(_refusal(exc)) from exc
    sub = claims.get("sub")
    if not isinstance(sub, str) or not sub:
        raise AuthError("token has no subject")
    return Principal(user_id=sub, claims=claims)


def _refusal(exc: jwt.PyJWTError) -> str:
    """What a client may read about a refused token: the claim at fault, never the library's parser
    messages (they quote codecs and byte offsets of what was sent)."""
    if isinstance(exc, jwt.ExpiredSignatureError):
        return "token expired"
    if isinstance(exc, jwt.MissingRequiredClaimError):
        return f"token has no {exc.claim!r} claim"
    if isinstance(exc, jwt.InvalidAudienceError):
        return "token audience not accepted"
    if isinstance(exc, jwt.InvalidIssuerError):
        return "token issuer not accepted"
    if isinstance(exc, jwt.ImmatureSignatureError):
        return "token not valid yet"
    return "invalid token"
