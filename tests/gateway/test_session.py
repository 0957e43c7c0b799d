import pytest

from gateway.session import PushVerdict, ReplayFull, Session, SessionState

DELIVER, DUPLICATE, GAP = PushVerdict.DELIVER, PushVerdict.DUPLICATE, PushVerdict.GAP


def attached(applied=0, max_replay=8):
    s = Session(1, "alice", "n1", max_replay=max_replay)
    assert s.attached("n1", applied) == []
    return s


def test_first_attach_continues_the_actors_numbering():
    s = attached(applied=41)
    assert s.submit(b"a") == 42
    assert s.state is SessionState.PINNED


def test_buffer_trims_only_what_is_durable_and_answered():
    s = attached()
    for i in range(5):
        s.submit(b"r%d" % i)
    assert s.on_reply(1, durable=0) and s.on_reply(2, durable=0)
    assert s.buffered == 5
    s.on_durable(4)  # durable beyond what was answered: keep 3 and 4 until answered
    assert s.buffered == 3
    assert s.on_reply(3, durable=4)
    assert s.buffered == 2


def test_replay_after_move_resends_everything_not_durable_and_dedups_replies():
    s = attached()
    for i in range(4):
        s.submit(b"r%d" % i)
    s.on_reply(1, durable=1)
    s.on_reply(2, durable=1)
    s.moving(now=10.0)
    s.submit(b"late")  # arrives while moving: buffered, not sent
    s.reattaching("n2")
    replay = s.attached("n2", applied_seq=1)
    assert [seq for seq, _ in replay] == [2, 3, 4, 5]
    assert not s.on_reply(2, durable=1)  # already answered by the old owner
    assert s.on_reply(3, durable=1)
    assert s.node == "n2"


def test_bounded_replay():
    s = attached(max_replay=2)
    s.submit(b"a")
    s.submit(b"b")
    assert not s.has_space
    with pytest.raises(ReplayFull):
        s.submit(b"c")


def test_illegal_transition():
    s = attached()
    with pytest.raises(RuntimeError):
        s.reattaching("n2")  # must be moving first


def test_pushes_are_delivered_once_per_stream_and_gaps_are_caught():
    s = attached()
    assert s.on_push(7, 1) is DELIVER and s.on_push(7, 2) is DELIVER
    assert s.on_push(7, 2) is DUPLICATE and s.on_push(7, 1) is DUPLICATE  # pushed again after a move
    assert s.on_push(7, 5) is GAP and s.last_pushed(7) == 2  # 3 and 4 never came: not delivered
    assert s.on_push(7, 3) is DELIVER
    assert s.on_push(8, 40) is DELIVER  # a stream's first push sets its baseline
    assert s.on_push(0, 0) is DELIVER and s.on_push(0, 0) is DELIVER  # notices


def test_push_streams_are_bounded():
    s = attached()
    for stream in range(1, 100):
        s.on_push(stream, 1, max_streams=10)
    assert len(s._streams) == 10
