"""``qc-robot train -m seed=0,1,2 env=...``: Hydra multirun sweeps through Hydra's own launchers.

The single-run CLI composes configs with Hydra's compose API (no working-directory change, no
output folders). A sweep needs Hydra's application runner instead: it expands the sweep
(``a=1,2``, ``glob``, ``range``), hands each job to the configured launcher (the basic one runs
jobs one after another; ``hydra/launcher=joblib`` runs them in parallel processes with
``pip install "qc-robot[sweep]"``; ``hydra/launcher=submitit_slurm`` submits them to a SLURM
cluster with hydra-submitit-launcher) and gives each job its own directory,
``runs/sweep/<verb>/<date_time>/<job number>``. ``train`` writes its run there (checkpoint,
metrics, curve) next to Hydra's record of the job's config and overrides.
"""

from __future__ import annotations

import os
import sys
from typing import Any

SWEEP_DIR = "runs/sweep/{verb}/${{now:%Y-%m-%d_%H-%M-%S}}"
RUN_DIR_KEYS = {"train": "training.run_dir", "finetune": "run_dir"}
"""Where each verb keeps its outputs: a sweep job points it at the job's own directory."""


def is_multirun(args: list[str]) -> bool:
    return "-m" in args or "--multirun" in args


def multirun(verb: str, schema: type, run: Any, config_dir: str, overrides: list[str]) -> int:
    """Run ``verb`` once per point of the sweep in ``overrides``; the exit code is the worst job's.

    The codes come back in Hydra's ``JobReturn`` records from whichever launcher ran the jobs
    (in this process, joblib's worker processes, Ray actors or SLURM jobs), not from this process's
    memory, so a job that failed elsewhere still fails the sweep."""
    from hydra import initialize_config_dir
    from hydra.core.config_store import ConfigStore
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf, open_dict

    from qc_robot.cli_checks import preflight
    from qc_robot.cli_errors import EXIT_USAGE, config_error_text, explain
    from qc_robot.config import to_dataclass

    ConfigStore.instance().store(name=f"{verb}_schema", node=schema)

    def job(cfg: Any) -> int:
        key = RUN_DIR_KEYS.get(verb)
        if key is not None:  # each job's outputs in its own directory
            with open_dict(cfg):
                OmegaConf.update(cfg, key, HydraConfig.get().runtime.output_dir)
        OmegaConf.resolve(cfg)

        def checked_run() -> int:
            dc: Any = to_dataclass(schema, cfg)
            preflight(verb, dc)
            return run(dc)

        return explain(verb, checked_run)

    args = [a for a in overrides if a not in ("-m", "--multirun")]
    # Absolute: a launcher's worker process may live in another directory (a reused joblib worker,
    # a SLURM job), and every job's directory must be the one this command names.
    sweep_dir = os.path.abspath(SWEEP_DIR.format(verb=verb)).replace("\\", "\\\\").replace("'", "\\'")
    defaults = [f"hydra.sweep.dir='{sweep_dir}'", "hydra.job.chdir=false",
                f"hydra.job.name={verb}", "hydra.mode=MULTIRUN"]
    try:
        with initialize_config_dir(config_dir=config_dir, version_base=None, job_name=verb):
            app = GlobalHydra.instance().hydra
            assert app is not None
            batches = app.multirun(config_name=verb, task_function=job, overrides=[*defaults, *args])
    except Exception as e:  # a bad sweep override, a launcher that is not installed: one line
        print(f"qc-robot {verb}: bad sweep: {config_error_text(e)}", file=sys.stderr)
        return EXIT_USAGE
    codes = [int(r.return_value or 0) for batch in batches for r in batch]
    return max(codes, default=0)
