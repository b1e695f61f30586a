"""Publisher confirms with many messages in flight (femd.confirms.Confirms)."""

from __future__ import annotations

import pika.frame
import pika.spec
import pytest

from femd.confirms import Confirms
from femd.errors import BrokerError


def ack(tag: int, *, multiple: bool = False) -> pika.frame.Method:
    method = pika.spec.Basic.Ack(delivery_tag=tag, multiple=multiple)
    return pika.frame.Method(1, method)


def nack(tag: int, *, multiple: bool = False) -> pika.frame.Method:
    return pika.frame.Method(
        1, pika.spec.Basic.Nack(delivery_tag=tag, multiple=multiple)
    )


def test_tags_count_from_one_and_map_to_outbox_seqs() -> None:
    c = Confirms()
    for seq in (17, 18, 21):
        c.sent(seq)
    assert c.seqs == {1: 17, 2: 18, 3: 21}
    c.on_confirm(ack(2))
    assert c.take_acked() == [18]
    assert c.take_acked() == []
    assert c.seqs == {1: 17, 3: 21}


def test_multiple_acks_everything_up_to_the_tag() -> None:
    c = Confirms()
    for seq in range(100, 106):
        c.sent(seq)
    c.on_confirm(ack(4, multiple=True))
    assert sorted(c.take_acked()) == [100, 101, 102, 103]
    assert c.seqs == {5: 104, 6: 105}
    c.on_confirm(ack(6, multiple=True))
    assert sorted(c.take_acked()) == [104, 105]
    assert c.seqs == {}


def test_a_confirm_for_an_unknown_tag_changes_nothing() -> None:
    c = Confirms()
    c.sent(1)
    c.on_confirm(ack(7))
    assert c.take_acked() == []
    assert c.seqs == {1: 1}


def test_a_nack_refuses_and_keeps_what_was_acked_for_the_caller() -> None:
    c = Confirms()
    for seq in (1, 2, 3):
        c.sent(seq)
    c.on_confirm(ack(1))
    c.on_confirm(nack(3, multiple=True))
    assert c.seqs == {}
    with pytest.raises(BrokerError, match=r"refused \(nack\)"):
        c.take_acked()
    # The link marks these published as it reconnects; the nacked one is not.
    assert c.acked == [1]


def test_each_confirm_wakes_the_loop() -> None:
    woken: list[int] = []
    c = Confirms(lambda: woken.append(1))
    c.sent(1)
    c.on_confirm(ack(1))
    c.on_confirm(nack(5))
    assert woken == [1, 1]


def test_best_effort_messages_take_a_tag_and_are_never_marked() -> None:
    c = Confirms()
    c.sent(None)  # a node status on the same channel
    c.sent(40)
    c.sent(None)
    c.sent(41)
    c.on_confirm(nack(1))  # a refused best-effort message is no failure
    c.on_confirm(ack(2))
    assert c.take_acked() == [40]
    c.on_confirm(ack(4, multiple=True))
    assert c.take_acked() == [41]
    assert c.seqs == {}
