"""The qc-robot wire protocol, version 1: message types and a msgpack codec. No sockets here.

Every message is one msgpack map ``{"v": 1, "type": <name>, ...fields}``; numpy arrays travel as
msgpack ExtType 1 (dtype name, shape, raw little-endian bytes) and only dtypes in an allow-list
are accepted, so decoding never builds objects (no pickle, no object/void/complex dtypes).
Camera images may travel as JPEG instead (ExtType 2, opt-in per sender), decoded back to the
uint8 (H, W, 3) array before anyone sees the message.
``docs/protocol.md`` is the language-neutral specification of the same format.

Imports only numpy, msgpack and the standard library, so a robot PC needs nothing else.
"""

from __future__ import annotations

import dataclasses
import math
import struct
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

import msgpack
import numpy as np

PROTOCOL_VERSION = 1
ARRAY_EXT = 1
"""msgpack ExtType code of an ndarray."""
JPEG_EXT = 2
"""msgpack ExtType code of a JPEG-compressed uint8 (H, W, 3) image (decoded to an ndarray)."""
MAX_MESSAGE_BYTES = 64 << 20
MAX_NDIM = 16
INT_MIN, INT_MAX = -(2**63), 2**63 - 1
"""Every integer field lies in the int64 range (identifiers go into HDF5 attrs and numpy)."""
NON_NEGATIVE_FIELDS = frozenset({
    "hello.action_dim", "observation.request_id", "observation.episode_id", "observation.step",
    "transition.episode_id", "transition.start_step", "describe.request_id",
    "subscribe.from_seq", "subscribe.window", "ack.seq", "ack.persisted_seq", "policy_push.version",
})  # fmt: skip
"""``type.field`` integers a receiver refuses when negative (what peers send to the server)."""
ALLOWED_DTYPES: tuple[str, ...] = (
    "bool", "uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64", "int64",
    "float16", "float32", "float64",
)  # fmt: skip


class ErrorCode:
    """Values of ``Error.code``."""

    BAD_MESSAGE = "bad_message"  # undecodable bytes, bad field types, missing fields
    UNKNOWN_TYPE = "unknown_type"
    VERSION = "version"  # protocol version not spoken by the receiver
    NO_SESSION = "no_session"  # observation before a (valid) handshake: send Hello again
    SPEC_MISMATCH = "spec_mismatch"  # driver and policy disagree (obs, action dim, rate)
    BAD_OBSERVATION = "bad_observation"  # missing key, wrong shape/dtype, NaN/inf
    POLICY_ERROR = "policy_error"  # inference failed or produced NaN / wrong shape
    BAD_TRANSITION = "bad_transition"  # transition refused (message names the field); episode kept
    TOO_MANY_CLIENTS = "too_many_clients"
    SUPERSEDED = "superseded"  # a newer observation from the same driver replaced this one
    RATE_LIMITED = "rate_limited"  # this peer sent too many bad messages: further ones are dropped
    INTERNAL = "internal"


class ProtocolError(ValueError):
    """A message that cannot be decoded or does not follow the protocol; ``code`` is an ErrorCode.

    ``request_id`` is the message's ``request_id`` when it could be read (an int in range), so
    an error reply can name the request it refuses."""

    def __init__(self, message: str, code: str = ErrorCode.BAD_MESSAGE, request_id: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.request_id = request_id


# ---------------------------------------------------------------------------------------------
# Messages. Field order is documentation only: on the wire every field is a named map entry.


@dataclass
class Message:
    TYPE: ClassVar[str] = ""


@dataclass
class Hello(Message):
    """Driver → server, first message: who the driver is and what it observes and accepts."""

    TYPE: ClassVar[str] = "hello"
    driver: str
    obs_spec: list[dict[str, Any]]
    """One ``{"key": str, "shape": [int], "dtype": str}`` per observation array."""
    action_dim: int
    action_low: np.ndarray
    """(A,) float32, the driver's own action limits."""
    action_high: np.ndarray
    control_hz: float
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Welcome(Message):
    """Server → driver, answer to an accepted Hello: the policy's spec and a session id."""

    TYPE: ClassVar[str] = "welcome"
    session: str
    obs_spec: list[dict[str, Any]]
    action_dim: int
    chunk_len: int
    control_hz: float
    action_low: np.ndarray
    """(A,) float32: every served action lies in [action_low, action_high]."""
    action_high: np.ndarray
    policy_version: str
    actor_type: str = ""
    heartbeat_s: float = 1.0
    """The driver should send a Heartbeat when it has sent nothing for this long."""
    session_timeout_s: float = 10.0
    """The server forgets a driver that sent nothing for this long."""
    log_transitions: bool = False
    """True when the server records episodes: the driver should stream Transition messages."""
    warnings: list[str] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class Observation(Message):
    """Driver → server: one observation; the server answers with a Chunk (or an Error)."""

    TYPE: ClassVar[str] = "observation"
    request_id: int
    episode_id: int
    step: int
    """Control step (since the episode's reset) at which ``obs`` was read."""
    timestamp: float
    """Driver clock (seconds) when ``obs`` was read."""
    obs: dict[str, np.ndarray]
    reset: bool = False
    """True on the first observation of an episode."""
    prev_start_step: int = -1
    """Real-time chunking (optional): ``start_step`` of the chunk the driver is executing, whose
    rest the new chunk should continue (the server keeps the last chunk it sent); -1: none."""
    delay_steps: int = -1
    """Real-time chunking (optional): control steps the driver expects this answer to take; that
    many leading actions of the new chunk are frozen to the executing chunk's. -1: unknown."""


@dataclass
class Chunk(Message):
    """Server → driver: the action chunk computed from the observation ``request_id``."""

    TYPE: ClassVar[str] = "chunk"
    request_id: int
    episode_id: int
    start_step: int
    """``step`` of the answered observation: ``actions[i]`` is meant for step start_step + i."""
    actions: np.ndarray
    """(H, A) float32, already clipped to the policy's action limits."""
    policy_version: str
    queue_ms: float
    """Received → inference started."""
    infer_ms: float
    """Inference alone, as the policy measured it (device time included)."""
    total_ms: float
    """Received → reply encoded (everything the server did)."""
    clipped: int = 0
    """Number of action elements the server moved into the limits."""
    frozen: int = 0
    """Leading actions copied unchanged from the previous chunk (real-time chunking; 0: none)."""


@dataclass
class Transition(Message):
    """Driver → server (no reply): K executed steps, for episode logging and online learning."""

    TYPE: ClassVar[str] = "transition"
    episode_id: int
    start_step: int
    obs: dict[str, np.ndarray]
    """(K, ...) per key: the observation each action was chosen from."""
    actions: np.ndarray
    """(K, A) float32: the actions actually applied (after the driver's safety layer)."""
    rewards: np.ndarray
    """(K,) float32."""
    terminals: np.ndarray
    """(K,) bool: true termination (success/failure), stops bootstrapping."""
    truncated: np.ndarray
    """(K,) bool: time limit or operator stop."""
    next_obs: dict[str, np.ndarray]
    success: bool = False
    """Whether the episode has succeeded by the last of these steps."""
    policy_version: str = ""
    """Version of the policy whose chunk produced these steps ('' = unknown: the server fills in
    the version of the last chunk it served to this session)."""
    intervention: np.ndarray | None = None
    """(K,) bool, optional: True where a human operator's action replaced the policy's."""
    timestamps: np.ndarray | None = None
    """(K,) float64, optional: driver clock (``time.time()``, s) when each step was applied."""
    held: np.ndarray | None = None
    """(K,) bool, optional: True where the robot got no new command in time and applied its hold."""
    outbox: str = ""
    """Id of the robot-side outbox that sent it ('' = none): stable across reconnects and restarts."""
    outbox_seq: int = 0
    """Its number in that outbox (1, 2, ...; 0 = not from an outbox). The server acknowledges it
    with ``ack{seq=outbox_seq}`` once journaled; a re-sent one is applied once."""
    reward: str = ""
    """The convention of ``rewards`` ('sparse', 'dense'; '' = unspecified): a learner refuses rows of another."""


@dataclass
class Heartbeat(Message):
    """Either direction; the server echoes every Heartbeat it receives (before or after Hello)."""

    TYPE: ClassVar[str] = "heartbeat"
    seq: int
    timestamp: float
    learner_behind: int = -1
    """In the server's echo to a driver: the updates its learner owes its UTD target (the most any
    subscribed learner reported; 0: keeping up; -1: no learner heard from). A driver waits at
    its reset while this exceeds its limit (``drive learner_wait``)."""


@dataclass
class Error(Message):
    """Server → driver. Its shape is frozen across protocol versions so any peer can read it."""

    TYPE: ClassVar[str] = "error"
    code: str
    message: str
    request_id: int | None = None


@dataclass
class Bye(Message):
    """Either direction: the sender is closing the session. A driver answers the server's Bye
    with a Bye of its own (so the server knows it was read); the server never answers one."""

    TYPE: ClassVar[str] = "bye"
    reason: str = ""


@dataclass
class Describe(Message):
    """Driver → server, any time (no session needed): ask what policy is served."""

    TYPE: ClassVar[str] = "describe"
    request_id: int | None = None
    """Echoed in the Description, so a driver can match it."""


@dataclass
class Description(Message):
    """Server → driver, answer to Describe: the same ``metadata`` map a Welcome carries."""

    TYPE: ClassVar[str] = "description"
    metadata: dict[str, Any]
    request_id: int | None = None


# -- the learner link (server's learner port; docs/protocol.md section 10) --------------------


@dataclass
class Subscribe(Message):
    """Learner → server: stream every journaled transition with ``seq >= from_seq``."""

    TYPE: ClassVar[str] = "subscribe"
    learner: str
    from_seq: int
    """First sequence number wanted: the learner's last applied seq + 1 (1 = everything)."""
    window: int = 256
    """Records the server may send beyond the last ``ack`` (flow control)."""


@dataclass
class Subscribed(Message):
    """Server → learner, answer to Subscribe: where the journal stands and what is served."""

    TYPE: ClassVar[str] = "subscribed"
    journal_id: str
    """Identity of the journal: sequence numbers are meaningful only within one journal."""
    first_seq: int
    """Oldest record still in the journal."""
    next_seq: int
    """Sequence number the next recorded transition will get."""
    policy_version: int
    """Version number of the served policy (0: the one the server started with)."""


@dataclass
class TransitionBatch(Message):
    """Server → learner: consecutive journal records, in increasing ``seq``."""

    TYPE: ClassVar[str] = "transition_batch"
    records: list[dict[str, Any]]
    """Each ``{"seq": int, "session": str, "driver": str, "policy_version": str, "t": float,
    "transition": bin}``; ``transition`` is an encoded Transition message."""


@dataclass
class Ack(Message):
    """Learner → server: flow control and durability of what the learner has."""

    TYPE: ClassVar[str] = "ack"
    seq: int
    """Every record with seq <= this was received, in order."""
    persisted_seq: int = 0
    """Every record with seq <= this is in a learner checkpoint (the journal may drop them)."""
    behind: int = 0
    """Learner → server: updates the learner owes its UTD target for the steps it received (0:
    keeping up). Relayed to drivers in heartbeat echoes (``learner_behind``)."""


@dataclass
class PolicyPush(Message):
    """Learner → server: a new exported policy to serve from the next chunk on."""

    TYPE: ClassVar[str] = "policy_push"
    version: int
    """Must exceed the served version (a stale push is refused)."""
    onnx: bytes
    """The self-describing model.onnx file."""
    sha256: str
    """Hex SHA-256 of ``onnx``."""


@dataclass
class PolicyAck(Message):
    """Server → learner: the outcome of a PolicyPush."""

    TYPE: ClassVar[str] = "policy_ack"
    version: int
    accepted: bool
    reason: str = ""
    """Why a push was refused (stale version, checksum, spec mismatch, load failure)."""


MESSAGE_TYPES: dict[str, type[Message]] = {
    c.TYPE: c for c in (Hello, Welcome, Observation, Chunk, Transition, Heartbeat, Error, Bye,
                        Describe, Description, Subscribe, Subscribed, TransitionBatch, Ack, PolicyPush,
                        PolicyAck)
}
DRIVER_TYPES = frozenset({"hello", "observation", "transition", "heartbeat", "bye", "describe"})
"""What a driver may send to the driver port; anything else is refused with ``unknown_type``."""
LEARNER_TYPES = frozenset({"subscribe", "ack", "heartbeat", "policy_push", "bye"})
"""What a learner may send to the learner port."""


def obs_spec_to_wire(fields: Any) -> list[dict[str, Any]]:
    """Objects with ``key``/``shape``/``dtype`` (e.g. ``qc_robot.policies.base.ObsField``) → wire form."""
    return [{"key": str(f.key), "shape": [int(s) for s in f.shape], "dtype": str(f.dtype)} for f in fields]


# ---------------------------------------------------------------------------------------------
# Arrays: ExtType(1, u8 len(dtype) | dtype ascii | u8 ndim | ndim × u32 LE | raw LE C-order data)


def pack_array(arr: np.ndarray) -> msgpack.ExtType:
    """An ndarray as ExtType 1; raises ProtocolError for dtypes outside the allow-list."""
    arr = np.asarray(arr)
    name = arr.dtype.name
    if name not in ALLOWED_DTYPES:
        raise ProtocolError(f"dtype {arr.dtype} is not allowed on the wire (allowed: {ALLOWED_DTYPES})")
    if arr.ndim > MAX_NDIM:
        raise ProtocolError(f"array has {arr.ndim} dims, at most {MAX_NDIM} allowed")
    wire = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<"))  # always little-endian
    head = bytes([len(name)]) + name.encode("ascii") + bytes([arr.ndim])
    head += struct.pack(f"<{arr.ndim}I", *arr.shape)
    return msgpack.ExtType(ARRAY_EXT, head + wire.tobytes())


def unpack_array(payload: bytes) -> np.ndarray:
    """Inverse of :func:`pack_array`; validates every length. Returns a fresh writable array."""
    try:
        n = payload[0]
        name = payload[1 : 1 + n].decode("ascii")
        ndim = payload[1 + n]
        off = 2 + n
        shape = struct.unpack_from(f"<{ndim}I", payload, off)
    except (IndexError, UnicodeDecodeError, struct.error) as e:
        raise ProtocolError(f"truncated or malformed array header: {e}") from None
    if name not in ALLOWED_DTYPES:
        raise ProtocolError(f"array dtype {name!r} is not allowed")
    if ndim > MAX_NDIM:
        raise ProtocolError(f"array has {ndim} dims, at most {MAX_NDIM} allowed")
    off += 4 * ndim
    dtype = np.dtype(name).newbyteorder("<")
    expected = math.prod(shape) * dtype.itemsize
    if len(payload) - off != expected:
        raise ProtocolError(f"array {name}{list(shape)} needs {expected} data bytes, got {len(payload) - off}")
    arr = np.frombuffer(payload, dtype=dtype, offset=off, count=math.prod(shape)).reshape(shape)
    if name == "bool" and arr.size and np.frombuffer(payload, np.uint8, offset=off).max() > 1:
        raise ProtocolError("bool array holds bytes other than 0/1")
    return arr.astype(dtype.newbyteorder("="), copy=True)


def pack_jpeg(arr: np.ndarray, quality: int) -> msgpack.ExtType:
    """A uint8 (H, W, 3) RGB image as ExtType 2 (``qc_robot.image_codec.jpeg_payload``)."""
    from qc_robot.image_codec import ImageCodecError, jpeg_payload

    try:
        return msgpack.ExtType(JPEG_EXT, jpeg_payload(arr, quality))
    except ImageCodecError as e:
        raise ProtocolError(str(e)) from None


def unpack_jpeg(payload: bytes, budget: list[int]) -> np.ndarray:
    """Inverse of :func:`pack_jpeg`; ``budget[0]`` (decoded bytes left in this message) is charged first."""
    from qc_robot.image_codec import ImageCodecError, image_from_payload

    try:
        return image_from_payload(payload, budget)
    except ImageCodecError as e:
        raise ProtocolError(f"JPEG image: {e}") from None


def _is_image(obj: Any) -> bool:
    return isinstance(obj, np.ndarray) and obj.dtype == np.uint8 and obj.ndim == 3 and obj.shape[2] == 3


def _default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return pack_array(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    raise ProtocolError(f"cannot encode {type(obj).__name__} (only msgpack types and ndarrays)")


def _ext_hook(code: int, data: bytes) -> Any:
    if code != ARRAY_EXT:
        raise ProtocolError(f"unknown msgpack ext type {code}")
    return unpack_array(data)


def _message_ext_hook() -> Any:
    """The ext hook of one message: arrays, and JPEG images within one decoded-bytes budget."""
    budget = [MAX_MESSAGE_BYTES]  # decoded JPEG bytes one message may produce

    def hook(code: int, data: bytes) -> Any:
        if code == JPEG_EXT:
            return unpack_jpeg(data, budget)
        return _ext_hook(code, data)

    return hook


# ---------------------------------------------------------------------------------------------
# Messages ⇄ bytes


def encode(msg: Message, jpeg_quality: int = 0) -> bytes:
    """Serialize a message (one ZeroMQ frame). ``jpeg_quality`` 1-100: every uint8 (H, W, 3)
    array travels as a JPEG (ext type 2; lossy, decoded back to the array by the receiver);
    0: all arrays raw (ext type 1)."""
    if type(msg) not in MESSAGE_TYPES.values():
        raise ProtocolError(f"not a protocol message: {type(msg).__name__}")
    body: dict[str, Any] = {"v": PROTOCOL_VERSION, "type": msg.TYPE}
    for f in dataclasses.fields(msg):
        body[f.name] = getattr(msg, f.name)
    default = _default
    if jpeg_quality:
        def default(obj: Any) -> Any:
            return pack_jpeg(obj, jpeg_quality) if _is_image(obj) else _default(obj)
    try:
        return msgpack.packb(body, default=default, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as e:
        if isinstance(e, ProtocolError):
            raise
        raise ProtocolError(f"cannot encode {msg.TYPE}: {e}") from None


def decode(data: bytes | bytearray | memoryview, accept: frozenset[str] | None = None) -> Message:
    """Parse and validate one message; raises ProtocolError (with ``code``) on anything wrong.

    ``accept``: the message types this receiver takes; a known type outside it is refused with
    ``unknown_type`` before its fields are checked (so an incomplete server-only message gets
    the same answer as a complete one). The error carries the ``request_id`` when it is readable.
    """
    if len(data) > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"message of {len(data)} bytes exceeds {MAX_MESSAGE_BYTES}")
    try:
        body = msgpack.unpackb(data, raw=False, ext_hook=_message_ext_hook(), strict_map_key=True, timestamp=0)
    except ProtocolError:
        raise
    except Exception as e:  # msgpack raises many types on garbage: report them all the same way
        raise ProtocolError(f"undecodable message ({type(e).__name__}: {e})") from None
    if not isinstance(body, dict):
        raise ProtocolError(f"message must be a map, got {type(body).__name__}")
    rid = body.get("request_id")
    rid = rid if type(rid) is int and 0 <= rid <= INT_MAX else None
    try:
        return _from_body(body, accept)
    except ProtocolError as e:
        e.request_id = rid
        raise


def _from_body(body: dict[Any, Any], accept: frozenset[str] | None) -> Message:
    for k in body:
        if not isinstance(k, str):
            raise ProtocolError(f"message map keys must be strings, got {type(k).__name__}")
    version = body.get("v")
    if not isinstance(version, int) or isinstance(version, bool):
        raise ProtocolError("message has no integer protocol version 'v'")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {version} not supported (this side speaks {PROTOCOL_VERSION})",
                            ErrorCode.VERSION)
    kind = body.get("type")
    cls = MESSAGE_TYPES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ProtocolError(f"unknown message type {kind!r}", ErrorCode.UNKNOWN_TYPE)
    if accept is not None and kind not in accept:
        raise ProtocolError(f"this receiver does not take {kind!r} messages", ErrorCode.UNKNOWN_TYPE)
    hints = _hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name not in body:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ProtocolError(f"{kind}: missing field {f.name!r}")
            continue
        value = _check(body[f.name], hints[f.name], f"{kind}.{f.name}")
        if type(value) is int and value < 0 and f"{kind}.{f.name}" in NON_NEGATIVE_FIELDS:
            raise ProtocolError(f"{kind}.{f.name}: must be >= 0, got {value}")
        kwargs[f.name] = value
    return cls(**kwargs)  # unknown keys are ignored: later minor revisions may add fields


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _check(value: Any, tp: Any, where: str) -> Any:
    """Validate ``value`` against the annotation ``tp``; coerce ints to float where a float is due."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(tp):
            return None
        (inner,) = [a for a in typing.get_args(tp) if a is not type(None)]
        return _check(value, inner, where)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ProtocolError(f"{where}: expected bool, got {type(value).__name__}")
        return value
    if tp is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise ProtocolError(f"{where}: expected int, got {type(value).__name__}")
        if not INT_MIN <= value <= INT_MAX:
            raise ProtocolError(f"{where}: {value} is outside the int64 range")
        return value
    if tp is float:
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise ProtocolError(f"{where}: expected number, got {type(value).__name__}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ProtocolError(f"{where}: expected str, got {type(value).__name__}")
        return value
    if tp is bytes:
        if not isinstance(value, bytes):
            raise ProtocolError(f"{where}: expected bin, got {type(value).__name__}")
        return value
    if tp is np.ndarray:
        if not isinstance(value, np.ndarray):
            raise ProtocolError(f"{where}: expected an array (ext type {ARRAY_EXT}), got {type(value).__name__}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ProtocolError(f"{where}: expected list, got {type(value).__name__}")
        (inner,) = typing.get_args(tp)
        return [_check(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ProtocolError(f"{where}: expected map, got {type(value).__name__}")
        _, inner = typing.get_args(tp)
        for k in value:
            if not isinstance(k, str):  # msgpack lets bin keys through strict_map_key
                raise ProtocolError(f"{where}: map keys must be strings, got {type(k).__name__} {k!r:.40}")
        return {k: _check(v, inner, f"{where}[{k!r}]") for k, v in value.items()}
    raise ProtocolError(f"{where}: unsupported field type {tp}")  # pragma: no cover


def check_obs_spec(spec: list[dict[str, Any]], where: str = "obs_spec") -> list[tuple[str, tuple[int, ...], str]]:
    """Validate a wire obs spec; returns ``(key, shape, dtype)`` tuples."""
    out = []
    for i, f in enumerate(spec):
        key, shape, dtype = f.get("key"), f.get("shape"), f.get("dtype")
        if not isinstance(key, str) or not key:
            raise ProtocolError(f"{where}[{i}]: 'key' must be a non-empty string")
        if not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape):
            raise ProtocolError(f"{where}[{i}] ({key}): 'shape' must be a list of non-negative ints")
        if dtype not in ALLOWED_DTYPES:
            raise ProtocolError(f"{where}[{i}] ({key}): dtype {dtype!r} not in {ALLOWED_DTYPES}")
        out.append((key, tuple(shape), str(dtype)))
    return out
