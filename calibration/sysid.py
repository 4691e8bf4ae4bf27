"""System identification: fit the sim's physical parameters and control delay to logged robot data.

Each logged trajectory is replayed *open loop* (``qc_robot.calibration.replay``), one control step per
row: a lockstep log's commands shifted by a candidate whole-step delay; a realtime log of executed
steps as the robot applied them (its latency and held ticks are in the rows), the delay then read
off the log's timing instead of fitted. The error is over the arm's proprioceptive dims (joint pos/vel, effector pos/yaw,
gripper opening: ``OBS_DIMS``), each divided by its spread in the log, so radians, rad/s and the
scaled effector position weigh alike. Cube poses are left out: contacts make them chaotic.

Fit, in four stages:

1. **Timing**: lockstep logs, a scan of the delay 0..``max_delay`` steps at nominal physics;
   executed-steps logs, the actuation latency interval the send and tick times allow
   (:func:`latency_bounds`) and the whole-step delay inside it.
2. **Global**: CMA-ES (the ``cma`` package) over every kind in fit coordinates (log for scales,
   log1p for friction) within the kinds' bounds, ``global_evals`` evaluations, on the *segmented*
   replay error (``global_segment`` rows per segment, each restarted from the log: multiple
   shooting). An open-loop replay of a whole episode lets a parameter error grow through the
   motion, so its error surface is rough and full of shallow basins (issue 16: kp -31 % on one
   robot after this stage); segments keep each prediction near the log and the surface smooth,
   and at the true physics their error is as exact as the whole replay's.
3. **Local**: ``scipy.optimize.least_squares`` from the global optimum, first on the segmented
   error (``local_segment``, ``seg_iters``), then on the whole open-loop replay (``max_iters``);
   the timing is re-scanned at the fit, and the last stage repeated once if it changed.
4. **Identifiability** (``qc_robot.calibration.identifiability``): each parameter's error profile gives
   its range, or the statement that this log does not identify it.

Realtime logs with the actuator targets each tick applied (``replay=ctrl``, :func:`error_model`)
are scored on one-step predictions instead: every row restarted from the log and driven by its
logged targets, not by the env's IK, whose iterative solve makes the targets (and so the error)
jump with the parameters. That error is smooth, so every stage uses it: CMA-ES on all rows,
then ``least_squares`` with Jacobian-scaled steps, then the profiles.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from qc_robot.calibration.convergence import RTOL, assess_convergence, gauss_newton_floor
from qc_robot.calibration.logs import Trajectory
from qc_robot.calibration.randomization import PARAM_KINDS, from_fit, nominal_params, to_fit
from qc_robot.calibration.replay import Replayer, contact_rows, replay_mode

log = logging.getLogger("qc_robot.calibration")
OBS_DIMS = slice(0, 18)
"""OGBench manipspace observation: joint pos (6), joint vel (6), effector pos (3, centred, x10),
effector yaw cos/sin (2), gripper opening (1, x3); then gripper contact and objects (excluded)."""
ERR_DIMS = np.r_[0:6, 12:18]
"""Dims of ``OBS_DIMS`` the error is taken over: the pose-like ones. Joint velocities are left out:
sampled at the control rate they alias the wrist's fast servo transients, and the error becomes
a field of needles in the parameters (a 5 % change in kp costs as much as a 50 % one), which no
optimiser can descend; the positions they integrate to carry the same information smoothly."""
DEFAULT_KINDS = ("kp", "damping", "armature", "frictionloss")


@dataclass
class Timing:
    """When the logged commands took effect."""

    delay_steps: int
    """The sim driver's control delay this corresponds to (whole steps)."""
    latency_ms: tuple[float, float] | None = None
    """Executed-steps logs: the interval of actuation latencies consistent with the log (robot ms)."""
    shift: int | None = None
    """Rows the replay shifts the commands by (None: ``delay_steps``; 0 for executed steps)."""

    @property
    def replay_delay(self) -> int:
        return self.delay_steps if self.shift is None else self.shift

    def label(self) -> str:
        if self.latency_ms is None:
            return str(self.delay_steps)
        return f"{self.delay_steps} ({self.latency_ms[0]:.1f}-{self.latency_ms[1]:.1f} ms)"


SCALE_GROUPS = (slice(0, 6), slice(6, 9), slice(9, 11), slice(11, 12))
"""Dims of ``ERR_DIMS`` that share one unit and so one scale: joint positions (rad), effector
position, the yaw's cos/sin pair, gripper opening."""
CTRL_ERR_DIMS = np.r_[0:11, 12:18]
"""Dims of ``OBS_DIMS`` a replay of the applied targets (``replay=ctrl``) is scored on: the pose-like
dims and the velocities of the first five joints. One-step predictions of those are smooth in the
parameters and carry what positions barely show (robot 0 of the matrix: armature x1.25 moved the
positions' error by 0.003, the velocities' by 0.19). The last wrist joint turns only the gripper:
its velocity jumps between neighbouring parameter values (0.30 → 0.74 rad/s on one row for kp
x1.01) and stays out."""
CTRL_SCALE_GROUPS = (slice(0, 6), slice(6, 11), slice(11, 14), slice(14, 16), slice(16, 17))


@dataclass(frozen=True)
class ErrorModel:
    """What a replay error is taken over, for one replay mode (:func:`error_model`)."""

    ctrl: bool
    """Drive the logged actuator targets (``Replayer.rollout(ctrl=True)``)."""
    dims: np.ndarray
    """Dims of ``OBS_DIMS`` in the error."""
    groups: tuple[slice, ...]
    """Dims of ``dims`` that share one scale."""
    segment: int
    """Rows per replay segment of the fit's reported error (and of ``check``'s): 0 = whole episodes."""


def error_model(mode: str) -> ErrorModel:
    """``ctrl``: one-step predictions (each row restarted from the log) of the pose and the
    velocities, driven by the logged targets; else the whole open-loop replay of the pose."""
    if mode == "ctrl":
        return ErrorModel(True, CTRL_ERR_DIMS, CTRL_SCALE_GROUPS, 1)
    return ErrorModel(False, ERR_DIMS, SCALE_GROUPS, 0)


def obs_scale(trajs: Sequence[Trajectory], em: ErrorModel | None = None) -> np.ndarray:
    """Per-dim weight of the error: the spread of the logged observations within their episodes,
    one value per group of dims in one unit (``em.groups``), floored at a tenth of the median
    group's. Per-dim spreads weighed a dim that barely moves (the yaw's sine near ±90°, a wrist
    joint that hardly turns) up to 100 times the others, so its smallest differences decided the fit."""
    em = em or error_model("executed")
    x = [t.next_obs[:, OBS_DIMS][:, em.dims] for t in trajs]
    var = np.sum([len(e) * e.var(axis=0) for e in x], axis=0) / max(sum(len(e) for e in x), 1)
    s = np.empty(len(var))
    for g in em.groups:
        s[g] = np.sqrt(np.mean(var[g]))
    groups = np.array([s[g][0] for g in em.groups])
    return np.maximum(s, max(1e-3, 0.1 * float(np.median(groups))))


def residuals(rep: Replayer, trajs: Sequence[Trajectory], params: dict[str, float], timing: Timing | int,
              scale: np.ndarray, segment: int = 0, em: ErrorModel | None = None) -> np.ndarray:
    """Stacked normalised prediction errors over every trajectory, row and dim (``segment``: the
    replay restarts from the log every that many rows, ``Replayer.rollout``; ``em``: the dims and
    whether the logged targets drive the replay, default the pose under the logged commands)."""
    tm = timing if isinstance(timing, Timing) else Timing(int(timing))
    em = em or error_model("executed")
    r = []
    for t in trajs:
        pred = rep.rollout(t, params, tm.replay_delay, segment, ctrl=em.ctrl)
        keep = kept_rows(t)
        r.append(((pred - t.next_obs)[keep][:, OBS_DIMS][:, em.dims] / scale).ravel())
    out = np.concatenate(r)
    if out.size == 0:
        raise ValueError("every row of the log is in contact with a cube (no simulator states to replay "
                         "contacts): log an excitation clear of the objects")
    return out


def kept_rows(t: Trajectory) -> np.ndarray:
    """(N,) rows in the error: all of a log with simulator states (its replay is exact, contacts
    included); without them, the rows out of contact with a cube (``replay.contact_rows``)."""
    return np.ones(len(t.actions), bool) if t.states is not None else ~contact_rows(t)


def replay_error(rep: Replayer, trajs: Sequence[Trajectory], params: dict[str, float], timing: Timing,
                 mode: str) -> float:
    """The normalised RMS replay error a fit in ``mode`` reports (``check`` compares with it)."""
    em = error_model(mode)
    return rms(residuals(rep, trajs, params, timing, obs_scale(trajs, em), em.segment, em))


def rms(r: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(r))))


def timing_candidates(trajs: Sequence[Trajectory], mode: str, max_delay: int, control_hz: float) -> list[Timing]:
    """Every timing a fit should consider for ``trajs`` replayed in ``mode`` (see the module doc)."""
    if mode == "lockstep":
        return [Timing(d) for d in range(max_delay + 1)]
    lo, hi = latency_bounds(trajs)
    return [Timing(_steps_in(lo, hi, 1e3 / control_hz), (lo, hi), shift=0)]


def latency_bounds(trajs: Sequence[Trajectory]) -> tuple[float, float]:
    """Interval of actuation latencies (ms) consistent with an executed-steps log: a tick applies
    the newest command that arrived since the previous tick, so every applied command arrived
    after the previous tick and by its own: ``t_prev - t_sent < latency <= t_tick - t_sent``."""
    lo, hi = 0.0, np.inf
    for t in trajs:
        assert t.t_tick is not None and t.t_sent is not None
        prev = np.concatenate([[-np.inf], t.t_tick[:-1]])  # the first row's previous tick is not in the log
        k = np.nonzero(t.t_sent >= 0)[0]
        if len(k):
            lo = max(lo, float(np.max(prev[k] - t.t_sent[k])) * 1e3)
            hi = min(hi, float(np.min(t.t_tick[k] - t.t_sent[k])) * 1e3)
    if not np.isfinite(hi):
        raise ValueError("the log has no applied command (every tick held): nothing to time")
    # a driver stamps a tick a little after it read its inbox: sub-ms jitter can cross the bounds
    return (lo, hi) if lo <= hi else (hi, lo)


def _steps_in(lo_ms: float, hi_ms: float, period_ms: float) -> int:
    """The whole-step delay inside [lo, hi] (nearest the middle when several are)."""
    mid = 0.5 * (lo_ms + hi_ms)
    d = int(round(mid / period_ms))
    cands = [k for k in range(int(np.floor(lo_ms / period_ms)), int(np.ceil(hi_ms / period_ms)) + 1)
             if lo_ms - 1e-6 <= k * period_ms <= hi_ms + 1e-6]
    return max(0, min(cands, key=lambda k: abs(k * period_ms - mid)) if cands else d)


@dataclass
class SysIdResult:
    params: dict[str, float]
    sigma: dict[str, float]
    """Standard errors in fit coordinates (log for scales, log1p for values)."""
    delay_steps: int
    error_before: float
    """Normalised RMS replay error with the nominal model and no delay (realtime: no latency)."""
    error_after: float
    ranges: dict[str, list[float]]
    evals: int
    seconds: float
    delay_scan: dict[str, float] = field(default_factory=dict)
    """Replay error per timing candidate at the fitted parameters."""
    mode: str = "lockstep"
    latency_ms: tuple[float, float] | None = None
    error_global: float = float("nan")
    """After the global stage (before the local one)."""
    identifiability: dict[str, Any] = field(default_factory=dict)
    joint_pos_rmse: tuple[float, float] = (0.0, 0.0)
    """(before, after) RMSE of the arm's joint positions in rad."""
    effector_rmse_m: tuple[float, float] = (0.0, 0.0)
    """(before, after) RMSE of the effector position in m."""
    timing: Timing | None = None
    convergence: dict[str, Any] = field(default_factory=dict)
    """``qc_robot.calibration.convergence.assess_convergence``: converged or not, and what to add."""

    @property
    def converged(self) -> bool:
        return bool(self.convergence.get("converged", False))

    @property
    def reduction(self) -> float:
        return self.error_before / max(self.error_after, 1e-12)

    def to_dict(self) -> dict[str, Any]:
        return {"params": self.params, "sigma": self.sigma, "control_delay_steps": self.delay_steps,
                "ranges": self.ranges, "error_before": self.error_before, "error_after": self.error_after,
                "error_global": self.error_global, "replay": self.mode,
                "latency_ms": list(self.latency_ms) if self.latency_ms else None,
                "joint_pos_rmse_rad": list(self.joint_pos_rmse), "effector_rmse_m": list(self.effector_rmse_m),
                "evals": self.evals, "seconds": self.seconds, "delay_scan": dict(self.delay_scan),
                "identifiability": self.identifiability, "convergence": self.convergence}


def _to_x(params: dict[str, float], kinds: Sequence[str]) -> np.ndarray:
    return np.array([to_fit(k, params[k]) for k in kinds])


def _from_x(x: np.ndarray, kinds: Sequence[str], base: dict[str, float]) -> dict[str, float]:
    p = dict(base)
    p.update({k: from_fit(k, float(v)) for k, v in zip(kinds, x, strict=True)})
    return p


def _scan(rep: Replayer, trajs: Sequence[Trajectory], params: dict[str, float], cands: Sequence[Timing],
          scale: np.ndarray, em: ErrorModel) -> tuple[Timing, dict[str, float]]:
    errs = [rms(residuals(rep, trajs, params, c, scale, em.segment, em)) for c in cands]
    return cands[int(np.argmin(errs))], {c.label(): e for c, e in zip(cands, errs, strict=True)}


def fit_bounds(kinds: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """The kinds' bounds in fit coordinates."""
    return (np.array([to_fit(k, PARAM_KINDS[k].lower) for k in kinds]),
            np.array([to_fit(k, PARAM_KINDS[k].upper) for k in kinds]))


def global_search(fun: Any, kinds: Sequence[str], x0: np.ndarray, evals: int, seed: int = 0,
                  sigma0: float = 0.5) -> tuple[np.ndarray, float, list[tuple[np.ndarray, float]]]:
    """CMA-ES over fit coordinates within the kinds' bounds: (best x, its cost, every (x, cost))."""
    import cma

    lo, hi = fit_bounds(kinds)
    x0 = np.clip(x0, lo + 1e-6, hi - 1e-6)
    # tolfun far below the cost's scale: a one-step error near the floor is ~1e-6 in mean square
    opts = {"bounds": [list(lo), list(hi)], "maxfevals": evals, "seed": seed + 1, "verbose": -9, "popsize": 8,
            "tolfun": 1e-12, "tolx": 1e-5}
    es = cma.CMAEvolutionStrategy(list(x0), sigma0, opts)
    history: list[tuple[np.ndarray, float]] = [(x0, float(fun(x0)))]
    while not es.stop():
        xs = es.ask()
        fs = [float(fun(np.asarray(x))) for x in xs]
        es.tell(xs, fs)
        history += [(np.asarray(x), f) for x, f in zip(xs, fs, strict=True)]
    best = min(history, key=lambda h: h[1])
    return best[0], best[1], history


def _head(trajs: Sequence[Trajectory], rows: int) -> list[Trajectory]:
    """The first ``rows`` rows of each trajectory."""
    import dataclasses

    return [dataclasses.replace(t, **{f.name: getattr(t, f.name)[:rows] for f in dataclasses.fields(t)
                                      if isinstance(getattr(t, f.name), np.ndarray)}) for t in trajs]


def _distinct(history: list[tuple[np.ndarray, float]], n: int, min_dist: float) -> list[np.ndarray]:
    """Up to ``n`` of the lowest-cost points of ``history`` after its best, each at least
    ``min_dist`` (Euclidean, fit coordinates) from the best and from each other."""
    ranked = sorted(history, key=lambda h: h[1])
    chosen = [ranked[0][0]] if ranked else []
    for x, _ in ranked[1:]:
        if len(chosen) > n:
            break
        if all(np.linalg.norm(x - c) >= min_dist for c in chosen):
            chosen.append(x)
    return chosen[1:]


def identify(env_name: str, trajs: Sequence[Trajectory], kinds: Sequence[str] = DEFAULT_KINDS,
             max_delay: int = 4, max_iters: int = 30, range_k: float = 3.0, range_min_frac: float = 0.1,
             replayer: Replayer | None = None, replay: str = "auto", global_evals: int = 480,
             profile: bool = True, seed: int = 0, global_rows: int = 0, starts: int = 1, start_iters: int = 6,
             min_dist: float = 0.4, global_segment: int = 10,
             local_segment: int = 10, seg_iters: int = 20, restart: bool = True) -> SysIdResult:
    """Fit ``kinds`` and the timing to ``trajs`` (see the module docstring); ``restart``: one more
    local run from the fit when it stopped above its Gauss-Newton floor (``calibration.convergence``)."""
    from scipy.optimize import least_squares

    from qc_robot.calibration.identifiability import assess
    from qc_robot.sim.tasks import task_spec

    t0 = time.monotonic()
    for k in kinds:
        if k not in PARAM_KINDS:
            raise ValueError(f"unknown parameter kind {k!r}; known: {sorted(PARAM_KINDS)}")
    mode = replay_mode(list(trajs), replay)
    cands = timing_candidates(trajs, mode, max_delay, task_spec(env_name).control_hz)
    rep = replayer or Replayer(env_name)
    evals0 = rep.evals
    em = error_model(mode)
    scale = obs_scale(trajs, em)
    base = nominal_params()
    # "before": the stock model, each command taken in the row it was logged in, no delay
    r0 = residuals(rep, trajs, base, Timing(0), scale, em.segment, em)
    before = rms(r0)
    timing, _ = _scan(rep, trajs, base, cands, scale, em)
    kinds = list(kinds)
    if em.ctrl:  # one-step predictions are already smooth: every stage scores them
        global_segment, local_segment = em.segment, 0

    params = dict(base)
    err_global = before
    if global_evals > 0:
        # the global stage sees the first `global_rows` rows of each trajectory (0: all), replayed in
        # segments restarted from the log (multiple shooting: a smooth surface, see the module doc)
        short = _head(trajs, global_rows) if global_rows > 0 else list(trajs)

        def cost(x: np.ndarray) -> float:
            return float(np.mean(np.square(residuals(rep, short, _from_x(x, kinds, base), timing, scale,
                                                      global_segment, em))))

        xg, _, history = global_search(cost, kinds, _to_x(base, kinds), global_evals, seed)
        params = _from_x(xg, kinds, base)
        err_global = rms(residuals(rep, trajs, params, timing, scale, em.segment, em))
        # multi-start: short local runs from the best CMA-ES points of other basins (far apart in
        # fit coordinates); the global stage's best on a subset of rows is not always the basin
        # of the best fit on all of them
        lo_b, hi_b = fit_bounds(kinds)
        best_err = err_global
        for x0 in _distinct(history, starts - 1, min_dist):
            def fun0(z: np.ndarray) -> np.ndarray:
                return residuals(rep, trajs, _from_x(z, kinds, base), timing, scale, em.segment, em)

            sol0 = least_squares(fun0, np.clip(x0, lo_b + 1e-6, hi_b - 1e-6), bounds=(lo_b, hi_b), diff_step=0.02,
                                 max_nfev=start_iters, xtol=1e-4, ftol=1e-6)
            if rms(sol0.fun) < best_err:
                best_err, params = rms(sol0.fun), _from_x(sol0.x, kinds, base)
    sigma = dict.fromkeys(kinds, float("nan"))
    lo, hi = fit_bounds(kinds)
    if local_segment > 0:  # descend the smooth segmented surface first, then polish on the whole replay
        def fun_s(z: np.ndarray) -> np.ndarray:
            return residuals(rep, trajs, _from_x(z, kinds, params), timing, scale, local_segment, em)

        x0 = np.clip(_to_x(params, kinds), lo + 1e-6, hi - 1e-6)
        sol = least_squares(fun_s, x0, bounds=(lo, hi), diff_step=0.02, max_nfev=seg_iters, xtol=1e-4, ftol=1e-6)
        params = _from_x(sol.x, kinds, params)
    for _ in range(2):  # local fit at the timing, re-scan the timing at the fit
        def fun(z: np.ndarray, tm: Timing = timing, p0: dict = params) -> np.ndarray:
            return residuals(rep, trajs, _from_x(z, kinds, p0), tm, scale, em.segment, em)

        # bounded in fit coordinates: clipping instead makes the error flat outside (friction < 0)
        # and the Jacobian there zero, which stalls the solver at the bound
        x0 = np.clip(_to_x(params, kinds), lo + 1e-6, hi - 1e-6)
        if em.ctrl:  # kp and damping scaled together form a long shallow valley: steps scaled by the
            # Jacobian walk it; a 5 % difference step averages the small-scale ripple of armature.
            # A second start has the value kinds (friction) at nominal: Coulomb friction makes the
            # error a staircase in its value (rows switch between sticking and slipping), which a
            # descent from a wrong friction stalls on (robot 4: 0.52 N·m for a true 0)
            x_nom = np.array([to_fit(k, base[k]) if PARAM_KINDS[k].mode == "value" else v
                              for k, v in zip(kinds, x0, strict=True)])
            sols = [least_squares(fun, np.clip(x, lo + 1e-6, hi - 1e-6), bounds=(lo, hi), diff_step=0.05,
                                  max_nfev=max_iters, xtol=1e-8, ftol=1e-12, x_scale="jac")
                    for x in ([x0, x_nom] if not np.allclose(x_nom, x0) else [x0])]
            sol = min(sols, key=lambda r: float(r.cost))
        else:
            sol = least_squares(fun, x0, bounds=(lo, hi), diff_step=0.02, max_nfev=max_iters, xtol=1e-4,
                                ftol=1e-6)
        params = _from_x(sol.x, kinds, params)
        sigma.update(_standard_errors(sol.jac, sol.fun, kinds))
        if len(cands) == 1:
            scan = {timing.label(): rms(sol.fun)}
            break
        new, scan = _scan(rep, trajs, params, cands, scale, em)
        if new is timing:
            break
        timing = new
    # how far the fit stopped from the floor a step from it could still reach; a fit stopped on a
    # slope gets one restart from where it stopped (a fresh trust region, a finer difference step)
    floor, exhausted = gauss_newton_floor(sol.jac, sol.fun), sol.status == 0
    if restart and rms(sol.fun) > floor + max(0.5 * floor, RTOL * before):
        def fun_r(z: np.ndarray, p0: dict = params) -> np.ndarray:
            return residuals(rep, trajs, _from_x(z, kinds, p0), timing, scale, em.segment, em)

        sol_r = least_squares(fun_r, np.clip(_to_x(params, kinds), lo + 1e-6, hi - 1e-6), bounds=(lo, hi),
                              diff_step=0.01, max_nfev=max_iters, xtol=1e-10, ftol=1e-14, x_scale="jac")
        if sol_r.cost < sol.cost:
            params = _from_x(sol_r.x, kinds, params)
            sigma.update(_standard_errors(sol_r.jac, sol_r.fun, kinds))
            sol = sol_r
        floor, exhausted = gauss_newton_floor(sol.jac, sol.fun), sol_r.status == 0
    r1 = residuals(rep, trajs, params, timing, scale, em.segment, em)
    after = rms(r1)
    def refit(p: dict[str, float], held: str) -> float:
        """The error with ``held`` at ``p[held]`` and the other kinds re-fitted (a few steps)."""
        free = [k for k in kinds if k != held]
        lo_f, hi_f = fit_bounds(free)

        def fun_f(z: np.ndarray) -> np.ndarray:
            return residuals(rep, trajs, _from_x(z, free, p), timing, scale, em.segment, em)

        z0 = np.clip(_to_x(p, free), lo_f + 1e-6, hi_f - 1e-6)
        sol_f = least_squares(fun_f, z0, bounds=(lo_f, hi_f), diff_step=0.05, max_nfev=6, xtol=1e-8, ftol=1e-12,
                              x_scale="jac")
        return rms(sol_f.fun)

    ident = assess(lambda p: rms(residuals(rep, trajs, p, timing, scale, em.segment, em)), params, sigma, kinds,
                   after, range_k, range_min_frac, profile=profile, refit=refit if em.ctrl and len(kinds) > 1 else None)
    conv = assess_convergence(after, min(floor, after), before, ident["report"], kinds, exhausted, max_iters,
                              global_evals)
    result = SysIdResult(params=params, sigma=sigma, delay_steps=timing.delay_steps, error_before=before,
                         error_after=after, ranges=ident["ranges"], evals=rep.evals - evals0,
                         seconds=time.monotonic() - t0, delay_scan=scan, mode=mode, latency_ms=timing.latency_ms,
                         error_global=err_global, identifiability=ident["report"], timing=timing, convergence=conv)
    result.joint_pos_rmse = (_dim_rmse(r0, scale, slice(0, 6)), _dim_rmse(r1, scale, slice(0, 6)))
    e0 = int(np.nonzero(em.dims == 12)[0][0])  # the effector position: OBS_DIMS 12:15
    eff = slice(e0, e0 + 3)
    result.effector_rmse_m = _dim_rmse(r0, scale, eff) / 10, _dim_rmse(r1, scale, eff) / 10  # obs scales it x10
    if replayer is None:
        rep.close()
    log.info("sysid (%s): error %.4f -> global %.4f -> %.4f (x%.1f), timing %s, params %s, %d evals in %.1f s",
             mode, before, err_global, after, result.reduction, timing.label(), params, result.evals, result.seconds)
    return result


def _dim_rmse(r: np.ndarray, scale: np.ndarray, dims: slice) -> float:
    """RMSE in observation units of ``dims`` from the stacked normalised residuals."""
    raw = r.reshape(-1, len(scale)) * scale  # (T, D) back to observation units
    return float(np.sqrt(np.mean(np.square(raw[:, dims]))))


def _standard_errors(jac: np.ndarray, res: np.ndarray, kinds: Sequence[str]) -> dict[str, float]:
    m, n = jac.shape
    s2 = float(res @ res) / max(m - n, 1)
    try:
        cov = np.linalg.pinv(jac.T @ jac) * s2
        se = np.sqrt(np.clip(np.diag(cov), 0.0, None))
    except np.linalg.LinAlgError:
        se = np.full(n, np.nan)
    return {k: float(v) for k, v in zip(kinds, se, strict=True)}


def plot_fit(env_name: str, trajs: Sequence[Trajectory], result: SysIdResult, path: str,
             replayer: Replayer | None = None) -> str:
    """PNG: logged vs predicted (nominal / fitted) joint positions and effector height of the
    first trajectory, and the timing scan."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rep = replayer or Replayer(env_name)
    t = trajs[0]
    tm = result.timing or Timing(result.delay_steps)
    before = rep.rollout(t, nominal_params(), 0)
    after = rep.rollout(t, result.params, tm.replay_delay)
    if replayer is None:
        rep.close()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    steps = np.arange(len(t.actions))
    for j, c in zip((0, 1, 3), ("C0", "C1", "C2"), strict=True):
        axes[0].plot(steps, t.next_obs[:, j], c, lw=2, label=f"log q{j}")
        axes[0].plot(steps, before[:, j], c, ls=":", label=f"nominal q{j}")
        axes[0].plot(steps, after[:, j], c, ls="--", label=f"fitted q{j}")
    axes[0].set(title="joint positions (rad)", xlabel="control step")
    axes[0].legend(fontsize=6, ncol=3)
    z = 14  # effector z (x10; OGBench centres x only)
    axes[1].plot(steps, t.next_obs[:, z] / 10, "k", lw=2, label="log")
    axes[1].plot(steps, before[:, z] / 10, "C3", ls=":", label="nominal")
    axes[1].plot(steps, after[:, z] / 10, "C2", ls="--", label="fitted")
    axes[1].set(title="effector height (m)", xlabel="control step")
    axes[1].legend(fontsize=7)
    labels = list(result.delay_scan)
    axes[2].bar(labels, [result.delay_scan[d] for d in labels], color="C4")
    axes[2].tick_params(axis="x", labelsize=6, rotation=45)
    axes[2].set(title=f"replay error vs timing (fit: {tm.label()})", xlabel="delay", ylabel="normalised RMS")
    fig.suptitle(f"sysid {env_name} ({result.mode}): error {result.error_before:.3f} -> {result.error_after:.3f} "
                 f"(x{result.reduction:.1f})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
