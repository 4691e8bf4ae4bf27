"""Serve an exported ``model.onnx`` with onnxruntime alone (numpy + onnxruntime; no torch).

The file describes itself (:mod:`qc_robot.policies.onnx_metadata`): observation keys, shapes and order,
chunk length, control rate and action limits. The graph already returns actions in robot units
clipped to the limits, so this module only checks observations, concatenates them in spec order
and times the call.

Real-time chunking: a file exported with ``rtc`` (metadata ``rtc: true``) continues a previous
chunk when given a :class:`qc_robot.policies.base.ChunkGuide` (``predict(obs, guide)``): the first
``guide.frozen`` actions come back unchanged and the rest is guided toward the previous plan.
Files exported before RTC (no such inputs) still load and serve; they ignore the guide
(``supports_guidance`` is False, the chunk is the plain one and ``frozen`` 0).

Observation checks: every key of the spec must be present with exactly its shape, a real numeric
dtype (cast to float32) and finite values; otherwise ValueError naming the key. Keys the spec
does not name are ignored, so a driver may send more than a policy uses (images, timestamps).

Image policies (metadata format_version 2): each image key is its own uint8 (1, H, W, C) graph
input, fed as the bytes arrived (the graph divides by 255). An image must be uint8 with exactly
the spec's (H, W, C): a float image or a transposed one is refused, not cast.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any

import numpy as np
import onnxruntime as ort

from qc_robot.policies.base import ChunkGuide, ChunkResult, PolicySpec
from qc_robot.policies.onnx_metadata import MetadataError, PolicyMetadata

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


class OnnxPolicy:
    """A :class:`qc_robot.policies.base.Policy` backed by an onnxruntime session.

    ``providers``: 'auto' (CUDA when onnxruntime-gpu sees a GPU, else CPU), 'cpu' or 'cuda'.
    ``threads``: intra-op threads (1 is fastest per call on a loaded robot PC; see
    docs/benchmarks_inference.md). ``warmup``: calls made at load so the first real call is not
    slower (allocations, CUDA kernels). ``seed``: of the sampling noise (None: OS entropy).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        providers: str = "auto",
        threads: int = 1,
        warmup: int = 10,
        version: str | None = None,
        seed: int | None = None,
    ) -> None:
        self.path = os.fspath(path)
        # The sampling noise comes from this generator (OS entropy unless ``seed``), not from the
        # graph's own RandomNormal: onnxruntime restarts that at the same seed in every session
        # one process creates, so a server swapping in pushed policies explored with one noise
        # draw repeated from each new session (every chunk, when pushes come every chunk).
        self._rng = np.random.default_rng(seed)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # The optional `noise` input is an overridable initializer by design, about which
        # onnxruntime warns at every load; keep errors only.
        opts.log_severity_level = 3
        chosen = _providers(providers)
        self.session = ort.InferenceSession(self.path, opts, providers=chosen)
        self.provider: str = self.session.get_providers()[0]
        if providers == "cuda" and self.provider != CUDA:
            raise RuntimeError(f"providers='cuda' but onnxruntime fell back to {self.provider}")
        props = dict(self.session.get_modelmeta().custom_metadata_map)
        try:
            self.meta = PolicyMetadata.from_props(props)
        except MetadataError as e:
            raise MetadataError(f"{self.path}: {e}") from e
        self.spec: PolicySpec = self.meta.to_spec(version)
        self._offsets = np.cumsum([0] + [math.prod(f.shape) for f in self.meta.flat_fields])
        names = {i.name for i in self.session.get_inputs()}
        names |= {i.name for i in self.session.get_overridable_initializers()}
        if "observation" not in names:
            raise MetadataError(f"{self.path}: graph has no 'observation' input")
        missing = [f.key for f in self.meta.image_fields if f.key not in names]
        if missing:
            raise MetadataError(f"{self.path}: the metadata names image inputs {missing} the graph lacks")
        self.image_keys = [f.key for f in self.meta.image_fields]
        """Image inputs (uint8 HWC, one graph input each); empty for state-only policies."""
        self._has_noise = "noise" in names
        self.supports_guidance = bool(self.meta.rtc) and {"prev_actions", "prev_delay", "prev_len"} <= names
        """True when the file takes a previous chunk (real-time chunking)."""
        zeros = {"observation": np.zeros((1, self.meta.obs_dim), np.float32),
                 **{f.key: np.zeros((1, *f.shape), np.uint8) for f in self.meta.image_fields}}
        for _ in range(warmup):
            self.session.run(["actions"], zeros)

    def predict(self, obs: dict[str, np.ndarray], guide: ChunkGuide | None = None) -> ChunkResult:
        """One chunk (H, A) float32 in robot units for one unbatched observation dict.

        With ``guide`` (and a file that supports it) the chunk continues the previous one.
        """
        flat = self.flatten(obs)[None]  # (1, O)
        feed: dict[str, np.ndarray] = {"observation": flat, **self.image_feed(obs)}
        if self._has_noise:
            feed["noise"] = self._rng.standard_normal((1, *self.meta.noise_shape), dtype=np.float32)
        frozen = 0
        if guide is not None and self.supports_guidance and guide.overlap > 0:
            feed.update(self.guide_feed(guide))
            frozen = guide.frozen
        t0 = time.perf_counter()
        actions = self.session.run(["actions"], feed)[0]  # (1, H, A)
        infer_s = time.perf_counter() - t0
        return ChunkResult(actions=actions[0], infer_s=infer_s, frozen=frozen)

    def guide_feed(self, guide: ChunkGuide) -> dict[str, np.ndarray]:
        """The RTC inputs for one guide (batch of one); ValueError on a wrong shape or value."""
        prev = np.asarray(guide.actions, np.float32)
        want = (self.meta.chunk_len, self.meta.action_dim)
        if prev.shape != want:
            raise ValueError(f"guide actions must be {want}, got {prev.shape}")
        if not np.all(np.isfinite(prev)):
            raise ValueError("guide actions contain NaN/inf")
        # the frozen prefix is returned as given: keep it inside the limits the graph promises
        prev = np.clip(prev, self.meta.action_low, self.meta.action_high)
        overlap = min(max(int(guide.overlap), 0), self.meta.chunk_len)
        return {"prev_actions": prev[None], "prev_delay": np.array([max(int(guide.delay), 0)], np.int64),
                "prev_len": np.array([overlap], np.int64)}

    def flatten(self, obs: dict[str, Any]) -> np.ndarray:
        """Check ``obs`` against the spec and concatenate it in spec order: (O,) float32."""
        if not isinstance(obs, dict):
            raise ValueError(f"observation must be a dict of arrays, got {type(obs).__name__}")
        parts = [np.zeros(0, np.float32)]  # an images-only policy has an empty flat observation
        for f in self.meta.flat_fields:
            if f.key not in obs:
                raise ValueError(
                    f"observation {f.key!r} missing (expected keys {[g.key for g in self.meta.obs_fields]})"
                )
            arr = np.asarray(obs[f.key])
            if arr.shape != f.shape:
                raise ValueError(f"observation {f.key!r} has shape {arr.shape}, expected {f.shape}")
            if arr.dtype.kind not in "biuf":
                raise ValueError(
                    f"observation {f.key!r} has dtype {arr.dtype}, not castable to float32"
                )
            arr = arr.astype(np.float32, copy=False)
            if not np.all(np.isfinite(arr)):
                raise ValueError(f"observation {f.key!r} has non-finite values (NaN or inf)")
            parts.append(arr.reshape(-1))
        return np.concatenate(parts)

    def image_feed(self, obs: dict[str, Any]) -> dict[str, np.ndarray]:
        """The image inputs of one observation: key → (1, H, W, C) uint8, checked, not cast."""
        feed: dict[str, np.ndarray] = {}
        for f in self.meta.image_fields:
            if f.key not in obs:
                raise ValueError(f"observation {f.key!r} (an image) missing (expected keys "
                                 f"{[g.key for g in self.meta.obs_fields]})")
            arr = np.asarray(obs[f.key])
            if arr.dtype != np.uint8:
                raise ValueError(f"image {f.key!r} has dtype {arr.dtype}, expected uint8 (0-255 bytes, HWC RGB)")
            if arr.shape != f.shape:
                raise ValueError(f"image {f.key!r} has shape {arr.shape}, expected {f.shape} (H, W, C)")
            feed[f.key] = np.ascontiguousarray(arr)[None]
        return feed

    def predict_batch(self, obs_flat: np.ndarray, noise: np.ndarray | None = None,
                      images: dict[str, np.ndarray] | None = None) -> np.ndarray:
        """Actions (B, H, A) for flat observations (B, O); fixed ``noise`` makes it deterministic.

        ``noise`` is (B, N, D) for best-of-N and (B, D) for fql (D = H·A); without it the graph
        draws its own. ``images``: key → (B, H, W, C) uint8 for image policies. For tests and
        benchmarks: no per-key checks here beyond shapes.
        """
        obs_flat = np.ascontiguousarray(obs_flat, np.float32)
        if obs_flat.ndim != 2 or obs_flat.shape[1] != self.meta.obs_dim:
            raise ValueError(f"obs_flat must be (B, {self.meta.obs_dim}), got {obs_flat.shape}")
        feed = {"observation": obs_flat}
        for f in self.meta.image_fields:
            img = None if images is None else images.get(f.key)
            if img is None or img.dtype != np.uint8 or img.shape != (obs_flat.shape[0], *f.shape):
                raise ValueError(f"images[{f.key!r}] must be uint8 {(obs_flat.shape[0], *f.shape)}")
            feed[f.key] = np.ascontiguousarray(img)
        if noise is not None:
            if not self._has_noise:
                raise ValueError("this file was exported without a noise input (noise_input=False)")
            want = (obs_flat.shape[0], *self.meta.noise_shape)
            noise = np.ascontiguousarray(noise, np.float32)
            if noise.shape != want:
                raise ValueError(f"noise must be {want}, got {noise.shape}")
            feed["noise"] = noise
        return self.session.run(["actions"], feed)[0]


def _providers(which: str) -> list[str]:
    available = ort.get_available_providers()
    if which == "cpu":
        return [CPU]
    if which == "cuda":
        if CUDA not in available:
            raise RuntimeError(
                f"providers='cuda' but onnxruntime offers only {available} (install onnxruntime-gpu)"
            )
        return [CUDA, CPU]
    if which == "auto":
        return [CUDA, CPU] if CUDA in available else [CPU]
    raise ValueError(f"providers must be 'auto', 'cpu' or 'cuda', got {which!r}")
