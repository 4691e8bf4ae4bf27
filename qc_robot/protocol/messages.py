"""The protocol's message types (version 1), its constants and error codes. No codec, no sockets.

Field order is documentation only: on the wire every field is a named map entry
(``docs/protocol.md`` section 4). Imports only numpy and the standard library.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

PROTOCOL_VERSION = 1
ARRAY_EXT = 1
"""msgpack ExtType code of an ndarray."""
JPEG_EXT = 2
"""msgpack ExtType code of a JPEG-compressed uint8 (H, W, 3) image (decoded to an ndarray)."""
MAX_MESSAGE_BYTES = 64 << 20
MAX_NDIM = 16
MAX_OUTBOX_ID = 64
"""Longest ``transition.outbox`` id a server accepts (what it keeps per peer is bounded)."""
INT_MIN, INT_MAX = -(2**63), 2**63 - 1
"""Every integer field lies in the int64 range (identifiers go into HDF5 attrs and numpy)."""
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
    RATE_LIMITED = "rate_limited"  # this peer exceeded its image-decode budget: retry later, send fewer
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
    """Id of the robot-side outbox that sent it ('' = none): stable across reconnects and restarts;
    at most ``MAX_OUTBOX_ID`` characters."""
    outbox_seq: int = 0
    """Its number in that outbox (1, 2, ...; 0 = not from an outbox). The server acknowledges it
    with ``ack{seq=outbox_seq}`` once journaled; a re-sent one is applied once."""
    reward: str = ""
    """The reward convention ``rewards`` follow ('' = unspecified; e.g. 'sparse': -1 per step,
    0 and a terminal on success), so a learner can refuse data it would misread."""


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
