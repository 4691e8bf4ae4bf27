"""Parity check of an exported file: onnxruntime against torch on fixed inputs."""

from __future__ import annotations

import os
from typing import Any, cast

import numpy as np
import torch

from qc_robot.agent.acting import ActingPolicy, euler_sample
from qc_robot.agent.networks import aggregate_q
from qc_robot.export.graph import ExportGraph
from qc_robot.policies.onnx_metadata import PolicyMetadata

VERIFY_BATCH = 4


class ExportParityError(RuntimeError):
    """onnxruntime's output differs from torch's, or the file does not run as specified."""


def verify_file(
    path: str | os.PathLike[str],
    ref: ExportGraph | None,
    acting: ActingPolicy,
    meta: PolicyMetadata,
    tol: float,
    seed: int = 0,
) -> float:
    """Run ``path`` with onnxruntime; returns the max abs error against ``ref`` (0 without ref).

    With ``ref`` the file must take a ``noise`` input; outputs are compared on fixed noise.
    Without noise the file must draw its own: the chunks must be finite and within limits.
    Raises :class:`ExportParityError`.
    """
    import onnxruntime as ort  # lazy: exporting with verify=False must not need onnxruntime

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3  # the optional noise input is an overridable initializer by design
    try:
        sess = ort.InferenceSession(os.fspath(path), opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types
        raise ExportParityError(f"onnxruntime cannot load the exported graph: {e}") from e
    gen = torch.Generator().manual_seed(seed)
    norm = acting.flow.normalizer if acting.encoder is None else acting.encoder.normalizer
    mean, std = cast(torch.Tensor, norm.mean), cast(torch.Tensor, norm.std)
    obs = mean + std * torch.randn(VERIFY_BATCH, meta.obs_dim, generator=gen)  # (B, O)
    obs_np = obs.numpy().astype(np.float32)
    images = [torch.randint(0, 256, (VERIFY_BATCH, *f.shape), generator=gen, dtype=torch.uint8)
              for f in meta.image_fields]  # (B, H, W, C) each
    feed = {"observation": obs_np, **{f.key: i.numpy() for f, i in zip(meta.image_fields, images, strict=True)}}
    with torch.no_grad():
        feat = acting.features(obs, images)  # (B, F): what the networks see
    err = 0.0
    if ref is not None:
        noise = torch.randn(VERIFY_BATCH, *meta.noise_shape, generator=gen)
        got = sess.run(["actions"], {**feed, "noise": noise.numpy()})[0]
        with torch.no_grad():
            want = ref(obs, noise, *images).numpy()
        row_err = np.abs(got - want).reshape(VERIFY_BATCH, -1).max(axis=1)  # (B,)
        bad = [b for b in range(VERIFY_BATCH) if row_err[b] > tol]
        bad = [b for b in bad if not _is_tie(ref, acting, feat[b], noise[b], got[b], tol)]
        err = float(row_err.max())
        if bad:
            raise ExportParityError(
                f"onnxruntime differs from torch by {err:.3g} (> parity_tol {tol:g}) on fixed noise, "
                f"rows {bad}; the exported graph does not compute the acting rule"
            )
        if meta.rtc:
            err = max(err, _verify_rtc(sess, ref, acting, meta, tol, obs, images, feat, gen))
    _check_sampling(sess, feed, meta)
    return err


def rtc_probe(meta: PolicyMetadata, chunks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Previous-chunk inputs that cover the cases: row b acts as if b steps of ``chunks[b]`` ran
    (aligned remainder, zero padded), freezing ``b`` steps; the last row has no previous chunk."""
    b, h = chunks.shape[0], meta.chunk_len
    prev = np.zeros_like(chunks)  # (B, H, A)
    delay = np.zeros(b, np.int64)
    length = np.zeros(b, np.int64)
    for i in range(b - 1):
        s = min(i, h - 1)
        prev[i, : h - s] = chunks[i, s:]
        delay[i], length[i] = min(i, h - s), h - s
    return prev, delay, length


def _verify_rtc(sess: Any, ref: ExportGraph, acting: ActingPolicy, meta: PolicyMetadata, tol: float,
                obs: torch.Tensor, images: list[torch.Tensor], feat: torch.Tensor, gen: torch.Generator) -> float:
    """The continued rule (``actions`` fed a previous chunk) against torch, and its frozen prefix
    bit-equal to ``prev_actions``."""
    obs_np = obs.numpy().astype(np.float32)
    base = {"observation": obs_np, **{f.key: i.numpy() for f, i in zip(meta.image_fields, images, strict=True)}}
    first = sess.run(["actions"], {**base,
                                   "noise": torch.randn(VERIFY_BATCH, *meta.noise_shape, generator=gen).numpy()})[0]
    prev, delay, length = rtc_probe(meta, first)
    noise = torch.randn(VERIFY_BATCH, *meta.noise_shape, generator=gen)
    feed = {**base, "noise": noise.numpy(), "prev_actions": prev, "prev_delay": delay, "prev_len": length}
    got = sess.run(["actions"], feed)[0]
    args = (torch.from_numpy(prev), torch.from_numpy(delay), torch.from_numpy(length))
    with torch.no_grad():
        want = ref.continued(obs, noise, *args, *images).numpy()
    for b in range(VERIFY_BATCH):
        k = int(min(delay[b], length[b]))
        if not np.array_equal(got[b, :k], prev[b, :k]):
            raise ExportParityError(f"RTC row {b}: the {k} frozen steps differ from prev_actions")
    row_err = np.abs(got - want).reshape(VERIFY_BATCH, -1).max(axis=1)  # (B,)
    bad = [b for b in range(VERIFY_BATCH) if row_err[b] > tol]
    bad = [b for b in bad if not _is_rtc_tie(ref, acting, obs[b], [i[b] for i in images], feat[b], noise[b],
                                             [a[b] for a in args], got[b], tol)]
    if bad:
        raise ExportParityError(
            f"the RTC branch differs from torch by {float(row_err.max()):.3g} (> parity_tol {tol:g}) on fixed "
            f"noise, rows {bad}; the exported graph does not compute the RTC rule"
        )
    return float(row_err.max())


def _is_rtc_tie(ref: ExportGraph, acting: ActingPolicy, obs: torch.Tensor, images: list[torch.Tensor],
                feat: torch.Tensor, noise: torch.Tensor, prev: list[torch.Tensor], got: np.ndarray,
                tol: float) -> bool:
    """As :func:`_is_tie`, for the guided candidates of the RTC branch (``feat``: the row's
    features, what the critic ranks on)."""
    if acting.actor_type != "best_of_n" or acting.critic is None:
        return False
    n = noise.shape[0]
    with torch.no_grad():
        obs_rep = feat.unsqueeze(0).expand(n, -1)  # (N, F)
        one = [p.unsqueeze(0) for p in prev] + [i.unsqueeze(0) for i in images]  # batch of one
        # best-of-1 on sample i returns that guided sample itself: (N, H, A) candidates
        cand = torch.cat([ref.continued(obs.unsqueeze(0), noise[i].reshape(1, 1, -1), *one) for i in range(n)])
        safe = torch.where(ref.scale > 0, ref.scale, torch.ones_like(ref.scale))
        x = ((cand - ref.offset) / safe).reshape(n, -1)  # (N, D) agent space
        q = aggregate_q(acting.critic(obs_rep, x), acting.q_agg)  # (N,)
    match = np.abs(cand.numpy() - got[None]).reshape(n, -1).max(axis=1) <= tol  # (N,)
    q_best = float(q.max())
    close = (q_best - q).numpy() <= 1e-4 * (1.0 + abs(q_best))
    return bool(np.any(match & close))


def _is_tie(
    ref: ExportGraph,
    acting: ActingPolicy,
    obs: torch.Tensor,
    noise: torch.Tensor,
    got: np.ndarray,
    tol: float,
) -> bool:
    """Best-of-N only: did onnxruntime pick another sample whose Q ties the best within rounding?"""
    if acting.actor_type != "best_of_n" or acting.critic is None:
        return False
    with torch.no_grad():
        obs_rep = obs.unsqueeze(0).expand(noise.shape[0], -1)  # (N, O)
        samples = euler_sample(acting.flow, obs_rep, noise, acting.flow_steps)  # (N, D)
        q = aggregate_q(acting.critic(obs_rep, samples), acting.q_agg)  # (N,)
        a = samples.reshape(-1, acting.chunk_len, acting.action_dim) * ref.scale + ref.offset
        cand = torch.minimum(torch.maximum(a, ref.low), ref.high).numpy()  # (N, H, A)
    match = np.abs(cand - got[None]).reshape(len(cand), -1).max(axis=1) <= tol  # (N,)
    q_best = float(q.max())
    close = (q_best - q).numpy() <= 1e-4 * (1.0 + abs(q_best))
    return bool(np.any(match & close))


def _check_sampling(sess: Any, feed: dict[str, np.ndarray], meta: PolicyMetadata) -> None:
    obs = feed["observation"]
    out = sess.run(["actions"], feed)[0]
    shape = (obs.shape[0], meta.chunk_len, meta.action_dim)
    if out.shape != shape or out.dtype != np.float32:
        raise ExportParityError(
            f"in-graph noise path returned {out.dtype} {out.shape}, expected float32 {shape}"
        )
    if not np.all(np.isfinite(out)):
        raise ExportParityError("in-graph noise path returned non-finite actions")
    if np.any(out < meta.action_low) or np.any(out > meta.action_high):
        raise ExportParityError(
            "in-graph noise path returned actions outside [action_low, action_high]"
        )
    if meta.rtc:  # the RTC branch with in-graph noise
        prev, delay, length = rtc_probe(meta, out)
        cont = sess.run(["actions"], {**feed, "prev_actions": prev, "prev_delay": delay, "prev_len": length})[0]
        if cont.shape != shape or not np.all(np.isfinite(cont)):
            raise ExportParityError(f"the RTC branch returned {cont.shape} or non-finite actions, expected {shape}")
        if np.any(cont < meta.action_low) or np.any(cont > meta.action_high):
            raise ExportParityError("the RTC branch returned actions outside [action_low, action_high]")
