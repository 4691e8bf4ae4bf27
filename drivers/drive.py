"""``qc-robot drive``: a driver, behind the safety layer, against a policy server.

Builds the driver and (optionally) the operator channel, connects to the server, runs episodes
with the control loop of ``qc_robot.drivers.runner`` and prints per-episode and total success.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import numpy as np

from qc_robot.calibration.files import load_calibration
from qc_robot.drivers.client import HandshakeError, PolicyClient
from qc_robot.drivers.config import DriveConfig
from qc_robot.drivers.episode_stage import EpisodeStage, split_rows
from qc_robot.drivers.executor import ChunkExecutor, ChunkSource
from qc_robot.drivers.learner_pace import LearnerPace
from qc_robot.drivers.outbox import Outbox
from qc_robot.drivers.registry import build_driver_config, make_driver
from qc_robot.drivers.runner import EpisodeResult, Pacer, PolicyPace, run_episode
from qc_robot.drivers.safety import SafeDriver
from qc_robot.drivers.shutdown import sigterm_as_interrupt
from qc_robot.drivers.simclock import StepDelayedSource

log = logging.getLogger("qc_robot.drive")


def _drain(client: PolicyClient, outbox: Outbox, timeout_s: float) -> None:
    """Deliver what the outbox holds before leaving (what is left stays on disk for the next run)."""
    deadline = time.monotonic() + timeout_s
    while outbox.pending and time.monotonic() < deadline:
        client.heartbeat()
        client.poll(0.02)
    if outbox.pending:
        print(f"outbox: {outbox.pending} transitions not yet acknowledged: kept in {outbox.dir} for the next run")
    outbox.close()


def build_driver(cfg: DriveConfig) -> SafeDriver:
    """The configured driver behind the safety layer (watchdog on the robot's scaled clock)."""
    values: dict[str, Any] = dict(env=cfg.env.name, sparse_reward=cfg.env.sparse_reward,
                                  max_episode_steps=cfg.env.max_episode_steps, realtime=cfg.realtime,
                                  time_scale=cfg.time_scale, latency_ms=cfg.latency_ms,
                                  obs_noise=cfg.obs_noise, seed=cfg.seed, calibration=cfg.calibration,
                                  randomize=cfg.randomize_physics,
                                  image_size=cfg.env.image_size, image_key=cfg.env.image_key,
                                  camera=cfg.env.camera, render_fast=cfg.env.render_fast, blind=cfg.blind)
    scale = cfg.time_scale
    driver = make_driver(cfg.driver, build_driver_config(cfg.driver, values, cfg.driver_args))
    if cfg.cameras:
        from qc_robot.drivers.camera_driver import CameraDriver

        driver = CameraDriver(driver, cfg.cameras)
    return SafeDriver(driver, cfg.safety, clock=lambda: time.monotonic() * scale)


def run_drive(cfg: DriveConfig) -> int:
    """``qc-robot drive``: run ``cfg.episodes`` episodes against the server; prints success.
    SIGTERM ends it like Ctrl-C: the arm is stopped, parked and released (``drivers/shutdown.py``)."""
    with sigterm_as_interrupt():
        return _run_drive(cfg)


def _run_drive(cfg: DriveConfig) -> int:
    logging.basicConfig(level=cfg.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if cfg.max_inflight < 1 or cfg.inference_delay_steps < 0:
        print(f"drive: max_inflight must be >= 1 (got {cfg.max_inflight}) and inference_delay_steps >= 0 "
              f"(got {cfg.inference_delay_steps})")
        return 2
    try:
        driver = build_driver(cfg)
        cal = load_calibration(cfg.calibration, task=cfg.env.name if cfg.driver == "sim" else None) \
            if cfg.calibration else None
        operator = _operator(cfg, driver)
        detector = _detector(cfg, driver)
        reload = _reload(cfg, driver) if detector is not None and cfg.reward_reload else None
    except (ValueError, RuntimeError) as e:  # CalibrationError is a ValueError; a missing device extra
        print(f"drive: {e}")
        return 2
    driver.connect()
    verdict_rewards = detector is not None or (operator is not None and (
        cfg.reward == "verdict" or (cfg.reward == "auto" and not driver.reports_reward)))
    meta = {"mode": cfg.mode, "calibration_id": cal.id if cal is not None else ""}
    try:
        curve = _client_curve(cfg)
    except (OSError, ValueError) as e:
        print(f"drive: CURVE keys: {e}")
        driver.close()
        return 2
    outbox = Outbox(cfg.outbox_dir, max_bytes=cfg.outbox_max_mb << 20) if cfg.outbox_dir else None
    if outbox is not None:
        meta["outbox"] = outbox.id
    stage = EpisodeStage(f"{cfg.outbox_dir}/stage.log" if cfg.outbox_dir else None) if operator else None
    client = PolicyClient(cfg.server, driver.spec.hello(cfg.driver, meta), curve=curve, outbox=outbox,
                          jpeg_quality=cfg.jpeg_quality)
    try:
        welcome = client.connect(cfg.connect_timeout_s)
    except HandshakeError as e:
        print(f"drive: {e}")
        driver.close()
        return 2
    label = _checked_label(cfg, welcome.metadata)
    if label is None:
        client.close()
        driver.close()
        return 2
    print(f"connected to {cfg.server}: policy {label}, "
          f"H={welcome.chunk_len}, session {welcome.session}; mode {cfg.mode}, driver {cfg.driver}"
          + (f", operator {operator.name}" if operator is not None else "")
          + (f", reward model {cfg.reward_model} (threshold {detector.threshold:g}, debounce {detector.debounce})"
             if detector is not None else ""))
    first_episode = 0
    if stage is not None and (cut := stage.recover()):  # a killed drive's last episode
        for run in cut:
            for part in split_rows(run, 64):
                client.send_transition(part)
        first_episode = cut[0].episode_id + 1  # the new episodes must not continue the cut one
        print(f"drive: episode {cut[0].episode_id} of the previous run (cut after "
              f"{sum(len(r.actions) for r in cut)} steps) sent, truncated there")
    if outbox is not None:  # episode numbers go on from the previous run's, never repeat
        first_episode = max(first_episode, outbox.next_episode)
    pace = PolicyPace(cfg.pace_every, cfg.pace_timeout_s) if cfg.pace_every and not driver.realtime else None
    if pace is not None and operator is not None:
        print("drive: pace_every sends blocks as they end, an operator's episodes only at their verdict: "
              "pacing is off with an operator")
        pace = None
    if cfg.pace_every and driver.realtime:
        print("drive: pace_every applies to lockstep drivers only (a realtime robot cannot wait): ignored")
    delayed = cfg.inference_delay_steps > 0 and not driver.realtime
    if cfg.inference_delay_steps > 0 and driver.realtime:
        print("drive: inference_delay_steps applies to lockstep drivers (realtime=false); a realtime robot meets "
              "the delay it has (serve delay_ms= adds one): ignored")
    if delayed and pace is not None:
        print("drive: pace_every waits for every reply, inference_delay_steps lets the world run on: pacing is off")
        pace = None
    source: ChunkSource = client
    if delayed:  # every reply released k steps after its request, on the world's clock
        source = StepDelayedSource(client, cfg.inference_delay_steps, lambda: driver.step_info().step,
                                   cfg.request_timeout_s)
    inflight = min(cfg.max_inflight, client.max_inflight)
    if cfg.max_inflight > inflight:
        print(f"drive: the server queues {inflight} observation(s) per driver: at most {inflight} request(s) in flight")
    executor = ChunkExecutor(source, welcome.chunk_len, cfg.mode, cfg.request_threshold, cfg.request_timeout_s,
                             wait_when_empty=not driver.realtime and not delayed,
                             gate=pace.accept if pace is not None else None,
                             tick_wait_s=cfg.tick_wait / (driver.spec.control_hz * cfg.time_scale) if driver.realtime else 0.0,
                             initial_delay_steps=cal.inference_delay_steps if cal is not None else 0,
                             max_inflight=inflight)
    pacer = Pacer(driver.spec.control_hz * cfg.time_scale) if driver.realtime else None
    learner_pace = LearnerPace(client, driver, cfg.learner_wait, cfg.learner_wait_max_s,
                               1.0 / (driver.spec.control_hz * cfg.time_scale))
    results: list[EpisodeResult] = []
    video = None
    if cfg.video:  # lockstep sim only (checked by the CLI): rendering is slower than a control period
        from qc_robot.video import DriverVideo

        video = DriverVideo(cfg.video, driver.driver, cfg.video_episodes)
    view = None
    if cfg.viz:  # a live view of the loop in Rerun (the viz extra)
        from qc_robot.liveview import RerunView

        view = RerunView(cfg.viz, executor)
    if operator is not None:
        operator.open()
        print(operator.help(), flush=True)
    try:
        for i in range(cfg.episodes):
            from qc_robot.liveview import chain

            on_rows = chain(video.episode(i) if video is not None else None,
                            view.episode(i) if view is not None else None)
            if outbox is not None:
                outbox.begin_episode(first_episode + i)
            if reload is not None and detector is not None:
                detector = reload.refresh(detector, first_episode + i)
            r = run_episode(driver, executor, first_episode + i, cfg.seed + i, pacer, client, cfg.send_transitions,
                            on_rows=on_rows, pace=pace, max_steps=cfg.max_steps, operator=operator, stage=stage,
                            verdict_rewards=verdict_rewards, reset_wait_s=cfg.reset_wait_s, detector=detector,
                            review_s=cfg.review_s, learner_wait=learner_pace)
            if r.verdict == "end" and r.steps == 0:
                print("the operator ended the run")
                break
            results.append(r)
            _print_episode(cfg, driver, r, i)
            if r.verdict == "end":
                print("the operator ended the run")
                break
    except KeyboardInterrupt:
        print("interrupted", flush=True)
    finally:
        if operator is not None:
            operator.close()
        if stage is not None:
            stage.close()
        if outbox is not None:
            _drain(client, outbox, cfg.outbox_drain_s)
        client.close()
        if video is not None:
            print(f"video of the first {cfg.video_episodes} episode(s): {video.close()}")
        if view is not None:
            view.close()
        driver.close()
    counted = [r for r in results if r.verdict != "discard"]  # a discarded episode has no outcome
    n_ok = sum(r.success for r in counted)
    pct = 100.0 * n_ok / max(1, len(counted))
    print(f"success {n_ok}/{len(counted)} ({pct:.1f}%)  requests {executor.stats.requests}  timeouts "
          f"{executor.stats.timeouts}  stale actions dropped {executor.stats.dropped_stale}  "
          f"safety: rejected {driver.stats.rejected}, trips {driver.stats.trips}")
    if executor.stats.delay_steps:
        d = np.asarray(executor.stats.delay_steps)
        print(f"inference delay: p50 {np.median(d):.0f}, max {d.max()} control steps (H={welcome.chunk_len}; "
              f"mode {cfg.mode}, at most {executor.max_inflight} request(s) in flight)"
              + (f"; {executor.stats.behind} chunk(s) arrived wholly stale: no mode keeps up, docs/rtc.md"
                 if executor.stats.behind else ""))
    print(f"policy: {label}; held {sum(_held(driver, r) for r in results)} of {sum(r.rows for r in results)} "
          "robot steps (no fresh policy action: waiting for a chunk, server lost or operator pause)")
    lost_eps = sum(r.offline_s > 0 for r in results)
    if lost_eps:
        print(f"server lost {client.stats.lost} time(s): {lost_eps}/{len(results)} episode(s) ran partly or wholly "
              f"without it, {sum(r.offline_s for r in results):.1f} s held in all (their outcome is the hold's, "
              "not the policy's)")
    if learner_pace.waits:
        total = sum(r.duration_s for r in results)
        print(f"waited for the learner at {learner_pace.waits} reset(s): {learner_pace.wait_s:.1f} s, "
              f"{100.0 * learner_pace.wait_s / max(total, 1e-9):.0f}% of the run's robot time"
              + (f"; {learner_pace.gave_up} wait(s) cut at {cfg.learner_wait_max_s:g} s" if learner_pace.gave_up else ""))
    if pace is not None:
        print(f"paced to the learner: {pace.blocks} blocks of {pace.every} steps, waited {pace.wait_s:.1f} s, "
              f"{pace.timeouts} timeouts")
    if operator is not None:
        steps = sum(r.rows for r in results)
        rate = f"{100.0 * sum(r.interventions for r in results) / steps:.1f}%" if steps else "n/a"
        print(f"{operator.summary()}; intervention rate {rate} of steps; discarded "
              f"{sum(r.verdict == 'discard' for r in results)} episode(s); reset phases "
              f"{sum(r.reset_s for r in results):.1f} s" + ("; rewards from verdicts" if verdict_rewards
                                                             and detector is None else ""))
    if detector is not None:
        s = detector.summary()
        print(f"reward model: fired in {sum(r.detector_fired for r in results)}/{len(results)} episodes; overruled "
              f"{s['overrules']} of {s['verdicts']} operator verdicts ({s['overrules_false_positive']} false "
              f"positives, {s['overrules_false_negative']} missed successes); {s['nan_frames']} non-finite frames "
              "gave no reward" + (f"; reloaded {reload.reloads} time(s), {reload.refused} changed file(s) refused"
                                  if reload is not None else ""))
    sys.stdout.flush()  # the summary reaches a log file even if the process dies in its shutdown
    return 0


def _checked_label(cfg: DriveConfig, metadata: dict[str, Any]) -> str | None:
    """The served policy in words; None (after one line saying why) when ``policy_expect`` names
    another policy than the server's."""
    from qc_robot.drivers.policy_id import mismatch, policy_label

    if cfg.policy_expect:
        try:
            wrong = mismatch(cfg.policy_expect, metadata)
        except (OSError, ValueError) as e:
            print(f"drive: policy_expect: {e}")
            return None
        if wrong is not None:
            print(f"drive: {wrong} (another server on {cfg.server}? stop it, or serve on another port)")
            return None
    return policy_label(metadata, cfg.policy_expect)


def _held(driver: SafeDriver, r: EpisodeResult) -> int:
    """Robot steps that ran the hold action: the robot's own ticks for a realtime driver, the
    loop's (one per step) for a lockstep one."""
    return r.robot_held if driver.realtime else r.held


def _print_episode(cfg: DriveConfig, driver: SafeDriver, r: EpisodeResult, i: int) -> None:
    rtt = f"{np.median(r.rtt_ms):.1f} ms" if r.rtt_ms else "n/a"
    lost = f"  SERVER LOST {r.offline_s:.1f} s" if r.offline_s > 0 else ""
    taken = f"  operator steps {r.interventions}" if r.interventions else ""
    ended = f"  ENDED BY SAFETY: {driver.end_reason}" if driver.end_reason else ""
    held = _held(driver, r)
    print(f"episode {i + 1}/{cfg.episodes}: {r.verdict or ('success' if r.success else 'failure')}  steps {r.steps} "
          f"(robot {r.robot_steps})  rows {r.rows}  held {held} ({held / driver.spec.control_hz:.1f} s)  "
          f"overruns {r.overruns}  chunks {r.chunks}  rtt p50 {rtt}  {r.duration_s:.1f} s{taken}{lost}{ended}", flush=True)


def _operator(cfg: DriveConfig, driver: SafeDriver) -> Any:
    """The operator channel (None for operator=none); a mistake is a ValueError of one line."""
    from qc_robot.teleop.operator import make_operator

    if cfg.reward not in ("auto", "driver", "verdict", "detector"):
        raise ValueError(f"reward must be 'auto', 'driver', 'verdict' or 'detector', got {cfg.reward!r}")
    return make_operator(cfg.operator, dict(cfg.operator_args), driver)


def _detector(cfg: DriveConfig, driver: SafeDriver) -> Any:
    """The success detector of ``reward_model`` (None: none); a mistake is a ValueError of one line."""
    if not cfg.reward_model:
        if cfg.reward == "detector":
            raise ValueError("reward=detector needs reward_model=PATH (a detector exported by qc-robot reward)")
        if cfg.reward_reload:
            raise ValueError("reward_reload watches reward_model=PATH: give one")
        return None
    if cfg.reward not in ("auto", "detector"):
        raise ValueError(f"reward_model gives the rewards: it cannot be combined with reward={cfg.reward}")
    if cfg.driver == "sim" and not cfg.blind:
        raise ValueError("reward_model on the sim needs blind=true (else the sim's own success ends the episodes "
                         "and the detector is not what decides)")
    from pathlib import Path

    if not Path(cfg.reward_model).is_file():
        raise ValueError(f"reward_model: no file {cfg.reward_model} (export one with qc-robot reward)")
    det = _load_detector(cfg, cfg.reward_model)
    det.check_spec(driver.spec.obs_fields)
    return det


def _load_detector(cfg: DriveConfig, path: str) -> Any:
    from qc_robot.policies.success_detector import SuccessDetector

    return SuccessDetector.load(path, threshold=cfg.reward_threshold if cfg.reward_threshold >= 0 else None,
                                debounce=cfg.reward_debounce or None)


def _reload(cfg: DriveConfig, driver: SafeDriver) -> Any:
    """``reward_reload``: a re-exported ``reward_model`` is swapped in at the next episode."""
    from functools import partial

    from qc_robot.drivers.detector_reload import DetectorReload

    return DetectorReload(cfg.reward_model, partial(_load_detector, cfg), driver.spec.obs_fields)


def _client_curve(cfg: DriveConfig) -> Any:
    """CURVE keys for the driver port (None: keyless, as on loopback)."""
    if not cfg.curve_secret_key:
        return None
    if not cfg.curve_server_key:
        raise ValueError("curve_secret_key needs curve_server_key (the server's public key file)")
    from qc_robot.server.learner_link import CurveKeys  # zmq.auth only; torch-free

    return CurveKeys.from_files(cfg.curve_secret_key, cfg.curve_server_key)
