"""The qc-robot wire protocol, version 1. No sockets here; three modules, one job each:

* :mod:`.messages`: the message types, constants and error codes;
* :mod:`.codec`: msgpack with the ndarray (ext 1) and JPEG (ext 2) extensions, bytes ⇄ maps;
* :mod:`.schema`: checks a parsed map into a message, in two steps (envelope, then fields) so
  that a receiver admits a message before decoding its arrays and images.

Every name is re-exported here (``from qc_robot import protocol as P``). ``docs/protocol.md`` is
the language-neutral specification. Imports only numpy, msgpack and the standard library, so a
robot PC needs nothing else.
"""

from qc_robot.protocol.codec import (
    Ext,
    PendingImage,
    _default,
    _is_image,
    encode,
    pack_array,
    pack_jpeg,
    pending_jpeg,
    unpack,
    unpack_array,
    unpack_jpeg,
)
from qc_robot.protocol.messages import (
    ALLOWED_DTYPES,
    ARRAY_EXT,
    DRIVER_TYPES,
    INT_MAX,
    INT_MIN,
    JPEG_EXT,
    LEARNER_TYPES,
    MAX_MESSAGE_BYTES,
    MAX_NDIM,
    MAX_OUTBOX_ID,
    MESSAGE_TYPES,
    PROTOCOL_VERSION,
    Ack,
    Bye,
    Chunk,
    Describe,
    Description,
    Error,
    ErrorCode,
    Heartbeat,
    Hello,
    Message,
    Observation,
    PolicyAck,
    PolicyPush,
    ProtocolError,
    Subscribe,
    Subscribed,
    Transition,
    TransitionBatch,
    Welcome,
    obs_spec_to_wire,
)
from qc_robot.protocol.schema import (
    NON_NEGATIVE_FIELDS,
    Decoding,
    Envelope,
    build,
    check_obs_spec,
    decode,
    read_envelope,
)

__all__ = [
    "ALLOWED_DTYPES", "ARRAY_EXT", "DRIVER_TYPES", "INT_MAX", "INT_MIN", "JPEG_EXT", "LEARNER_TYPES",
    "MAX_MESSAGE_BYTES", "MAX_NDIM", "MAX_OUTBOX_ID", "MESSAGE_TYPES", "NON_NEGATIVE_FIELDS", "PROTOCOL_VERSION",
    "Ack", "Bye", "Chunk", "Decoding", "Describe", "Description", "Envelope", "Error", "ErrorCode", "Ext",
    "Heartbeat", "Hello", "Message", "Observation", "PendingImage", "PolicyAck", "PolicyPush", "ProtocolError",
    "Subscribe", "Subscribed", "Transition", "TransitionBatch", "Welcome", "_default", "_is_image", "build",
    "check_obs_spec", "decode", "encode", "obs_spec_to_wire", "pack_array", "pack_jpeg", "pending_jpeg",
    "read_envelope", "unpack", "unpack_array", "unpack_jpeg",
]  # fmt: skip
