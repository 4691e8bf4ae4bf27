"""Replies held back to inject an inference delay (``serve delay_ms=``): each leaves ``delay_s``
after its observation arrived, in due order, sent by the socket loop (never a sleeping worker,
which would serialise a driver's pipelined requests)."""

from __future__ import annotations

import heapq
import itertools
import math
import time


class DelayedReplies:
    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s
        self._heap: list[tuple[float, int, bytes, bytes, bytes]] = []  # (due, n, ident, reply, version)
        self._n = itertools.count()

    def hold(self, t_recv: float, ident: bytes, reply: bytes, version: bytes) -> None:
        """Keep a reply whose observation arrived at ``t_recv`` (``time.perf_counter``)."""
        heapq.heappush(self._heap, (t_recv + self.delay_s, next(self._n), ident, reply, version))

    def due(self) -> list[tuple[bytes, bytes, bytes]]:
        """The replies whose time has come, oldest first: (ident, reply, version)."""
        now, out = time.perf_counter(), []
        while self._heap and self._heap[0][0] <= now:
            out.append(heapq.heappop(self._heap)[2:])
        return out

    def wait_ms(self, most: int) -> int:
        """How long the socket loop may poll before the next reply is due (at most ``most``)."""
        if not self._heap:
            return most
        return max(0, min(most, math.ceil((self._heap[0][0] - time.perf_counter()) * 1e3)))
