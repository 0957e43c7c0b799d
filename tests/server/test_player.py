import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.config import NodeSettings
from server.errors import BadJson, BadRequest, RingsideError
from server.player import PlayerState, parse_request

LIMITS = NodeSettings()
ERROR_CODES = {"bad_json", "bad_request", "unknown_op"}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=20,
)


@settings(suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.binary(max_size=300))
def test_any_bytes_parse_or_raise_a_documented_error(data):
    try:
        parse_request(data)
    except RingsideError as exc:
        assert exc.code in ERROR_CODES


@settings(suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.dictionaries(st.sampled_from(["set", "incr", "x"]), json_values, max_size=3))
def test_any_update_is_applied_whole_or_refused_whole(args):
    player = PlayerState("p")
    before = player.to_blob()
    try:
        player.handle("player.update", args, LIMITS, seq=1)
    except RingsideError as exc:
        assert exc.code in ERROR_CODES
        assert player.to_blob() == before  # nothing half-applied
    else:
        assert player.applied_seq == 1


def test_parse_errors_carry_the_id_when_known():
    with pytest.raises(BadRequest) as err:
        parse_request(b'{"id": 4, "op": 5}')
    assert err.value.request_id == 4
    with pytest.raises(BadJson):
        parse_request(b"{")


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        (b'{"op": "ping"}', "id is required"),  # a reply with id null would be ambiguous
        (b'{"id": null, "op": "ping"}', "id is required"),
        (b'{"id": 2, "op": "hello", "token": "t"}', "first frame only"),  # not "unknown fields"
    ],
)
def test_requests_the_protocol_does_not_allow_say_why(frame, message):
    with pytest.raises(BadRequest) as err:
        parse_request(frame)
    assert message in err.value.message


@pytest.mark.parametrize("name", ["a\x00b", "evil\u202egnp.exe", "line\nbreak"])
def test_a_name_other_players_would_see_garbled_is_refused(name):
    with pytest.raises(BadRequest, match="printable"):
        PlayerState("p").handle("player.update", {"set": {"name": name}}, LIMITS, seq=1)
    PlayerState("p").handle("player.update", {"set": {"name": "Zoë 李 🙂"}}, LIMITS, seq=1)


def test_player_get_takes_no_args_and_out_of_range_integers_say_their_range():
    with pytest.raises(BadRequest, match="takes no args"):
        PlayerState("p").handle("player.get", {"x": 1}, LIMITS, seq=1)
    with pytest.raises(BadRequest, match=r"from -2\*\*53 to 2\*\*53"):
        PlayerState("p").handle("player.update", {"incr": {"xp": 2**63 - 1}}, LIMITS, seq=1)


def test_update_validates_and_applies():
    player = PlayerState("p")
    result, mutated = player.handle(
        "player.update", {"set": {"name": "P", "position": [1, 2.5, 3]}, "incr": {"xp": 5}}, LIMITS, seq=3
    )
    assert mutated and result["xp"] == 5 and result["applied_seq"] == 3
    back = PlayerState.from_blob(player.to_blob(), "p")
    assert back.view() == player.view()


def test_an_overflowing_increment_changes_nothing_else_in_the_update():
    player = PlayerState("p")
    player.xp = 2**53 - 1
    before = player.to_blob()
    with pytest.raises(BadRequest, match="overflow"):
        player.handle("player.update", {"set": {"name": "Q"}, "incr": {"level": 1, "xp": 5}}, LIMITS, seq=2)
    assert player.to_blob() == before


def test_set_then_incr_of_one_field_adds_to_the_set_value():
    player = PlayerState("p")
    result, _ = player.handle("player.update", {"set": {"level": 10}, "incr": {"level": 2}}, LIMITS, seq=1)
    assert result["level"] == 12
