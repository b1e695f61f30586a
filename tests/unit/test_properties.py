"""Property-based: admit() never crashes and never allows a tampered envelope."""

import base64
import contextlib
import io
import json
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from femd import cli
from femd.decision import Verdict, admit
from femd.envelope import PAYLOAD_TYPE, b64decode, decode_envelope
from femd.errors import EnvelopeError, ManifestError
from femd.policy import load_policy

NODE = "fdn-01"
PT = PAYLOAD_TYPE.encode()
SETTINGS = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


class World:
    """One policy, one valid envelope signed by both signers (threshold 2)."""

    def __init__(self, tmp, keys, make_policy, task_dict, sign, now):
        self.policy_path = make_policy(tmp, keys)
        self.policy = load_policy(self.policy_path)
        self.now = now
        self.good = sign(task_dict(), *keys.values())
        env = json.loads(self.good)
        self.env = env
        self.payload = base64.b64decode(env["payload"])
        self.sigs = [base64.b64decode(s["sig"]) for s in env["signatures"]]
        self.keyids = [s["keyid"] for s in env["signatures"]]
        self.tmp = tmp
        self.keys = keys

    def admit(self, data: bytes) -> Verdict | None:
        """admit(), where only the two input errors may escape (as None)."""
        try:
            v = admit(data, self.policy, node=NODE, now=self.now)
        except (EnvelopeError, ManifestError):
            return None
        assert isinstance(v, Verdict)
        return v

    def intact(self, data: bytes) -> bool:
        """Same payload bytes and, for every counted key, the original signature."""
        env, payload = decode_envelope(data)
        if payload != self.payload or env.payloadType != PAYLOAD_TYPE:
            return False
        good = dict(zip(self.keyids, self.sigs, strict=True))
        for s in env.signatures:
            with contextlib.suppress(EnvelopeError):
                if s.keyid in good and b64decode(s.sig, "sig") == good[s.keyid]:
                    good.pop(s.keyid)
        return not good  # both original signatures are present


@pytest.fixture(scope="module")
def world(tmp_path_factory, make_policy, task_dict, sign, now, keypair):
    keys = {"orchestrator": keypair(), "pi-smith": keypair()}
    w = World(tmp_path_factory.mktemp("prop"), keys, make_policy, task_dict, sign, now)
    assert w.admit(w.good).decision.allowed  # the baseline is an allow
    return w


# ---------------------------------------------------------------------------
# arbitrary input


@SETTINGS
@given(data=st.binary(max_size=4096))
@example(data=b"")
@example(data=b"{}")
@example(data=b"[" * 5000)
@example(data=b'{"payloadType": "%s", "payload": "", "signatures": []}' % PT)
def test_arbitrary_bytes_give_a_verdict_or_an_input_error(world, data):
    v = world.admit(data)
    assert v is None or not v.decision.allowed


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)


@SETTINGS
@given(
    payload=st.binary(max_size=512) | json_values.map(lambda v: json.dumps(v).encode()),
    keyids=st.lists(st.text(max_size=70) | st.sampled_from(["", "0" * 64]), max_size=4),
    sigs=st.lists(st.binary(max_size=80), max_size=4),
    urlsafe=st.booleans(),
)
def test_arbitrary_envelopes_never_allow(world, payload, keyids, sigs, urlsafe):
    enc = base64.urlsafe_b64encode if urlsafe else base64.b64encode
    data = json.dumps(
        {
            "payloadType": PAYLOAD_TYPE,
            "payload": enc(payload).decode(),
            "signatures": [
                {"keyid": k, "sig": enc(s).decode()}
                for k, s in zip(keyids, sigs, strict=False)
            ],
        }
    ).encode()
    v = world.admit(data)
    assert v is None or not v.decision.allowed


@SETTINGS
@given(
    payload=json_values.map(lambda v: json.dumps(v).encode()) | st.binary(max_size=256)
)
def test_payloads_signed_by_trusted_keys_decode_or_error(world, payload):
    # A trusted key signed it: the payload is parsed; still only values or input errors.
    env = dict(world.env)
    env["payload"] = base64.b64encode(payload).decode()
    v = world.admit(json.dumps(env).encode())  # signatures no longer match: deny
    assert v is None or not v.decision.allowed


offsets = st.integers(min_value=-(24 * 60 - 1), max_value=24 * 60 - 1).map(
    lambda m: timezone(timedelta(minutes=m))
)
FIRST = datetime(1, 1, 1, tzinfo=UTC)
LAST = datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC)
# every datetime from year 1 to 9999, often within a day of either end, each
# with an offset of up to +-23:59
near_ends = st.integers(min_value=0, max_value=2 * 86400).flatmap(
    lambda s: st.sampled_from(
        [FIRST + timedelta(seconds=s), LAST - timedelta(seconds=s)]
    )
)
times = (st.datetimes() | near_ends).flatmap(
    lambda t: offsets.map(lambda tz: t.replace(tzinfo=tz, microsecond=0))
)


@SETTINGS
@given(
    issued=times,
    expires=times,
    # `now` is the caller's clock (the CLI refuses an --at it cannot convert to UTC)
    now=times.filter(
        lambda t: FIRST + timedelta(days=1) < t < LAST - timedelta(days=1)
    ),
)
def test_signed_times_anywhere_give_a_verdict(
    world, task_dict, sign, issued, expires, now
):
    data = sign(
        task_dict(issued_at=issued.isoformat(), expires_at=expires.isoformat()),
        *world.keys.values(),
    )
    if expires <= issued:
        with pytest.raises(ManifestError, match="`expires_at` must be later"):
            admit(data, world.policy, node=NODE, now=now)
    else:
        assert isinstance(admit(data, world.policy, node=NODE, now=now), Verdict)


# ---------------------------------------------------------------------------
# mutated valid envelopes


def _mutate(data: bytes, ops) -> bytes:
    b = bytearray(data)
    for op, pos, value in ops:
        if not b:
            b.append(value)
            continue
        i = pos % len(b)
        if op == "flip":
            b[i] ^= value or 1
        elif op == "set":
            b[i] = value
        elif op == "insert":
            b.insert(i, value)
        else:
            del b[i]
    return bytes(b)


OPS = st.lists(
    st.tuples(
        st.sampled_from(["flip", "set", "insert", "delete"]),
        st.integers(min_value=0, max_value=1 << 16),
        st.integers(min_value=0, max_value=255),
    ),
    min_size=1,
    max_size=4,
)


@SETTINGS
@given(ops=OPS)
def test_mutated_envelope_json_allows_only_if_intact(world, ops):
    data = _mutate(world.good, ops)
    v = world.admit(data)
    event("allow" if v and v.decision.allowed else "deny" if v else "input error")
    if v is not None and v.decision.allowed:
        assert world.intact(data)
        assert v.payload == world.payload


@SETTINGS
@given(ops=OPS, urlsafe=st.booleans())
def test_mutated_payload_never_allows(world, ops, urlsafe):
    payload = _mutate(world.payload, ops)
    env = dict(world.env)
    enc = base64.urlsafe_b64encode if urlsafe else base64.b64encode
    env["payload"] = enc(payload).decode()
    v = world.admit(json.dumps(env).encode())
    if payload == world.payload:
        assert v is not None
        assert v.decision.allowed
    else:
        assert v is None or not v.decision.allowed


@SETTINGS
@given(ops=OPS, which=st.integers(min_value=0, max_value=1))
def test_mutated_signature_never_allows(world, ops, which):
    sig = _mutate(world.sigs[which], ops)
    env = json.loads(world.good)
    env["signatures"][which]["sig"] = base64.b64encode(sig).decode()
    v = world.admit(json.dumps(env).encode())
    assert v is not None  # a bad signature is a deny, never an input error
    assert v.decision.allowed == (sig == world.sigs[which])


@SETTINGS
@given(
    ops=OPS,
    field=st.sampled_from(["keyid", "payloadType"]),
)
def test_mutated_keyid_or_type_never_allows(world, ops, field):
    env = json.loads(world.good)
    if field == "keyid":
        original = env["signatures"][0]["keyid"]
        env["signatures"][0]["keyid"] = _mutate(original.encode(), ops).decode(
            "latin-1"
        )
        changed = env["signatures"][0]["keyid"] != original
    else:
        original = env["payloadType"]
        env["payloadType"] = _mutate(original.encode(), ops).decode("latin-1")
        changed = env["payloadType"] != original
    v = world.admit(json.dumps(env).encode())
    if changed:
        assert v is None or not v.decision.allowed
    else:
        assert v is not None
        assert v.decision.allowed


# ---------------------------------------------------------------------------
# the CLI never prints a traceback


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=2048) | OPS.map(lambda ops: ("mut", ops)))
def test_check_command_never_crashes(world, data):
    if isinstance(data, tuple):
        data = _mutate(world.good, data[1])
    path = world.tmp / "input.json"
    path.write_bytes(data)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(
            [
                "check",
                "--policy",
                str(world.policy_path),
                "--at",
                "2026-11-22T12:00:00Z",
                str(path),
            ]
        )
    assert code in (0, 1, 2)
    assert "Traceback" not in err.getvalue()
    assert "internal error" not in err.getvalue()
    if code == 2:
        assert out.getvalue() == ""
        assert err.getvalue().count("\n") == 1
    if code == 0:
        assert world.intact(data)
