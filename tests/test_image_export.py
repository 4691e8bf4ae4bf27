"""Image policies through export, onnxruntime and a live control server (issue 12).

One exported file per actor type (module fixtures: a trace takes seconds): its graph takes each
image key as its own uint8 NHWC input beside the flat ``observation``, its metadata says so
(format_version 2, ``image_spec``), onnxruntime matches torch on fixed noise, bad images are
refused by name, a real ZeroMQ server serves it to a driver sending uint8 frames, and the
fine-tuner's weight swap (no re-trace) ships new encoder weights."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from qc_robot import protocol as P
from qc_robot.agent.agent import QCAgent
from qc_robot.config import AgentConfig, VisionConfig
from qc_robot.drivers.base import DriverSpec
from qc_robot.drivers.client import PolicyClient
from qc_robot.export.graph import ExportGraph
from qc_robot.export.onnx_export import build_metadata, export_policy
from qc_robot.policies.base import ObsField
from qc_robot.policies.onnx_metadata import MetadataError, PolicyMetadata
from qc_robot.policies.onnx_policy import OnnxPolicy
from qc_robot.server.app import ControlServer

IMG = (32, 32, 3)
STATE = 4
LOW = np.array([-1.0, 0.0], np.float32)
HIGH = np.array([2.0, 0.5], np.float32)
FIELDS = [ObsField("state", (STATE,), "float32"), ObsField("agentview_image", IMG, "uint8")]


def make_agent(actor_type: str, seed: int = 0) -> QCAgent:
    cfg = AgentConfig(actor_type=actor_type, hidden_dims=[32, 32], num_samples=4, flow_steps=3, horizon=3,
                      batch_size=8, device="cpu", vision=VisionConfig(channels=[4, 8], out_dim=16))
    agent = QCAgent(cfg, STATE, 2, seed=seed, image_shapes={"agentview_image": IMG})
    agent.set_normalizer(np.linspace(-1, 1, STATE), np.linspace(0.5, 2, STATE))
    return agent


def meta_for(acting, rtc: bool = True):  # noqa: ANN001, ANN201
    return build_metadata(acting, FIELDS, LOW, HIGH, 20.0, 4, train_step=7, config_hash="img", rtc=rtc)


@pytest.fixture(scope="module", params=["best_of_n", "fql"])
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    agent = make_agent(request.param)
    acting = agent.acting_policy().eval()
    path = tmp_path_factory.mktemp("img") / f"{request.param}.onnx"
    # fql with the real-time-chunking branch (the default for new exports), best-of-N without:
    # both graph layouts, at half the trace time of best-of-N with it
    export_policy(acting, meta_for(acting, rtc=request.param == "fql"), path)
    return agent, acting, path


def _obs(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {"state": rng.normal(size=STATE).astype(np.float32),
            "agentview_image": rng.integers(0, 256, IMG, dtype=np.uint8)}


def test_the_graph_takes_each_image_as_uint8_nhwc_and_says_so(exported) -> None:  # noqa: ANN001
    agent, _, path = exported
    model = onnx.load(path)
    types = {i.name: i.type.tensor_type for i in model.graph.input}
    img = types["agentview_image"]
    assert img.elem_type == onnx.TensorProto.UINT8
    assert [d.dim_value or d.dim_param for d in img.shape.dim][1:] == list(IMG)
    assert [d.dim_value or d.dim_param for d in types["observation"].shape.dim][1:] == [STATE]
    props = {p.key: p.value for p in model.metadata_props}
    assert props["format_version"] == "2" and props["obs_dim"] == str(STATE)
    spec = json.loads(props["image_spec"])
    assert spec["keys"] == ["agentview_image"] and spec["normalization"] == "x/255"
    assert spec["dtype"] == "uint8" and spec["layout"] == "NHWC" and spec["shapes"]["agentview_image"] == list(IMG)
    policy = OnnxPolicy(path, warmup=1)
    assert policy.image_keys == ["agentview_image"] and policy.meta.obs_dim == STATE
    assert [f.key for f in policy.spec.obs_fields] == ["state", "agentview_image"]


def test_onnxruntime_matches_torch_with_images_on_fixed_noise(exported) -> None:  # noqa: ANN001
    agent, acting, path = exported
    policy = OnnxPolicy(path, warmup=1)
    rng = np.random.default_rng(3)
    b = 5
    obs = rng.normal(size=(b, STATE)).astype(np.float32)
    imgs = rng.integers(0, 256, (b, *IMG), dtype=np.uint8)
    noise = rng.normal(size=(b, *policy.meta.noise_shape)).astype(np.float32)
    got = policy.predict_batch(obs, noise, images={"agentview_image": imgs})
    ref = ExportGraph(acting, LOW, HIGH, lean=False).eval()
    with torch.no_grad():
        want = ref(torch.from_numpy(obs), torch.from_numpy(noise), torch.from_numpy(imgs)).numpy()
    assert got.shape == (b, 3, 2)
    np.testing.assert_allclose(got, want, atol=1e-4)
    # the image matters: another frame, another chunk (same noise)
    other = policy.predict_batch(obs, noise, images={"agentview_image": 255 - imgs})
    assert np.abs(other - got).max() > 1e-3
    # the in-process agent (features from the same encoder) agrees with the served graph
    agent_chunk = agent.act(obs, images=[imgs])  # (B, H, A) in [-1, 1], its own noise
    assert agent_chunk.shape == (b, 3, 2)


def test_bad_images_are_refused_by_name(exported) -> None:  # noqa: ANN001
    _, _, path = exported
    policy = OnnxPolicy(path, warmup=1)
    obs = _obs(np.random.default_rng(0))
    assert policy.predict(obs).actions.shape == (3, 2)
    for bad, needle in ((obs["agentview_image"].astype(np.float32) / 255, "dtype float32, expected uint8"),
                        (obs["agentview_image"].transpose(2, 0, 1), r"shape \(3, 32, 32\), expected"),
                        (obs["agentview_image"][:16], "shape")):
        with pytest.raises(ValueError, match=needle):
            policy.predict({**obs, "agentview_image": bad})
    with pytest.raises(ValueError, match="'agentview_image' \\(an image\\) missing"):
        policy.predict({"state": obs["state"]})


def test_metadata_of_image_files_is_checked() -> None:
    meta = PolicyMetadata(FIELDS, 2, 3, 20.0, LOW, HIGH, "fql")
    props = meta.to_props()
    assert props["format_version"] == "2"
    assert PolicyMetadata.from_props(props).image_fields == [FIELDS[1]]
    with pytest.raises(MetadataError, match="image_spec"):
        PolicyMetadata.from_props({k: v for k, v in props.items() if k != "image_spec"})
    with pytest.raises(MetadataError, match="normalized"):
        spec = json.loads(props["image_spec"])
        PolicyMetadata.from_props({**props, "image_spec": json.dumps({**spec, "normalization": "x"})})
    with pytest.raises(MetadataError, match="format_version 1 but the obs_spec has image"):
        PolicyMetadata.from_props({**props, "format_version": "1"})
    clash = PolicyMetadata([FIELDS[0], ObsField("noise", IMG, "uint8")], 2, 3, 20.0, LOW, HIGH, "fql")
    with pytest.raises(MetadataError, match="'noise'"):
        clash.validate()
    # a state-only file is still written as version 1, as before images existed
    assert PolicyMetadata(FIELDS[:1], 2, 3, 20.0, LOW, HIGH, "fql").to_props()["format_version"] == "1"


def test_a_live_server_serves_the_image_policy_to_a_driver_sending_frames(exported) -> None:  # noqa: ANN001
    _, _, path = exported
    policy = OnnxPolicy(path, warmup=1)
    server = ControlServer(policy, "tcp://127.0.0.1:*").start()
    ds = DriverSpec(list(FIELDS), 2, LOW, HIGH, 20.0)
    client = PolicyClient(server.address, ds.hello("camera-test"))
    try:
        client.connect(10.0)
        rng = np.random.default_rng(1)
        for step in range(3):
            o = _obs(rng)
            assert client.request(o, 0, step * 3) is not None
            reply = client.poll(10.0)
            assert isinstance(reply, P.Chunk), reply
            assert reply.actions.shape == (3, 2)
            assert np.all(reply.actions >= LOW) and np.all(reply.actions <= HIGH)
        # a frame of the wrong size is that message's error; the server goes on serving
        assert client.request({**_obs(rng), "agentview_image": np.zeros((16, 16, 3), np.uint8)}, 0, 9) is not None
        err = client.poll(10.0)
        assert isinstance(err, P.Error) and "agentview_image" in err.message
        assert client.request(_obs(rng), 0, 12) is not None
        assert isinstance(client.poll(10.0), P.Chunk)
    finally:
        client.close()
        server.stop()


def test_the_weight_swap_push_ships_new_encoder_weights(tmp_path: Path) -> None:
    """qc-robot finetune's push path: traced once, then new weights (encoder included) written
    into the same graph and verified; the pushed file computes the updated policy."""
    from qc_robot.finetune.push import PolicyPusher

    agent = make_agent("fql", seed=1)
    pushed: list[bytes] = []

    def push(version: int, data: bytes, timeout_s: float) -> P.PolicyAck:
        pushed.append(data)
        return P.PolicyAck(version=version, accepted=True, reason="")

    pusher = PolicyPusher(agent, lambda acting, step: meta_for(acting, rtc=False), push, lambda: len(pushed) + 1)
    try:
        pusher.prepare(0)
        assert agent.encoder is not None
        with torch.no_grad():  # new weights everywhere, the conv stacks included
            for p in agent.acting_policy().parameters():
                p.add_(0.05 * torch.randn_like(p))
        t0 = time.monotonic()
        pusher.submit(1, 1)
        assert pusher.flush(120.0)
        swap_s = time.monotonic() - t0
    finally:
        pusher.close()
    assert [s.kind for s in pusher.stats] == ["swap"] and pusher.stats[0].accepted, pusher.stats
    f = tmp_path / "pushed.onnx"
    f.write_bytes(pushed[-1])
    policy = OnnxPolicy(f, warmup=1)
    rng = np.random.default_rng(2)
    obs = rng.normal(size=(3, STATE)).astype(np.float32)
    imgs = rng.integers(0, 256, (3, *IMG), dtype=np.uint8)
    noise = rng.normal(size=(3, *policy.meta.noise_shape)).astype(np.float32)
    got = policy.predict_batch(obs, noise, images={"agentview_image": imgs})
    ref = ExportGraph(agent.acting_policy().eval(), LOW, HIGH, lean=False).eval()
    with torch.no_grad():
        want = ref(torch.from_numpy(obs), torch.from_numpy(noise), torch.from_numpy(imgs)).numpy()
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert swap_s < 60.0
