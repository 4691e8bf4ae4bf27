"""First run after install: bring-up policies, the mock driver's own episode length and sizing,
the shipped default policy served with no --policy (issue 15)."""

from __future__ import annotations

import numpy as np
import pytest

from drivers.mock import MockConfig, MockDriver, policy_dims
from qc_robot.cli import compose, main


@pytest.fixture
def hold_server():
    """A real control server on a free loopback port, serving a bring-up policy."""
    from qc_robot.server.app import ControlServer, load_policy

    made = []

    def start(ref: str) -> ControlServer:
        s = ControlServer(load_policy(ref), "tcp://127.0.0.1:*").start()
        made.append(s)
        return s

    yield start
    for s in made:
        s.stop()


def test_mock_keeps_its_own_episode_length_under_drive(hold_server, capsys):
    """drive passes env.max_episode_steps=0 ('unset'); the mock's episodes still end at 100."""
    srv = hold_server("hold:28:5:5")
    assert main(["drive", "driver=mock", f"server={srv.address}", "episodes=2", "driver_args.obs_dim=28"]) == 0
    out = capsys.readouterr().out
    assert out.count("steps 100 (robot 100)") == 2 and "success 0/2" in out
    assert srv.stats.chunks == 2 * 100 // 5


def test_mock_takes_its_dimensions_from_a_policy_when_asked(hold_server, capsys):
    srv = hold_server("random:28:5:5:10")
    assert main(["drive", "driver=mock", f"server={srv.address}", "episodes=1",
                 "driver_args.policy=random:28:5:5:10", "driver_args.max_episode_steps=20"]) == 0
    assert "steps 20 (robot 20)" in capsys.readouterr().out
    d = MockDriver(MockConfig(policy="hold:28:7:5:10"))
    assert d.spec.action_dim == 7 and d.spec.obs_fields[0].shape == (28,) and d.spec.control_hz == 10.0
    assert d.reset(0)["state"].shape == (28,)


def test_a_mismatched_mock_is_refused_by_the_server(hold_server, capsys):
    srv = hold_server("hold:28:5:5")
    assert main(["drive", "driver=mock", f"server={srv.address}", "episodes=1", "connect_timeout_s=5"]) != 0
    assert "spec_mismatch" in capsys.readouterr().out


def test_bring_up_refs_give_their_spec():
    assert policy_dims("hold:37:5:5") == (5, 37, 20.0)
    with pytest.raises(ValueError, match="hold:OBS_DIM"):
        policy_dims("hold:x")


def test_serve_needs_no_policy_key():
    assert compose("serve", []).policy == "default"
    assert compose("drive", []).env.name == "cube-single-task1"  # the shipped policy's task


def test_mock_max_episode_steps_zero_means_its_default():
    d = MockDriver(MockConfig(max_episode_steps=0, success_radius=0.0))
    d.reset(0)
    ends = []
    for _ in range(100):
        d.send_action(np.zeros(5))
        ends.append(d.step_info().truncated)
    assert d.spec.max_episode_steps == 100 and ends == [False] * 99 + [True]
