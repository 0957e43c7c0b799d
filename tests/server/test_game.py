import pytest

from server.errors import BadRequest, NotFound
from server.game import GameEnded, GameFull, GameLimits, GameState, NotInGame

LIMITS = GameLimits(log_size=5, empty_close_s=10.0)


def new_game(max_players=3):
    g = GameState("g1", LIMITS.log_size)
    g.handle("game.create", {"mode": "duel", "max_players": max_players}, "alice", 1, 0.0, LIMITS)
    return g


def test_create_joins_the_creator_and_numbers_events():
    g = new_game()
    assert g.players == ["alice"] and g.seq == 2
    assert [e.action["type"] for e in g.log] == ["created", "joined"]


def test_actions_get_consecutive_seqs_and_scores_add_up():
    g = new_game()
    g.handle("game.join", {}, "bob", 1, 0.0, LIMITS)
    result, events = g.handle(
        "game.action", {"action": {"type": "score", "points": 3}}, "bob", 2, 0.0, LIMITS
    )
    assert result["seq"] == 4 and events[0].seq == 4
    g.handle("game.action", {"action": {"type": "chat", "text": "gg"}}, "alice", 2, 0.0, LIMITS)
    assert g.scores == {"alice": 0, "bob": 3} and g.seq == 5


def test_replayed_effect_is_not_applied_twice_and_gets_the_same_answer():
    g = new_game()
    first, events = g.handle(
        "game.action", {"action": {"type": "score", "points": 5}}, "alice", 7, 0.0, LIMITS
    )
    again, more = g.handle("game.action", {"action": {"type": "score", "points": 5}}, "alice", 7, 0.0, LIMITS)
    assert events and not more and first == again
    assert g.scores["alice"] == 5


def test_errors():
    g = new_game(max_players=2)
    g.handle("game.join", {}, "bob", 1, 0.0, LIMITS)
    with pytest.raises(GameFull):
        g.handle("game.join", {}, "carol", 1, 0.0, LIMITS)
    with pytest.raises(NotInGame):
        g.handle("game.action", {"action": {"type": "x"}}, "carol", 2, 0.0, LIMITS)
    with pytest.raises(BadRequest):
        g.handle("game.action", {"action": {"type": "x", "blob": "y" * 1000}}, "bob", 2, 0.0, LIMITS)
    with pytest.raises(NotFound):
        GameState("nope", 5).handle("game.join", {}, "bob", 1, 0.0, LIMITS)
    before = g.seq
    with pytest.raises(BadRequest):
        g.handle("game.action", {"action": {"type": "score", "points": "9"}}, "bob", 3, 0.0, LIMITS)
    assert g.seq == before  # a refused action takes no seq


def test_log_is_bounded_and_events_after_reports_truncation():
    g = new_game()
    for i in range(10):
        g.handle("game.action", {"action": {"type": "move"}}, "alice", 10 + i, 0.0, LIMITS)
    assert len(g.log) == 5
    out = g.events_after(0)
    assert out["truncated"] and [e["seq"] for e in out["events"]] == [8, 9, 10, 11, 12]
    assert not g.events_after(9)["truncated"]


def test_state_survives_a_blob_roundtrip():
    g = new_game()
    g.handle("game.action", {"action": {"type": "score", "points": 2}}, "alice", 5, 0.0, LIMITS)
    back = GameState.from_blob(g.to_blob(), "g1", LIMITS.log_size)
    assert back.view() == g.view()
    assert (
        back.handle("game.action", {"action": {"type": "score", "points": 2}}, "alice", 5, 0.0, LIMITS)[1]
        == []
    )


def test_deadlines_end_the_game():
    g = GameState("g2", 5)
    g.handle("game.create", {"max_players": 2, "duration_s": 30}, "alice", 1, 100.0, LIMITS)
    assert g.next_deadline(LIMITS) == 130.0
    assert g.on_timer(120.0, LIMITS) == []
    [ended] = g.on_timer(130.0, LIMITS)
    assert ended.action["type"] == "ended" and ended.action["reason"] == "time"
    with pytest.raises(GameEnded):
        g.handle("game.action", {"action": {"type": "x"}}, "alice", 2, 131.0, LIMITS)


def test_an_empty_game_closes():
    g = new_game()
    g.handle("game.leave", {}, "alice", 2, 50.0, LIMITS)
    assert g.next_deadline(LIMITS) == 60.0
    [ended] = g.on_timer(60.0, LIMITS)
    assert ended.action["reason"] == "empty"
