"""Export an acting policy to one self-describing, self-verified ``model.onnx``.

The graph holds the whole acting rule (see :mod:`qc_robot.export.graph`): observation
normalization, every Euler step, best-of-N scoring and argmax (or the one-step actor), then the
map from agent space [-1, 1] to robot units and the clip to [low, high]. Metadata
(:class:`qc_robot.policies.onnx_metadata.PolicyMetadata`) goes into ``metadata_props``.

Noise design: one file, noise optional.
    Inputs are ``observation`` (batch, O) and ``noise`` ((batch, N, D) for best-of-N,
    (batch, D) for fql). ``noise`` is an ONNX *overridable initializer*: a graph input that also
    has an initializer (IR >= 4), here an empty (0, ...) tensor. Feed only ``observation`` and the
    graph draws standard-normal noise itself (an ``If`` on ``Size(noise) == 0`` runs
    RandomNormalLike only then); feed ``noise`` and the output is a deterministic function of
    the inputs (parity tests, replay, future real-time-chunking guidance). So serving, tests and
    guidance use the very same file, and the parity check runs on the file that ships.
    ``noise_input=False`` removes the ``noise`` input altogether (a file that can only sample);
    it is verified through the optional-noise model it is cut from.

Images (issue 12): an image policy's graph also takes one uint8 (batch, H, W, C) input per image
key, named by the key; the encoder inside the graph divides by 255, and ``observation`` holds only
the flat (non-image) fields. The metadata (format_version 2) lists them in ``image_spec``.

Real-time chunking (``rtc=True``, the default): three more optional inputs, ``prev_actions``
(batch, H, A) float32 in robot units, aligned to the new chunk's steps, ``prev_delay`` (batch,)
int64 (steps to freeze) and ``prev_len`` (batch,) int64 (steps the previous chunk still covers),
overridable initializers whose defaults mean "no previous chunk". The plain rule and the
continued rule (frozen prefix + guided inpainting, :mod:`qc_robot.agent.rtc`) are traced
separately and joined by an ``If`` on ``max(prev_len) > 0``: onnxruntime runs only the branch
taken, so a runtime that knows nothing of RTC (feeds ``observation``, fetches ``actions``) gets
the plain rule at the plain cost, as from a file exported before. The metadata says
``rtc: true`` and the guidance bound ``rtc_max_guidance``.

Export checks itself: the file is written next to ``out_path`` under a temporary name, run with
onnxruntime on fixed noise and compared with torch; only a file within ``parity_tol`` is moved
into place, otherwise :class:`ExportParityError` is raised and nothing is left behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

import qc_robot
from qc_robot.agent.acting import ActingPolicy
from qc_robot.export.graph import ContinuedGraph, ExportGraph, obs_dim_of
from qc_robot.export.scrub import scrub
from qc_robot.export.verify import ExportParityError, verify_file
from qc_robot.policies.onnx_metadata import PolicyMetadata

__all__ = ["ExportParityError", "build_metadata", "export_policy", "run_export"]

log = logging.getLogger(__name__)


def export_policy(
    acting: ActingPolicy,
    meta: PolicyMetadata,
    out_path: str | os.PathLike[str],
    opset: int = 18,
    noise_input: bool = True,
    verify: bool = True,
    parity_tol: float = 1e-4,
    lean: bool = True,
    rtc: bool | None = None,
    optimize: bool = True,
) -> Path:
    """Trace ``acting`` into ``out_path`` with ``meta`` embedded; returns the path.

    ``lean=False`` exports the acting rule as written (kept for benchmarks and as a fallback);
    the lean graph precomputes what is constant across samples and steps. ``rtc`` (default: as
    ``meta.rtc`` says) adds the real-time-chunking inputs. ``optimize=False`` skips the exporter's graph optimizer (onnxruntime still optimizes at load): every tensor of
    the graph module stays an initializer under its own name, so new weights can be written into
    the file without tracing again (``qc_robot.finetune.push``).
    Raises ValueError when ``meta`` disagrees with ``acting`` and :class:`ExportParityError`
    when onnxruntime and torch disagree by more than ``parity_tol``.
    """
    meta = dataclasses.replace(meta, noise_input=noise_input, rtc=meta.rtc if rtc is None else rtc)
    _check_meta(acting, meta)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    acting = acting.eval()
    graph = ExportGraph(acting, meta.action_low, meta.action_high, lean=lean,
                        max_guidance=meta.rtc_max_guidance).eval()
    model = _trace(graph, meta, opset, rtc=False, optimize=optimize)
    if meta.rtc:
        model = _join_rtc(model, _trace(ContinuedGraph(graph), meta, opset, rtc=True, optimize=optimize), meta)
    full = _add_noise_source(model, meta.noise_shape, optional=True)
    shipped = full if noise_input else _add_noise_source(model, meta.noise_shape, optional=False)
    for m in (full, shipped):
        helper.set_model_props(m, meta.to_props())
        scrub(m)  # no stack traces with this machine's source paths in a file that travels

    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp_full = out.with_name(f".{out.name}.full-tmp-{os.getpid()}")
    try:
        onnx.save(shipped, tmp)
        if verify:
            ref = ExportGraph(acting, meta.action_low, meta.action_high, lean=False,
                              max_guidance=meta.rtc_max_guidance).eval()
            if noise_input:
                verify_file(tmp, ref, acting, meta, parity_tol)
            else:
                onnx.save(full, tmp_full)
                verify_file(tmp_full, ref, acting, meta, parity_tol)
                verify_file(tmp, None, acting, meta, parity_tol)  # sampling only: runs, in limits
        os.replace(tmp, out)
    finally:
        for p in (tmp, tmp_full):
            p.unlink(missing_ok=True)
    return out


def _check_meta(acting: ActingPolicy, meta: PolicyMetadata) -> None:
    meta.validate()
    obs_dim = obs_dim_of(acting)
    expect: dict[str, Any] = {
        "actor_type": acting.actor_type,
        "chunk_len": acting.chunk_len,
        "action_dim": acting.action_dim,
        "obs_dim": obs_dim,
    }
    if acting.actor_type == "best_of_n":
        expect.update(flow_steps=acting.flow_steps, q_agg=acting.q_agg)
    for key, value in expect.items():
        if getattr(meta, key) != value:
            raise ValueError(f"metadata {key}={getattr(meta, key)!r} but the policy has {value!r}")
    images = {f.key: tuple(f.shape) for f in meta.image_fields}
    wanted = {} if acting.encoder is None else dict(acting.encoder.image_shapes)
    if list(images) != list(wanted) or images != wanted:
        raise ValueError(f"metadata images {images} but the policy's encoder takes {wanted}")


def _trace(graph: torch.nn.Module, meta: PolicyMetadata, opset: int, rtc: bool,
           optimize: bool = True) -> onnx.ModelProto:
    """torch.onnx (dynamo) export with a dynamic batch; returns the ModelProto."""
    obs = torch.zeros(2, meta.obs_dim)
    noise = torch.zeros(2, *meta.noise_shape)
    batch = torch.export.Dim("batch")
    args: tuple[torch.Tensor, ...] = (obs, noise)
    inputs, outputs = ["observation", "noise"], ["actions"]
    shapes: dict[str, Any] = {"observation": {0: batch}, "noise": {0: batch}}
    if rtc:
        args += (torch.zeros(2, meta.chunk_len, meta.action_dim), torch.ones(2, dtype=torch.int64),
                 torch.full((2,), meta.chunk_len, dtype=torch.int64))
        inputs += list(RTC_INPUTS)
        shapes.update({name: {0: batch} for name in RTC_INPUTS})
    for f in meta.image_fields:  # after the others: ExportGraph takes them as *images
        args += (torch.zeros(2, *f.shape, dtype=torch.uint8),)
        inputs.append(f.key)
        shapes[f.key] = {0: batch}
    if meta.image_fields:  # positional, with the *images varargs as one tuple (torch.export's structure)
        n_img = len(meta.image_fields)
        shapes = (*(shapes[n] for n in inputs[:-n_img]), tuple(shapes[n] for n in inputs[-n_img:]))  # type: ignore[assignment]
    # the dynamo exporter reports progress on stdout and warns about optional packages: quiet
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                graph,
                args,
                dynamo=True,
                opset_version=opset,
                input_names=inputs,
                output_names=outputs,
                dynamic_shapes=shapes,
                verbose=False,
                optimize=optimize,
            )
    finally:
        quiet.setLevel(level)
    assert program is not None
    return program.model_proto


RTC_INPUTS = ("prev_actions", "prev_delay", "prev_len")


def _join_rtc(plain: onnx.ModelProto, cont: onnx.ModelProto, meta: PolicyMetadata) -> onnx.ModelProto:
    """One model: ``If max(prev_len) > 0`` then the continued rule else the plain one.

    Both traces become branches (their own names prefixed, inputs shared from the outer scope,
    initializers kept outside); the RTC inputs get "no previous chunk" defaults.
    """
    from onnx import compose

    p = compose.add_prefix(plain, "plain/", rename_inputs=False)
    c = compose.add_prefix(cont, "rtc/", rename_inputs=False)
    h, a = meta.chunk_len, meta.action_dim

    def branch(m: onnx.ModelProto, name: str) -> onnx.GraphProto:
        out = m.graph.output[0].name
        return helper.make_graph(list(m.graph.node), name, [],
                                 [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)])

    model = onnx.ModelProto.FromString(plain.SerializeToString())  # opsets, IR version, producer
    g = model.graph
    del g.node[:], g.initializer[:], g.value_info[:], g.output[:]
    g.initializer.extend(list(p.graph.initializer) + list(c.graph.initializer))
    g.initializer.extend([
        helper.make_tensor("prev_actions", TensorProto.FLOAT, [1, h, a], [0.0] * (h * a)),
        helper.make_tensor("prev_delay", TensorProto.INT64, [1], [0]),
        helper.make_tensor("prev_len", TensorProto.INT64, [1], [0]),
        helper.make_tensor("rtc_zero", TensorProto.INT64, [], [0]),
    ])
    known = {i.name for i in g.input}
    for inp in cont.graph.input:
        if inp.name not in known:  # a fed value keeps its own batch; the default has one row
            new = g.input.add()
            new.CopyFrom(inp)
            new.type.tensor_type.shape.dim[0].dim_param = f"{inp.name}_batch"
    g.node.extend([
        helper.make_node("ReduceMax", ["prev_len"], ["rtc_len_max"], keepdims=0),
        helper.make_node("Greater", ["rtc_len_max", "rtc_zero"], ["rtc_on"]),
        helper.make_node("If", ["rtc_on"], ["actions"], then_branch=branch(c, "continued"),
                         else_branch=branch(p, "plain")),
    ])
    g.output.extend([helper.make_tensor_value_info("actions", TensorProto.FLOAT, ["batch", h, a])])
    return model


def _add_noise_source(
    model: onnx.ModelProto, noise_shape: tuple[int, ...], optional: bool
) -> onnx.ModelProto:
    """Rewire the traced ``noise`` input: optional (drawn when empty) or always drawn in-graph."""
    model = onnx.ModelProto.FromString(model.SerializeToString())  # work on a copy
    g = model.graph
    tail = list(noise_shape)
    _rename_uses(g, "noise", "noise_used")  # every consumer now reads the resolved noise

    def draw_nodes(out: str) -> list[onnx.NodeProto]:
        return [
            helper.make_node("Shape", ["observation"], ["ns_batch"], start=0, end=1),
            helper.make_node("Concat", ["ns_batch", "ns_tail"], ["ns_shape"], axis=0),
            helper.make_node(
                "ConstantOfShape",
                ["ns_shape"],
                ["ns_zeros"],
                value=helper.make_tensor("v", TensorProto.FLOAT, [1], [0.0]),
            ),
            helper.make_node("RandomNormalLike", ["ns_zeros"], [out], mean=0.0, scale=1.0),
        ]

    tail_init = helper.make_tensor("ns_tail", TensorProto.INT64, [len(tail)], tail)
    given = [i for i in g.input if i.name == "noise"][0]
    if optional:
        # empty default → "not fed"; the batch dim gets its own name so a fed noise is not tied
        # to the observation's symbolic batch by name only
        given.type.tensor_type.shape.dim[0].dim_param = "noise_batch"
        g.initializer.append(helper.make_tensor("noise", TensorProto.FLOAT, [0, *tail], []))
        draw = helper.make_graph(
            draw_nodes("ns_drawn"),
            "draw_noise",
            [],
            [helper.make_tensor_value_info("ns_drawn", TensorProto.FLOAT, None)],
        )
        keep = helper.make_graph(
            [helper.make_node("Identity", ["noise"], ["ns_given"])],
            "given_noise",
            [],
            [helper.make_tensor_value_info("ns_given", TensorProto.FLOAT, None)],
        )
        head = [
            helper.make_node("Size", ["noise"], ["ns_size"]),
            helper.make_node("Equal", ["ns_size", "ns_zero"], ["ns_empty"]),
            helper.make_node(
                "If", ["ns_empty"], ["noise_used"], then_branch=draw, else_branch=keep
            ),
        ]
        g.initializer.append(helper.make_tensor("ns_zero", TensorProto.INT64, [], [0]))
    else:
        g.input.remove(given)
        head = draw_nodes("noise_used")
    g.initializer.append(tail_init)
    nodes = head + list(g.node)
    del g.node[:]
    g.node.extend(nodes)
    model.ir_version = max(model.ir_version, 4)  # overridable initializers need IR >= 4
    onnx.checker.check_model(model)
    return model


def _rename_uses(g: onnx.GraphProto, old: str, new: str) -> None:
    """Make every node reading ``old`` read ``new``, inside ``If`` branches too."""
    for n in g.node:
        n.input[:] = [new if x == old else x for x in n.input]
        for attr in n.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                _rename_uses(attr.g, old, new)


def build_metadata(
    acting: ActingPolicy,
    obs_fields: list[Any],
    action_low: np.ndarray,
    action_high: np.ndarray,
    control_hz: float,
    num_samples: int,
    train_step: int = 0,
    config_hash: str = "",
    rtc: bool = True,
    frame_stack: int = 1,
) -> PolicyMetadata:
    """Metadata for ``acting`` with the versions of this process filled in (``rtc``: the file
    will take a previous chunk, the default for new exports; ``frame_stack``: frames per image
    input, for image policies)."""
    return PolicyMetadata(
        obs_fields=list(obs_fields),
        action_dim=acting.action_dim,
        chunk_len=acting.chunk_len,
        control_hz=float(control_hz),
        action_low=np.asarray(action_low, np.float32),
        action_high=np.asarray(action_high, np.float32),
        actor_type=acting.actor_type,
        num_samples=num_samples if acting.actor_type == "best_of_n" else 1,
        flow_steps=acting.flow_steps,
        q_agg=acting.q_agg,
        train_step=int(train_step),
        config_hash=config_hash,
        rtc=rtc,
        frame_stack=int(frame_stack),
        code_version=qc_robot.__version__,
        torch_version=torch.__version__,
    )


def run_export(cfg: Any) -> int:
    """CLI ``qc-robot export``: checkpoint → verified model.onnx. Returns an exit code."""
    from qc_robot.train.checkpoint import load_checkpoint  # lazy: the learner side is heavy

    ckpt = load_checkpoint(cfg.checkpoint, device="cpu")  # tracing and verification run on CPU
    acting = ckpt.agent.acting_policy()
    control_hz = cfg.control_hz if cfg.control_hz > 0 else ckpt.control_hz
    meta = build_metadata(
        acting,
        ckpt.obs_fields,
        ckpt.action_low,
        ckpt.action_high,
        control_hz,
        num_samples=ckpt.agent.cfg.num_samples,
        train_step=ckpt.step,
        config_hash=ckpt.config_hash,
        frame_stack=ckpt.agent.cfg.vision.frame_stack,
    )
    meta.extra["task"] = ckpt.config.env.name  # served as welcome.metadata.task: drivers show it
    path = export_policy(
        acting, meta, cfg.out, opset=cfg.opset, verify=cfg.verify, parity_tol=cfg.parity_tol
    )
    print(
        f"exported {meta.actor_type} policy (step {meta.train_step}, H={meta.chunk_len}, "
        f"A={meta.action_dim}, obs_dim={meta.obs_dim}"
        + "".join(f", image {f.key} {'x'.join(map(str, f.shape))} uint8" for f in meta.image_fields)
        + f") to {path}"
        + (f"; onnxruntime matches torch within {cfg.parity_tol:g}" if cfg.verify else "")
    )
    return 0
