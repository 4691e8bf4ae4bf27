"""What a peer may make the server spend or keep: image-decode budgets and outbox bookkeeping.

* :class:`DecodeBudget`: decoded bytes and decoding time per second, per peer and for all peers
  together (token buckets). Bytes are charged from the declared size before decoding; time is
  charged after it, so a peer in debt is refused until its bucket refills.
* :class:`FloodGuard`: a peer whose observations keep superseding each other sends faster than
  it can be served; beyond a budget its messages are dropped unread, so a flood costs the
  socket loop a receive per message instead of a parse, a check and a reply.
* :class:`OutboxLedger`: the newest acknowledged ``outbox_seq`` per (peer, outbox id), so a
  re-sent transition is applied once. Scoped to the peer (one driver can never acknowledge or
  suppress another's transitions), ids bounded in length, a few ids per peer, forgotten when the
  peer leaves.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

from qc_robot.server.ratelog import TokenBuckets


@dataclass
class DecodeLimits:
    """Image decoding a peer (and all peers together) may cause, per second (burst: one second's)."""

    peer_bytes_s: float = 64 << 20
    """Decoded image bytes per second per peer (a 50 Hz driver with two 224x224 cameras needs 15 MB/s)."""
    peer_s: float = 0.25
    """Seconds of decoding per second per peer."""
    total_bytes_s: float = 256 << 20
    total_s: float = 0.5


class DecodeBudget:
    """Thread-safe: the socket loop admits, the worker that decoded charges the time."""

    def __init__(self, limits: DecodeLimits, max_keys: int = 4096) -> None:
        self.limits = limits
        self._bytes = TokenBuckets(limits.peer_bytes_s, limits.peer_bytes_s, limits.total_bytes_s,
                                   limits.total_bytes_s, max_keys)
        self._time = TokenBuckets(limits.peer_s, limits.peer_s, limits.total_s, limits.total_s, max_keys)
        self._lock = threading.Lock()

    def admit(self, peer: bytes, nbytes: int) -> str:
        """'' when ``peer`` may decode ``nbytes`` now (they are charged), else why not."""
        with self._lock:
            if not self._time.has_tokens(peer, 0.0):
                return "decoding time budget spent"
            if not self._bytes.take(peer, float(nbytes)):
                return "decoded-bytes budget spent"
        return ""

    def spent(self, peer: bytes, seconds: float) -> None:
        with self._lock:
            self._time.charge(peer, seconds)

    def forget(self, peer: bytes) -> None:
        with self._lock:
            self._bytes.forget(peer)
            self._time.forget(peer)

    def __len__(self) -> int:
        with self._lock:
            return max(len(self._bytes), len(self._time))


class FloodGuard:
    """Per peer, a budget of superseded observations (``burst``, refilled at ``rate`` per second).
    While a peer has no token its messages are dropped unread: a flooder is read about ``rate``
    times a second, and a driver whose observations piled up during a stall is heard in full
    again once they stop superseding each other. Socket-loop only (not thread-safe)."""

    def __init__(self, burst: float = 50.0, rate: float = 20.0, max_keys: int = 4096) -> None:
        self._tokens = TokenBuckets(burst, rate, 1e18, 1e18, max_keys)  # no shared cap

    def superseded(self, peer: bytes) -> None:
        self._tokens.charge(peer, 1.0)

    def admit(self, peer: bytes) -> bool:
        """Whether to read ``peer``'s next message (False: drop it unread)."""
        return self._tokens.has_own_tokens(peer)

    def forget(self, peer: bytes) -> None:
        self._tokens.forget(peer)

    def __len__(self) -> int:
        return len(self._tokens)


class OutboxLedger:
    """Per peer, the newest ``outbox_seq`` acknowledged for each of its (at most ``per_peer``)
    outbox ids. With authenticated peers (CURVE keys), also who owns each id: the first key to
    use it while a peer with that key holds it, so a driver with another key can never have its
    transitions journaled under that id (where a learner would take them for the owner's). A
    restarted driver (new connection, same key) takes its ids over at once. Socket-loop only."""

    def __init__(self, per_peer: int = 4) -> None:
        self.per_peer = per_peer
        self._seen: dict[bytes, OrderedDict[str, int]] = {}
        self._key: dict[bytes, str] = {}  # peer -> its authenticated key
        self._owner: dict[str, str] = {}  # outbox id -> key; only ids some peer holds in ``_seen``

    def done(self, peer: bytes, outbox: str, seq: int) -> bool:
        """Whether ``peer``'s outbox already had ``seq`` acknowledged (a re-send)."""
        ids = self._seen.get(peer)
        return ids is not None and seq <= ids.get(outbox, 0)

    def claim(self, peer: bytes, key: str | None, outbox: str) -> bool:
        """Hold ``outbox`` for ``peer``, authenticated as ``key`` (None: not authenticated, nothing
        to own by); False if a peer with another key holds it."""
        if key is None:
            return True
        if self._owner.setdefault(outbox, key) != key:
            return False
        self._key[peer] = key
        self._keep(peer, outbox, 0)
        return True

    def acknowledged(self, peer: bytes, outbox: str, seq: int) -> None:
        self._keep(peer, outbox, seq)

    def _keep(self, peer: bytes, outbox: str, seq: int) -> None:
        ids = self._seen.setdefault(peer, OrderedDict())
        ids[outbox] = max(ids.get(outbox, 0), seq)
        ids.move_to_end(outbox)
        while len(ids) > self.per_peer:  # a driver has one outbox: more ids are a peer playing games
            self._release(peer, ids.popitem(last=False)[0])

    def _release(self, peer: bytes, outbox: str) -> None:
        """``peer`` no longer holds ``outbox``: free it unless another peer with its key does."""
        key = self._key.get(peer)
        if key is None or self._owner.get(outbox) != key:
            return
        if not any(k == key and p != peer and outbox in self._seen.get(p, ()) for p, k in self._key.items()):
            del self._owner[outbox]

    def forget(self, peer: bytes) -> None:
        for outbox in list(self._seen.get(peer, ())):
            self._release(peer, outbox)
        self._seen.pop(peer, None)
        self._key.pop(peer, None)

    def counts(self) -> tuple[int, int]:
        """(outbox ids kept, characters in them)."""
        ids = [k for d in self._seen.values() for k in d]
        return len(ids), sum(map(len, ids))
