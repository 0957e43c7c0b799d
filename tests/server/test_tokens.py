import pytest

from server.tokens import TokenError, mint, verify

SECRET = b"test-secret"


def test_roundtrip():
    token = mint(SECRET, "alice", expires_at=2000)
    claims = verify(SECRET, token, now=1000)
    assert claims.player == "alice" and claims.expires_at == 2000


@pytest.mark.parametrize(
    "token, reason",
    [
        ("", "malformed"),
        (None, "malformed"),
        (12, "malformed"),
        ("no-dot", "malformed"),
        ("x" * 600, "malformed"),
        ("abc.def", "bad signature"),
    ],
)
def test_rejects_garbage(token, reason):
    with pytest.raises(TokenError) as err:
        verify(SECRET, token, now=0)
    assert err.value.reason == reason


def test_forged_with_other_secret():
    token = mint(b"other", "alice", expires_at=2000)
    with pytest.raises(TokenError, match="bad signature"):
        verify(SECRET, token, now=1000)


def test_tampered_player():
    token = mint(SECRET, "alice", expires_at=2000)
    forged_body = mint(SECRET, "mallory", expires_at=2000).split(".")[0]
    with pytest.raises(TokenError, match="bad signature"):
        verify(SECRET, forged_body + "." + token.split(".")[1], now=1000)


def test_expired():
    token = mint(SECRET, "alice", expires_at=1000)
    with pytest.raises(TokenError, match="expired"):
        verify(SECRET, token, now=1000)


def test_bad_player_id_not_minted():
    with pytest.raises(TokenError):
        mint(SECRET, "has space", expires_at=10)
