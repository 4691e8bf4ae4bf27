"""``qc-robot serve`` configuration (schema of ``configs/serve.yaml``)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ServeConfig:
    """The control server: one policy, many drivers, ZeroMQ ROUTER socket."""

    policy: str = "default"
    """Path to a self-describing ``model.onnx``; 'default': the small cube-single-task1 policy
    shipped in the package (qc_robot/assets); or ``hold:OBS_DIM:ACT_DIM:H`` / ``random:...`` for
    bring-up without a trained model (observation key ``state``; e.g. hold:28:5:5 matches
    cube-single, hold:37:5:5 cube-double, hold:10:5:5 the mock driver)."""
    bind: str = "tcp://127.0.0.1:5555"
    """ZeroMQ endpoint to bind. Loopback by default (keyless there)."""
    allow_remote: bool = False
    """Must be true to bind anything but loopback/ipc/inproc; then CURVE keys are required
    (``curve_secret_key`` + ``driver_authorized_dir``) unless ``insecure_remote`` is set."""
    insecure_remote: bool = False
    """Allow a non-loopback bind without CURVE: anyone who reaches the port can drive the robot.
    Only on a network you trust completely."""
    driver_authorized_dir: str = ""
    """Directory of the public key files (``*.key``) of drivers allowed on the driver port: turns
    on CURVE there (encryption and authentication, ZeroMQ ZAP); needs ``curve_secret_key``. A
    driver whose key is not in it gets no answer at all."""
    seed: int | None = None
    """Seed of the served policy's sampling noise (None: OS entropy). With one driver in lockstep
    (``realtime=false``) and the same ``drive seed=``, a run's outcomes repeat exactly."""
    threads: int = 1
    """Intra-op threads of the ONNX runtime session."""
    providers: str = "auto"
    """onnxruntime execution providers: 'auto', 'cpu', 'cuda' (see qc_robot.policies.onnx_policy)."""
    workers: int = 1
    """Inference worker threads. >1 lets drivers' inferences overlap (the policy must be
    thread-safe: onnxruntime sessions are)."""
    max_inflight: int = 4
    """Observations queued per driver (computed in order): the requests a driver may pipeline under
    inference delay (``drive max_inflight``). One more supersedes the oldest queued."""
    delay_ms: float = 0.0
    """Hold every reply until this long after its observation arrived: an injected inference delay
    (a slow robot PC, Wi-Fi) to try the executor modes against (docs/rtc.md). 0: none."""
    max_clients: int = 8
    """Drivers served at once; further Hellos are refused with ``too_many_clients``."""
    heartbeat_s: float = 1.0
    """Advertised to drivers: send a Heartbeat after this long without sending anything."""
    session_timeout_s: float = 10.0
    """A driver silent for this long is forgotten (its partial episode log is written)."""
    max_message_bytes: int = 0
    """Driver-port message size limit, enforced by ZeroMQ before buffering (0: enough for a
    transition of 4·H steps of the policy's observations, at least 1 MiB; at most 64 MiB).
    Advertised as ``welcome.metadata.max_message_bytes``."""
    log_dir: str = ""
    """Directory for HDF5 episode logs of everything served ('' = off)."""
    log_level: str = "INFO"
    learner_bind: str = ""
    """Learner port for ``qc-robot finetune`` ('' = off; e.g. tcp://127.0.0.1:5556): transitions
    are journaled and streamed to the learner, which pushes new policies back."""
    journal_dir: str = "runs/serve-journal"
    """Durable transition journal (and pushed policies) when the learner port is on; reuse the
    directory across server restarts so an unacknowledged backlog is re-sent."""
    resume_policy: bool = True
    """With the learner port: start from the newest policy the learner pushed to an earlier run on
    this ``journal_dir`` (``policies/``), not ``policy``, when it fits the same robot; false: start
    from ``policy`` (pushes still continue above the highest version accepted before)."""
    journal_prune: bool = False
    """Delete journal segments once a learner has them in a checkpoint (default: keep everything)."""
    learner_timeout_s: float = 10.0
    """A learner silent for this long is unsubscribed (its data stays in the journal)."""
    curve_secret_key: str = ""
    """The server's CURVE key file (``name.key_secret`` from ``zmq.auth.create_certificates``):
    encrypts and authenticates the learner port (and the driver port when
    ``driver_authorized_dir`` is set). Required for a non-loopback bind."""
    curve_authorized_dir: str = ""
    """Directory of the public key files (``*.key``) of learners allowed to connect."""
