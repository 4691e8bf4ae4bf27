"""``qc-robot finetune`` configuration (schema of ``configs/finetune.yaml``)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class FinetuneConfig:
    """Online fine-tuning on a robot: a learner fed by a ``qc-robot serve`` learner port."""

    checkpoint: str = "???"
    """Offline checkpoint to start from (its config names the task and the dataset)."""
    server: str = "tcp://127.0.0.1:5556"
    """The server's learner port (``learner_bind`` of ``qc-robot serve``)."""
    run_dir: str = "runs/finetune"
    """Finetune checkpoints and logs; a restart with the same run_dir resumes from its checkpoint
    (weights, replay, intervention buffer, last applied journal seq)."""
    data_path: str = ""
    """Offline dataset kept in the replay ('' = the checkpoint's ``data.path``)."""
    replay_capacity: int = 500_000
    """Online rows the replay holds beyond the offline data (oldest online rows are overwritten)."""
    utd: int = 1
    """Gradient updates per received env step."""
    start_updates: int = 0
    """Online env steps received before updates begin."""
    intervention_fraction: float = 0.5
    """Share of each batch drawn from the intervention buffer once it holds a chunk (HIL-SERL: 0.5)."""
    intervention_capacity: int = 200_000
    """Rows of the intervention buffer."""
    reward_fn: str = ""
    """'module:function' applied to each Transition learner-side: returns rewards (K,) or
    (rewards, terminals); '' keeps the driver's rewards (docs/finetune.md). Its output is taken to
    follow the checkpoint's reward convention: the robots' declared one is then not checked."""
    push_every: int = 50
    """Updates between policy pushes (0: push only at the end). A push holds training only for a
    weight snapshot (milliseconds); export and upload run on a thread of their own."""
    push_mode: str = "swap"
    """'swap': trace the graph once, then write new weights into it (fast); 'trace': trace every
    push (slow, the old behaviour; kept as the benchmark's baseline)."""
    push_on_exit: bool = True
    """Push the final policy when the run ends (if it changed since the last push)."""
    save_every: int = 5_000
    """Updates between checkpoints (always saved at the end and on Ctrl-C)."""
    max_env_steps: int = 0
    """Stop after this many online env steps received (0: no limit)."""
    max_updates: int = 0
    """Stop after this many online updates (0: no limit)."""
    max_wall_s: float = 0.0
    """Stop after this many seconds (0: no limit)."""
    idle_stop_s: float = 0.0
    """Stop when no transition arrived for this long (0: wait forever)."""
    verify_export: bool = True
    """Check exported policies against torch before pushing them: every traced file, the first
    weight swap after each trace and every ``verify_every``-th swap (a swap that fails is traced)."""
    verify_every: int = 10
    """With ``verify_export``: check every n-th weight swap after the first (0: only the first).
    A swap rewrites only the weights of a graph that passed the check; each check costs about as
    much as the rest of a push (an onnxruntime session and a torch pass)."""
    push_timeout_s: float = 30.0
    heartbeat_s: float = 1.0
    timeout_s: float = 5.0
    """Reconnect when the server is silent this long."""
    window: int = 256
    """Records the server may stream ahead of our acknowledgement."""
    curve_secret_key: str = ""
    """Our CURVE key file (``name.key_secret``); needed when the server uses CURVE."""
    curve_server_key: str = ""
    """The server's public key file (``server.key``)."""
    device: str = ""
    """'' = the checkpoint's agent device; 'cpu' or 'cuda'."""
    threads: int = 0
    """torch CPU threads (0: torch's default)."""
    log_interval: int = 1_000
    seed: int = 0
    log_level: str = "INFO"
