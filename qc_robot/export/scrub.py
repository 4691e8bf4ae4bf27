"""Remove the exporter's build-machine details from an ONNX model: stack traces, doc strings.

torch's dynamo exporter records, on every node, the Python stack that produced it
(``pkg.torch.onnx.stack_trace``: "File "/home/<user>/.../networks.py", line 33, ..."). A shipped
file would carry the absolute source paths of the machine that exported it. Only those
annotations go: weights, graph, opsets and the policy's own metadata are untouched.

``python -m qc_robot.export.scrub FILE.onnx ... [key=value ...]`` scrubs files in place (the
shipped policy; key=value adds metadata, e.g. task=cube-single-task1), and checks that the weights
are bit-identical and the outputs unchanged for fixed inputs.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import onnx

STACK_KEYS = ("pkg.torch.onnx.stack_trace",)
"""Node metadata that holds source paths; the other exporter annotations name modules only."""


def scrub(model: onnx.ModelProto) -> int:
    """Drop stack traces and doc strings from every node, value and subgraph; returns how many."""
    dropped = 0
    if model.doc_string:
        model.doc_string, dropped = "", dropped + 1
    dropped += _scrub_graph(model.graph)
    for f in model.functions:
        for n in f.node:
            dropped += _scrub_node(n)
    return dropped


def _scrub_graph(g: onnx.GraphProto) -> int:
    dropped = 0
    if g.doc_string:
        g.doc_string, dropped = "", dropped + 1
    for n in g.node:
        dropped += _scrub_node(n)
    for v in [*g.input, *g.output, *g.value_info, *g.initializer]:
        if v.doc_string:
            v.doc_string, dropped = "", dropped + 1
    return dropped


def _scrub_node(n: onnx.NodeProto) -> int:
    dropped = 0
    if n.doc_string:
        n.doc_string, dropped = "", dropped + 1
    keep = [p for p in n.metadata_props if p.key not in STACK_KEYS]
    if len(keep) != len(n.metadata_props):
        dropped += len(n.metadata_props) - len(keep)
        del n.metadata_props[:]
        n.metadata_props.extend(keep)
    for a in n.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            dropped += _scrub_graph(a.g)
        for sub in a.graphs:
            dropped += _scrub_graph(sub)
    return dropped


def build_paths(model: onnx.ModelProto) -> list[str]:
    """Every 'File "..."' entry left in ``model`` (empty for a scrubbed one)."""
    text = model.SerializeToString().decode("latin-1")
    return [line.strip() for line in text.split("\n") if 'File "' in line]


def _weights(model: onnx.ModelProto) -> list[bytes]:
    return [t.SerializeToString() for t in model.graph.initializer]


def scrub_file(path: str | os.PathLike[str], set_props: dict[str, str] | None = None) -> int:
    """Scrub ``path`` in place; refuses (ValueError) if the weights or outputs would change.

    ``set_props``: metadata to add or replace as well (the shipped file's ``task``)."""
    import numpy as np

    from qc_robot.policies.onnx_policy import OnnxPolicy

    p = Path(path)
    model = onnx.load(p)
    before = _weights(model)
    dropped = scrub(model)
    if set_props:
        onnx.helper.set_model_props(model, {**{p.key: p.value for p in model.metadata_props}, **set_props})
    if _weights(model) != before:
        raise ValueError(f"{p}: scrubbing changed the weights")
    tmp = p.with_name(f".{p.name}.scrub-{os.getpid()}")
    try:
        onnx.save(model, tmp)
        old, new = OnnxPolicy(p, warmup=0), OnnxPolicy(tmp, warmup=0)
        rng = np.random.default_rng(0)
        obs = rng.standard_normal((4, old.meta.obs_dim)).astype(np.float32)
        images = {f.key: rng.integers(0, 256, (4, *f.shape), dtype=np.uint8) for f in old.meta.image_fields}
        if old._has_noise:  # a file that draws its own noise is checked by its weights alone
            noise = rng.standard_normal((4, *old.meta.noise_shape)).astype(np.float32)
            outs = [pol.predict_batch(obs, noise, images) for pol in (old, new)]
            if not np.array_equal(outs[0], outs[1]):
                raise ValueError(f"{p}: scrubbing changed the outputs")
        os.replace(tmp, p)
    finally:
        tmp.unlink(missing_ok=True)
    return dropped


if __name__ == "__main__":  # python -m qc_robot.export.scrub FILE.onnx ... [key=value ...]
    files = [a for a in sys.argv[1:] if "=" not in a]
    props = dict(a.split("=", 1) for a in sys.argv[1:] if "=" in a)
    for arg in files:
        print(f"{arg}: {scrub_file(arg, props)} annotations dropped; weights and outputs unchanged")
