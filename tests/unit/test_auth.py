"""Bearer credentials: cron secret and HS256 JWTs (SPEC §8, §10), without any server."""

from __future__ import annotations

import time

import jwt
import pytest

from shared.auth import (
    AuthError,
    AuthMisconfigured,
    bearer_token,
    cron_secret_matches,
    issue_token,
    verify_token,
)
from shared.settings import Settings

SECRET = "s" * 32


def test_issued_token_verifies_with_subject() -> None:
    s = Settings(auth_jwt_secret=SECRET)
    principal = verify_token(s, issue_token(s, "alice", 60))
    assert principal.user_id == "alice"
    assert principal.claims["exp"] - principal.claims["iat"] == 60


def test_a_token_minted_on_a_clock_a_little_ahead_is_accepted() -> None:
    """`iat` a few seconds in the future (the minting host's clock ahead of the gateway's) was 401
    "token not valid yet"; SPEC §10 requires only `sub` and `exp`."""
    s = Settings(auth_jwt_secret=SECRET)
    now = int(time.time())
    ahead = jwt.encode({"sub": "a", "iat": now + 5, "exp": now + 65}, SECRET, algorithm="HS256")
    assert verify_token(s, ahead).user_id == "a"


@pytest.mark.parametrize("secret", [None, "", "s" * 31])
def test_missing_or_short_secret_is_misconfigured(secret: str | None) -> None:
    s = Settings(auth_jwt_secret=secret)
    with pytest.raises(AuthMisconfigured):
        issue_token(s, "alice")
    with pytest.raises(AuthMisconfigured):
        verify_token(s, "anything")


def test_expired_wrong_key_and_missing_claims_are_refused() -> None:
    s = Settings(auth_jwt_secret=SECRET)
    now = int(time.time())
    expired = jwt.encode({"sub": "a", "exp": now - 10}, SECRET, algorithm="HS256")
    other_key = jwt.encode({"sub": "a", "exp": now + 60}, "o" * 32, algorithm="HS256")
    no_exp = jwt.encode({"sub": "a"}, SECRET, algorithm="HS256")
    no_sub = jwt.encode({"exp": now + 60}, SECRET, algorithm="HS256")
    for token in (expired, other_key, no_exp, no_sub, "not-a-jwt", None):
        with pytest.raises(AuthError):
            verify_token(s, token)


def test_a_refusal_names_the_claim_at_fault_and_never_the_parser() -> None:
    s = Settings(auth_jwt_secret=SECRET)
    now = int(time.time())
    refusals = {
        jwt.encode({"sub": "a", "exp": now - 10}, SECRET, algorithm="HS256"): "token expired",
        jwt.encode({"sub": "a"}, SECRET, algorithm="HS256"): "token has no 'exp' claim",
        jwt.encode({"sub": "a", "exp": now + 60}, "o" * 32, algorithm="HS256"): "invalid token",
        "abc.def.ghi": "invalid token",  # PyJWT: "Invalid header string: 'utf-8' codec can't decode ..."
        "not-a-jwt": "invalid token",
    }
    for token, reason in refusals.items():
        with pytest.raises(AuthError) as refused:
            verify_token(s, token)
        assert str(refused.value) == reason
    with pytest.raises(AuthError, match="^token audience not accepted$"):
        verify_token(
            Settings(auth_jwt_secret=SECRET, auth_jwt_audience="x"),
            jwt.encode({"sub": "a", "exp": now + 60, "aud": "y"}, SECRET, algorithm="HS256"),
        )


def test_audience_and_issuer_are_checked_only_when_configured() -> None:
    now = int(time.time())
    token = jwt.encode({"sub": "a", "exp": now + 60, "aud": "x", "iss": "y"}, SECRET, algorithm="HS256")
    assert verify_token(Settings(auth_jwt_secret=SECRET), token).user_id == "a"
    assert (
        verify_token(
            Settings(auth_jwt_secret=SECRET, auth_jwt_audience="x", auth_jwt_issuer="y"), token
        ).user_id
        == "a"
    )
    with pytest.raises(AuthError):
        verify_token(Settings(auth_jwt_secret=SECRET, auth_jwt_audience="other"), token)
    with pytest.raises(AuthError):
        verify_token(Settings(auth_jwt_secret=SECRET, auth_jwt_issuer="other"), token)


def test_bearer_header_parsing() -> None:
    assert bearer_token("Bearer abc") == "abc"
    assert bearer_token("bearer  abc ") == "abc"
    assert bearer_token("Basic abc") is None
    assert bearer_token("Bearer ") is None
    assert bearer_token(None) is None


def test_cron_secret_compare() -> None:
    s = Settings(cron_secret="c" * 20)
    assert cron_secret_matches(s, "c" * 20)
    assert not cron_secret_matches(s, "c" * 19)
    assert not cron_secret_matches(s, None)
    with pytest.raises(AuthMisconfigured):
        cron_secret_matches(Settings(), "x")
