"""Policy push cost: how long training pauses, and how soon the server serves the new weights.

One learner process trains a QC agent (real updates on a replay of random rows, one thread) and
pushes every ``--push-every`` updates to a real ``qc-robot serve`` (its own process, learner port,
journal) through the learner link, in two modes measured in the same run:

* ``swap`` (the default of ``qc-robot finetune``): the graph is traced once before training; a
  push snapshots the weights on the training thread and a pusher thread writes them into the
  traced graph, verifies the file against torch and pushes it;
* ``trace`` (the behaviour before): every push traces and verifies on the training thread.

Reported per mode: the training pause per push (the time the training loop spent in the push
call), the time from the snapshot to the server's acknowledgement (it serves the new policy from
its next chunk), the update-time distribution with pushes against a no-push baseline measured
just before, and how many updates old the served policy was when the next one replaced it.

    OMP_NUM_THREADS=1 python benchmarks/e2e_push.py --agent qc_fql --pushes 10
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from e2e_common import background, stop  # noqa: E402


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q)) if xs else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--agent", default="qc_fql", help="configs/agent group (qc_fql, qc)")
    ap.add_argument("--experiment", default="cpu_small", help="configs/experiment (network sizes)")
    ap.add_argument("--pushes", type=int, default=10, help="pushes per mode (trace mode: half as many)")
    ap.add_argument("--push-every", type=int, default=50)
    ap.add_argument("--baseline-updates", type=int, default=200)
    ap.add_argument("--modes", default="swap,trace")
    ap.add_argument("--verify-every", type=int, default=2,
                    help="swap mode: check every n-th swap against torch (finetune's default is 10; 2 "
                         "interleaves checked and unchecked pushes so both are measured in the same run)")
    ap.add_argument("--port", type=int, default=5691)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(1)
    from qc_robot.agent.agent import QCAgent
    from qc_robot.cli import compose
    from qc_robot.data.replay import ChunkReplay
    from qc_robot.export.onnx_export import build_metadata, export_policy
    from qc_robot.finetune.client import LearnerClient
    from qc_robot.finetune.push import PolicyPusher
    from qc_robot.policies.base import ObsField

    cfg = compose("train", [f"experiment={args.experiment}", f"agent={args.agent}", "env=cube-single-task1"])
    obs_dim, act_dim, n = 28, 5, 5000
    rng = np.random.default_rng(0)
    agent = QCAgent(cfg.agent, obs_dim, act_dim)
    obs = rng.normal(size=(n, obs_dim)).astype(np.float32)
    agent.set_normalizer(obs.mean(0), obs.std(0))
    replay = ChunkReplay(obs_dim, act_dim, n, agent.device)
    replay.add_offline({"observations": obs, "actions": rng.uniform(-1, 1, (n, act_dim)).astype(np.float32),
                        "rewards": -np.ones(n, np.float32), "terminals": (np.arange(n) % 200 == 199).astype(np.float32),
                        "masks": np.ones(n, np.float32), "next_observations": obs})
    a = cfg.agent
    fields = [ObsField("state", (obs_dim,), "float32")]
    low, high = -np.ones(act_dim, np.float32), np.ones(act_dim, np.float32)

    def meta(acting, step: int):  # noqa: ANN001, ANN202
        return build_metadata(acting, fields, low, high, 20.0, num_samples=a.num_samples, train_step=step,
                              config_hash="bench")

    work = Path(tempfile.mkdtemp(prefix="qc-bench-push-"))
    model = export_policy(agent.acting_policy(), meta(agent.acting_policy(), 0), work / "model.onnx")
    drv, lrn = f"tcp://127.0.0.1:{args.port}", f"tcp://127.0.0.1:{args.port + 1}"
    server = background(["qc-robot", "serve", "--policy", str(model), f"bind={drv}", f"learner_bind={lrn}",
                         f"journal_dir={work / 'journal'}", "threads=1", "providers=cpu"], work / "serve.log")
    client = LearnerClient(lrn, 1, heartbeat_s=0.5).start()
    if not client.subscribed.wait(60):
        print("the server did not answer", (work / "serve.log").read_text()[-2000:])
        return 1
    updates = [0]
    version = [0]
    results: list[dict] = []
    try:
        for mode in args.modes.split(","):
            served_at: list[tuple[int, int]] = []  # (updates at snapshot, updates when acknowledged)

            def push(v: int, onnx: bytes, timeout_s: float):  # noqa: ANN202
                ack = client.push_policy(v, onnx, timeout_s)
                if ack is not None and ack.accepted:
                    version[0] = max(version[0], v)
                return ack

            pusher = PolicyPusher(agent, meta, push, lambda: max(version[0], client.server_version) + 1,
                                  verify=True, trace_only=mode == "trace", verify_every=args.verify_every)
            t0 = time.perf_counter()
            if mode == "swap":
                pusher.prepare(updates[0])
            prepare_s = time.perf_counter() - t0
            base: list[float] = []
            for _ in range(args.baseline_updates):  # no pushes: the baseline of this run
                t = time.perf_counter()
                agent.update(replay.sample(a.batch_size, a.horizon, a.discount))
                updates[0] += 1
                base.append(time.perf_counter() - t)
            n_push = args.pushes if mode == "swap" else max(2, args.pushes // 2)
            with_push: list[float] = []
            pauses: list[float] = []
            for i in range(n_push * args.push_every):
                t = time.perf_counter()
                agent.update(replay.sample(a.batch_size, a.horizon, a.discount))
                updates[0] += 1
                if (i + 1) % args.push_every == 0:
                    before = len(pusher.stats)
                    pauses.append(pusher.submit(updates[0], updates[0]))
                    snap = updates[0]

                    def watch(before: int = before, snap: int = snap, pusher: PolicyPusher = pusher,
                              served_at: list = served_at) -> None:
                        while len(pusher.stats) <= before:
                            time.sleep(0.001)
                        served_at.append((snap, updates[0]))
                    threading.Thread(target=watch, daemon=True).start()
                with_push.append(time.perf_counter() - t)
            pusher.flush(120)
            time.sleep(0.05)
            pusher.close()
            lag = [done - snap for snap, done in served_at]  # updates made while the push was on its way
            groups = [(mode, [p for p in pusher.stats if p.accepted])]
            if mode == "swap":  # checked against torch before the push, or not (see verify_every)
                groups = [(f"swap, {'checked' if v else 'unchecked'}", [p for p in pusher.stats if p.accepted
                                                                          and p.verified == v]) for v in (True, False)]
            for name, ok in groups:
                lat = [p.latency_s for p in ok]
                build = [p.build_s for p in ok]
                results.append(dict(mode=name, pushes=len(pusher.stats), accepted=len(ok), prepare_s=prepare_s,
                                    pause_p50=pct(pauses, 50), pause_max=max(pauses) if pauses else float("nan"),
                                    lat_p50=pct(lat, 50), lat_p99=pct(lat, 99), build_p50=pct(build, 50),
                                    base_p50=pct(base, 50), base_p99=pct(base, 99), upd_p50=pct(with_push, 50),
                                    upd_p99=pct(with_push, 99), lag_max=max(lag) if lag else -1,
                                    kinds=sorted({p.kind for p in ok}), nbytes=ok[-1].nbytes if ok else 0))
    finally:
        client.close()
        stop(server)
        shutil.rmtree(work, ignore_errors=True)

    print()
    print(f"agent {args.agent} ({args.experiment}: hidden {list(a.hidden_dims)}, batch {a.batch_size}), one torch "
          f"thread; push every {args.push_every} updates; server in its own process (1 onnxruntime thread).")
    print()
    print("| mode | pushes served (of all in the mode) | one-off trace s | training pause per push p50 / max | snapshot → served p50 / p99 "
          "| update ms p50 / p99 without pushes | with pushes | updates made while a push travels (max) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['mode']} ({'/'.join(r['kinds'])}) | {r['accepted']}/{r['pushes']} | {r['prepare_s']:.1f} "
              f"| {1e3 * r['pause_p50']:.1f} ms / {1e3 * r['pause_max']:.1f} ms "
              f"| {r['lat_p50']:.3f} s / {r['lat_p99']:.3f} s | {1e3 * r['base_p50']:.1f} / {1e3 * r['base_p99']:.1f} "
              f"| {1e3 * r['upd_p50']:.1f} / {1e3 * r['upd_p99']:.1f} | {r['lag_max']} |")
    print(f"\nfile size {results[0]['nbytes'] / 1024:.0f} KiB; build = swap or trace, plus the check when made: "
          + ", ".join(f"{r['mode']} {r['build_p50']:.3f} s" for r in results) if results else "")
    return 0


if __name__ == "__main__":
    sys.exit(main())
