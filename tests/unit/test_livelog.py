"""Live task output: new whole lines, throttled per task, marked as task output."""

from collections.abc import Iterator

import pytest

from femd.errors import LaunchError
from femd.events import LOGS_EXCHANGE
from femd.launchers import Outcome
from femd.livelog import LogFollower
from femd.messages import SideMessage


class GrowingHandle:
    """A Handle whose captured output grows as the test writes to it."""

    task_id = "t1"

    def __init__(self) -> None:
        self.data = bytearray()
        self.broken = False

    def wait(self, timeout_s: float | None = None) -> Outcome | None:
        return None

    def cancel(self, grace_s: float = 10.0) -> None:
        return None

    def logs(self) -> Iterator[bytes]:
        if self.broken:
            raise LaunchError("gone")
        for i in range(0, len(self.data), 7):  # odd chunking on purpose
            yield bytes(self.data[i : i + 7])


def follower(handle: GrowingHandle, sent: list[SideMessage], **kw) -> LogFollower:
    f = LogFollower(
        handle,
        node="fdn-01",
        publish=sent.append,
        rate_bytes_s=kw.get("rate", 1000),
        burst_bytes=kw.get("burst", 1024),
    )
    f._last_poll = -1e9  # no poll spacing in a unit test
    return f


def poll(f: LogFollower, *, final: bool = False) -> None:
    f._last_poll = -1e9
    f.poll(final=final)


def test_whole_lines_go_out_as_they_come_and_the_rest_at_the_end():
    h, sent = GrowingHandle(), []
    f = follower(h, sent)
    h.data += b"first\nsec"
    poll(f)
    assert [m.body for m in sent] == [b"first\n"]
    m = sent[0]
    assert (m.exchange, m.routing_key, m.content_type) == (
        LOGS_EXCHANGE,
        "fdn-01.t1",
        "text/plain",
    )
    first = m.headers["seq"]
    assert m.headers == {"seq": first, "dropped": 0, "femd_task_output": True}
    h.data += b"ond\nno newline"
    poll(f)
    poll(f, final=True)
    assert [m.body for m in sent] == [b"first\n", b"second\n", b"no newline"]
    assert [m.headers["seq"] - first for m in sent] == [0, 1, 2]
    again = follower(h, [])
    assert again.seq >= first + 2  # a restarted follower never reuses a seq


def test_a_chatty_task_is_throttled_and_the_drop_is_counted():
    h, sent = GrowingHandle(), []
    f = follower(h, sent, rate=10, burst=100)
    h.data += b"x" * 49 + b"\n"
    h.data += (b"y" * 99 + b"\n") * 1000  # 100 kB at once
    poll(f)
    assert sum(len(m.body) for m in sent) <= 100
    dropped = sum(int(m.headers["dropped"]) for m in sent)
    assert dropped == 100_000
    assert sent[0].body == b"x" * 49 + b"\n"


def test_zero_rate_sends_nothing_and_errors_are_quiet():
    h, sent = GrowingHandle(), []
    h.data += b"line\n"
    poll(follower(h, sent, rate=0))
    assert sent == []
    h.broken = True
    poll(follower(h, sent))
    assert sent == []


@pytest.mark.parametrize("size", [1, 20_000, 40_000])
def test_long_lines_are_cut_into_bounded_messages(size):
    h, sent = GrowingHandle(), []
    f = follower(h, sent, rate=10**6, burst=10**6)
    h.data += b"z" * size
    poll(f)
    poll(f, final=True)
    assert all(len(m.body) <= 16 * 1024 for m in sent)
    assert b"".join(m.body for m in sent) == b"z" * size
