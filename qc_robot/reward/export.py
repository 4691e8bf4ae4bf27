"""Export a success detector to one self-describing, self-verified ONNX file.

The graph is :class:`qc_robot.reward.model.DetectorNet`'s forward: ``observation`` (batch, O)
float32 (the flat fields, normalized inside the graph) and one uint8 (batch, H, W, C) input per
image key (divided by 255 inside) → ``probability`` (batch,). The decision rule (threshold,
debounce), the observation spec, the task and the held-out metrics go into ``metadata_props``
(:class:`qc_robot.policies.success_detector.DetectorMetadata`).

As for the policy: the file is written under a temporary name, run in onnxruntime on the
held-out frames and on random inputs against torch, and moved into place only within
``parity_tol``; otherwise :class:`ExportParityError` and nothing is left behind.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import helper

from qc_robot.export.scrub import scrub
from qc_robot.export.verify import ExportParityError
from qc_robot.policies.success_detector import OUTPUT, DetectorMetadata
from qc_robot.reward.model import DetectorNet

VERIFY_RANDOM = 64
"""Random inputs checked besides the given frames (around the normalizer's statistics)."""


def export_detector(net: DetectorNet, meta: DetectorMetadata, out_path: str | os.PathLike[str],
                    state: np.ndarray, images: dict[str, np.ndarray], opset: int = 18,
                    parity_tol: float = 1e-5, seed: int = 0) -> tuple[Path, float]:
    """Trace ``net`` into ``out_path`` with ``meta``; check onnxruntime against torch on
    ``state`` (F, O) / ``images`` (F, H, W, C) and on random inputs. Returns (path, max |error|)."""
    net = net.cpu().eval()
    if [f.key for f in meta.image_fields] != net.image_keys or meta.obs_dim != net.state_dim:
        raise ValueError(f"metadata images {[f.key for f in meta.image_fields]} / obs_dim {meta.obs_dim} but the "
                         f"network takes {net.image_keys} / {net.state_dim}")
    model = _trace(net, meta, opset)
    helper.set_model_props(model, meta.to_props())
    scrub(model)  # no stack traces with this machine's source paths in a file that travels
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        onnx.save(model, tmp)
        err = verify_detector(tmp, net, meta, state, images, parity_tol, seed)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out, err


def _trace(net: DetectorNet, meta: DetectorMetadata, opset: int) -> onnx.ModelProto:
    """torch.onnx (dynamo) export with a dynamic batch."""
    batch = torch.export.Dim("batch")
    args: tuple[torch.Tensor, ...] = (torch.zeros(2, meta.obs_dim),)
    names = ["observation"]
    for f in meta.image_fields:
        args += (torch.zeros(2, *f.shape, dtype=torch.uint8),)
        names.append(f.key)
    # positional, the *images varargs as one tuple (torch.export's structure of the arguments)
    shapes: Any = ({0: batch}, tuple({0: batch} for _ in meta.image_fields)) if meta.image_fields \
        else {"observation": {0: batch}}
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(net, args, dynamo=True, opset_version=opset, input_names=names,
                                        output_names=[OUTPUT], dynamic_shapes=shapes, verbose=False)
    finally:
        quiet.setLevel(level)
    assert program is not None
    return program.model_proto


def verify_detector(path: str | os.PathLike[str], net: DetectorNet, meta: DetectorMetadata, state: np.ndarray,
                    images: dict[str, np.ndarray], tol: float, seed: int = 0) -> float:
    """Max |onnxruntime − torch| probability over the given frames and random inputs;
    :class:`ExportParityError` beyond ``tol`` or for a file that does not run as described."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    try:
        sess = ort.InferenceSession(os.fspath(path), opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types
        raise ExportParityError(f"onnxruntime cannot load the exported detector: {e}") from e
    gen = torch.Generator().manual_seed(seed)
    mean, std = net.normalizer.mean, net.normalizer.std
    rand_state = (mean + std * torch.randn(VERIFY_RANDOM, meta.obs_dim, generator=gen)).numpy()  # (R, O)
    rand_images = {f.key: torch.randint(0, 256, (VERIFY_RANDOM, *f.shape), generator=gen, dtype=torch.uint8).numpy()
                   for f in meta.image_fields}  # (R, H, W, C) each
    err = 0.0
    for s, imgs in ((np.asarray(state, np.float32), images), (rand_state.astype(np.float32), rand_images)):
        for lo in range(0, len(s), 256):
            feed = {"observation": s[lo:lo + 256], **{k: imgs[k][lo:lo + 256] for k in net.image_keys}}
            got = sess.run([OUTPUT], feed)[0]
            with torch.no_grad():
                want = net(torch.from_numpy(feed["observation"]),
                           *(torch.from_numpy(feed[k]) for k in net.image_keys)).numpy()
            if got.shape != want.shape or got.dtype != np.float32:
                raise ExportParityError(f"the exported detector returned {got.dtype} {got.shape}, "
                                        f"expected float32 {want.shape}")
            err = max(err, float(np.max(np.abs(got - want))) if len(got) else 0.0)
    if not err <= tol:
        raise ExportParityError(f"onnxruntime differs from torch by {err:.3g} (> parity_tol {tol:g}) in P(success)")
    return err
