"""The control loop: at the control rate, observation → (operator | executor) → safety → driver.

``run_episode`` runs one episode and is shared by ``qc-robot drive`` (``qc_robot.drivers.drive``),
``qc-robot demo`` and the tests. With an operator in the loop (``qc_robot.teleop.operator``) it
also runs the reset phase, lets the operator's commands replace the policy's while they take
over, ends the episode on their verdict and holds the episode's transitions back until then.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from qc_robot.policies.success_detector import SuccessDetector
    from qc_robot.teleop.operator import Operator, OperatorTick

import numpy as np

from qc_robot import protocol as P
from qc_robot.data.rewards import SPARSE
from qc_robot.drivers.base import ExecutedStep, StepInfo
from qc_robot.drivers.client import PolicyClient
from qc_robot.drivers.episode_stage import EpisodeStage, split_rows, version_runs
from qc_robot.drivers.executor import ChunkExecutor, ExecutorStats
from qc_robot.drivers.safety import SafeDriver

log = logging.getLogger("qc_robot.runner")


class Pacer:
    """Fixed-rate ticks on the monotonic clock; records how late each tick starts."""

    def __init__(self, hz: float) -> None:
        self.period = 1.0 / hz
        self._next = time.monotonic()
        self.lateness_s: list[float] = []
        self.overruns = 0

    def start(self) -> None:
        self._next = time.monotonic()

    def wait(self, idle: Callable[[float], None] | None = None) -> None:
        """Sleep until the next tick; a tick more than a period late resets the schedule.

        ``idle(deadline)`` may use the time instead of sleeping (it must return by ``deadline``).
        """
        self._next += self.period
        if idle is not None:
            idle(self._next)
        delay = self._next - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        late = time.monotonic() - self._next
        if len(self.lateness_s) < 1_000_000:
            self.lateness_s.append(late)
        if late > self.period:
            self.overruns += 1
            self._next = time.monotonic()  # do not burst to catch up


class PolicyPace:
    """Lockstep pacing to a learner: after every ``every`` executed steps, act again only with a
    chunk from a policy newer than the one that produced them (waiting up to ``timeout_s``).

    With a learner that pushes every ``every · utd`` updates, the robot then waits for training
    exactly as the in-process loop does: each block of steps is acted by the policy that trained
    on every step before it. The wait is measured, and a learner that never answers costs one
    ``timeout_s`` per block, not a dead robot.
    """

    def __init__(self, every: int, timeout_s: float = 60.0) -> None:
        if every <= 0:
            raise ValueError("pace every must be > 0")
        self.every, self.timeout_s = every, timeout_s
        self.steps = 0
        self.version: str | None = None
        self.blocks = 0
        self.timeouts = 0
        self.wait_s = 0.0
        self._since: float | None = None

    @property
    def due(self) -> bool:
        """The current block is complete: the next chunk must come from a newer policy."""
        return self.version is not None and self.steps >= self.every

    def executed(self, n: int) -> None:
        self.steps += n

    def accept(self, chunk: P.Chunk) -> bool:
        if self.version is None or chunk.policy_version != self.version:
            self._new_block(chunk.policy_version)
            return True
        if not self.due:
            return True
        now = time.monotonic()
        self._since = self._since or now
        if now - self._since >= self.timeout_s:
            log.warning("no newer policy than %s after %.0f s: acting with it again", self.version, self.timeout_s)
            self.timeouts += 1
            self._new_block(chunk.policy_version)
            return True
        return False

    def _new_block(self, version: str) -> None:
        if self._since is not None:
            self.wait_s += time.monotonic() - self._since
        self.version, self.steps, self._since = version, 0, None
        self.blocks += 1


@dataclass
class EpisodeResult:
    index: int
    success: bool
    steps: int
    """Control-loop ticks (commands sent)."""
    robot_steps: int
    """Steps the robot executed (its own clock; equals ``steps`` for lockstep drivers)."""
    held: int
    """Ticks the safety layer held (no fresh action from the executor)."""
    chunks: int
    duration_s: float
    rtt_ms: list[float] = field(default_factory=list)
    rows: int = 0
    """Transition rows produced: exactly one per executed robot step."""
    robot_held: int = 0
    """Robot ticks that found no new command and applied the hold (realtime drivers)."""
    overruns: int = 0
    """Waits of the loop for the robot's next step that ran past 1.5 control periods: the world did
    not advance when it should have (load, a stalled robot). Never a transition row."""
    offline_s: float = 0.0
    """Seconds of this episode without a server session (the robot held meanwhile)."""
    verdict: str = ""
    """How it ended: 'success' or 'failure' (the operator's verdict, else the task's outcome or
    the time limit), 'discard' (nothing sent), 'end' (the operator ended the run: truncated)."""
    interventions: int = 0
    """Rows the operator had the controls for (flagged ``intervention``)."""
    reset_s: float = 0.0
    """Seconds of the reset phase before the episode (waiting for the operator's ready)."""
    learner_wait_s: float = 0.0
    """Seconds the robot waited at its reset for the learner to catch up (``learner_wait``)."""
    detector_fired: bool = False
    """The success detector (``reward_model``) ended the episode."""
    overruled: str = ""
    """'false_positive' or 'false_negative': the operator's verdict contradicted the detector."""


def _version_runs(rows: list[ExecutedStep]) -> list[list[ExecutedStep]]:
    return version_runs(rows, lambda r: r.policy_version)


class _TransitionSender:
    """Streams executed steps as Transition messages, one per ``every`` rows (a chunk) and at the
    end; with a ``stage`` (an operator in the loop) each tick's rows are staged instead and the
    episode leaves whole once its verdict is known (:meth:`release`)."""

    def __init__(self, client: PolicyClient, every: int, stage: EpisodeStage | None = None,
                 verdict_rewards: bool = False) -> None:
        self.client, self.every = client, max(1, every)
        self.stage, self.verdict_rewards = stage, verdict_rewards
        self.rows: list[ExecutedStep] = []
        self.start_step = 0
        self.success = False

    def add(self, row: ExecutedStep) -> None:
        self.rows.append(row)

    def flush(self, episode_id: int, force: bool = False) -> None:
        """Send the complete chunks of rows (all of them if ``force``); staging: stage every row."""
        if self.stage is not None:
            for run in _version_runs(self.rows):
                self.stage.add(self._message(episode_id, run))
                self.start_step += len(run)
            self.rows = []
            return
        n = len(self.rows) if force else len(self.rows) // self.every * self.every
        if n <= 0:
            return
        rows, self.rows = self.rows[:n], self.rows[n:]
        per = self._rows_per_message(rows[0])
        for run in _version_runs(rows):  # each message names the one policy that acted in it
            for i in range(0, len(run), per):  # the server's size limit holds with images too
                self._send(episode_id, run[i:i + per])

    def _rows_per_message(self, row: ExecutedStep) -> int:
        """Rows that fit the server's advertised message limit (with a quarter left for framing)."""
        w = self.client.welcome
        limit = int(w.metadata.get("max_message_bytes", P.MAX_MESSAGE_BYTES)) if w is not None else P.MAX_MESSAGE_BYTES
        row_bytes = sum(v.nbytes for v in row.obs.values()) + sum(v.nbytes for v in row.next_obs.values())
        row_bytes += row.action.nbytes + 64
        return max(1, int(0.75 * limit) // row_bytes)

    def _message(self, episode_id: int, rows: list[ExecutedStep]) -> P.Transition:
        self.success = self.success or any(r.success for r in rows)  # succeeded by the last row sent
        keys = rows[0].obs.keys()
        rewards = np.asarray([r.reward for r in rows], np.float32)
        if self.verdict_rewards:  # the sparse convention: 0 on a success that ends the episode
            rewards = np.asarray([0.0 if r.success and r.terminated else -1.0 for r in rows], np.float32)
        return P.Transition(
            episode_id=episode_id, start_step=self.start_step,
            obs={k: np.stack([r.obs[k] for r in rows]) for k in keys},
            actions=np.stack([r.action for r in rows]).astype(np.float32), rewards=rewards,
            terminals=np.asarray([r.terminated for r in rows], bool),
            truncated=np.asarray([r.truncated for r in rows], bool),
            next_obs={k: np.stack([r.next_obs[k] for r in rows]) for k in keys}, success=self.success,
            timestamps=np.asarray([r.wall_time for r in rows], np.float64),
            held=np.asarray([r.held for r in rows], bool),
            intervention=np.asarray([r.intervention for r in rows], bool),
            policy_version=next((r.policy_version for r in rows if r.policy_version), ""),
            reward=SPARSE if self.verdict_rewards else "")

    def _send(self, episode_id: int, rows: list[ExecutedStep]) -> None:
        self.client.send_transition(self._message(episode_id, rows))
        self.start_step += len(rows)

    def release(self, verdict: str) -> int:
        """Staging: the episode ends with ``verdict``; send it whole (or drop it on 'discard').
        Returns the steps sent."""
        assert self.stage is not None
        if verdict == "discard":
            self.stage.discard()
            return 0
        runs = self.stage.take()
        if not runs:
            return 0
        finish(runs[-1], verdict, self.verdict_rewards)
        per = self._rows_per_message_of(runs[0])
        for tr in runs:
            for part in split_rows(tr, per):
                self.client.send_transition(part)
        return sum(len(tr.actions) for tr in runs)

    def _rows_per_message_of(self, tr: P.Transition) -> int:
        w = self.client.welcome
        limit = int(w.metadata.get("max_message_bytes", P.MAX_MESSAGE_BYTES)) if w is not None else P.MAX_MESSAGE_BYTES
        k = len(tr.actions)
        row_bytes = (sum(v.nbytes for v in tr.obs.values()) + sum(v.nbytes for v in tr.next_obs.values())
                     + tr.actions.nbytes) // max(1, k) + 64
        return max(1, int(0.75 * limit) // row_bytes)


def finish(tr: P.Transition, verdict: str, verdict_rewards: bool) -> None:
    """Set a finished episode's last step from its verdict: a success terminates there (reward 0
    under the sparse convention, -1 before it), anything else is truncated there."""
    if verdict == "success":
        tr.terminals[-1], tr.truncated[-1], tr.success = True, False, True
        if verdict_rewards:
            tr.rewards[-1] = 0.0
    else:
        tr.success = False
        if verdict_rewards:  # a detector's success overruled: under verdicts only a success terminates
            tr.terminals[-1], tr.rewards[-1] = False, -1.0
        if not tr.terminals[-1]:
            tr.truncated[-1] = True


def _snapshot(driver: SafeDriver) -> tuple[dict[str, np.ndarray], StepInfo]:
    """The latest observation and the step info of the same robot step (retried across a tick)."""
    while True:
        info = driver.step_info()
        obs = driver.get_observation()
        again = driver.step_info()
        if again.step == info.step:
            return obs, again


class _NoPolicy:
    """The executor of an episode with no policy (teleop: the operator drives every tick)."""

    chunk_len = 1

    def __init__(self) -> None:
        self.stats = ExecutorStats()

    def reset(self) -> None:
        pass

    def act(self, obs: dict[str, np.ndarray], step: int, episode_id: int) -> None:
        return None

    @property
    def last_version(self) -> str:
        return ""

    def idle(self, deadline: float, next_step: int) -> None:
        pass


def run_episode(driver: SafeDriver, executor: ChunkExecutor | None, episode_id: int, seed: int | None,
                pacer: Pacer | None = None, client: PolicyClient | None = None,
                send_transitions: bool = False, max_steps: int = 0,
                on_rows: Callable[[list[ExecutedStep]], None] | None = None,
                stall_timeout_s: float = 5.0, pace: PolicyPace | None = None,
                operator: Operator | None = None, stage: EpisodeStage | None = None,
                verdict_rewards: bool = False, reset_wait_s: float = 0.0,
                reset_phase: bool = True, detector: SuccessDetector | None = None,
                review_s: float = 0.0, learner_wait: Callable[[], float] | None = None) -> EpisodeResult:
    """One episode; returns its result.

    Rows (for ``send_transitions`` and ``on_rows``) are exact: one per step the robot executed,
    never one for a tick where the world did not advance, and none after the episode's end. A
    lockstep driver's row is composed here (observation read, action applied, the step's outcome,
    the next observation). A realtime driver's rows are its own record of its ticks
    (``Driver.executed_steps``), and the loop follows the robot's clock: after each command it
    waits for the robot's next step (taking chunk replies meanwhile), so every command is read
    from the newest state and reaches the robot before the tick that applies it. ``pacer`` only
    paces a realtime driver that keeps no log of its own (its period is used otherwise).

    With an ``operator``: after the reset the loop waits for the operator's ready (or
    ``reset_wait_s``); each tick the operator may take over (their command replaces the policy's,
    the chunk in flight is dropped, the row is flagged ``intervention``), pause, or end the episode
    with a verdict. Rows are staged (``stage``) and sent only when the episode has ended, with the
    verdict on the last one; ``verdict_rewards``: rewards are the sparse convention (-1 a step, 0
    on the success step), for robots with no reward of their own. ``reset_phase=False``: no wait
    for ready (teleop waits before the reset). ``executor`` None: no policy (teleop: the
    operator drives every tick); ``pacer`` then also paces a lockstep driver, at a person's pace.

    With a ``detector`` (``reward_model``) each executed step's next observation is scored; when
    it fires the episode ends at that step as a success (later steps of the same tick are not
    rows). An operator then has ``review_s`` seconds to overrule it, and may end an episode with a
    'success' the detector missed; both kinds of overrule are counted (``overruled``).

    ``learner_wait``: called before the reset; it holds the robot while the learner is too far
    behind and returns the seconds it waited (those ticks are no part of the episode).
    """
    t0 = time.monotonic()
    lockstep_pacer = pacer if executor is None and not driver.realtime else None
    ex: ChunkExecutor | _NoPolicy = executor if executor is not None else _NoPolicy()
    res = EpisodeResult(episode_id, False, 0, 0, 0, 0, 0.0)
    # before the reset, not after: a robot whose episode clock starts at its reset (the sim's time
    # limit) would spend the episode holding while it waits, and start it already over
    waited = learner_wait() if learner_wait is not None else 0.0
    obs = driver.reset(seed)
    ex.reset()
    if waited > 0:
        res.learner_wait_s = waited
        if driver.realtime:
            driver.executed_steps()  # the held ticks are no episode
            obs = driver.get_observation()
    if operator is not None:
        if reset_phase:
            ready = _reset_phase(driver, operator, pacer, reset_wait_s)
            res.reset_s = time.monotonic() - t0
            if ready == "end":
                res.verdict, res.duration_s = "end", time.monotonic() - t0
                return res
            if driver.realtime:
                driver.executed_steps()  # the ticks the robot held through while waiting are no episode
            obs = driver.get_observation()
        operator.episode_started(obs)
    if detector is not None:
        detector.reset()
    held0, chunks0, rtt0 = driver.stats.held, ex.stats.chunks, len(ex.stats.rtt_ms)
    offline0 = client.offline_now if client is not None else 0.0
    limit = max_steps or (driver.spec.max_episode_steps * 2 if driver.spec.max_episode_steps else 100_000)
    sender = None
    if client and send_transitions:
        sender = _TransitionSender(client, ex.chunk_len, stage if operator is not None else None,
                                   verdict_rewards and (operator is not None or detector is not None))
    period = pacer.period if pacer is not None else 1.0 / driver.spec.control_hz
    info = driver.step_info()
    last: ExecutedStep | None = None
    alive = True
    op: OperatorTick | None = None
    takeover_cmds: set[int] = set()  # realtime: robot steps at which an operator command was sent
    cmd_versions: dict[int, str] = {}  # realtime: robot step a policy command was sent at → its version
    hold_cmds: set[int] = set()  # realtime: robot steps at which the loop sent the hold (no fresh action)
    if pacer is not None:
        pacer.start()
    try:
        while True:
            was = op
            op = operator.tick() if operator is not None else None
            if op is not None and (op.verdict is not None or op.end):
                res.verdict = op.verdict or "end"
                break  # before acting: the episode's last row is the previous tick's
            if driver.sensor_fault is not None:  # a stale/failed camera: hold, and drop the plans made
                ex.reset()  # before it, so none of them runs once the sensors are current again
                action = None
            elif op is not None and (op.takeover or op.paused):
                if was is None or not (was.takeover or was.paused):
                    ex.reset()  # the chunk in flight is dropped; on release a fresh one is asked
                action = op.action if op.takeover else None  # a failed device: None, the safety layer holds
                if op.takeover and driver.realtime:
                    takeover_cmds.add(info.step)
            else:
                action = ex.act(obs, res.steps, episode_id)
            version = ex.last_version if action is not None and not (op is not None and op.takeover) else ""
            if version and driver.realtime:
                cmd_versions[info.step] = version
            held_before = driver.stats.held
            applied = driver.act(action)
            if driver.realtime and driver.stats.held > held_before:
                hold_cmds.add(info.step)
            res.steps += 1
            if client is not None:
                client.heartbeat()
            if lockstep_pacer is not None:
                lockstep_pacer.wait()
            if not driver.realtime:  # lockstep: send_action executed exactly this one step
                nxt, new = _snapshot(driver)
                rows = [ExecutedStep(res.steps - 1, obs, applied, driver.stats.held > held_before, new.reward,
                                     new.success, new.terminated, new.truncated, nxt, time.monotonic(), time.time(),
                                     intervention=bool(op is not None and op.takeover),
                                     policy_version="" if driver.stats.held > held_before else version)]
            else:
                nxt, new, rows, alive = _realtime_wait(driver, ex, pacer, period, info, obs, applied, res,
                                                       stall_timeout_s)
                for r in rows:
                    r.held = r.held or r.cmd_step in hold_cmds  # the robot applied the hold the loop sent
                    r.intervention = r.cmd_step in takeover_cmds or bool(r.held and op is not None and op.takeover)
                    # a row without cmd_step is this tick's own command (a driver that logs no steps)
                    r.policy_version = "" if r.held else cmd_versions.get(r.cmd_step, "") if r.cmd_step >= 0 else version
            obs, info = nxt, new
            if detector is not None and rows:
                rows = _detect(detector, rows)
                res.detector_fired = rows[-1].success
            last = rows[-1] if rows else last
            ended = (last is not None and (last.terminated or last.truncated)) or new.terminated or new.truncated \
                or not alive or res.steps >= limit or res.detector_fired
            if ended and last is not None and not (last.terminated or last.truncated):
                last.truncated = True  # the loop ends the episode here (its step limit, a stalled robot)
            for r in rows:
                res.success = res.success or r.success
                res.robot_held += r.held and driver.realtime
                res.interventions += r.intervention
                if sender is not None:
                    sender.add(r)
            res.rows += len(rows)
            if on_rows is not None and rows:
                on_rows(rows)
            if pace is not None:
                pace.executed(len(rows))
            if sender is not None:  # a complete pacing block goes out whole: the learner needs all of it
                sender.flush(episode_id, force=ended or (pace is not None and pace.due))
            if ended:
                break
        if res.detector_fired and operator is not None and review_s > 0:
            operator.detector_fired()
            res.verdict = _review(driver, operator, period, review_s) or ""
    finally:
        if operator is not None:
            operator.episode_ended()
    if detector is not None and res.verdict in ("success", "failure"):  # the operator's word on it
        o = detector.record_verdict(res.verdict == "success")
        res.overruled = o.kind if o is not None else ""
    if not res.verdict:
        res.verdict = "success" if res.success else "failure"
    elif operator is not None:
        res.success = res.verdict == "success"
    if sender is not None and sender.stage is not None:
        sender.flush(episode_id, force=True)
        sender.release(res.verdict)
    res.robot_steps = driver.step_info().step if not driver.realtime else (last.step + 1 if last else 0)
    res.held = driver.stats.held - held0
    res.chunks = ex.stats.chunks - chunks0
    res.duration_s = time.monotonic() - t0
    res.rtt_ms = ex.stats.rtt_ms[rtt0:]
    res.offline_s = client.offline_now - offline0 if client is not None else 0.0
    return res


def _detect(detector: SuccessDetector, rows: list[ExecutedStep]) -> list[ExecutedStep]:
    """Score each row's next observation; the rows up to the one the detector fires on, that one
    marked the episode's successful last step. The robot's own success flags are not used."""
    for i, r in enumerate(rows):
        r.success = False
        if detector.update(r.next_obs).fired:
            r.success = r.terminated = True
            r.truncated = False
            return rows[: i + 1]
    return rows


def _review(driver: SafeDriver, operator: Operator, period: float, review_s: float) -> str | None:
    """After the detector fired: up to ``review_s`` seconds for the operator's verdict (None: no
    word: the fire stands; 'end' is no word here, press it again at the reset). The robot holds
    meanwhile."""
    deadline = time.monotonic() + review_s
    while time.monotonic() < deadline:
        said = operator.review_tick()
        if said is not None:
            return None if said == "end" else said
        if driver.realtime:
            driver.act(None)
        time.sleep(period)  # the operator's pace, not a synchronisation: nothing else waits on it
    return None


def _reset_phase(driver: SafeDriver, operator: Operator, pacer: Pacer | None, wait_s: float) -> str:
    """After the reset (the driver's home move): wait for the operator's ready, or ``wait_s``
    seconds when > 0. The robot holds meanwhile (a realtime one is sent its hold each tick).
    Returns 'ready' or 'end'; other keys are ignored and counted by the operator."""
    period = pacer.period if pacer is not None else 1.0 / driver.spec.control_hz
    deadline = time.monotonic() + wait_s if wait_s > 0 else None
    while True:
        said = operator.reset_phase_tick()
        if said == "end" or (said == "ready" and deadline is None):
            return said
        if deadline is not None and time.monotonic() >= deadline:
            return "ready"
        if driver.realtime:
            driver.act(None)
        time.sleep(period)  # the operator's pace, not a synchronisation: nothing else waits on it


def _realtime_wait(driver: SafeDriver, executor: ChunkExecutor | _NoPolicy, pacer: Pacer | None, period: float,
                   info: StepInfo, obs: dict[str, np.ndarray], applied: np.ndarray, res: EpisodeResult,
                   stall_timeout_s: float) -> tuple[dict[str, np.ndarray], StepInfo, list[ExecutedStep], bool]:
    """After a command: wait for the robot's next step. Returns (newest obs, its info, the rows of
    the steps executed meanwhile, whether the robot is still stepping)."""
    target = info.step + 1
    if not driver.logs_steps:  # no log of its own: pace on our clock, a row only for exactly one step
        if pacer is not None:
            pacer.wait(functools.partial(_idle, executor, next_step=res.steps))
        nxt, new = _snapshot(driver)
        if new.step != target:
            res.overruns += 1  # no step (the world did not advance) or several we did not see apart
            return nxt, new, [], True
        return nxt, new, [ExecutedStep(info.step, obs, applied, driver.last_held, new.reward, new.success, new.terminated,
                                       new.truncated, nxt, time.monotonic(), time.time())], True
    expected = (info.time or time.monotonic()) + period  # when the robot's next tick is due
    executor.idle(min(expected, time.monotonic() + period), res.steps)  # take replies meanwhile
    waited, alive = 0.0, True
    while not driver.wait_step(target, 1.5 * period if waited == 0.0 else period):
        res.overruns += 1
        waited += period
        now = driver.step_info()
        if now.terminated or now.truncated:
            break
        if waited >= stall_timeout_s:
            log.error("the robot executed no step for %.1f s: ending the episode", waited)
            alive = False
            break
        executor.idle(time.monotonic() + 0.1 * period, res.steps)
    nxt, new = _snapshot(driver)
    rows = driver.executed_steps() or []
    return nxt, new, rows, alive


def _idle(executor: ChunkExecutor | _NoPolicy, deadline: float, next_step: int) -> None:
    executor.idle(deadline, next_step)


