"""kill -9 a real recording process at chosen and random moments; the file must stay loadable.

The child runs the production TeleopSession + Recorder on the mock driver (no MuJoCo, so it
starts fast) with a deterministic device; test-only hooks in the child print a marker and, for
the chosen points, pause there so the kill lands exactly at that moment.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
import warnings

import numpy as np
import pytest

from qc_robot.data.hdf5_io import load_flat, validate
from qc_robot.data.journal import read_journal
from qc_robot.data.recorder import journal_path, recover

CHILD = textwrap.dedent(r'''
    import os, sys, time
    import numpy as np
    from qc_robot.drivers.mock import MockConfig
    from qc_robot.drivers.registry import make_safe_driver
    from qc_robot.data import recorder as R
    from qc_robot.teleop.devices import Event, TeleopCommand, TeleopDevice
    from qc_robot.teleop.session import TeleopSession

    out, pause_at, commit = sys.argv[1], sys.argv[2], sys.argv[3]
    EP_LEN = 30

    def pattern(t):  # the action of step t: the test recomputes it
        return (0.5 * np.sin(0.1 * t + np.arange(5))).astype(np.float32)

    class Pattern(TeleopDevice):
        def __init__(self):
            self.active, self.t = False, 0
        def episode_started(self, obs):
            self.active, self.t = True, 0
        def episode_ended(self):
            self.active = False
        def read(self):
            if not self.active:
                return TeleopCommand(None, [Event.START])
            if self.t >= EP_LEN:
                return TeleopCommand(None, [Event.SUCCESS])
            self.t += 1
            return TeleopCommand(pattern(self.t - 1), [])

    def say(msg):
        print(msg, flush=True)

    def hang():
        while True:
            time.sleep(1)

    step0 = R.Recorder.step
    def step(self, *a, **k):
        step0(self, *a, **k)  # journaled: the step is no longer in flight
        n = self.steps
        say(f"step {n}")
        if pause_at == f"step{n}" and self.num_demos() == 1:
            hang()
    R.Recorder.step = step

    import h5py
    create0 = h5py.Group.create_dataset
    def create_dataset(self, name, *a, **k):
        ds = create0(self, name, *a, **k)
        if pause_at == "commit" and name == "rewards" and R.Recorder.num_demos_hint == 1:
            say("in-commit")
            hang()
        return ds
    h5py.Group.create_dataset = create_dataset
    R.Recorder.num_demos_hint = 0

    commit0 = R.commit_episode
    def commit_episode(*a, **k):
        name = commit0(*a, **k)
        R.Recorder.num_demos_hint += 1
        say(f"committed {name}")
        if pause_at == "after-replace" and R.Recorder.num_demos_hint == 2:
            hang()
        return name
    R.commit_episode = commit_episode

    driver = make_safe_driver("mock", MockConfig(max_episode_steps=1000, success_radius=0.0))
    with R.Recorder(out, {"task": "mock-crash"}, commit=commit) as rec:
        say("ready")
        TeleopSession(driver, Pattern(), rec, episodes=int(os.environ.get("EPISODES", "1000")),
                      time_scale=float(os.environ.get("TIME_SCALE", "50")), attrs={"operator": "t"}).run()
''')


def pattern(t: int) -> np.ndarray:
    return (0.5 * np.sin(0.1 * t + np.arange(5))).astype(np.float32)


def _spawn(tmp_path, out: str, pause_at: str, commit: str = "atomic", time_scale: float = 50.0):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = dict(os.environ, TIME_SCALE=str(time_scale), PYTHONPATH=os.getcwd())
    return subprocess.Popen([sys.executable, str(script), out, pause_at, commit], stdout=subprocess.PIPE,
                            text=True, env=env)


def _wait_for(proc: subprocess.Popen, marker: str, timeout: float = 30.0) -> list[str]:
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line.strip())
        if line.strip() == marker:
            return lines
    proc.kill()
    raise AssertionError(f"child never printed {marker!r}; last lines {lines[-5:]}")


def _kill(proc: subprocess.Popen) -> list[str]:
    """SIGKILL the child; returns what it printed and we had not read yet."""
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    rest = proc.stdout.read().split()
    proc.stdout.close()
    return rest


def _load(out: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert validate(out) == [], validate(out)
        return load_flat(out)


def _demo_actions(ds, i: int) -> np.ndarray:
    start = 0 if i == 0 else int(ds.episode_ends[i - 1])
    return ds.actions[start : int(ds.episode_ends[i])]


def test_kill_mid_episode_loses_nothing_journaled(tmp_path):
    out = str(tmp_path / "demos.hdf5")
    proc = _spawn(tmp_path, out, pause_at="step17")
    _wait_for(proc, "committed demo_0")
    _wait_for(proc, "step 17")  # step 17 of episode 1 journaled; the child pauses there
    _kill(proc)
    assert os.path.exists(journal_path(out))
    assert len(_load(out).episode_ends) == 1  # the file alone: episode 0, intact
    name = recover(out)
    assert name == "demo_1" and not os.path.exists(journal_path(out))
    ds = _load(out)
    assert list(np.diff(np.r_[0, ds.episode_ends])) == [30, 17]  # nothing journaled was lost
    np.testing.assert_array_equal(_demo_actions(ds, 1), np.stack([pattern(t) for t in range(17)]))
    import h5py

    with h5py.File(out) as f:
        a = f["data/demo_1"].attrs
        assert a["label"] == "unlabelled" and bool(a["recovered"]) and not bool(a["success"])
        assert a["operator"] == "t" and f["data/demo_0"].attrs["label"] == "success"
    assert recover(out) is None  # idempotent


@pytest.mark.parametrize("commit", ["atomic", "inplace"])
def test_kill_inside_hdf5_commit_keeps_file_and_label(tmp_path, commit):
    out = str(tmp_path / "demos.hdf5")
    proc = _spawn(tmp_path, out, pause_at="commit", commit=commit)
    _wait_for(proc, "in-commit")  # half-way through writing episode 1 into the HDF5 file (or its copy)
    _kill(proc)
    if commit == "atomic":  # the file is the old, complete one
        assert len(_load(out).episode_ends) == 1
    assert read_journal(journal_path(out)).episode.label == "success"
    assert recover(out, commit) in ("demo_1", "demo_2")  # inplace: demo_1 was the partial group
    ds = _load(out)
    assert list(np.diff(np.r_[0, ds.episode_ends])) == [30, 30]
    import h5py

    with h5py.File(out) as f:
        assert f["data/demo_1"].attrs["label"] == "success"  # the verdict survived the crash
    assert not os.path.exists(out + ".commit.tmp")


def test_kill_between_commit_and_journal_removal_adds_no_duplicate(tmp_path):
    out = str(tmp_path / "demos.hdf5")
    proc = _spawn(tmp_path, out, pause_at="after-replace")
    _wait_for(proc, "committed demo_1")
    _kill(proc)
    assert os.path.exists(journal_path(out))
    assert recover(out) is None  # its uuid is already in the file
    assert len(_load(out).episode_ends) == 2


@pytest.mark.parametrize("trial", range(3))
def test_kill_at_random_moments(tmp_path, trial):
    out = str(tmp_path / "demos.hdf5")
    proc = _spawn(tmp_path, out, pause_at="never", time_scale=200.0)
    lines = _wait_for(proc, "ready")
    time.sleep(random.Random(trial).uniform(0.05, 0.6))
    lines += _kill(proc)
    committed = sum(ln.startswith("committed") for ln in lines)
    after = lines[max((i for i, ln in enumerate(lines) if ln.startswith("committed")), default=-1) + 1 :]
    journaled = int(after[-1]) if after and after[-1].isdigit() else 0  # "step N" split into words
    recover(out)
    if not os.path.exists(out):
        assert committed == 0 and journaled == 0
        return
    ds = _load(out)
    assert not os.path.exists(journal_path(out))
    lengths = list(np.diff(np.r_[0, ds.episode_ends]))
    assert committed <= len(lengths) <= committed + 1
    if len(lengths) > committed:  # the recovered episode holds at least every step reported journaled
        assert lengths[-1] >= journaled
    for i in range(len(lengths)):  # every step kept is exactly what was executed
        acts = _demo_actions(ds, i)
        np.testing.assert_array_equal(acts, np.stack([pattern(t) for t in range(len(acts))]))
