"""Per-tick cost of camera images at 64x64 and 128x128, and the memory of a replay of images.

Measured, per image size:
  1. sim rendering (``qc_robot.sim.camera.SimCamera``, MuJoCo EGL, OGBench's camera
     ``front_pixels``): OGBench's exact settings and ``render_fast``;
  2. robot-side capture: the capture thread's cost per frame (``cv2.VideoCapture`` read of an MJPG
     file, BGR->RGB, resize) and the control loop's cost to take the newest frame (``latest``);
  3. JPEG encode and decode (OpenCV, quality 90 and 75) and the bytes on the wire;
  4. the wire round trip observation -> chunk through a real ``ControlServer`` on loopback
     (codec, checks, worker hand-off; the policy does no work), raw uint8 and JPEG, against a
     state-only baseline measured in the same run, interleaved in rounds so all see the same load;
  5. replay memory: bytes per transition and for 100k transitions (arithmetic of the arrays),
     and the measured HDF5 bytes per frame of real rendered frames (gzip 4, one chunk a frame).
Inference of an image encoder is not measured here (the encoder is the agent's side).

    python benchmarks/bench_camera.py [--n 300] [--renders 8] [--out docs/bench_camera.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qc_robot.video import use_offscreen_gl  # noqa: E402

use_offscreen_gl()

from qc_robot import protocol as P  # noqa: E402
from qc_robot.drivers.client import PolicyClient  # noqa: E402
from qc_robot.policies.base import ChunkResult, ObsField, PolicySpec  # noqa: E402
from qc_robot.server.app import ControlServer  # noqa: E402

SIZES = (64, 128)
STATE_DIM, ACT_DIM, H = 28, 5, 5


def pct(xs: list[float]) -> dict[str, float]:
    a = np.asarray(xs) * 1e3
    return {"p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)), "n": len(xs)}


def bench_render(size: int, n: int) -> dict[str, Any]:
    """Both qualities on the same states, alternating, so they see the same load; and how far
    apart their pixels are."""
    from qc_robot.sim.camera import SimCamera
    from qc_robot.sim.tasks import make_env

    env = make_env("visual-cube-single-task1", image_size=size)
    env.reset(seed=0)
    cams = {"ogbench": SimCamera(env.unwrapped, size, size), "fast": SimCamera(env.unwrapped, size, size, fast=True)}
    for cam in cams.values():
        cam.render()  # GL context and shadow map made once
    ts: dict[str, list[float]] = {k: [] for k in cams}
    diff = []
    rng = np.random.default_rng(0)
    for _ in range(n):
        env.step(rng.uniform(-1, 1, ACT_DIM))
        imgs = {}
        for k, cam in cams.items():
            t = time.perf_counter()
            imgs[k] = cam.render()
            ts[k].append(time.perf_counter() - t)
        diff.append(float(np.abs(imgs["fast"].astype(np.int16) - imgs["ogbench"]).mean()))
    for cam in cams.values():
        cam.close()
    env.close()
    return {**{k: pct(v) for k, v in ts.items()}, "fast_vs_ogbench_mean_abs_diff": float(np.mean(diff))}


def frames_of(size: int, n: int) -> list[np.ndarray]:
    """Real rendered frames (fast mode) of a random-action episode, for codec and HDF5 figures."""
    from qc_robot.sim.camera import SimCamera
    from qc_robot.sim.tasks import make_env

    env = make_env("visual-cube-single-task1", image_size=size)
    env.reset(seed=1)
    cam = SimCamera(env.unwrapped, size, size, fast=True)
    rng = np.random.default_rng(1)
    frames = []
    for _ in range(n):
        env.step(rng.uniform(-1, 1, ACT_DIM))
        frames.append(cam.render())
    cam.close()
    env.close()
    return frames


def bench_capture(size: int, frames: list[np.ndarray], n: int) -> dict[str, Any]:
    import cv2

    from qc_robot.drivers.camera import CameraConfig, OpenCVCamera

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "v.avi")
        w = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"MJPG"), 30, (2 * size, 2 * size))
        for f in frames:
            w.write(cv2.resize(f[:, :, ::-1], (2 * size, 2 * size)))
        w.release()
        # the capture thread's work per frame: read+decode, colour order, resize to the policy's size
        cap = cv2.VideoCapture(path)
        ts = []
        for _ in range(n):
            t = time.perf_counter()
            ok, bgr = cap.read()
            if not ok:
                cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
                ok, bgr = cap.read()
            np.ascontiguousarray(cv2.resize(bgr[:, :, ::-1], (size, size), interpolation=cv2.INTER_AREA))
            ts.append(time.perf_counter() - t)
        cap.release()
        cam = OpenCVCamera(CameraConfig(source=path, width=size, height=size, fps=30, max_age_s=1.0, loop=True))
        cam.start()
        lt = []
        for _ in range(n):
            t = time.perf_counter()
            cam.latest().image.copy()  # what CameraDriver.get_observation does per tick
            lt.append(time.perf_counter() - t)
        cam.stop()
    return {"thread_read_per_frame": pct(ts), "loop_latest_per_tick": pct(lt)}


def bench_jpeg(frames: list[np.ndarray], n: int) -> dict[str, Any]:
    from qc_robot.image_codec import decode_jpeg, encode_jpeg

    out: dict[str, Any] = {}
    for q in (90, 75):
        enc, dec, sizes, err = [], [], [], []
        for i in range(n):
            f = frames[i % len(frames)]
            t = time.perf_counter()
            b = encode_jpeg(f, q)
            enc.append(time.perf_counter() - t)
            t = time.perf_counter()
            g = decode_jpeg(b, f.shape)
            dec.append(time.perf_counter() - t)
            sizes.append(len(b))
            err.append(float(np.abs(g.astype(np.int16) - f).mean()))
        out[f"q{q}"] = {"encode": pct(enc), "decode": pct(dec), "bytes_median": float(np.median(sizes)),
                        "raw_bytes": int(frames[0].nbytes), "mean_abs_err": float(np.mean(err))}
    return out


class _Zero:
    """A policy that does no work: the round trip is the stack's cost alone."""

    def __init__(self, spec: PolicySpec) -> None:
        self.spec = spec
        self._a = np.zeros((spec.chunk_len, spec.action_dim), np.float32)

    def predict(self, obs: dict[str, np.ndarray]) -> ChunkResult:
        return ChunkResult(self._a, 0.0)


def _spec(size: int) -> PolicySpec:
    fields = [ObsField("state", (STATE_DIM,), "float32")]
    if size:
        fields.append(ObsField("image", (size, size, 3), "uint8"))
    return PolicySpec(fields, ACT_DIM, H, 20.0)


def bench_wire(frames: dict[int, list[np.ndarray]], n: int, rounds: int = 5) -> dict[str, Any]:
    arms = [("state only", 0, 0)] + [(f"{s}x{s} {'raw' if q == 0 else f'jpeg q{q}'}", s, q)
                                     for s in SIZES for q in (0, 90)]
    servers, clients = {}, {}
    for name, size, q in arms:
        spec = _spec(size)
        srv = ControlServer(_Zero(spec), "tcp://127.0.0.1:*").start()
        hello = P.Hello("bench", P.obs_spec_to_wire(spec.obs_fields), ACT_DIM, -np.ones(ACT_DIM, np.float32),
                        np.ones(ACT_DIM, np.float32), 20.0)
        c = PolicyClient(srv.address, hello, jpeg_quality=q)
        c.connect(10.0)
        servers[name], clients[name] = srv, c
    times: dict[str, list[float]] = {name: [] for name, _, _ in arms}
    bytes_: dict[str, int] = {}
    state = np.zeros(STATE_DIM, np.float32)
    step = 0
    for _ in range(rounds):
        for name, size, q in arms:
            c = clients[name]
            for i in range(n // rounds):
                obs: dict[str, np.ndarray] = {"state": state}
                if size:
                    obs["image"] = frames[size][i % len(frames[size])]
                if name not in bytes_:
                    bytes_[name] = len(P.encode(P.Observation(1, 0, 0, 0.0, obs), jpeg_quality=q))
                t = time.perf_counter()
                c.request(obs, 0, step, reset=step == 0)
                reply = None
                while reply is None:
                    reply = c.poll(1.0)
                times[name].append(time.perf_counter() - t)
                assert isinstance(reply, P.Chunk), reply
                step += 1
    for name in clients:
        clients[name].close()
        servers[name].stop()
    base = float(np.median(times["state only"]))
    return {name: {**pct(ts), "obs_bytes": bytes_[name], "added_p50_ms": (float(np.median(ts)) - base) * 1e3}
            for name, ts in times.items()}


def replay_memory(frames: dict[int, list[np.ndarray]]) -> dict[str, Any]:
    import h5py

    from qc_robot.data.hdf5_io import EpisodeWriter

    out: dict[str, Any] = {}
    vec = STATE_DIM * 4 + ACT_DIM * 4 + 4 * 4  # state float32, action, reward/terminal/mask/valid
    for s in SIZES:
        img = s * s * 3
        both = 2 * img + STATE_DIM * 4 + vec  # obs and next_obs images stored
        one = img + vec  # next_obs by index into the same array (a flat replay of episodes)
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "x.hdf5")
            f = np.stack(frames[s])
            with EpisodeWriter(path, {"bench": True}) as w:
                w.add_episode({"image": f}, np.zeros((len(f), ACT_DIM)), np.zeros(len(f)), np.zeros(len(f)),
                              {"image": f})
            with h5py.File(path) as h:
                stored = h["data/demo_0/obs/image"].id.get_storage_size() / len(f)
        out[f"{s}x{s}"] = {"image_bytes": img, "per_transition_obs_and_next": both,
                           "per_transition_next_by_index": one,
                           "100k_obs_and_next_GiB": both * 100_000 / 2**30,
                           "100k_next_by_index_GiB": one * 100_000 / 2**30,
                           "100k_float32_obs_and_next_GiB": (4 * 2 * img) * 100_000 / 2**30,
                           "hdf5_gzip_bytes_per_frame": stored}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=300, help="round trips / codec runs per arm")
    ap.add_argument("--renders", type=int, default=8, help="rendered frames per size and quality")
    ap.add_argument("--out", default="", help="write the results as JSON here")
    args = ap.parse_args()
    res: dict[str, Any] = {"host": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                    "load_avg": os.getloadavg()}}
    frames = {s: frames_of(s, 32) for s in SIZES}
    res["render"] = {s: bench_render(s, args.renders) for s in SIZES}
    print(json.dumps(res["render"], indent=1), flush=True)
    res["capture"] = {s: bench_capture(s, frames[s], args.n) for s in SIZES}
    res["jpeg"] = {s: bench_jpeg(frames[s], args.n) for s in SIZES}
    print(json.dumps({"capture": res["capture"], "jpeg": res["jpeg"]}, indent=1), flush=True)
    res["wire"] = bench_wire(frames, args.n)
    print(json.dumps(res["wire"], indent=1), flush=True)
    res["replay"] = replay_memory(frames)
    print(json.dumps(res["replay"], indent=1), flush=True)
    res["host"]["load_avg_end"] = os.getloadavg()
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
