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

import sys
from typing import Any

SWEEP_DIR = "runs/sweep/{verb}/${{now:%Y-%m-%d_%H-%M-%S}}"
RUN_DIR_KEYS = {"train": "training.run_dir", "finetune": "run_dir"}
"""Where each verb keeps its outputs: a sweep job points it at the job's own directory."""


def is_multirun(args: list[str]) -> bool:
    return "-m" in args or "--multirun" in args


def multirun(verb: str, schema: type, run: Any, config_dir: str, overrides: list[str]) -> int:
    """Run ``verb`` once per point of the sweep in ``overrides``; the exit code is the worst job's."""
    import hydra
    from hydra.core.config_store import ConfigStore
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf, open_dict

    from qc_robot.cli_checks import preflight
    from qc_robot.cli_errors import explain
    from qc_robot.config import to_dataclass

    ConfigStore.instance().store(name=f"{verb}_schema", node=schema)
    codes: list[int] = []

    @hydra.main(config_path=config_dir, config_name=verb, version_base=None)
    def job(cfg: Any) -> int:
        key = RUN_DIR_KEYS.get(verb)
        if key is not None:  # each job's outputs in its own directory
            with open_dict(cfg):
                OmegaConf.update(cfg, key, HydraConfig.get().runtime.output_dir)
        OmegaConf.resolve(cfg)
        dc: Any = to_dataclass(schema, cfg)

        def checked_run(dc: Any = dc) -> int:
            preflight(verb, dc)
            return run(dc)

        code = explain(verb, checked_run)
        codes.append(code)
        return code

    args = [a for a in overrides if a not in ("-m", "--multirun")]
    defaults = [f"hydra.sweep.dir={SWEEP_DIR.format(verb=verb)}", "hydra.job.chdir=false", f"hydra.job.name={verb}"]
    saved = sys.argv
    sys.argv = [f"qc-robot {verb}", "--multirun", *defaults, *args]
    try:
        job()
    except SystemExit as e:  # Hydra exits on a bad sweep override; its message is already printed
        return int(e.code or 0) or 2
    finally:
        sys.argv = saved
    return max(codes, default=0)
