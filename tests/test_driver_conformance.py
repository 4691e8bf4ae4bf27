"""One conformance suite over every registered driver: spec, limits, watchdog, reset, determinism.

A driver without hardware runs as registered (its lockstep, seeded configuration). A hardware
driver runs against its vendor's stand-in: LeRobot's real SO-101 classes on a simulated Feetech
servo bus, the xArm SDK against a simulated xArm control box on a loopback address. A driver
registered without either fails ``test_every_driver_is_covered``, so adding a
driver without a way to run it here is caught. Hardware drivers are not seeded: they are checked
to return to their home pose on reset instead of for seeded randomisation.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from qc_robot import protocol as P
from qc_robot.drivers.base import Driver
from qc_robot.drivers.registry import DRIVERS, build_driver_config, driver_config, make_driver
from qc_robot.drivers.safety import SafeDriver, SafetyConfig


def _lerobot(stack: contextlib.ExitStack, tmp: Path) -> Driver:
    from lerobot_env import require_lerobot_arms

    require_lerobot_arms()
    from lerobot_rig import calibrated_so101

    sim, args = calibrated_so101("follower", tmp)
    stack.callback(sim.close)
    home = [0.1, -0.2, 0.3, 0.0, 0.5, -0.5]
    return make_driver("lerobot", driver_config("lerobot", robot_args=args, max_episode_steps=50, home=home, reset_s=0.0))


def _xarm(stack: contextlib.ExitStack, tmp: Path) -> Driver:
    pytest.importorskip("xarm.wrapper", reason="xarm-python-sdk not installed (pip install 'qc-robot[xarm]')")
    from xarm_sim import XArmSim

    if not XArmSim.available():
        pytest.skip("the xArm controller simulator must listen on port 502 (root or CAP_NET_BIND_SERVICE)")
    sim = XArmSim().__enter__()
    stack.callback(sim.close)
    return make_driver("xarm", driver_config("xarm", ip=sim.host, max_episode_steps=50))


HARDWARE: dict[str, Callable[[contextlib.ExitStack, Path], Driver]] = {"lerobot": _lerobot, "xarm": _xarm}
"""Registered hardware drivers and how to build each against its stand-in (no hardware)."""


_DRIVERS: dict[str, Driver] = {}


@pytest.fixture(params=sorted(DRIVERS))
def driver(request: pytest.FixtureRequest, _stack: contextlib.ExitStack,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Driver]:
    """Each registered driver, built and connected once per module (closed before its stand-in:
    ExitStack callbacks run in reverse order)."""
    name = request.param
    if name not in _DRIVERS:
        if name in HARDWARE:
            d = HARDWARE[name](_stack, tmp_path_factory.mktemp(name))
        else:
            d = make_driver(name, build_driver_config(name, {"realtime": False, "seed": 0}, {"max_episode_steps": 50}))
        d.connect()
        _stack.callback(d.close)
        _DRIVERS[name] = d
    yield _DRIVERS[name]


@pytest.fixture(scope="module")
def _stack() -> Iterator[contextlib.ExitStack]:
    with contextlib.ExitStack() as stack:
        yield stack
    _DRIVERS.clear()


def _seeded(driver: Driver) -> bool:
    return driver.name not in HARDWARE


def test_every_driver_is_covered() -> None:
    for name, (_, cls) in DRIVERS.items():  # class-level realtime: hardware (sim decides per config)
        assert name in HARDWARE or not cls.realtime, (
            f"driver {name!r} is realtime hardware: add its stand-in to HARDWARE in this file")


def test_spec(driver: Driver) -> None:
    s = driver.spec
    assert s.action_dim > 0 and s.control_hz > 0 and s.obs_fields
    assert s.action_low.shape == s.action_high.shape == (s.action_dim,) and np.all(s.action_low < s.action_high)
    hello = P.decode(P.encode(s.hello(driver.name)))  # the spec survives the wire
    assert isinstance(hello, P.Hello) and hello.action_dim == s.action_dim
    np.testing.assert_array_equal(hello.action_low, s.action_low)
    hold = driver.hold_action()
    assert hold.shape == (s.action_dim,) and np.all(hold >= s.action_low) and np.all(hold <= s.action_high)


def _check_obs(driver: Driver, obs: dict[str, np.ndarray]) -> None:
    assert set(obs) == {f.key for f in driver.spec.obs_fields}
    for f in driver.spec.obs_fields:
        assert obs[f.key].shape == tuple(f.shape) and obs[f.key].dtype == np.dtype(f.dtype)
        assert np.all(np.isfinite(obs[f.key]))


def _flat(obs: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([obs[k].ravel() for k in sorted(obs)])


def _uniform(driver: Driver, rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(driver.spec.action_low, driver.spec.action_high).astype(np.float32)


def _rollout(driver: Driver, seed: int, steps: int = 5) -> list[np.ndarray]:
    obs = [driver.reset(seed)]
    rng = np.random.default_rng(0)
    for _ in range(steps):
        driver.send_action(_uniform(driver, rng))
        obs.append(driver.get_observation())
    return [_flat(o) for o in obs]


def test_reset_and_seeded_determinism(driver: Driver) -> None:
    _check_obs(driver, driver.reset(3))
    a, b = _rollout(driver, 3), _rollout(driver, 3)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_allclose(x, y, atol=0 if _seeded(driver) else 2e-3)
    if _seeded(driver):
        assert not np.array_equal(_rollout(driver, 4)[0], a[0]), "reset must randomize across seeds"
    else:  # hardware: reset returns to the home pose whatever happened before (seeds do not apply)
        np.testing.assert_allclose(_rollout(driver, 4)[0], a[0], atol=2e-3)
        assert not np.allclose(a[0], a[-1], atol=1e-2), "the actions must have moved the arm"
    info = driver.step_info()
    assert info.step == 5 and isinstance(info.reward, float) and isinstance(info.success, bool)


def test_send_action_returns_clipped_action(driver: Driver) -> None:
    driver.reset(0)
    s = driver.spec
    span = s.action_high - s.action_low
    applied = driver.send_action(s.action_high + span)
    np.testing.assert_allclose(applied, s.action_high, atol=1e-3 * span.max())
    applied = driver.send_action(s.action_low - span)
    np.testing.assert_allclose(applied, s.action_low, atol=1e-3 * span.max())
    with pytest.raises(ValueError):
        driver.send_action(np.full(s.action_dim, np.nan))
    with pytest.raises(ValueError):
        driver.send_action(np.zeros(s.action_dim + 1))


class _Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_safety_layer_limits(driver: Driver) -> None:
    """NaN and wrong shapes become holds; out-of-range commands are clipped; max_delta holds."""
    s = driver.spec
    safe = SafeDriver(driver, SafetyConfig(max_delta=[float((s.action_high - s.action_low).min() / 8)]))
    safe.reset(0)
    hold = driver.hold_action()
    np.testing.assert_allclose(safe.act(np.full(s.action_dim, np.nan)), hold, atol=1e-3)
    np.testing.assert_allclose(safe.act(np.zeros(s.action_dim + 1)), hold, atol=1e-3)
    assert safe.stats.rejected == 2
    first = safe.act(s.action_high)
    second = safe.act(s.action_low)
    step = safe._max_delta  # noqa: SLF001 - the configured per-dim bound
    assert np.all(np.abs(second - first) <= step + 1e-3 * (s.action_high - s.action_low))
    assert np.all(second >= s.action_low - 1e-6) and np.all(second <= s.action_high + 1e-6)


@pytest.mark.parametrize("on_timeout", ["hold", "stop"])
def test_watchdog(driver: Driver, on_timeout: str) -> None:
    """No fresh action for watchdog_s: the driver gets its hold command; 'stop' latches until reset."""
    clock = _Clock()
    safe = SafeDriver(driver, SafetyConfig(watchdog_s=0.5, on_timeout=on_timeout), clock=clock)
    safe.reset(0)
    rng = np.random.default_rng(1)
    a = _uniform(driver, rng)
    applied = safe.act(a)
    before = driver.get_observation()
    clock.t = 0.4
    safe.act(None)
    assert not safe.tripped
    clock.t = 1.0
    out = safe.act(None)
    assert safe.tripped and safe.stats.trips == 1
    np.testing.assert_allclose(out, driver.hold_action(), atol=1e-6)
    if driver.absolute_actions:  # the hold is the last command sent
        np.testing.assert_allclose(driver.hold_action(), applied, atol=2e-3)
    if driver.name in HARDWARE:  # holding (or stopping) leaves the arm where it was
        np.testing.assert_allclose(_flat(driver.get_observation()), _flat(before), atol=2e-3)
    b = _uniform(driver, rng)
    after = safe.act(b)
    if on_timeout == "hold":
        assert not safe.tripped and safe.stats.fresh == 2  # resumed with the fresh command
        np.testing.assert_allclose(after, np.clip(b, driver.spec.action_low, driver.spec.action_high), atol=2e-3)
    else:
        assert safe.stats.fresh == 1, "a stopped robot must ignore actions until it is rearmed"
        safe.reset(0)  # reset rearms
        assert not safe.tripped
        safe.act(b)
        assert safe.stats.fresh == 2


def test_held_rows_are_the_ticks_that_held(driver: Driver) -> None:
    """Every row of the real control loop says whether its tick applied the hold: exactly the
    ticks without a fresh action (what the server's episode log and "robot held" count)."""
    from episode_rig import run_scripted

    safe = SafeDriver(driver, SafetyConfig(watchdog_s=1e9))
    rng = np.random.default_rng(2)
    actions = [_uniform(driver, rng) * 0.3 for _ in range(12)]  # small: the hardware stays inside its box

    def script(step: int) -> np.ndarray | None:
        return None if step % 3 == 2 else actions[step]

    res, rows = run_scripted(safe, script, max_steps=12)
    assert res.steps == 12 and len(rows) == 12
    assert [r.held for r in rows] == [i % 3 == 2 for i in range(12)]
    keeps = list(driver.hold_keeps)
    for prev, r in zip(rows, rows[1:], strict=False):
        if r.held:  # zero motion; the dims the driver keeps (its gripper) repeat the last command
            hold = np.zeros(driver.spec.action_dim, np.float32) if not driver.absolute_actions else r.action
            hold[keeps] = prev.action[keeps]
            np.testing.assert_allclose(r.action, np.clip(hold, driver.spec.action_low, driver.spec.action_high),
                                       atol=2e-3)


GRIPPERS: dict[str, tuple[int, int]] = {"xarm": (4, 4), "lerobot": (5, 5)}
"""Hardware drivers with a gripper: (its action dimension, +1 closes; its reading in ``state``, up
closes). The sim's grasp is checked on a cube (``_sim_grasp``); the mock has no gripper."""


def _sim_grasp(safe: SafeDriver) -> tuple[float, float]:
    """Pick the cube with OGBench's plan oracle until it is off the table; then (the fingers'
    contact reading, the gripper actuator's force)."""
    from qc_robot.teleop.scripted import ScriptedOperator

    sim: Any = safe.driver
    op = ScriptedOperator(lambda: sim.env, oracle="plan", seed=0)
    op.episode_started(safe.reset(3))
    env = sim.env.unwrapped
    for _ in range(150):
        safe.act(np.asarray(op.read().action, np.float32))
        if env.compute_ob_info()["privileged/block_0_pos"][2] > 0.05:
            break
    else:
        pytest.fail("the oracle did not lift the cube: no grasp to hold")
    info = env.compute_ob_info()
    return float(info["proprio/gripper_contact"][0]), float(env.data.actuator_force[env._gripper_actuator_ids][0])


def test_the_hold_keeps_a_grasp(driver: Driver) -> None:
    """Ticks without a fresh action (a reply late under inference delay) hold the robot *and its
    grasp*: a held gripper keeps squeezing (sim: on a lifted cube) or keeps its closed target."""
    safe = SafeDriver(driver, SafetyConfig(watchdog_s=1e9))
    if driver.name == "sim":
        contact, force = _sim_grasp(safe)
        assert contact > 0.5 and force > 1.0, "the oracle's grasp does not squeeze the cube"
        for _ in range(10):
            safe.act(None)
        after_contact, after_force = _sim_grasp_reading(safe)
        assert safe.stats.held >= 10
        assert after_contact > 0.5 and after_force > 0.5 * force, (
            f"the hold let the cube go: contact {contact:.2f} → {after_contact:.2f}, "
            f"grip force {force:.2f} → {after_force:.2f}")
        return
    if driver.name not in GRIPPERS:
        pytest.skip(f"{driver.name}: no gripper")
    dim, reading = GRIPPERS[driver.name]
    safe.reset(0)
    close = np.zeros(driver.spec.action_dim, np.float32)
    close[dim] = 1.0
    for _ in range(3):
        safe.act(close)
    closed = float(safe.get_observation()["state"][reading])
    for _ in range(5):
        safe.act(None)
    held = float(safe.get_observation()["state"][reading])
    assert held >= closed - 1e-3, f"the hold opened the gripper: {closed:.3f} → {held:.3f}"


def _sim_grasp_reading(safe: SafeDriver) -> tuple[float, float]:
    env = safe.driver.env.unwrapped  # type: ignore[attr-defined]
    return (float(env.compute_ob_info()["proprio/gripper_contact"][0]),
            float(env.data.actuator_force[env._gripper_actuator_ids][0]))


def test_a_latched_stop_ends_the_episode_truncated(driver: Driver) -> None:
    """Watchdog ``on_timeout=stop``: the episode ends at the trip (not at the step limit), its last
    row truncated, ``end_reason`` says why, and the next reset clears it."""
    from episode_rig import TickClock, run_scripted

    clock = TickClock(0.2)
    safe = SafeDriver(driver, SafetyConfig(watchdog_s=0.5, on_timeout="stop"), clock=clock)
    hold = driver.hold_action()

    def script(step: int) -> np.ndarray | None:
        return hold if step < 3 else None  # silent from the 4th tick: trips at tick 6 (0.6 s > 0.5 s)

    res, rows = run_scripted(safe, script, max_steps=30, clock=clock)
    assert res.steps == 6, "the loop must end the episode at the latched stop"
    assert rows and rows[-1].truncated and not any(r.truncated for r in rows[:-1])
    assert safe.end_reason is not None and safe.end_reason.startswith("watchdog stop")
    assert safe.step_info().truncated
    safe.reset(0)
    assert safe.end_reason is None and not safe.step_info().truncated and not safe.tripped
