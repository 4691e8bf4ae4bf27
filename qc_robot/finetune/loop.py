"""``qc-robot finetune``: online QC fine-tuning from what robots experience, through the server.

The offline checkpoint gives the agent, the task and the dataset; this module owns the agent, the
replay (offline data kept, online episodes appended: ``finetune/training.py``), the updates and
the checkpoint. Records stream in from the server's journal
(:class:`~qc_robot.finetune.client.LearnerClient`), whole episodes go into the replay, operator
steps also into an intervention buffer that supplies ``intervention_fraction`` of each batch,
``utd`` updates run per received env step, and every ``push_every`` updates the acting policy is
exported (verified) and pushed to the server, which serves it from its next chunk. The learner
tells the server how many updates it owes, so robots can wait at their reset while it catches up
(``drive learner_wait``). Checkpoints carry the last applied journal seq, the open episodes and
the intervention buffer, so a restarted learner resumes exactly where its checkpoint was and
the server re-sends the rest.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import logging
import os
import signal
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qc_robot.data.batch import ChunkBatch
from qc_robot.data.replay import ChunkReplay
from qc_robot.finetune.client import LearnerClient, Record
from qc_robot.finetune.config import FinetuneConfig
from qc_robot.finetune.episodes import (
    Episode,
    EpisodeAssembler,
    intervention_segments,
    load_reward_fn,
)
from qc_robot.finetune.online import OnlineReplay, cat_batches, replay_rows
from qc_robot.finetune.push import PolicyPusher
from qc_robot.finetune.training import checkpoint_of, open_training
from qc_robot.server.learner_link import CurveKeys
from qc_robot.train.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from qc_robot.train.learner import CHECKPOINT
from qc_robot.train.logs import RunLogger

log = logging.getLogger("qc_robot.finetune")


class RewardConventionError(ValueError):
    """An online row declares a reward convention other than the checkpoint's."""


@dataclass
class FinetuneResult:
    run_dir: Path
    updates: int
    """Online updates done (all runs of this run_dir)."""
    env_steps: int
    applied_seq: int
    policy_version: int
    episodes: int
    successes: int


def export_onnx_bytes(agent: Any, offline: Checkpoint, train_step: int, verify: bool = True) -> bytes:
    """The agent's acting policy as a self-describing, verified model.onnx, in memory."""
    from qc_robot.export.onnx_export import build_metadata, export_policy

    acting = copy.deepcopy(agent.acting_policy()).cpu()  # a copy: export must not touch training nets
    meta = build_metadata(acting, offline.obs_fields, offline.action_low, offline.action_high, offline.control_hz,
                          num_samples=agent.cfg.num_samples, train_step=train_step,
                          config_hash=offline.config_hash)
    with tempfile.TemporaryDirectory(prefix="qc-push-") as d:
        return export_policy(acting, meta, Path(d) / "model.onnx", verify=verify).read_bytes()


@dataclass
class RobotStats:
    """Per-robot counts (a robot is its outbox id, else its driver session)."""

    env_steps: int = 0
    episodes: int = 0
    successes: int = 0
    duplicates: int = 0
    """Transitions re-delivered by the robot's outbox and skipped (already applied)."""
    last_outbox_seq: int = 0


class Finetuner:
    """One learner loop fed by a server's learner port."""

    def __init__(self, cfg: FinetuneConfig) -> None:
        self.cfg = cfg
        if cfg.push_mode not in ("swap", "trace"):
            raise ValueError(f"push_mode must be 'swap' or 'trace', got {cfg.push_mode!r}")
        self.offline = load_checkpoint(cfg.checkpoint, device=cfg.device or None)
        tr = self.training = open_training(cfg, self.offline)
        if not Path(tr.config.data.path).exists():
            log.warning("offline dataset %s not found: the replay starts with online data only", tr.config.data.path)
        self.agent, self.replay, self.sampler = tr.agent, tr.replay, tr.sampler
        self.step, self.env_steps = tr.step, tr.env_steps
        """Gradient updates in all (the offline ones included) and online env steps received."""
        self.reward = self.offline.reward
        """The reward convention of the checkpoint: online rows that declare another are refused."""
        if cfg.reward_fn:
            log.info("reward_fn %s replaces the robots' rewards: its output must follow the checkpoint's %s "
                     "convention (the robots' declared convention is not checked)", cfg.reward_fn, self.reward)
        state = tr.resumed
        if tr.is_resume:
            log.info("resuming %s: %d updates, journal seq %d", Path(cfg.run_dir) / CHECKPOINT, self.step,
                     state.get("applied_seq", 0))
        self.logger = RunLogger(cfg.run_dir, resume=tr.is_resume)
        self._log_t0 = time.perf_counter()
        a = tr.config.agent
        self.horizon, self.discount, self.batch_size = a.horizon, a.discount, a.batch_size
        self.interventions = ChunkReplay(self.agent.obs_dim, self.agent.act_dim, cfg.intervention_capacity,
                                         self.agent.device, image_shapes=self.replay.image_shapes)
        self.assembler = EpisodeAssembler([f.key for f in self.offline.obs_fields], self.agent.obs_dim,
                                          load_reward_fn(cfg.reward_fn), image_shapes=self.replay.image_shapes)
        self.applied_seq: int = state.get("applied_seq", 0)
        self.journal_id: str = state.get("journal_id", "")
        self.updates: int = state.get("updates", 0)
        self.policy_version: int = state.get("policy_version", 0)
        self.episodes: int = state.get("episodes", 0)
        self.successes: int = state.get("successes", 0)
        self.rejected = 0
        self.online = OnlineReplay(self.replay, self.horizon, self.discount)
        self.robots: dict[str, RobotStats] = {k: RobotStats(**v) for k, v in state.get("robots", {}).items()}
        if tr.is_resume:  # what was logged after the checkpoint is logged again as it is re-applied
            self.logger.forget_after(self.step)
            _keep_rows(Path(cfg.run_dir) / "episodes.csv", lambda r: int(r["episode"]) <= self.episodes)
        if "assembler" in state:
            self.assembler.load_state_dict(state["assembler"])
            for key, rows in self.assembler.open_rows().items():  # open episodes are sampled again
                self.online.stage(key, rows)
        if "interventions" in state:
            self.interventions.load_state_dict(state["interventions"])
        self._last_push = self.updates
        self._stop = threading.Event()
        self.client: LearnerClient | None = None
        self.pusher: PolicyPusher | None = None
        self.rates: list[tuple[float, float, int]] = []
        """(env steps/s received, updates/s, updates owed) per log interval."""
        self.push_pause_s: list[float] = []
        """Seconds each push held the training thread (the snapshot)."""

    # -- data ----------------------------------------------------------------------------------

    def apply(self, records: list[Record]) -> None:
        """Take records in seq order; each is applied exactly once (older seqs are ignored, and so is
        a transition a robot's outbox delivered twice). Every step enters the replay as it arrives:
        an open episode is sampled from its staging buffer until it ends (``online.OnlineReplay``)."""
        for r in records:
            if r.seq <= self.applied_seq:
                continue
            tr = r.transition
            self._check_reward(r)
            key = tr.outbox or r.session  # the robot: stable across reconnects when it has an outbox
            robot = self.robots.setdefault(key, RobotStats())
            if tr.outbox and tr.outbox_seq:
                if tr.outbox_seq <= robot.last_outbox_seq:
                    robot.duplicates += 1
                    self.applied_seq = r.seq
                    continue
                robot.last_outbox_seq = tr.outbox_seq
            try:
                finished = self.assembler.add(r.seq, key, r.policy_version, tr)
            except ValueError as e:
                self.rejected += 1
                log.error("record %d from %s (%s) refused: %s", r.seq, r.driver, r.session, e)
                self.applied_seq = r.seq
                continue
            self.env_steps += len(tr.actions)
            robot.env_steps += len(tr.actions)
            for ep in finished:  # before staging: a new episode of this robot starts a new buffer
                self._add_episode(ep)
            part = self.assembler.open_part(key)  # this record's rows, if its episode goes on
            if part is not None:
                self.online.stage(key, part)
            self.applied_seq = r.seq

    def _check_reward(self, r: Record) -> None:
        """Refuse (stop the run) at the first row whose declared convention is not the checkpoint's,
        before anything of it is applied: it stays in the server's journal, unacknowledged. A
        ``reward_fn`` defines the rewards itself, so the robot's declaration does not matter then."""
        declared = r.transition.reward
        if declared and declared != self.reward and self.assembler.reward_fn is None:
            raise RewardConventionError(
                f"record {r.seq} from {r.driver} ({r.session}) has {declared} rewards but {self.cfg.checkpoint} "
                f"was trained on {self.reward} rewards: stopped before training on it (it stays in the server's "
                f"journal); run the robot with {self.reward} rewards, fine-tune a checkpoint trained on "
                f"{declared} ones, or set reward_fn to rewrite them")

    def _add_episode(self, ep: Episode) -> None:
        rows = ep.rows
        self.online.commit(ep.session, rows)  # whole, with its final flags, into the main replay
        for start, stop in intervention_segments(rows["intervention"], self.horizon):
            seg = {k: v[start:stop] for k, v in rows.items()}
            seg["truncated"] = seg["truncated"].copy()
            if not (seg["terminated"][-1] or seg["truncated"][-1]):
                seg["truncated"][-1] = True  # the segment ends here in the intervention buffer
            self.interventions.extend(replay_rows(seg))
        self.episodes += 1
        self.successes += int(ep.success)
        robot = self.robots.setdefault(ep.session, RobotStats())
        robot.episodes += 1
        robot.successes += int(ep.success)
        path = Path(self.cfg.run_dir) / "episodes.csv"
        new = not path.exists()
        with path.open("a", newline="") as f:
            w = csv.writer(f)
            if new:
                w.writerow(["episode", "env_steps", "updates", "length", "success", "return", "interventions",
                            "policy_versions", "session"])
            w.writerow([self.episodes, self.env_steps, self.updates, ep.length, int(ep.success),
                        float(rows["rewards"].sum()), int(rows["intervention"].sum()), " ".join(ep.policy_versions),
                        ep.session])

    # -- training ------------------------------------------------------------------------------

    def owed(self) -> int:
        """Updates due for the env steps received (``utd`` per step after ``start_updates``)."""
        steps = self.env_steps - self.cfg.start_updates
        if steps <= 0 or not any(n > 0 for _, n in self.online.startable()):
            return 0
        return self.cfg.utd * steps - self.updates

    def sample(self) -> ChunkBatch:
        """A batch: ``intervention_fraction`` of it from the intervention buffer once that holds a
        chunk, the rest uniform over every row of the replay, open episodes included."""
        gen, b = self.sampler, self.batch_size
        n_int = int(round(b * self.cfg.intervention_fraction)) if self.interventions.size >= self.horizon else 0
        main = self.online.sample(b - n_int, generator=gen)
        if n_int == 0:
            return main
        return cat_batches([main, self.interventions.sample(n_int, self.horizon, self.discount, generator=gen)])

    def push(self) -> float:
        """Hand the current weights to the pusher thread (it exports and pushes them); returns the
        seconds training was held. The server serves them from its next chunk once it acknowledges."""
        if self.pusher is None:
            self.pusher = self._make_pusher()
        pause = self.pusher.submit(self.step, self.updates)
        self.push_pause_s.append(pause)
        self._last_push = self.updates
        return pause

    def _make_pusher(self) -> PolicyPusher:
        from qc_robot.export.onnx_export import build_metadata

        off, agent = self.offline, self.agent

        def meta(acting: Any, train_step: int) -> Any:
            return build_metadata(acting, off.obs_fields, off.action_low, off.action_high, off.control_hz,
                                  num_samples=agent.cfg.num_samples, train_step=train_step,
                                  config_hash=off.config_hash)

        def send(version: int, onnx: bytes, timeout_s: float) -> Any:
            assert self.client is not None
            ack = self.client.push_policy(version, onnx, timeout_s)
            if ack is not None and ack.accepted:
                self.policy_version = max(self.policy_version, version)
            return ack

        def next_version() -> int:
            assert self.client is not None
            return max(self.policy_version, self.client.server_version) + 1

        return PolicyPusher(agent, meta, send, next_version, verify=self.cfg.verify_export,
                            timeout_s=self.cfg.push_timeout_s, trace_only=self.cfg.push_mode == "trace",
                            verify_every=self.cfg.verify_every)

    def _check_threads(self) -> None:
        """A helper thread that died is fatal: the run must not go on without data or pushes."""
        if self.client is not None and not self.client.alive:
            raise RuntimeError(f"the learner link thread died: {self.client.error!r}")
        if self.pusher is not None and not self.pusher.alive:
            raise RuntimeError(f"the policy pusher thread died: {self.pusher.error!r}")

    def _report_rate(self) -> None:
        """Say so when the robots produce steps faster than the learner holds its UTD target."""
        now, steps, done = time.monotonic(), self.env_steps, self.updates
        last = getattr(self, "_rate_mark", None)
        self._rate_mark = (now, steps, done)
        if last is None or now <= last[0]:
            return
        steps_s, upd_s = (steps - last[1]) / (now - last[0]), (done - last[2]) / (now - last[0])
        behind = self.owed()
        self.rates.append((steps_s, upd_s, behind))
        if behind > max(2 * self.cfg.push_every, 100):
            log.warning("the learner owes %d updates to its UTD target: robots send %.1f env steps/s, it makes "
                        "%.1f updates/s (UTD %d needs %.1f); it keeps taking their steps and pays the updates as it "
                        "can, and robots wait at their resets while it owes more than their learner_wait", behind,
                        steps_s, upd_s, self.cfg.utd, self.cfg.utd * steps_s)

    def _log_metrics(self, info: dict[str, torch.Tensor]) -> None:
        """One metrics row (one host sync): the update's losses, updates/s and env steps."""
        now = time.perf_counter()
        metrics = {k: float(v) for k, v in info.items()}
        metrics["time/updates_per_s"] = self.cfg.log_interval / max(now - self._log_t0, 1e-9)
        self._log_t0 = now
        self.logger.log(self.step, {"phase_online": 1.0, **metrics, "env_steps": float(self.env_steps)})

    def robot_table(self) -> list[dict[str, Any]]:
        """Per-robot env steps, episodes, successes and outbox re-deliveries skipped."""
        return [{"robot": k, **dataclasses.asdict(v)} for k, v in sorted(self.robots.items())]

    def save(self) -> Path:
        state = {
            "applied_seq": self.applied_seq, "journal_id": self.journal_id, "updates": self.updates,
            "policy_version": self.policy_version, "episodes": self.episodes, "successes": self.successes,
            "assembler": self.assembler.state_dict(), "interventions": self.interventions.state_dict(),
            "robots": {k: dataclasses.asdict(v) for k, v in self.robots.items()}}
        ckpt = checkpoint_of(self.training, self.offline, self.step, self.env_steps, state)
        path = save_checkpoint(Path(self.cfg.run_dir) / CHECKPOINT, ckpt)
        if self.client is not None:
            self.client.persisted(self.applied_seq)  # the server may now prune what we hold
        return path

    def stop(self) -> None:
        self._stop.set()

    def _write_push_stats(self) -> None:
        assert self.pusher is not None
        _write_csv(Path(self.cfg.run_dir) / "pushes.csv", [dataclasses.asdict(p) for p in self.pusher.stats])
        _write_csv(Path(self.cfg.run_dir) / "robots.csv", self.robot_table())

    def _done(self, t_start: float, last_data: float) -> bool:
        c, now = self.cfg, time.monotonic()
        return bool(self._stop.is_set()
                    or (c.max_updates and self.updates >= c.max_updates)
                    or (c.max_env_steps and self.env_steps >= c.max_env_steps and self.owed() <= 0)
                    or (c.max_wall_s and now - t_start >= c.max_wall_s)
                    or (c.idle_stop_s and now - last_data >= c.idle_stop_s and self.owed() <= 0))

    def prepare(self) -> None:
        """Trace the acting graph for weight swaps (seconds; before any update and before the link
        thread starts: tracing is not safe alongside other threads compiling Python, see push.py)."""
        c = self.cfg
        if self.pusher is None and (c.push_every or c.push_on_exit):
            self.pusher = self._make_pusher()
            if c.push_mode != "trace":
                t0 = time.perf_counter()
                self.pusher.prepare(self.step)
                log.info("traced the acting graph for weight swaps in %.1f s", time.perf_counter() - t0)

    def run(self) -> FinetuneResult:
        c = self.cfg
        self.prepare()
        curve = (CurveKeys.from_files(c.curve_secret_key, c.curve_server_key) if c.curve_secret_key else None)
        self.client = LearnerClient(c.server, self.applied_seq + 1, name=f"finetune:{c.run_dir}",
                                    window=c.window, heartbeat_s=c.heartbeat_s, timeout_s=c.timeout_s,
                                    curve=curve, journal_id=self.journal_id).start()
        t_start = last_data = time.monotonic()
        info: dict[str, torch.Tensor] = {}
        try:
            while not self._done(t_start, last_data):
                self._check_threads()
                # max_env_steps reached: stop taking data (it stays in the journal), only pay the
                # updates owed; else a learner that keeps pace with the robot never catches up
                # and overshoots the limit by however much arrives meanwhile.
                full = bool(c.max_env_steps and self.env_steps >= c.max_env_steps)
                records = [] if full else self.client.get(timeout_s=0.0 if self.owed() > 0 else 0.05)
                if records:
                    self.apply(records)
                    last_data = time.monotonic()
                    self.journal_id = self.client.journal_id
                self.client.behind = max(0, self.owed())  # the robots wait at their reset while it is large
                if self.owed() <= 0:
                    continue
                info = self.agent.update(self.sample())
                self.step += 1
                self.updates += 1
                if c.log_interval and self.updates % c.log_interval == 0:
                    self._log_metrics(info)
                    log.info("updates %d  env steps %d  episodes %d (success %d)  seq %d  open rows %d  policy v%d  "
                             "%d robots", self.updates, self.env_steps, self.episodes, self.successes,
                             self.applied_seq, self.online.open_rows, self.policy_version, len(self.robots))
                    self._report_rate()
                if c.push_every and self.updates - self._last_push >= c.push_every:
                    self.push()
                if c.save_every and self.updates % c.save_every == 0:
                    self.save()
            if c.push_on_exit and self.updates > self._last_push:
                self.push()
        finally:
            try:
                if self.pusher is not None:
                    if self.client.alive and not self.pusher.flush(c.push_timeout_s + 60.0):
                        log.warning("the last policy push did not finish")
                    self.pusher.close()
                    self._write_push_stats()
                self.save()
                time.sleep(min(0.2, 2 * c.heartbeat_s))  # let the final ack (persisted seq) go out
            finally:
                self.client.close()
                self.logger.close()
        return FinetuneResult(Path(c.run_dir), self.updates, self.env_steps, self.applied_seq,
                              self.policy_version, self.episodes, self.successes)


def _keep_rows(path: Path, keep: Callable[[dict[str, str]], bool]) -> None:
    """Rewrite the CSV at ``path`` with only the rows ``keep`` accepts (atomic; no file: nothing)."""
    if not path.exists():
        return
    with path.open(newline="") as f:
        header, *rows = list(csv.reader(f))
    kept = [r for r in rows if keep(dict(zip(header, r, strict=False)))]
    if len(kept) < len(rows):
        tmp = path.with_suffix(".tmp")
        with tmp.open("w", newline="") as f:
            csv.writer(f).writerows([header, *kept])
        os.replace(tmp, path)


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def run_finetune(cfg: FinetuneConfig) -> int:
    """CLI entry: fine-tune until a limit or Ctrl-C / SIGTERM (which save and exit cleanly)."""
    # our loggers at log_level; third parties (the ONNX exporter is chatty at INFO) at WARNING
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("qc_robot").setLevel(cfg.log_level.upper())
    try:
        ft = Finetuner(cfg)
    except (FileNotFoundError, ValueError) as e:
        print(f"qc-robot finetune: {e}")
        return 2
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: ft.stop())
    try:
        r = ft.run()
    except RewardConventionError as e:  # saved, nothing of the record applied: one line, no traceback
        print(f"qc-robot finetune: {e}")
        return 2
    except Exception as e:  # a dead helper thread or a failed update: saved, and a non-zero exit
        log.exception("finetune failed")
        print(f"qc-robot finetune: failed: {type(e).__name__}: {e}")
        return 1
    for robot in ft.robot_table():
        print(f"robot {robot['robot']}: {robot['env_steps']} env steps, {robot['episodes']} episodes "
              f"({robot['successes']} successes), {robot['duplicates']} re-deliveries skipped")
    print(f"done: {r.updates} online updates, {r.env_steps} env steps, {r.episodes} episodes "
          f"({r.successes} successes), journal seq {r.applied_seq}, policy v{r.policy_version} → "
          f"{r.run_dir / CHECKPOINT}")
    return 0


__all__ = ["FinetuneResult", "Finetuner", "RewardConventionError", "export_onnx_bytes", "run_finetune"]
