"""Fault soak of the fine-tuning stack: n wall-clock sim robots, one server with a journal, one
learner; every process is killed with SIGKILL and restarted, each once per round in a random
order (the learner's first turn stops it with SIGSTOP for 20 s instead). Then everything is
drained and counted (issue 25):

* delivery: transitions produced by the robots' outboxes, journaled (distinct, re-journaled),
  applied by the learner; lost = produced - journaled;
* bookkeeping: ``episodes.csv`` rows against the learner checkpoint's episode count (and
  duplicate episode numbers), glued episodes (an episode's rows whose chain ``next_obs[i] ==
  obs[i+1]`` breaks in the learner's replay), policy files rewritten under one version (each
  ``policies/model-v*.onnx`` hashed every second), journal records whose version differs from the
  one the driver stamped, and what each restarted server served first.

    OMP_NUM_THREADS=1 python benchmarks/soak_restarts.py --checkpoint runs/x/checkpoint.pt \\
        --onnx runs/x/model.onnx --robots 2 --minutes 10 --out-dir runs/soak

Prints a markdown table. Every process runs with one thread.
"""

from __future__ import annotations

import argparse
import atexit
import csv
import hashlib
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from e2e_common import ENV, stop  # noqa: E402 (after the path set-up)

RUNNING: list[subprocess.Popen] = []


class Proc:
    """A named command that can be SIGKILLed, paused and started again (one log, appended)."""

    def __init__(self, name: str, cmd: list[str], log: Path) -> None:
        self.name, self.cmd, self.log = name, cmd, log
        self.p: subprocess.Popen | None = None
        self.kills = 0

    def start(self) -> None:
        with self.log.open("a") as f:
            self.p = subprocess.Popen(self.cmd, env=ENV, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        RUNNING.append(self.p)

    def kill(self) -> None:
        assert self.p is not None
        try:
            os.killpg(self.p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.p.wait(10)
        self.kills += 1

    def pause(self, seconds: float) -> None:
        assert self.p is not None
        os.killpg(self.p.pid, signal.SIGSTOP)
        time.sleep(seconds)
        os.killpg(self.p.pid, signal.SIGCONT)


def policy_hashes(d: Path, seen: dict[str, set[str]]) -> None:
    for f in d.glob("model-v*.onnx") if d.is_dir() else []:
        try:
            seen.setdefault(f.name, set()).add(hashlib.sha256(f.read_bytes()).hexdigest())
        except OSError:
            pass  # replaced while read: hashed again next round


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--onnx", required=True)
    ap.add_argument("--task", default="cube-single-task1")
    ap.add_argument("--robots", type=int, default=2)
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--fault-every", type=float, default=40, help="mean seconds between faults")
    ap.add_argument("--out-dir", default="runs/soak")
    ap.add_argument("--port", type=int, default=5611)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    out = Path(args.out_dir)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    drv, lrn = f"tcp://127.0.0.1:{args.port}", f"tcp://127.0.0.1:{args.port + 1}"
    journal = out / "journal"
    server = Proc("server", ["qc-robot", "serve", "--policy", args.onnx, f"bind={drv}", f"learner_bind={lrn}",
                             f"journal_dir={journal}", "threads=1", "providers=cpu"], out / "serve.log")
    learner = Proc("learner", ["qc-robot", "finetune", f"checkpoint={args.checkpoint}", f"server={lrn}",
                               f"run_dir={out / 'ft'}", "push_every=50", "save_every=200", "threads=1",
                               "replay_capacity=200000", "log_interval=500", "utd=1"],
                   out / "finetune.log")
    robots = [Proc(f"robot{i}", ["qc-robot", "drive", "driver=sim", f"env={args.task}", f"server={drv}",
                                 "episodes=100000", f"seed={1000 * i}", "realtime=true", "learner_wait=0",
                                 f"outbox_dir={out / f'outbox{i}'}", "env.sparse_reward=true"], out / f"drive{i}.log")
              for i in range(args.robots)]
    server.start()
    time.sleep(3)
    learner.start()
    for r in robots:
        r.start()
    hashes: dict[str, set[str]] = {}
    faults: list[str] = []
    t_end = time.monotonic() + 60 * args.minutes
    paused = False
    queue: list[Proc] = []
    while time.monotonic() < t_end:
        wait = rng.expovariate(1.0 / args.fault_every)
        deadline = min(t_end, time.monotonic() + wait)
        while time.monotonic() < deadline:
            policy_hashes(journal / "policies", hashes)
            time.sleep(1.0)
        if time.monotonic() >= t_end:
            break
        if not queue:  # every process is hit once per round, in a random order
            queue = [server, learner, *robots]
            rng.shuffle(queue)
        victim = queue.pop()
        if victim is learner and not paused:  # the learner's first turn: stopped, not killed
            faults.append(f"{time.monotonic() - t_end + 60 * args.minutes:.0f}s stop learner 20 s")
            victim.pause(20.0)
            paused = True
            continue
        faults.append(f"{time.monotonic() - t_end + 60 * args.minutes:.0f}s kill -9 {victim.name}")
        victim.kill()
        time.sleep(rng.uniform(1.0, 8.0))
        victim.start()
    # drain: robots stop (SIGINT: they send what their outbox holds), the learner catches up
    for r in robots:
        assert r.p is not None
        stop(r.p, signal.SIGINT, 60)
    time.sleep(10)
    assert learner.p is not None
    stop(learner.p, signal.SIGINT, 300)
    assert server.p is not None
    stop(server.p, signal.SIGINT, 30)
    policy_hashes(journal / "policies", hashes)

    from qc_robot import protocol as P
    from qc_robot.drivers.outbox import Outbox
    from qc_robot.server.journal import Journal
    from qc_robot.train.checkpoint import load_checkpoint

    produced = {}
    for i in range(args.robots):
        box = Outbox(out / f"outbox{i}")
        produced[box.id] = (box.next_seq - 1, box.pending)
        box.close()
    j = Journal(journal)
    recs = j.read(1, max_records=10**9, max_bytes=1 << 40)
    seen: Counter[tuple[str, int]] = Counter()
    version_mismatch = 0
    steps_by_key: dict[tuple[str, int], int] = {}
    for rec in recs:
        tr = P.decode(rec["transition"])
        assert isinstance(tr, P.Transition)
        seen[(tr.outbox, tr.outbox_seq)] += 1
        steps_by_key[(tr.outbox, tr.outbox_seq)] = len(tr.actions)
        if tr.policy_version and tr.policy_version != str(rec.get("policy_version", "")):
            version_mismatch += 1
    journaled = {box: len({s for (b, s) in seen if b == box}) for box in produced}
    rejournaled = sum(c - 1 for c in seen.values())
    lost = {box: produced[box][0] - journaled[box] for box in produced}
    ck = load_checkpoint(out / "ft" / "checkpoint.pt")
    ft = ck.extra["finetune"]
    applied_steps = sum(int(v["env_steps"]) for v in ft["robots"].values())
    journaled_steps = sum(steps_by_key.values())
    with (out / "ft" / "episodes.csv").open() as f:
        ep_rows = list(csv.DictReader(f))
    numbers = Counter(int(r["episode"]) for r in ep_rows)
    rows = ck.extra["online_rows"]["rows"]
    obs, nxt, term = rows["observations"], rows["next_observations"], rows["terminals"]
    cont = term[:-1] < 0.5  # row i and i+1 in one episode
    gaps = np.abs(nxt[:-1] - obs[1:]).max(axis=1) > 1e-5
    glued = int((cont & gaps).sum())
    rewritten = sorted(name for name, hs in hashes.items() if len(hs) > 1)
    serve_log = (out / "serve.log").read_text()
    resumed = re.findall(r"serving policy v(\d+) .*newest the learner pushed", serve_log)

    print()
    print(f"Soak: {args.robots} wall-clock sim robots ({args.task}), one server (journal), one learner; "
          f"{args.minutes:g} min, a fault every {args.fault_every:g} s on average (seed {args.seed}).")
    print(f"Faults ({len(faults)}): " + "; ".join(faults))
    print()
    print("| what | count |")
    print("|---|---|")
    print(f"| transitions produced (robots' outboxes) | {sum(p for p, _ in produced.values())} |")
    print(f"| still pending in an outbox at the end | {sum(q for _, q in produced.values())} |")
    print(f"| journaled, distinct | {sum(journaled.values())} |")
    print(f"| journaled again (a re-send whose ack a killed server lost) | {rejournaled} |")
    print(f"| lost (produced, never journaled) | {sum(max(0, v) for v in lost.values())} |")
    print(f"| env steps journaled (distinct) / applied by the learner | {journaled_steps} / {applied_steps} |")
    print(f"| learner checkpoint episodes / episodes.csv rows / duplicate numbers | {ft['episodes']} / "
          f"{len(ep_rows)} / {sum(c - 1 for c in numbers.values())} |")
    print(f"| glued episodes (chain breaks inside an episode in the replay) | {glued} |")
    print(f"| policy files rewritten under one version | {len(rewritten)} {rewritten or ''} |")
    print(f"| transitions whose journal version differs from the driver's stamp | {version_mismatch} |")
    print(f"| restarted servers that resumed the newest pushed policy | {len(resumed)} of {server.kills} "
          f"({', '.join('v' + v for v in resumed)}) |")
    print(f"| kills: server / learner / robots | {server.kills} / {learner.kills} / "
          f"{sum(r.kills for r in robots)} |")
    return 0


@atexit.register
def _cleanup() -> None:
    for p in RUNNING:
        stop(p, wait=10)


if __name__ == "__main__":
    sys.exit(main())
