"""Cheap policy updates: new weights reach the server in a fraction of a second, training barely pauses.

A full ONNX export (tracing the acting rule with the dynamo exporter, then verifying it) takes
seconds on a CPU, and the first version of ``qc-robot finetune`` did it on the training thread
every ``push_every`` updates. Here the graph is traced once, before training starts
(:meth:`PolicyPusher.prepare`), and every push after that only snapshots the acting networks'
weights on the training thread (a tensor copy: milliseconds) and hands them to a pusher thread,
which

1. writes the new weights into the traced graph's initializers (the lean graph's derived tensors
   are recomputed by building :class:`ExportGraph` from the snapshot), so the file is a new
   serialization of the same graph, not a new trace,
2. verifies the file against torch on fixed noise (``verify``: the same check as ``qc-robot
   export``) for the first swap after each trace and then every ``verify_every``-th: a swap
   only rewrites the named initializers of a graph that passed the check, so later files differ
   from a checked one in weight values alone, and the periodic check is the canary for a tensor
   the trace folded into a constant (it costs an onnxruntime session and a torch pass: most of a
   best-of-N push's time on a 2-core CPU), and
3. pushes it and waits for the server's answer.

Tracing must stay on the training thread: torch.export patches module calls process-wide while
it traces, so a trace on another thread captures the training thread's forward passes. (And it
parses onnxscript sources with ``ast``, which on CPython 3.11 can fail with "AST constructor
recursion depth mismatch" while another thread compiles code; so the one trace runs before the
link thread starts, and a trace is retried once on that error.) A swap
that fails verification (a tensor the trace folded into a constant) therefore makes the *next*
submit trace again on the training thread (a pause of seconds, logged; not seen in practice).

Snapshots coalesce: a snapshot taken while a push is in flight replaces any older one still
waiting, so the served policy is always the newest the pusher could ship. Every push is timed:
``pause_s`` (training thread), ``build_s`` (swap or trace, and verification), ``latency_s``
(snapshot → the server's acknowledgement, i.e. the policy is served from the next chunk).
"""

from __future__ import annotations

import copy
import logging
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qc_robot import protocol as P

log = logging.getLogger("qc_robot.finetune.push")


@dataclass
class PushStat:
    version: int
    updates: int
    """Online updates done when the snapshot was taken."""
    kind: str
    """'trace' (full export) or 'swap' (weights into the traced graph)."""
    pause_s: float
    build_s: float
    latency_s: float
    """Snapshot → the server's acknowledgement (nan when it never answered)."""
    accepted: bool
    reason: str = ""
    nbytes: int = 0
    verified: bool = False
    """The file was checked against torch before it was pushed (see ``verify_every``)."""


@dataclass
class _Snapshot:
    state: dict[str, torch.Tensor]
    train_step: int
    updates: int
    t: float
    pause_s: float
    traced: bytes | None = None
    """The file, when ``submit`` traced it (the pusher then only pushes it)."""


class PolicyPusher:
    """Background exporter and pusher of the acting policy (one thread, newest snapshot wins)."""

    def __init__(self, agent: Any, build_meta: Callable[[Any, int], Any],
                 push: Callable[[int, bytes, float], P.PolicyAck | None], next_version: Callable[[], int],
                 verify: bool = True, timeout_s: float = 30.0, trace_only: bool = False,
                 verify_every: int = 10) -> None:
        self.agent, self.build_meta, self._push = agent, build_meta, push
        self.next_version, self.verify, self.timeout_s = next_version, verify, timeout_s
        self.verify_every = verify_every
        """Check every n-th swap after the first one (0: only the first after each trace)."""
        self._swaps = 0  # swaps since the last trace
        self.trace_only = trace_only
        """Always trace, on the training thread (the old behaviour; the benchmark's baseline)."""
        self.stats: list[PushStat] = []
        self.version = 0
        """Newest version the server accepted."""
        self.error: BaseException | None = None
        self._acting = copy.deepcopy(agent.acting_policy()).cpu().eval()  # the pusher's own copy
        self._template: Any = None  # onnx.ModelProto traced once
        self._names: list[str] = []  # initializers taken from ExportGraph's state
        self._pending: _Snapshot | None = None
        self._needs_trace = True
        self._busy = False
        self._cond = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="qc-policy-pusher", daemon=True)
        self._thread.start()

    # -- the training thread's side -------------------------------------------------------------

    def prepare(self, train_step: int) -> None:
        """Trace the graph now (call before training starts: it takes seconds)."""
        self._acting.load_state_dict(self._state())
        self._trace(self.build_meta(self._acting, train_step))
        self._needs_trace = False

    def submit(self, train_step: int, updates: int) -> float:
        """Snapshot the acting weights for a push; returns the seconds the caller was held (a
        re-trace, when one is due, runs here too: see the module docstring)."""
        t0 = time.perf_counter()
        state = self._state()
        data = None
        if self._needs_trace or self.trace_only:
            self._acting.load_state_dict(state)
            data = self._trace(self.build_meta(self._acting, train_step))
            self._needs_trace = False
        pause = time.perf_counter() - t0
        with self._cond:
            self._pending = _Snapshot(state, train_step, updates, time.monotonic(), pause, data)
            self._cond.notify_all()
        return pause

    def _state(self) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return {k: v.detach().to("cpu", copy=True) for k, v in self.agent.acting_policy().state_dict().items()}

    def flush(self, timeout_s: float) -> bool:
        """Wait until every submitted snapshot was pushed (or failed); False on timeout."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            return self._cond.wait_for(lambda: (self._pending is None and not self._busy) or self._stop,
                                       max(0.0, deadline - time.monotonic()))

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def close(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join(timeout)

    # -- the pusher thread ----------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    self._cond.wait_for(lambda: self._pending is not None or self._stop)
                    if self._stop:
                        return
                    snap, self._pending, self._busy = self._pending, None, True
                try:
                    assert snap is not None
                    self._one(snap)
                except Exception as e:  # one failed push is that push's error, not a dead pusher
                    log.exception("policy push failed: %s", e)
                    self.stats.append(PushStat(0, snap.updates if snap else 0, "error", 0.0, 0.0, float("nan"),
                                               False, f"{type(e).__name__}: {e}"))
                finally:
                    with self._cond:
                        self._busy = False
                        self._cond.notify_all()
        except BaseException as e:  # noqa: BLE001 - recorded so the training loop can exit non-zero
            self.error = e
            raise

    def _one(self, snap: _Snapshot) -> None:
        t0 = time.monotonic()
        onnx_bytes, kind, verified = snap.traced, "trace", self.verify
        if onnx_bytes is None:
            self._acting.load_state_dict(snap.state)
            verified = self.verify and (self._swaps == 0 or (self.verify_every > 0
                                                             and self._swaps % self.verify_every == 0))
            onnx_bytes, kind = self._swap(self.build_meta(self._acting, snap.train_step), verified), "swap"
            self._swaps += 1
        build = time.monotonic() - t0
        if onnx_bytes is None:  # cannot swap: the next submit traces again
            self._needs_trace = True
            self.stats.append(PushStat(0, snap.updates, "swap", snap.pause_s, build, float("nan"), False,
                                       "swapped weights failed verification"))
            return
        version = self.next_version()
        ack = self._push(version, onnx_bytes, self.timeout_s)
        latency = time.monotonic() - snap.t if ack is not None else float("nan")
        ok = ack is not None and ack.accepted
        reason = "no answer" if ack is None else ack.reason
        if ok:
            self.version = max(self.version, version)
            log.info("pushed policy v%d (%s, %d updates, %.0f KiB): build %.2f s, served %.2f s after the "
                     "snapshot, training paused %.1f ms", version, kind, snap.updates, len(onnx_bytes) / 1024,
                     build, latency, snap.pause_s * 1e3)
        else:
            log.warning("policy v%d not served: %s", version, reason)
        self.stats.append(PushStat(version, snap.updates, kind, snap.pause_s, build, latency, ok, reason,
                                   len(onnx_bytes), verified))

    def _trace(self, meta: Any) -> bytes:
        import onnx

        from qc_robot.export.onnx_export import export_policy

        for attempt in (1, 2):
            try:
                with tempfile.TemporaryDirectory(prefix="qc-push-") as d:
                    data = export_policy(self._acting, meta, Path(d) / "model.onnx", verify=self.verify,
                                         optimize=self.trace_only).read_bytes()  # unoptimized: names stay
                break
            except SystemError as e:  # CPython 3.11's thread-unsafe AST recursion check (see above)
                if attempt == 2:
                    raise
                log.warning("export failed (%s): once more", e)
        model = onnx.load_from_string(data)
        self._swaps = 0
        state = self._graph_state(meta)
        self._names = [i.name for i in model.graph.initializer if _state_key(i.name) in state]
        self._template = model
        return data

    def _graph_state(self, meta: Any) -> dict[str, torch.Tensor]:
        """Every tensor of the traced module(s), by the name the trace gives its initializer
        (the real-time-chunking branch traces ``ContinuedGraph``, whose tensors sit under ``inner.``)."""
        from qc_robot.export.graph import ExportGraph

        graph = ExportGraph(self._acting, meta.action_low, meta.action_high,
                            max_guidance=meta.rtc_max_guidance).eval()
        state = dict(graph.state_dict())
        state.update({f"inner.{k}": v for k, v in graph.state_dict().items()})
        return state

    def _reference(self, meta: Any) -> Any:
        from qc_robot.export.graph import ExportGraph

        return ExportGraph(self._acting, meta.action_low, meta.action_high, lean=False,
                           max_guidance=meta.rtc_max_guidance).eval()

    def _swap(self, meta: Any, verify: bool) -> bytes | None:
        """The traced graph with this snapshot's weights (checked against torch when ``verify``),
        or None to trace instead."""
        from onnx import helper, numpy_helper

        from qc_robot.export.verify import ExportParityError, verify_file

        state = self._graph_state(meta)
        model = self._template
        by_name = {i.name: i for i in model.graph.initializer}
        for name in self._names:
            arr = state[_state_key(name)].detach().cpu().numpy()
            init = by_name[name]
            if tuple(init.dims) != arr.shape:
                log.warning("initializer %s changed shape: tracing again", name)
                return None
            init.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(arr, dtype=np.float32), name))
        del model.metadata_props[:]
        helper.set_model_props(model, meta.to_props())
        data = model.SerializeToString()
        if verify:
            with tempfile.TemporaryDirectory(prefix="qc-swap-") as d:
                path = Path(d) / "model.onnx"
                path.write_bytes(data)
                ref = self._reference(meta)
                try:
                    verify_file(path, ref, self._acting, meta, 1e-4)
                except ExportParityError as e:  # a tensor the trace folded away: this graph cannot swap
                    log.warning("swapped weights fail verification (%s): tracing again", e)
                    return None
        return data


def _state_key(initializer: str) -> str:
    """``plain/flow_rest.0.weight`` → ``flow_rest.0.weight``: the joined RTC model prefixes each
    branch's initializers with its branch name."""
    return initializer.split("/", 1)[1] if "/" in initializer else initializer
