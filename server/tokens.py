"""Signed client tokens: HMAC-SHA256 over the player id and expiry.

Format: ``base64url(json {"p": player, "exp": unix_seconds}) + "." + base64url(mac)``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

import orjson

PLAYER_ID = re.compile(r"^[A-Za-z0-9_\-:.]{1,64}$")
MAX_TOKEN_LEN = 512


class TokenError(ValueError):
    """The token is malformed, forged or expired; `reason` says which."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Claims:
    player: str
    expires_at: int
    token_id: str = ""  # for revocation; empty in tokens minted before ids existed


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _mac(secret: bytes, body: str) -> bytes:
    return hmac.new(secret, body.encode(), hashlib.sha256).digest()


def valid_player_id(player: str) -> bool:
    return bool(PLAYER_ID.match(player))


def mint(secret: bytes, player: str, *, expires_at: int) -> str:
    if not valid_player_id(player):
        raise TokenError(f"player id must match {PLAYER_ID.pattern}")
    body = _b64(orjson.dumps({"p": player, "exp": expires_at, "jti": secrets.token_hex(8)}))
    return f"{body}.{_b64(_mac(secret, body))}"


def verify(secret: bytes, token: object, *, now: float) -> Claims:
    """Return the claims of a genuine, unexpired token or raise TokenError."""
    if not isinstance(token, str) or not token or len(token) > MAX_TOKEN_LEN:
        raise TokenError("malformed")
    body, sep, mac = token.partition(".")
    if not sep:
        raise TokenError("malformed")
    try:
        given = _unb64(mac)
    except ValueError as exc:
        raise TokenError("malformed") from exc
    if not hmac.compare_digest(given, _mac(secret, body)):
        raise TokenError("bad signature")
    try:
        claims = orjson.loads(_unb64(body))
        player, expires_at, token_id = claims["p"], claims["exp"], claims.get("jti", "")
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise TokenError("malformed") from exc
    if (
        not isinstance(player, str)
        or not valid_player_id(player)
        or not isinstance(expires_at, int)
        or not isinstance(token_id, str)
        or len(token_id) > 32
    ):
        raise TokenError("malformed")
    if expires_at <= now:
        raise TokenError("expired")
    return Claims(player, expires_at, token_id)


def revoked_key(token_id: str) -> str:
    """The Redis key whose presence revokes a token (it expires with the token)."""
    return f"rs:revoked:{token_id}"
