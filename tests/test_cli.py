"""CLI flag translation and config composition for every verb."""

import pytest

from qc_robot.cli import VERBS, compose, flags_to_overrides


def test_flags_become_overrides_and_values_keep_their_dashes():
    args = ["--policy", "runs/a-b/model.onnx", "--log-dir=/tmp/x-y", "--verify", "a=b"]
    assert flags_to_overrides(args) == ["policy=runs/a-b/model.onnx", "log_dir=/tmp/x-y", "verify=true", "a=b"]


@pytest.mark.parametrize("verb", sorted(VERBS))
def test_every_verb_composes_its_config(verb):
    cfg = compose(verb, [])
    assert type(cfg).__name__.endswith("Config")


def test_group_and_value_overrides_reach_the_dataclass():
    cfg = compose("train", ["agent=qc_fql", "env=cube-double-task2", "agent.horizon=3", "experiment=smoke"])
    assert cfg.agent.actor_type == "fql" and cfg.agent.horizon == 3
    assert cfg.env.name == "cube-double-task2"
    assert cfg.data.path == "data/cube-double-task2.hdf5"  # interpolation resolved
    assert cfg.agent.hidden_dims == [32, 32]  # from experiment=smoke


def test_bad_overrides_fail_composition():
    with pytest.raises(Exception, match="horizon"):
        compose("train", ["agent.horizon=five"])
    with pytest.raises(Exception, match="nope"):
        compose("serve", ["nope=1"])
