"""CLI flag translation and config composition for every verb."""

import pytest

from qc_robot.cli import VERBS, compose, flags_to_overrides


def test_flags_become_overrides_and_values_keep_their_dashes():
    args = ["--policy", "runs/a-b/model.onnx", "--log-dir=/tmp/x-y", "--verify", "a=b"]
    assert flags_to_overrides(args) == ["policy=runs/a-b/model.onnx", "log_dir=/tmp/x-y", "verify=true", "a=b"]


@pytest.mark.parametrize("verb", sorted(VERBS))
def test_every_verb_composes_its_config(verb):
    cfg = compose(verb, [], require=False)  # required keys (checkpoint=...) are enforced separately
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


# --- first run: required keys, --help, one-line errors (issue 15) -------------------------------

import dataclasses  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402
from pathlib import Path  # noqa: E402

from qc_robot.cli import main  # noqa: E402
from qc_robot.config import MissingKeysError, config_keys  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def _one_line_error(capsys: pytest.CaptureFixture[str], argv: list[str], *needles: str) -> str:
    """Run the CLI in process; it must fail with one stderr line that contains every needle."""
    rc = main(argv)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc != 0, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"qc-robot {argv[0]}: "), lines
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("verb,key", [("eval", "checkpoint"), ("export", "checkpoint"),
                                      ("finetune", "checkpoint"), ("replay", "path")])
def test_required_keys_are_enforced_not_passed_on(verb, key):
    with pytest.raises(MissingKeysError, match=key):
        compose(verb, [])
    assert getattr(compose(verb, [], require=False), key) == "???"  # --help/--cfg may show them


@pytest.mark.parametrize("verb,key", [("eval", "checkpoint"), ("export", "checkpoint")])
def test_a_missing_required_key_is_one_line_naming_it(capsys, verb, key):
    _one_line_error(capsys, [verb], "missing required key", f"{key}=")


@pytest.mark.parametrize("argv,needles", [
    (["eval", "checkpoint=/nonexistent/checkpoint.pt"], ["checkpoint", "/nonexistent/checkpoint.pt", "not found"]),
    (["export", "checkpoint=/nonexistent/c.pt"], ["checkpoint", "not found"]),
    (["serve", "--policy", "/nonexistent/model.onnx"], ["policy", "/nonexistent/model.onnx", "not found"]),
    (["serve", "policy=hold:abc"], ["policy", "hold:OBS_DIM:ACT_DIM:H"]),
    (["datagen", "env.name=bad"], ["unknown task 'bad'", "env.name", "cube-triple-task1..5"]),
    (["datagen", "env=bad"], ["no env named 'bad'", "cube-single-task1..5"]),
    (["train", "agent=nope"], ["no agent named 'nope'", "qc_fql"]),
    (["train", "agent.horizon=five"], ["agent.horizon=five", "Integer"]),
    (["serve", "nope=1"], ["unknown key", "nope"]),
    (["drive", "driver=sim", "env.name=cube-nine-task1"], ["unknown task 'cube-nine-task1'"]),
])
def test_each_mistake_is_one_line_with_a_nonzero_exit(capsys, argv, needles):
    _one_line_error(capsys, argv, *needles)


def test_a_policy_file_that_is_not_onnx_is_one_line(capsys, tmp_path):
    bad = tmp_path / "model.onnx"
    bad.write_text("not a model")
    _one_line_error(capsys, ["serve", f"policy={bad}", "bind=ipc://" + str(tmp_path / "s")],
                    "onnxruntime cannot load the model", str(bad))


def test_a_checkpoint_that_is_not_one_is_one_line(capsys, tmp_path):
    bad = tmp_path / "checkpoint.pt"
    bad.write_bytes(b"\x00garbage")
    _one_line_error(capsys, ["eval", f"checkpoint={bad}", "episodes=1"], f"checkpoint={bad}",
                    "not a checkpoint written by qc-robot train")


_BLOCKER = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):  # a robot PC's install: these packages are absent
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
sys.meta_path.insert(0, Block())
from qc_robot.cli import main
sys.exit(main({argv!r}))
"""


ROBOT_PC = ("torch", "mujoco", "ogbench", "gymnasium")  # `pip install qc-robot[cpu]` lacks these


@pytest.mark.parametrize("argv,blocked,extra", [
    (["drive", "driver=sim", "connect_timeout_s=1"], ROBOT_PC, "sim"),
    (["datagen", "data.num_episodes=1"], ROBOT_PC, "sim"),
    (["eval", "checkpoint={ckpt}"], ROBOT_PC, "learn"),
    (["eval", "checkpoint={ckpt}", "env.name=cube-single-task1"], ("torch",), "learn"),
    (["train", "experiment=smoke"], ROBOT_PC, "learn"),  # one extra covers train, not [sim] then [learn]
])
def test_a_missing_extra_names_the_extra_to_install(tmp_path, argv, blocked, extra):
    ckpt = tmp_path / "checkpoint.pt"
    ckpt.write_bytes(b"x")
    argv = [a.format(ckpt=ckpt) for a in argv]
    code = textwrap.dedent(_BLOCKER.format(blocked=blocked, argv=argv))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                         env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert len(lines) == 1 and f'pip install "qc-robot[{extra}]"' in lines[0], out.stderr


@pytest.mark.parametrize("verb", sorted(VERBS))
def test_help_lists_every_key_with_its_documentation(capsys, verb):
    assert main([verb, "--help"]) == 0
    out = capsys.readouterr().out
    schema = type(compose(verb, [], require=False))
    keys = config_keys(schema)
    for k in keys:
        assert f"  {k.key} = " in out, k.key
        if k.doc:  # the first words of the field's docstring are shown under it
            first = " ".join(k.doc.replace("``", "").split()[:3])
            assert first in " ".join(out.split()), (k.key, first)
    assert "examples:" in out and f"qc-robot {verb} " in out.split("examples:")[1]
    if verb == "eval":
        assert "  checkpoint = ??? (required)" in out


def test_help_shows_the_values_overrides_give():
    from qc_robot.cli import help_text

    assert "agent.hidden_dims = [32, 32]" in help_text("train", ["experiment=smoke"])


def test_dataset_help_lists_its_sub_verbs(capsys):
    assert main(["dataset", "--help"]) == 0
    out = capsys.readouterr().out.split("sub-verbs:")[1].split("\n\n")[0]
    assert [ln.split()[0] for ln in out.strip().splitlines()] == ["info", "validate", "merge", "split", "recover",
                                                                    "import", "export"]


def test_config_dataclass_docs_are_read_from_field_docstrings():
    from qc_robot.config import AgentConfig, field_docs

    docs = field_docs(AgentConfig)
    assert docs["horizon"].startswith("Chunk length h")
    assert set(docs) <= {f.name for f in dataclasses.fields(AgentConfig)}


def test_every_registered_task_can_be_named_with_env():
    from omegaconf import OmegaConf

    from qc_robot.sim.tasks import list_tasks, task_spec

    files = sorted((REPO / "configs" / "env").glob("*.yaml"))
    assert {p.stem for p in files} == set(list_tasks())
    for p in files:  # each file names its own task, with the task's reward setting
        node = OmegaConf.load(p)
        assert node.name == p.stem and node.sparse_reward == task_spec(p.stem).sparse_default
    for name in ("cube-triple-task1", "puzzle-4x4-task5", "scene-task1"):
        cfg = compose("train", [f"env={name}"])
        assert cfg.env.name == name and cfg.data.path == f"data/{name}.hdf5"
    assert compose("drive", ["env=cube-triple-task1"]).env.name == "cube-triple-task1"


def test_free_form_dict_keys_need_no_plus():
    cfg = compose("drive", ["driver=mock", "driver_args.obs_dim=28", "+driver_args.gain=0.2"])
    assert cfg.driver_args == {"obs_dim": 28, "gain": 0.2}


@pytest.mark.parametrize("argv,wrong,right", [
    (["train", "experiment=frist_run", "--cfg"], "experiment=frist_run", "experiment=first_run"),  # optional group
    (["train", "agent=qcfql"], "agent=qcfql", "agent=qc_fql"),
    (["train", "+data=defualt", "--cfg"], "data=defualt", "data=default"),
    (["drive", "env=cube-single-tsak1"], "env=cube-single-tsak1", "env=cube-single-task1"),
    (["train", "-m", "experiment=frist_run"], "experiment=frist_run", "experiment=first_run"),  # no job runs
    (["train", "agent=qc,qcc", "--cfg"], "agent=qcc", "agent=qc"),  # every value of a sweep
    (["train", "-m", "agent=qc,qcc"], "agent=qcc", "agent=qc"),
])
def test_an_unknown_group_option_is_refused_naming_the_nearest(capsys, monkeypatch, tmp_path, argv, wrong, right):
    from qc_robot.cli import main

    monkeypatch.chdir(tmp_path)  # a sweep that ran despite the typo would write runs/sweep/ here
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and wrong in err and f"did you mean {right}?" in err, err
    assert not (tmp_path / "runs").exists()  # refused before any job of a sweep ran


def test_train_without_demos_names_the_readme_command_that_records_them(capsys, tmp_path, monkeypatch):
    from qc_robot.cli import main

    monkeypatch.chdir(tmp_path)  # no data/ here
    assert main(["train", "experiment=first_run"]) == 2
    err = capsys.readouterr().err.strip()
    readme = (REPO / "README.md").read_text()
    assert len(err.splitlines()) == 1 and "qc-robot teleop device=scripted env=cube-single-task1 oracle=plan" in err
    assert "datagen" not in err and "oracle=plan oracle_noise=0.1 realtime=false" in readme, err
    assert main(["train", "experiment=smoke"]) == 2  # play data: datagen writes it
    assert "qc-robot datagen env=" in capsys.readouterr().err


def test_the_usage_footer_recommends_a_first_run_that_succeeds(capsys):
    from qc_robot.cli import main

    assert main(["--help"]) == 0
    first = [x for x in capsys.readouterr().out.splitlines() if x.startswith("First run:")]
    assert first and "hold:" not in first[0] and "qc-robot demo" in first[0], first
