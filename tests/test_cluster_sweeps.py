"""Issue 29: `train -m` through Hydra's own launchers gives the basic launcher's runs: the same
job directories, the same files in them, the same configs and the same trained weights; a job
that fails in a launcher's worker process fails the sweep. Each launcher test skips cleanly where
its plugin is not installed (joblib and submitit come with the ``cluster`` extra)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from qc_robot.cli import main

SWEEP = ["experiment=smoke", "training.seed=0,1", "training.offline_steps=2", "training.online_steps=0",
         "training.eval_episodes=0"]
LAUNCHERS = {
    "joblib": ("hydra_plugins.hydra_joblib_launcher", ["hydra.launcher.n_jobs=2"]),
    "submitit_local": ("hydra_plugins.hydra_submitit_launcher", ["hydra.launcher.timeout_min=10"]),
    "ray": ("hydra_plugins.hydra_ray_launcher",
            ["+hydra.launcher.ray.init.num_cpus=2", "+hydra.launcher.ray.init.include_dashboard=false"]),
}


def _sweep(where: Path, dataset: Path, monkeypatch, launcher: list[str]) -> tuple[int, list[Path]]:
    where.mkdir()
    monkeypatch.chdir(where)
    rc = main(["train", "-m", *launcher, *SWEEP, f"data.path={dataset}"])
    return rc, sorted(p for p in (where / "runs" / "sweep" / "train").glob("*/*") if p.is_dir() and p.name.isdigit())


def _tensors(state: dict, prefix: str = "") -> dict[str, torch.Tensor]:
    """A nested state dict's tensors by their dotted path."""
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if isinstance(v, dict):
            out.update(_tensors(v, f"{prefix}{k}."))
        elif isinstance(v, torch.Tensor):
            out[f"{prefix}{k}"] = v
    return out


def _files(job: Path) -> list[str]:
    return sorted(str(p.relative_to(job)) for p in job.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def basic_runs(tiny_dataset, tmp_path_factory):
    """The basic launcher's sweep, run once for the module and only when a launcher test needs it
    (a call, so a launcher test that skips costs nothing)."""
    made: list[Path] = []

    def get() -> list[Path]:
        if not made:
            mp = pytest.MonkeyPatch()
            try:
                rc, jobs = _sweep(tmp_path_factory.mktemp("basic") / "w", tiny_dataset, mp, [])
            finally:
                mp.undo()
            assert rc == 0 and [j.name for j in jobs] == ["0", "1"]
            made.extend(jobs)
        return made

    return get


@pytest.mark.parametrize("name", list(LAUNCHERS))
def test_a_launchers_sweep_is_the_basic_launchers(name, basic_runs, tiny_dataset, tmp_path, monkeypatch):
    module, args = LAUNCHERS[name]
    pytest.importorskip(module)
    from qc_robot.train.checkpoint import load_checkpoint

    reference = basic_runs()
    rc, jobs = _sweep(tmp_path / "w", tiny_dataset, monkeypatch, [f"hydra/launcher={name}", *args])
    assert rc == 0
    assert [j.name for j in jobs] == ["0", "1"]
    for job, ref in zip(jobs, reference, strict=True):
        assert _files(job) == _files(ref)
        for f in ("config.yaml", "overrides.yaml"):
            assert (job / ".hydra" / f).read_text() == (ref / ".hydra" / f).read_text(), f
        a, b = load_checkpoint(job / "checkpoint.pt"), load_checkpoint(ref / "checkpoint.pt")
        assert a.step == b.step == 2
        sa, sb = _tensors(a.agent.state_dict()), _tensors(b.agent.state_dict())
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    a0 = _tensors(load_checkpoint(jobs[0] / "checkpoint.pt").agent.state_dict())
    a1 = _tensors(load_checkpoint(jobs[1] / "checkpoint.pt").agent.state_dict())
    assert not all(torch.equal(a0[k], a1[k]) for k in a0)  # the seeds differ: a swap would show


def test_a_job_failing_in_a_worker_process_fails_the_sweep(tmp_path, monkeypatch, capsys):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    missing = tmp_path / "missing.hdf5"
    rc, jobs = _sweep(tmp_path / "w", missing, monkeypatch, ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"])
    assert rc == 2 and len(jobs) == 2  # both jobs ran, in joblib's processes, and refused the data
