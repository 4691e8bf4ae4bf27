"""The wire codec: round trips, and refusal of everything that is not a valid v1 message."""

from __future__ import annotations

import pickle

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from qc_robot import protocol as P


def _roundtrip(msg: P.Message) -> P.Message:
    out = P.decode(P.encode(msg))
    assert type(out) is type(msg)
    return out


@settings(max_examples=60, deadline=None)
@given(hnp.arrays(dtype=st.sampled_from([np.dtype(d) for d in P.ALLOWED_DTYPES]),
                  shape=hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5)))
def test_array_roundtrip_any_allowed_dtype_and_shape(arr: np.ndarray) -> None:
    out = _roundtrip(P.Observation(1, 2, 3, 4.5, {"x": arr}))
    got = out.obs["x"]
    assert got.dtype == arr.dtype and got.shape == arr.shape
    np.testing.assert_array_equal(got, arr)  # NaNs compare equal here
    assert got.flags.writeable


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**62), st.integers(-(2**31), 2**31), st.text(max_size=20),
       st.one_of(st.none(), st.integers(0, 2**40)))
def test_scalar_fields_roundtrip(rid: int, step: int, text: str, maybe: int | None) -> None:
    assert _roundtrip(P.Error(text, text[::-1], maybe)) == P.Error(text, text[::-1], maybe)
    c = _roundtrip(P.Chunk(rid, 7, step, np.zeros((2, 3), np.float32), text, 1, 2.5, 3.0, 4))
    assert (c.request_id, c.start_step, c.policy_version, c.queue_ms) == (rid, step, text, 1.0)


def test_every_message_type_roundtrips() -> None:
    a = np.arange(3, dtype=np.float32)
    spec = [{"key": "state", "shape": [3], "dtype": "float32"}]
    msgs = [
        P.Hello("mock", spec, 3, -a, a, 20.0, {"k": [1, "x"]}),
        P.Welcome("s1", spec, 3, 5, 20.0, -a, a, "v7", "fql", 1.0, 10.0, True, ["w"], {"m": 1}),
        P.Observation(1, 0, 0, 1.0, {"state": a}, True),
        P.Chunk(1, 0, 0, np.ones((5, 3), np.float32), "v7", 0.1, 0.2, 0.3),
        P.Transition(0, 0, {"state": a[None]}, a[None], np.zeros(1, np.float32), np.zeros(1, bool),
                     np.ones(1, bool), {"state": a[None]}, True),
        P.Heartbeat(3, 1.5), P.Error("bad_message", "x", 4), P.Bye("done"),
    ]
    for m in msgs:
        out = _roundtrip(m)
        for f in m.__dataclass_fields__:
            va, vb = getattr(m, f), getattr(out, f)
            if isinstance(va, np.ndarray):
                np.testing.assert_array_equal(va, vb)
            elif f not in ("obs", "next_obs"):
                assert va == vb, f


def test_big_endian_input_arrives_as_native_values() -> None:
    arr = np.arange(4, dtype=">f8")
    got = _roundtrip(P.Observation(1, 0, 0, 0.0, {"x": arr})).obs["x"]
    np.testing.assert_array_equal(got, arr)


@pytest.mark.parametrize("arr", [np.array([object()], dtype=object), np.zeros(2, np.complex64),
                                 np.zeros(2, dtype="V4"), np.array(["a"]), np.zeros(1, "datetime64[s]")])
def test_encode_refuses_disallowed_dtypes(arr: np.ndarray) -> None:
    with pytest.raises(P.ProtocolError):
        P.encode(P.Observation(1, 0, 0, 0.0, {"x": arr}))


def test_encode_refuses_arbitrary_objects() -> None:
    with pytest.raises(P.ProtocolError):
        P.encode(P.Hello("d", [], 1, np.zeros(1), np.ones(1), 20.0, {"obj": object()}))


def _raw(body: dict) -> bytes:
    return msgpack.packb(body, use_bin_type=True)


def _ext_array(dtype: str, shape: list[int], data: bytes) -> msgpack.ExtType:
    import struct

    head = bytes([len(dtype)]) + dtype.encode() + bytes([len(shape)]) + struct.pack(f"<{len(shape)}I", *shape)
    return msgpack.ExtType(P.ARRAY_EXT, head + data)


@pytest.mark.parametrize("data,code", [
    (b"", P.ErrorCode.BAD_MESSAGE),
    (b"\xc1garbage", P.ErrorCode.BAD_MESSAGE),
    (pickle.dumps({"v": 1, "type": "bye"}), P.ErrorCode.BAD_MESSAGE),
    (_raw([1, 2]), P.ErrorCode.BAD_MESSAGE),
    (_raw({"type": "bye"}), P.ErrorCode.BAD_MESSAGE),
    (_raw({"v": 2, "type": "bye"}), P.ErrorCode.VERSION),
    (_raw({"v": 1, "type": "launch_missiles"}), P.ErrorCode.UNKNOWN_TYPE),
    (_raw({"v": 1, "type": "heartbeat", "seq": 1}), P.ErrorCode.BAD_MESSAGE),  # missing field
    (_raw({"v": 1, "type": "heartbeat", "seq": "1", "timestamp": 0.0}), P.ErrorCode.BAD_MESSAGE),
    (_raw({"v": 1, "type": "heartbeat", "seq": True, "timestamp": 0.0}), P.ErrorCode.BAD_MESSAGE),
    (_raw({"v": 1, "type": "bye", 1: 2}), P.ErrorCode.BAD_MESSAGE),  # non-string map key
    (_raw({"v": 1, "type": "bye", "reason": msgpack.ExtType(42, b"x")}), P.ErrorCode.BAD_MESSAGE),
    (_raw({"v": 1, "type": "bye", "reason": msgpack.Timestamp(1)}), P.ErrorCode.BAD_MESSAGE),
])
def test_decode_refuses_garbage(data: bytes, code: str) -> None:
    with pytest.raises(P.ProtocolError) as e:
        P.decode(data)
    assert e.value.code == code and str(e.value)


@pytest.mark.parametrize("ext", [
    _ext_array("object", [1], b"\0" * 8),
    _ext_array("complex64", [1], b"\0" * 8),
    _ext_array("V8", [1], b"\0" * 8),
    _ext_array("float32", [3], b"\0" * 8),  # too short
    _ext_array("float32", [1], b"\0" * 8),  # too long
    _ext_array("bool", [2], b"\x00\x07"),  # not a bool byte
    msgpack.ExtType(P.ARRAY_EXT, b""),
    msgpack.ExtType(P.ARRAY_EXT, b"\x07float32\x02\x01"),  # truncated shape
])
def test_decode_refuses_bad_arrays(ext: msgpack.ExtType) -> None:
    data = _raw({"v": 1, "type": "observation", "request_id": 1, "episode_id": 0, "step": 0,
                 "timestamp": 0.0, "obs": {"x": ext}})
    with pytest.raises(P.ProtocolError):
        P.decode(data)


def test_truncated_messages_are_refused() -> None:
    data = P.encode(P.Observation(1, 0, 0, 0.0, {"x": np.arange(10.0)}))
    for n in (1, 5, len(data) // 2, len(data) - 1):
        with pytest.raises(P.ProtocolError):
            P.decode(data[:n])


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_fuzz_decode_never_raises_anything_but_protocol_error(data: bytes) -> None:
    try:
        P.decode(data)
    except P.ProtocolError:
        pass


def test_unknown_fields_are_ignored() -> None:
    m = P.decode(_raw({"v": 1, "type": "bye", "reason": "x", "future_field": [1, 2]}))
    assert m == P.Bye("x")


def test_transition_names_its_reward_convention() -> None:
    a = np.zeros((1, 3), np.float32)
    tr = P.Transition(0, 0, {"state": a}, a, np.zeros(1, np.float32), np.zeros(1, bool), np.zeros(1, bool),
                      {"state": a}, reward="sparse")
    out = _roundtrip(tr)
    assert isinstance(out, P.Transition) and out.reward == "sparse"
    body = msgpack.unpackb(P.encode(tr), raw=False, ext_hook=lambda c, d: msgpack.ExtType(c, d))
    del body["reward"]
    assert P.decode(msgpack.packb(body, use_bin_type=True)).reward == ""  # optional: '' = unspecified
    body["reward"] = 1
    with pytest.raises(P.ProtocolError, match=r"transition\.reward: expected str"):
        P.decode(msgpack.packb(body, use_bin_type=True))


def test_the_envelope_is_read_before_any_array_is_decoded() -> None:
    """A receiver learns type and request id from the envelope; a malformed array fails only when
    the message is built, and the error still names the request."""
    data = _raw({"v": 1, "type": "observation", "request_id": 41, "episode_id": 0, "step": 0, "timestamp": 0.0,
                 "obs": {"x": _ext_array("float32", [2**20], b"\0" * 8)}})  # lies about its size
    env = P.read_envelope(data, P.DRIVER_TYPES)
    assert (env.kind, env.request_id) == ("observation", 41)
    with pytest.raises(P.ProtocolError, match="needs 4194304 data bytes") as e:
        P.build(env)
    assert e.value.request_id == 41
    with pytest.raises(P.ProtocolError) as e:
        P.decode(data)
    assert e.value.request_id == 41 and e.value.code == P.ErrorCode.BAD_MESSAGE


def test_obs_keys_not_wanted_are_never_decoded() -> None:
    data = _raw({"v": 1, "type": "observation", "request_id": 1, "episode_id": 0, "step": 0, "timestamp": 0.0,
                 "obs": {"state": P.pack_array(np.ones(2, np.float32)), "junk": _ext_array("V8", [1], b"")}})
    with pytest.raises(P.ProtocolError):
        P.decode(data)  # everything decoded: the junk key is refused
    msg = P.build(P.read_envelope(data), P.Decoding(obs_keys=frozenset({"state"})))
    assert isinstance(msg, P.Observation) and list(msg.obs) == ["state"]


def test_the_old_flat_module_names_still_import() -> None:
    from qc_robot.protocol import (  # noqa: F401
        ARRAY_EXT,
        Hello,
        ProtocolError,
        Transition,
        decode,
        encode,
        pack_array,
    )

    assert P.Transition is Transition and P.decode is decode
