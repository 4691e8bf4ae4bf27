"""Rate-limited warnings and per-peer budgets: a flood of bad messages costs counts, not log lines.

A peer that sends thousands of bad messages a second must not fill the disk with one log line
per message nor make the server spend its time answering it. :class:`RateLimitedLog` logs the
first occurrence of each kind and then at most one summary line per interval with the count
since; :class:`TokenBuckets` grants each peer (and all peers together) a burst of error replies
refilled at a fixed rate, in bounded memory.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict


class RateLimitedLog:
    """``warn(kind, fmt, *args)``: the first of each kind, then one line per ``interval_s`` with a count."""

    def __init__(self, logger: logging.Logger, interval_s: float = 10.0) -> None:
        self.logger, self.interval_s = logger, interval_s
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def warn(self, kind: str, fmt: str, *args: object) -> None:
        self.log(logging.WARNING, kind, fmt, *args)

    def info(self, kind: str, fmt: str, *args: object) -> None:
        self.log(logging.INFO, kind, fmt, *args)

    def log(self, level: int, kind: str, fmt: str, *args: object) -> None:
        if not self.logger.isEnabledFor(level):
            return
        now = time.monotonic()
        last = self._last.get(kind)
        if last is not None and now - last < self.interval_s:
            self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
            return
        n = self._suppressed.pop(kind, 0)
        self._last[kind] = now
        if n:
            self.logger.log(level, fmt + " (and %d more %s since the last report)", *args, n, kind)
        else:
            self.logger.log(level, fmt, *args)


class TokenBuckets:
    """One token bucket per key (``burst`` tokens, ``rate`` per second) plus one shared by all.

    At most ``max_keys`` keys are remembered (least recently used forgotten), so a peer that opens
    endless connections costs bounded memory; a forgotten key starts with a full bucket, which the
    shared bucket still caps."""

    def __init__(self, burst: float, rate: float, total_burst: float, total_rate: float,
                 max_keys: int = 4096) -> None:
        self.burst, self.rate = burst, rate
        self.total_burst, self.total_rate = total_burst, total_rate
        self.max_keys = max_keys
        self._keys: OrderedDict[bytes, tuple[float, float]] = OrderedDict()
        self._total = (total_burst, time.monotonic())

    @staticmethod
    def _refill(state: tuple[float, float], burst: float, rate: float, now: float) -> float:
        tokens, t = state
        return min(burst, tokens + (now - t) * rate)

    def take(self, key: bytes, cost: float = 1.0) -> bool:
        """Spend ``cost`` tokens of ``key`` and as many shared ones; False (nothing spent) if either
        has fewer."""
        now = time.monotonic()
        mine = self._refill(self._keys.get(key, (self.burst, now)), self.burst, self.rate, now)
        total = self._refill(self._total, self.total_burst, self.total_rate, now)
        ok = mine >= cost and total >= cost
        if ok:
            mine, total = mine - cost, total - cost
        self._store(key, mine, total, now)
        return ok

    def charge(self, key: bytes, cost: float) -> None:
        """Spend ``cost`` tokens of ``key`` and shared ones whatever is left (a cost known only
        afterwards, e.g. time spent): the balance may go negative and refills from there."""
        now = time.monotonic()
        mine = self._refill(self._keys.get(key, (self.burst, now)), self.burst, self.rate, now)
        total = self._refill(self._total, self.total_burst, self.total_rate, now)
        self._store(key, mine - cost, total - cost, now)

    def _store(self, key: bytes, mine: float, total: float, now: float) -> None:
        self._keys[key] = (mine, now)
        self._keys.move_to_end(key)
        self._total = (total, now)
        while len(self._keys) > self.max_keys:
            self._keys.popitem(last=False)

    def has_tokens(self, key: bytes, need: float = 1.0) -> bool:
        """Whether ``key`` and the shared bucket hold at least ``need`` tokens now (nothing is spent;
        unknown keys have a full bucket). ``need=0``: whether neither is in debt."""
        now = time.monotonic()
        state = self._keys.get(key)
        mine = self.burst if state is None else self._refill(state, self.burst, self.rate, now)
        return mine >= need and self._refill(self._total, self.total_burst, self.total_rate, now) >= need

    def has_own_tokens(self, key: bytes) -> bool:
        """Whether ``key`` could spend one token now, ignoring the shared bucket."""
        state = self._keys.get(key)
        return state is None or self._refill(state, self.burst, self.rate, time.monotonic()) >= 1.0

    def __len__(self) -> int:
        return len(self._keys)

    def forget(self, key: bytes) -> None:
        self._keys.pop(key, None)
