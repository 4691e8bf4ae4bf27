"""``qc-robot calibrate``: measure a robot and write ``calibration/<robot_id>.json``.

Steps (``step=``): ``excite`` logs an excitation dataset from the driver; ``latency`` measures round
trips through the server and the driver's actuation delay; ``normalization`` computes dataset
statistics; ``sysid`` fits the sim's physics to the dataset; ``all`` runs latency, normalization
and sysid (the last two when a dataset is given); ``check`` compares a new dataset (and the link)
against the stored calibration and exits 1 on drift. Exit codes: 0 done, 1 drift, 2 bad input, 3 a
fit that did not converge under ``require_converged=true``. Each step updates only its own section of an
existing file, so steps can be run on different days.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qc_robot.calibration.files import (
    Calibration,
    CalibrationError,
    default_path,
    load_calibration,
    save_calibration,
)

STEPS = ("excite", "latency", "normalization", "sysid", "all", "check")


@dataclass
class CalibrateConfig:
    """Calibrate one robot (or the sim standing in for it)."""

    step: str = "all"
    """excite | latency | normalization | sysid | all | check."""
    robot_id: str = "sim"
    """Names the file: calibration/<robot_id>.json (unless ``out`` is set)."""
    out: str = ""
    """Calibration file path ('' = calibration/<robot_id>.json)."""
    task: str = "cube-single-task1"
    """Sim task the robot's data corresponds to (obs layout; the model sysid replays in)."""
    dataset: str = ""
    """HDF5 episodes of the robot (normalization, sysid, check; excite writes it)."""
    driver: str = "sim"
    """Registered driver for excite/latency."""
    driver_args: dict[str, Any] = field(default_factory=dict)
    """Driver config keys (e.g. calibration: hidden.json to make the sim a 'different robot')."""
    realtime: bool = True
    time_scale: float = 1.0
    latency_ms: float = 0.0
    """sim driver: injected actuation latency (the latency step should recover it)."""
    obs_noise: float = 0.0
    server: str = "local"
    """Policy server for round trips; 'local' starts an in-process hold-policy server (measures the
    link and the driver, not your model's inference: use the real server for that)."""
    requests: int = 50
    trials: int = 8
    """Step tests for the actuation delay."""
    step_dim: int = 0
    step_value: float = 0.5
    episodes: int = 3
    """excite/sysid: episodes written / used."""
    steps: int = 50
    """excite/sysid: steps per episode written / used."""
    kinds: list[str] = field(default_factory=lambda: ["kp", "damping", "armature", "frictionloss"])
    """Physical parameter kinds to fit (qc_robot.calibration.randomization.PARAM_KINDS)."""
    max_delay: int = 4
    """sysid: largest control delay considered (steps; realtime logs: latencies up to this many periods)."""
    max_iters: int = 30
    """sysid: evaluation budget of each local least-squares stage (each also costs one replay per
    parameter for the Jacobian)."""
    global_evals: int = 480
    """sysid: CMA-ES evaluations of the global stage before the local one (0 = local only)."""
    starts: int = 1
    """sysid: local starts from distinct basins of the global stage (1 = its best only; more starts
    were measured only with the earlier IK replay, where 4 recovered one more robot at about 1.4x
    the time)."""
    replay: str = "auto"
    """sysid/check: how the log is replayed: auto (ctrl when the log is a realtime driver's record
    of its executed steps with their actuator targets, executed when without, else lockstep) | ctrl
    (each row's applied actuator targets, one-step predictions) | executed (each row's command as the
    robot applied it) | lockstep (each row's command shifted by a fitted whole-step delay)."""
    profile: bool = True
    """sysid: per-parameter error profiles (ranges, identifiability report)."""
    range_k: float = 3.0
    """Randomization ranges: fitted value ± range_k standard errors ..."""
    range_min_frac: float = 0.1
    """... and at least ± this fraction."""
    plot: str = ""
    """sysid PNG ('' = next to the calibration file: <robot_id>_sysid.png)."""
    require_converged: bool = False
    """sysid: exit 3 and write nothing when the fit did not converge (its replay error stays above
    the floor a step from it could reach, or a profile found a lower error); the report says what to add."""
    drift_factor: float = 2.0
    """check, logs without the applied targets (executed/lockstep replay): drift when the replay error
    exceeds drift_factor x the calibrated one."""
    drift_tol: float = 0.05
    """check, ctrl replay: a scale (kp, damping, armature) drifted when the new log's refit moves it by
    more than this fraction and drift_sigmas standard errors (calibration/drift.py)."""
    drift_tol_friction: float = 0.05
    """check, ctrl replay: the same for friction, in N·m."""
    drift_sigmas: float = 3.0
    """check, ctrl replay: standard errors of the refit a shift must also exceed (3: 0.27 % false alarms
    per parameter under Gaussian noise)."""
    check_iters: int = 15
    """check, ctrl replay: least-squares evaluations of the refit."""
    seed: int = 0
    log_level: str = "WARNING"


def _driver(cfg: CalibrateConfig) -> Any:
    from qc_robot.drivers.registry import build_driver_config, make_driver

    values: dict[str, Any] = dict(env=cfg.task, realtime=cfg.realtime, time_scale=cfg.time_scale,
                                  latency_ms=cfg.latency_ms, obs_noise=cfg.obs_noise, seed=cfg.seed)
    if cfg.driver == "sim" and cfg.step in ("latency", "all", "check"):
        values["max_episode_steps"] = 100_000  # step tests outlast a task episode; a frozen world never responds
    return make_driver(cfg.driver, build_driver_config(cfg.driver, values, cfg.driver_args))


def _latency(cfg: CalibrateConfig) -> dict[str, Any]:
    from qc_robot.calibration.latency import measure_latency

    driver = _driver(cfg)
    server = None
    try:
        address = cfg.server
        if cfg.server == "local":
            from qc_robot.policies.base import PolicySpec
            from qc_robot.policies.scripted import HoldPolicy
            from qc_robot.server.app import ControlServer

            s = driver.spec
            spec = PolicySpec(s.obs_fields, s.action_dim, 5, s.control_hz, actor_type="hold", version="calibrate")
            server = ControlServer(HoldPolicy(spec), "tcp://127.0.0.1:*").start()
            address = server.address
        return measure_latency(driver, address, cfg.requests, cfg.trials, cfg.step_dim, cfg.step_value,
                               cfg.time_scale, seed=cfg.seed)
    finally:
        if server is not None:
            server.stop()
        driver.close()


def _sysid(cfg: CalibrateConfig, out: Path) -> dict[str, Any]:
    from qc_robot.calibration.identifiability import describe, describe_range
    from qc_robot.calibration.logs import load_trajectories
    from qc_robot.calibration.randomization import PARAM_KINDS
    from qc_robot.calibration.replay import Replayer
    from qc_robot.calibration.sysid import identify, plot_fit

    trajs = load_trajectories(cfg.dataset, cfg.task, cfg.episodes, cfg.steps)
    rep = Replayer(cfg.task, cfg.seed)
    try:
        try:
            res = identify(cfg.task, trajs, cfg.kinds, cfg.max_delay, cfg.max_iters, cfg.range_k, cfg.range_min_frac,
                           replayer=rep, replay=cfg.replay, global_evals=cfg.global_evals, profile=cfg.profile,
                           seed=cfg.seed, starts=cfg.starts)
        except ValueError as e:  # a log the fit cannot use (every row in contact, nothing to time)
            raise CalibrationError(f"{cfg.dataset}: {e}") from None
        png = cfg.plot or str(out.with_name(f"{out.stem}_sysid.png"))
        plot_fit(cfg.task, trajs, res, png, replayer=rep)
    finally:
        rep.close()
    fit = res.to_dict()
    lat = f" (latency {res.latency_ms[0]:.0f}-{res.latency_ms[1]:.0f} ms)" if res.latency_ms else ""
    print(f"sysid ({res.mode} replay): replay error {res.error_before:.4f} -> global {res.error_global:.4f} -> "
          f"{res.error_after:.4f} (x{res.reduction:.1f}); joint pos RMSE {res.joint_pos_rmse[0]:.4f} -> "
          f"{res.joint_pos_rmse[1]:.4f} rad; control delay {res.delay_steps} steps{lat}; {res.evals} replays in "
          f"{res.seconds:.1f} s; plot {png}")
    for k in cfg.kinds:
        lo, hi = res.ranges[k]
        ident = res.identifiability.get(k, {})
        tag = "" if ident.get("identifiable", True) else "  NOT IDENTIFIABLE (see below)"
        se = f"se {res.sigma[k] * (1 + res.params[k]):.2g} N·m" if PARAM_KINDS[k].mode == "value" else f"se {res.sigma[k]:.1%}"
        print(f"  {k:<13} {describe(k, res.params[k]):>14}  ({se})  range {describe_range(k, lo, hi)}{tag}")
    for k in cfg.kinds:
        if "statement" in res.identifiability.get(k, {}):
            print(f"  note: {res.identifiability[k]['statement']}")
    print(f"sysid {res.convergence['summary']}")
    for a in res.convergence["advice"]:
        print(f"  to converge: {a}")
    return {"params": res.params, "ranges": res.ranges, "control_delay_steps": res.delay_steps,
            "sigma": res.sigma, "env": cfg.task, "dataset": os.path.abspath(cfg.dataset), "plot": png,
            "fit": {k: v for k, v in fit.items() if k not in ("params", "ranges", "control_delay_steps", "sigma")}}


def _finite_or_fail(value: float, what: str) -> float:
    """A comparison with NaN is an error, never a pass."""
    if not math.isfinite(value):
        raise CalibrationError(f"check: {what} is {value} (cannot compare; the log or the calibration is bad)")
    return value


def _fit_number(cal: Calibration, key: str, where: str) -> float:
    """``physics.fit[key]`` (validated on load to be a number when present); NaN when absent."""
    fit = (cal.physics or {}).get("fit") or {}
    return float(fit.get(key, float("nan")))


def _check_physics_params(cfg: CalibrateConfig, cal: Calibration, rep: Any, trajs: Any, timing: Any,
                          mode: str) -> bool:
    """The parameter-shift drift test (``calibration.drift``) on a log with the applied targets."""
    from qc_robot.calibration.drift import describe_drift, physics_drift

    assert cal.physics is not None
    ident = ((cal.physics.get("fit") or {}).get("identifiability") or {})
    rep_ = physics_drift(rep, trajs, cal.physics["params"], timing, mode, ident, cfg.drift_tol,
                         cfg.drift_tol_friction, cfg.drift_sigmas, cfg.check_iters)
    _finite_or_fail(rep_["error_stored"], f"replay error of {cfg.dataset}")
    bad = bool(rep_["drifted"])
    print(f"check physics ({mode} replay, timing {timing.label()}): refit of {', '.join(rep_['params'])} on the new "
          f"log: replay error {rep_['error_stored']:.3g} at the calibrated physics, {rep_['error_refit']:.3g} refitted; "
          f"drift when a shift exceeds ±{cfg.drift_tol:.0%} (friction ±{cfg.drift_tol_friction:g} N·m) and "
          f"{cfg.drift_sigmas:g} standard errors" + ("  DRIFT" if bad else "  ok"))
    for line in describe_drift(rep_):
        print(line)
    return bad


def _check(cfg: CalibrateConfig, cal: Calibration, where: str) -> int:
    """Drift report of a new dataset against the calibration; 1 if anything drifted."""
    import numpy as np

    drifted = []
    for key, value in (("drift_tol", cfg.drift_tol), ("drift_tol_friction", cfg.drift_tol_friction),
                       ("drift_sigmas", cfg.drift_sigmas), ("drift_factor", cfg.drift_factor)):
        if not (math.isfinite(value) and value > 0):
            raise CalibrationError(f"check: {key} must be a positive number, got {value!r}")
    if cfg.check_iters < 1:
        raise CalibrationError(f"check: check_iters must be >= 1, got {cfg.check_iters!r}")
    if cfg.dataset:
        from qc_robot.calibration.logs import check_log

        check_log(cfg.dataset, cfg.task, episodes=None)
    if cal.physics is not None and cfg.dataset:
        from qc_robot.calibration.logs import load_trajectories
        from qc_robot.calibration.replay import Replayer, replay_mode
        from qc_robot.calibration.sysid import Timing, replay_error, timing_candidates
        from qc_robot.sim.tasks import task_spec

        trajs = load_trajectories(cfg.dataset, cfg.task, cfg.episodes, cfg.steps)
        mode = replay_mode(trajs, cfg.replay)
        # lockstep: the calibrated whole-step delay; executed steps: the rows as applied, and the
        # latency the new log implies compared with the calibrated one
        timing = timing_candidates(trajs, mode, 0, task_spec(cfg.task).control_hz)[0]
        if mode == "lockstep":
            timing = Timing(cal.control_delay_steps)
        elif timing.delay_steps != cal.control_delay_steps:
            print(f"check timing: the log's actuation delay is {timing.label()} steps (calibrated "
                  f"{cal.control_delay_steps})  DRIFT")
            drifted.append("timing")
        if mode != "ctrl":  # logs without the applied targets: the replay-error ratio (see docs)
            ref = _finite_or_fail(_fit_number(cal, "error_after", where), f"{where}: physics.fit.error_after "
                                  "(the calibrated replay error)")
        rep = Replayer(cfg.task, cfg.seed)
        try:
            if mode == "ctrl":
                bad = _check_physics_params(cfg, cal, rep, trajs, timing, mode)
            else:
                err = replay_error(rep, trajs, cal.physics["params"], timing, mode)
        except ValueError as e:  # a log the replay cannot score (every row in contact)
            raise CalibrationError(f"{cfg.dataset}: {e}") from None
        finally:
            rep.close()
        if mode != "ctrl":
            _finite_or_fail(err, f"replay error of {cfg.dataset}")
            bad = not err <= cfg.drift_factor * ref
            print(f"check physics ({mode} replay, timing {timing.label()}): replay error {err:.3g} (calibrated "
                  f"{ref:.3g}, drift above {cfg.drift_factor} x {ref:.3g} = {cfg.drift_factor * ref:.3g})"
                  f"{'  DRIFT' if bad else '  ok'}")
        drifted += ["physics"] if bad else []
    if cal.normalization is not None and cfg.dataset:
        from qc_robot.calibration.normalization import dataset_stats

        new, old = dataset_stats(cfg.dataset), cal.normalization
        for key in sorted(set(new["obs"]) & set(old["obs"])):
            shift = np.abs(np.subtract(new["obs"][key]["mean"], old["obs"][key]["mean"]))
            z = _finite_or_fail(float(np.max(shift / (np.asarray(old["obs"][key]["std"]) + 1e-6))),
                                f"obs/{key} mean shift")
            print(f"check normalization: obs/{key} mean moved by up to {z:.2f} std")
    if cal.latency is not None and cfg.driver:
        new_lat = _latency(cfg)
        a, b = new_lat["actuation_delay_steps"], cal.latency["actuation_delay_steps"]
        print(f"check latency: actuation delay {a} steps (calibrated {b}), rtt p90 "
              f"{new_lat['rtt_ms']['p90']:.1f} ms (calibrated {cal.latency['rtt_ms']['p90']:.1f})"
              f"{'  DRIFT' if a != b else '  ok'}")
        drifted += ["latency"] if a != b else []
    print(f"check {cal.id}: " + (f"drift in {', '.join(drifted)}: re-run calibrate" if drifted else "no drift"))
    return 1 if drifted else 0


def run_calibrate(cfg: CalibrateConfig) -> int:
    """``qc-robot calibrate``: run ``cfg.step``; returns the exit code (2 on bad input)."""
    logging.basicConfig(level=cfg.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if cfg.step not in STEPS:
        print(f"calibrate: step must be one of {STEPS}, got {cfg.step!r}")
        return 2
    try:
        out = Path(cfg.out) if cfg.out else default_path(cfg.robot_id)
        if cfg.step == "excite":
            from qc_robot.calibration.excitation import record_excitation

            if not cfg.dataset:
                raise CalibrationError("excite needs dataset=<path to write>")
            driver = _driver(cfg)
            try:
                record_excitation(driver, cfg.dataset, cfg.episodes, cfg.steps, cfg.seed,
                                  {"task": cfg.task, "robot_id": cfg.robot_id}, cfg.time_scale)
            finally:
                driver.close()
            print(f"excite: {cfg.episodes} x {cfg.steps} steps written to {cfg.dataset}")
            return 0
        cal = load_calibration(out, robot_id=cfg.robot_id, task=cfg.task) if out.exists() else None
        if cfg.step == "check":
            if cal is None:
                raise CalibrationError(f"{out}: nothing to check against (run calibrate first)")
            return _check(cfg, cal, str(out))
        if cal is None:
            cal = Calibration(robot_id=cfg.robot_id, task=cfg.task)
        needs_data = cfg.step in ("normalization", "sysid")
        if needs_data and not cfg.dataset:
            raise CalibrationError(f"step {cfg.step} needs dataset=<robot episodes .hdf5>")
        if cfg.step in ("latency", "all"):
            cal.latency = _latency(cfg)
            cal.control_hz = float(cal.latency["control_hz"])
            lat = cal.latency
            print(f"latency: rtt p50/p90/p99 {lat['rtt_ms']['p50']:.2f}/{lat['rtt_ms']['p90']:.2f}/"
                  f"{lat['rtt_ms']['p99']:.2f} ms -> inference delay {lat['inference_delay_steps']} steps; "
                  f"actuation p50/p90 {lat['actuation_ms']['p50']:.1f}/{lat['actuation_ms']['p90']:.1f} ms -> "
                  f"{lat['actuation_delay_steps']} steps; obs noise std {lat['obs_noise_std']:.2g}")
        if cfg.dataset and cfg.step in ("normalization", "sysid", "all"):
            from qc_robot.calibration.logs import check_log

            check_log(cfg.dataset, cfg.task, episodes=None)  # before any step reads it
        if cfg.step in ("normalization", "all") and cfg.dataset:
            from qc_robot.calibration.normalization import dataset_stats

            cal.normalization = dataset_stats(cfg.dataset)
            print(f"normalization: {cal.normalization['transitions']} transitions of "
                  f"{cal.normalization['episodes']} episodes; action limits {cal.normalization['action_limits']}")
        if cfg.step in ("sysid", "all") and cfg.dataset:
            cal.physics = _sysid(cfg, out)
            if cfg.require_converged and not cal.physics["fit"]["convergence"]["converged"]:
                print(f"calibrate: sysid did not converge (require_converged=true): {out} not written")
                return 3
    except (CalibrationError, ValueError, OSError, RuntimeError) as e:
        print(f"calibrate: {e}")
        return 2
    path = save_calibration(cal, out)
    print(f"wrote {path} (id {cal.id})")
    return 0

