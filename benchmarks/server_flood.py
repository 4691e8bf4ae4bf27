"""A valid 50 Hz driver's latency while another peer floods a real ``qc-robot serve``.

Per policy, three phases in the same run, each a fresh driver process against the same server:

* ``none``: the driver alone (baseline);
* ``valid``: a flooder with its own valid session sends valid observations as fast as the socket
  takes them (it never waits for answers; it drains what comes back);
* ``garbage``: a flooder sends malformed messages (random bytes, lying arrays, observations
  without a session) as fast as the socket takes them.

Every process (server, driver, flooder) runs at the same priority (nice 0). The driver asks for
one chunk every 20 ms and waits for it; a *missed period* is a request not answered within
20 ms. Printed as a markdown table (``--out`` also writes it).

    python benchmarks/server_flood.py --seconds 5 --best-of-n --workers 1 2 --out /tmp/flood.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import zmq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from qc_robot import protocol as P  # noqa: E402

PERIOD = 0.02  # the driver's request period (50 Hz)


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q)) if xs else float("nan")


def _socket(address: str) -> zmq.Socket:
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(address)
    return s


def _describe(address: str) -> dict[str, Any]:
    s = _socket(address)
    s.send(P.encode(P.Describe(1)))
    if not s.poll(30_000):
        raise SystemExit(f"no description from {address}")
    meta = P.decode(s.recv())
    s.close(0)
    assert isinstance(meta, P.Description)
    return meta.metadata


def _hello(meta: dict[str, Any], name: str) -> P.Hello:
    a = meta["action_dim"]
    return P.Hello(name, meta["obs"], a, np.asarray(meta["action_low"], np.float32),
                   np.asarray(meta["action_high"], np.float32), float(meta["control_hz"]))


def _observation(meta: dict[str, Any], rid: int, rng: np.random.Generator) -> bytes:
    obs = {f["key"]: rng.normal(0, 0.1, f["shape"]).astype(f["dtype"]) for f in meta["obs"]}
    return P.encode(P.Observation(rid, 0, rid, time.time(), obs))


def run_driver(address: str, seconds: float, out: str) -> None:
    """One request per period, each awaited (at most one period late before the next is due)."""
    meta = _describe(address)
    s = _socket(address)
    s.send(P.encode(_hello(meta, "valid-50hz")))
    assert s.poll(30_000) and isinstance(P.decode(s.recv()), P.Welcome)
    rng = np.random.default_rng(0)
    rtt: list[float] = []
    missed = unanswered = 0
    t_end = time.monotonic() + seconds
    nxt, rid = time.monotonic(), 0
    while time.monotonic() < t_end:
        rid += 1
        data = _observation(meta, rid, rng)
        t0 = time.perf_counter()
        s.send(data)
        got = None
        while s.poll(1000):
            m = P.decode(s.recv())
            if getattr(m, "request_id", None) == rid:
                got = m
                break
        dt = time.perf_counter() - t0
        if isinstance(got, P.Chunk):
            rtt.append(dt * 1e3)
            missed += dt > PERIOD
        else:
            unanswered += 1
            missed += 1
        nxt += PERIOD
        delay = nxt - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        else:
            nxt = time.monotonic()
    s.close(0)
    Path(out).write_text(json.dumps({"rtt": rtt, "missed": missed, "unanswered": unanswered, "requests": rid}))


def _garbage(meta: dict[str, Any], rng: np.random.Generator, n: int = 512) -> list[bytes]:
    out = []
    for i in range(n):
        kind = i % 4
        if kind == 0:
            out.append(rng.bytes(int(rng.integers(1, 200))))
        elif kind == 1:  # an array header that lies about its size
            head = bytes([7]) + b"float32" + bytes([1]) + (2**31).to_bytes(4, "little")
            out.append(msgpack.packb({"v": 1, "type": "observation", "request_id": i, "episode_id": 0, "step": 0,
                                      "timestamp": 0.0, "obs": {"state": msgpack.ExtType(P.ARRAY_EXT, head)}}))
        elif kind == 2:
            out.append(_observation(meta, i, rng))  # valid, but this peer has no session
        else:
            out.append(msgpack.packb({"v": 1, "type": "hello", "driver": 7}))
    return out


def run_flood(address: str, kind: str, stop_file: str, out: str) -> None:
    """Send as fast as the socket takes messages until ``stop_file`` exists; drain the replies."""
    meta = _describe(address)
    s = _socket(address)
    rng = np.random.default_rng(1)
    if kind == "valid":
        s.send(P.encode(_hello(meta, "flooder")))
        assert s.poll(30_000) and isinstance(P.decode(s.recv()), P.Welcome)
        pool = [_observation(meta, i + 1, rng) for i in range(256)]
    else:
        pool = _garbage(meta, rng)
    sent = chunks = replies = 0
    stop = Path(stop_file)
    while not stop.exists():
        for _ in range(200):
            try:
                s.send(pool[sent % len(pool)], zmq.NOBLOCK)
                sent += 1
            except zmq.Again:
                break
            while s.poll(0):
                replies += 1
                chunks += s.recv()[:64].find(b"chunk") >= 0
    s.close(0)
    Path(out).write_text(json.dumps({"sent": sent, "replies": replies, "chunks": chunks}))


def export_best_of_n(path: Path, obs_dim: int) -> None:
    """A random-weight best-of-N policy at the reference size (hidden 4x512, N=32, 10 flow steps)."""
    import torch

    from qc_robot.agent.acting import ActingPolicy
    from qc_robot.agent.networks import ChunkCritic, FlowActor
    from qc_robot.export.onnx_export import build_metadata, export_policy
    from qc_robot.policies.base import ObsField

    torch.manual_seed(0)
    h, a, hidden = 5, 5, [512] * 4
    acting = ActingPolicy("best_of_n", FlowActor(obs_dim, h * a, hidden), ChunkCritic(obs_dim, h * a, hidden), None,
                          h, a, 10, "mean").eval()
    meta = build_metadata(acting, [ObsField("state", (obs_dim,))], -np.ones(a, np.float32), np.ones(a, np.float32),
                          20.0, 32)
    export_policy(acting, meta, path)


def _start_server(policy: str, workers: int, tmp: Path, env: dict[str, str]) -> tuple[subprocess.Popen, str, Path]:
    log_path = tmp / f"serve-{abs(hash(policy))}-{workers}.log"
    server = subprocess.Popen(
        [sys.executable, "-m", "qc_robot.cli", "serve", f"policy={policy}", "bind='tcp://127.0.0.1:*'",
         f"workers={workers}", "log_level=INFO"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=log_path.open("w"))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and server.poll() is None:
        m = re.search(r"serving policy .* on (tcp://\S+)", log_path.read_text())
        if m:
            return server, m.group(1), log_path
        time.sleep(0.1)
    raise SystemExit("server did not start:\n" + log_path.read_text()[-2000:])


def measure(policy: str, name: str, workers: int, seconds: float, tmp: Path, env: dict[str, str]) -> list[str]:
    server, address, _ = _start_server(policy, workers, tmp, env)
    name = f"{name} | {workers}"
    me = [sys.executable, str(Path(__file__).resolve())]
    rows = []
    try:
        for flood in ("none", "valid", "garbage"):
            tag = f"{abs(hash(name))}-{flood}"
            stop = tmp / f"stop-{tag}"
            flooder = None
            if flood != "none":
                flooder = subprocess.Popen([*me, "--role", f"flood-{flood}", "--address", address, "--stop", str(stop),
                                            "--json", str(tmp / f"flood-{tag}.json")], cwd=ROOT, env=env)
                time.sleep(1.0)  # flooding before the driver starts
            t0 = time.monotonic()
            drv = tmp / f"driver-{tag}.json"
            subprocess.run([*me, "--role", "driver", "--address", address, "--seconds", str(seconds),
                            "--json", str(drv)], cwd=ROOT, env=env, check=True)
            wall = time.monotonic() - t0
            stop.touch()
            f = {"sent": 0, "chunks": 0}
            if flooder is not None:
                flooder.wait(60)
                f = json.loads((tmp / f"flood-{tag}.json").read_text())
            d = json.loads(drv.read_text())
            rate = f"{f['sent'] / (wall + 1.0):,.0f}/s" if flooder else "-"
            rows.append(f"| {name} | {flood} | {d['requests']} | {pct(d['rtt'], 50):.2f} | {pct(d['rtt'], 99):.2f} | "
                        f"{max(d['rtt'], default=float('nan')):.1f} | {d['missed']} "
                        f"({100 * d['missed'] / max(d['requests'], 1):.1f}%) | {d['unanswered']} | {rate} | "
                        f"{f['chunks']:,} |")
            print(rows[-1], flush=True)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(60)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--role", default="main", choices=["main", "driver", "flood-valid", "flood-garbage"])
    ap.add_argument("--address", default="")
    ap.add_argument("--seconds", type=float, default=8.0, help="driver run per phase")
    ap.add_argument("--stop", default="")
    ap.add_argument("--json", default="")
    ap.add_argument("--policy", default="default", help="the served policy (serve's policy=)")
    ap.add_argument("--best-of-n", action="store_true", help="also a random-weight best-of-N policy (N=32)")
    ap.add_argument("--workers", type=int, nargs="+", default=[1], help="serve's workers= (a server per value)")
    ap.add_argument("--out", default="", help="also write the markdown here")
    args = ap.parse_args()
    if args.role == "driver":
        return run_driver(args.address, args.seconds, args.json)
    if args.role.startswith("flood-"):
        return run_flood(args.address, args.role.removeprefix("flood-"), args.stop, args.json)

    tmp = Path(tempfile.mkdtemp(prefix="qc-flood-"))
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    policies = [(args.policy, "shipped QC-FQL" if args.policy == "default" else args.policy)]
    if args.best_of_n:
        bon = tmp / "best_of_n.onnx"
        export_best_of_n(bon, 28)
        policies.append((str(bon), "best-of-N (N=32)"))
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    rows = []
    for policy, name in policies:
        for workers in args.workers:
            rows += measure(policy, name, workers, args.seconds, tmp, env)
    lines = [
        f"Conditions: {platform.machine()}, {os.cpu_count()} CPU cores, load average at start {load}, Python "
        f"{platform.python_version()}, pyzmq {zmq.__version__} / libzmq {zmq.zmq_version()}, loopback TCP; server, "
        f"driver and flooder each a process at nice 0; {args.seconds:g} s of driver per row.",
        "",
        "| policy | workers | flood | requests | p50 ms | p99 ms | max ms | missed periods (> 20 ms) | unanswered (1 s) "
        "| flooder sent | flooder's chunks |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        *rows,
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
