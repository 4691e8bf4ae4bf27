"""``qc-robot demo``: the whole control loop in one command, on the embedded default.

A control server serving the shipped cube-single policy (or ``policy=...``) on a free loopback
port, the MuJoCo sim driver talking to it over ZeroMQ exactly as a robot would (wall clock at
the task's 20 Hz by default), a status line redrawn in place while it runs, and a summary at the
end. Nothing is trained and nothing is downloaded: it works right after install.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from qc_robot.config import EnvConfig


@dataclass
class DemoConfig:
    """Serve a policy and drive the sim with it: the loop a robot runs, in one process."""

    policy: str = "default"
    """'default' (the cube-single-task1 policy shipped in the package), a model.onnx, or a
    bring-up ref such as hold:28:5:5."""
    env: EnvConfig = field(default_factory=lambda: EnvConfig(name="cube-single-task1"))
    """The sim task (must match the policy: the shipped one is cube-single-task1)."""
    episodes: int = 5
    """Episodes to run."""
    seed: int = 100
    """Episode i resets with seed + i; the served policy's noise is seeded with it too, so a
    lockstep run (realtime=false) repeats exactly."""
    realtime: bool = True
    """True: the sim robot runs on the wall clock like hardware; False: lockstep (as fast as the
    policy answers, and required for video)."""
    time_scale: float = 1.0
    """Speed-up of the wall clock (2 = twice real time)."""
    mode: str = "open_loop"
    """'open_loop' (run each chunk in full, then ask) or 'latency_aware'."""
    video: str = ""
    """Write the first ``video_episodes`` episodes as .gif/.mp4 (needs realtime=false)."""
    video_episodes: int = 1
    """Episodes recorded into ``video``."""
    status: bool = True
    """Redraw a status line in place (only when stdout is a terminal; otherwise one line per episode)."""
    finetune: str = ""
    """A checkpoint.pt to fine-tune online while the demo runs ('' = off; needs the learn extra):
    the demo serves its exported policy with a learner port, runs ``qc-robot finetune`` on the
    driver's transitions and swaps each pushed policy in between chunks."""
    push_every: int = 250
    """finetune: updates between policy pushes."""
    finetune_dir: str = "runs/demo-finetune"
    """finetune: the learner's run directory (and the server's transition journal in it)."""
    operator: str = "none"
    """The operator in the loop, as ``drive operator=`` ('scripted': the simulated operator gives
    verdicts and takes over when the policy stalls; best with realtime=false)."""
    operator_args: dict[str, Any] = field(default_factory=dict)
    """The operator's settings (``qc_robot.teleop.operator.OperatorConfig``)."""
    blind: bool = False
    """Hide reward and success from the loop as a real arm does (with an operator, rewards come
    from its verdicts)."""


@dataclass
class _Live:
    """What the status line shows, updated by the control loop's row callback."""

    episode: int = 0
    step: int = 0
    successes: int = 0
    done: int = 0
    t0: float = field(default_factory=time.monotonic)


class _Finetune:
    """The optional learner: the checkpoint exported to ONNX, a learner port on the server and a
    ``qc-robot finetune`` process fed by it (stopped when the stream has been idle a while)."""

    def __init__(self, cfg: DemoConfig) -> None:
        from pathlib import Path

        from qc_robot.config import ExportConfig
        from qc_robot.export.onnx_export import run_export
        from qc_robot.policies.onnx_policy import OnnxPolicy
        from qc_robot.server.journal import Journal
        from qc_robot.server.learner_link import LearnerLink

        self.cfg = cfg
        self.dir = Path(cfg.finetune_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.policy_path = str(self.dir / "start.onnx")
        run_export(ExportConfig(checkpoint=cfg.finetune, out=self.policy_path))
        self.address = f"ipc://{self.dir.resolve() / 'learner.ipc'}"
        self.link = LearnerLink(self.address, Journal(str(self.dir / "journal")),
                                policy_loader=lambda path, version: OnnxPolicy(path, version=version))
        self.log_path = self.dir / "finetune.log"
        self.proc: Any = None

    def start(self) -> None:
        import subprocess

        args = [sys.executable, "-m", "qc_robot.cli", "finetune", f"checkpoint={self.cfg.finetune}",
                f"server={self.address}", f"run_dir={self.dir / 'learner'}", f"push_every={self.cfg.push_every}",
                "idle_stop_s=5", "log_level=WARNING"]
        self.proc = subprocess.Popen(args, stdout=self.log_path.open("w"), stderr=subprocess.STDOUT)

    def finish(self, server: Any, timeout_s: float = 300.0) -> None:
        """Wait for the learner (it acknowledges its final push before exiting: swapped by then)."""
        import subprocess

        print("waiting for the learner to take the last transitions and push its policy ...", flush=True)
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.terminate()
            self.proc.wait(timeout=30)


def _status(live: _Live, cfg: DemoConfig, limit: int, rtt: list[float], server: Any) -> str:
    rtt_text = f"{np.median(rtt[-50:]):.1f} ms" if rtt else "-"
    return (f"episode {live.episode + 1}/{cfg.episodes}  step {live.step:>3}/{limit}  "
            f"success {live.successes}/{live.done}  chunks {server.stats.chunks}  rtt {rtt_text}  "
            f"{time.monotonic() - live.t0:5.1f} s")


def run_demo(cfg: DemoConfig) -> int:
    """CLI entry: serve, drive ``cfg.episodes`` episodes, print a summary; 0 on a clean run."""
    from qc_robot.drivers.client import PolicyClient
    from qc_robot.drivers.config import DriveConfig
    from qc_robot.drivers.drive import build_driver
    from qc_robot.drivers.episode_stage import EpisodeStage
    from qc_robot.drivers.executor import ChunkExecutor
    from qc_robot.drivers.policy_id import policy_label
    from qc_robot.drivers.runner import Pacer, run_episode
    from qc_robot.server.app import ControlServer
    from qc_robot.server.serve import load_policy
    from qc_robot.teleop.operator import make_operator

    tty = cfg.status and sys.stdout.isatty()
    learner = _Finetune(cfg) if cfg.finetune else None
    policy = load_policy(learner.policy_path if learner is not None else cfg.policy, seed=cfg.seed)
    server = ControlServer(policy, "tcp://127.0.0.1:*",
                           learner_link=learner.link if learner is not None else None).start()
    if learner is not None:
        learner.start()
    drive = DriveConfig(driver="sim", env=cfg.env, server=server.address, episodes=cfg.episodes,
                        seed=cfg.seed, mode=cfg.mode, realtime=cfg.realtime, time_scale=cfg.time_scale,
                        blind=cfg.blind)
    driver = build_driver(drive)
    try:
        operator = make_operator(cfg.operator, dict(cfg.operator_args), driver)
    except ValueError as e:
        server.stop()
        print(f"demo: {e}")
        return 2
    spec = policy.spec
    served = f"{cfg.finetune} (exported)" if learner is not None else cfg.policy
    print(f"qc-robot demo: serving {served} ({spec.actor_type}, H={spec.chunk_len}) on {server.address}; "
          f"sim driver {cfg.env.name}, {'wall clock' if cfg.realtime else 'lockstep'} at "
          f"{driver.spec.control_hz * cfg.time_scale:g} Hz, {cfg.episodes} episodes", flush=True)
    client = PolicyClient(server.address, driver.spec.hello("sim", {"mode": cfg.mode}))
    results = []
    video = None
    label = served
    try:
        driver.connect()
        if operator is not None:
            operator.open()
        welcome = client.connect(10.0)
        label = policy_label(welcome.metadata, served)
        print(f"connected: policy {label}", flush=True)
        period = 1.0 / (driver.spec.control_hz * cfg.time_scale)
        executor = ChunkExecutor(client, welcome.chunk_len, cfg.mode, 0.5, 2.0,
                                 wait_when_empty=not driver.realtime,
                                 tick_wait_s=0.5 * period if driver.realtime else 0.0,
                                 max_inflight=client.max_inflight)  # pipelined under delay (docs/rtc.md)
        pacer = Pacer(driver.spec.control_hz * cfg.time_scale) if driver.realtime else None
        if cfg.video:
            from qc_robot.video import DriverVideo

            video = DriverVideo(cfg.video, driver.driver, cfg.video_episodes)
        limit = driver.spec.max_episode_steps
        live = _Live()
        for i in range(cfg.episodes):
            live.episode, live.step = i, 0
            record = video.episode(i) if video is not None else None

            def on_rows(rows: list[Any], record: Any = record) -> None:
                live.step = rows[-1].step + 1
                if record is not None:
                    record(rows)
                if tty:
                    sys.stdout.write("\r" + _status(live, cfg, limit, executor.stats.rtt_ms, server) + "\033[K")
                    sys.stdout.flush()

            r = run_episode(driver, executor, i, cfg.seed + i, pacer, client, send_transitions=learner is not None,
                            on_rows=on_rows, operator=operator, stage=EpisodeStage() if operator else None,
                            verdict_rewards=operator is not None and not driver.reports_reward)
            if r.verdict == "end":
                break
            results.append(r)
            live.done += 1
            live.successes += int(r.success)
            end = "\r\033[K" if tty else ""
            version = f", policy v{server.policy_version}" if learner is not None else ""
            taken = f", operator steps {r.interventions}" if r.interventions else ""
            print(f"{end}episode {i + 1}/{cfg.episodes}: {'SUCCESS' if r.success else r.verdict} after "
                  f"{r.robot_steps} steps ({r.duration_s:.1f} s{version}{taken})", flush=True)
    except KeyboardInterrupt:
        print("\ninterrupted")
    finally:
        client.close()
        if operator is not None:
            operator.close()
        if video is not None:
            path = video.close()
            if path is not None:
                print(f"video: {path}")
        driver.close()
        if learner is not None:  # the learner drains what was sent, pushes its last policy, exits
            learner.finish(server)
        server.stop()
    _summary(results, server, driver, label)
    if operator is not None:
        print("  " + operator.summary())
    if learner is not None:
        print(f"  fine-tune         {server.stats.transitions} transitions streamed, policy v0 → "
              f"v{server.policy_version}; learner log {learner.log_path}")
    return 0


def _summary(results: list[Any], server: Any, driver: Any, label: str) -> None:
    n = len(results)
    ok = sum(r.success for r in results)
    rtt = [x for r in results for x in r.rtt_ms]
    wins = [r.robot_steps for r in results if r.success]
    lines = [f"summary: success {ok}/{n}" + (f" ({100 * ok / n:.0f}%)" if n else "") + f" with {label}",
             f"  steps to success  {np.mean(wins):.0f} mean" if wins else "  steps to success  -",
             f"  chunks served     {server.stats.chunks} (errors: {server.stats.errors or 'none'})",
             f"  round trip        p50 {np.median(rtt):.1f} ms, p99 {np.percentile(rtt, 99):.1f} ms" if rtt
             else "  round trip        -",
             f"  held              {sum(r.robot_held if driver.realtime else r.held for r in results)} of "
             f"{sum(r.rows for r in results)} robot steps without a fresh policy action "
             f"(safety: rejected {driver.stats.rejected}, trips {driver.stats.trips})"]
    print("\n".join(lines))
