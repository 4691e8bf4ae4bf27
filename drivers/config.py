"""``qc-robot drive`` configuration (schema of ``configs/drive.yaml``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from qc_robot.config import EnvConfig
from qc_robot.drivers.safety import SafetyConfig


@dataclass
class DriveConfig:
    """Run a driver against a policy server for a number of episodes."""

    driver: str = "sim"
    """Registered driver name (qc_robot.drivers.registry): 'sim' or 'mock'."""
    env: EnvConfig = field(default_factory=lambda: EnvConfig(name="cube-single-task1"))
    """The simulated task (sim driver only; the shipped default policy's task by default)."""
    server: str = "tcp://127.0.0.1:5555"
    policy_expect: str = ""
    """The policy the server must be serving: a model.onnx, 'default' (the shipped one) or a
    bring-up ref (hold:28:5:5). A server serving anything else (another one left on the port) is
    refused before the first episode ('' = any; the connected line names the policy either way)."""
    episodes: int = 10
    seed: int = 0
    """Episode i resets with seed + i."""
    mode: str = "open_loop"
    """'open_loop' (QC: run the whole chunk, then ask), 'latency_aware' (ask early, drop stale),
    'rtc' (as latency_aware; the server continues the executing chunk: frozen prefix + guided
    rest, docs/rtc.md) or 'temporal_ensemble' (ACT's exponential blending of every prediction)."""
    request_threshold: float = 0.5
    """latency_aware and rtc: ask for the next chunk when this fraction of H (or the measured delay, if
    larger) is left in the queue."""
    max_inflight: int = 4
    """latency_aware, rtc, temporal_ensemble: requests in flight at most (pipelining: at a delay d
    above H/2 further staggered requests keep a fresh chunk landing every H - d steps; how many
    follows from the measured delay; also bounded by the server's ``max_inflight``). 1: one at a
    time."""
    inference_delay_steps: int = 0
    """Lockstep drivers (realtime=false): release each reply this many control steps after its
    request, on the world's clock: a robot PC's or network's inference delay reproduced exactly
    (docs/rtc.md). 0: none (the world waits for every reply)."""
    realtime: bool = True
    """sim: wall-clock robot (True) or lockstep (False: the world waits for the policy)."""
    time_scale: float = 1.0
    """Speed-up of the wall clock (sim and the control loop), e.g. 5 in tests."""
    latency_ms: float = 0.0
    """sim: actuation latency."""
    obs_noise: float = 0.0
    """sim: observation noise std."""
    request_timeout_s: float = 2.0
    """A chunk not back after this long is given up (a late reply is then never executed)."""
    connect_timeout_s: float = 30.0
    tick_wait: float = 0.5
    """Realtime drivers: the fraction of a control period a tick with nothing queued may wait for
    the reply to its request before holding (0: never wait, hold one tick per chunk)."""
    safety: SafetyConfig = field(default_factory=SafetyConfig)
    driver_args: dict[str, Any] = field(default_factory=dict)
    """Further driver-specific config keys (override the common ones above)."""
    cameras: list[dict[str, Any]] = field(default_factory=list)
    """Cameras added to the driver's observation, each a ``qc_robot.drivers.camera.CameraConfig``
    map: ``{name: agentview_image, kind: opencv, source: '0', width: 128, height: 128,
    max_age_s: 0.2}``. A stale or failed camera holds the robot (docs/robots.md)."""
    jpeg_quality: int = 0
    """1-100: send observation images as JPEG at this quality (lossy; decoded by the server before
    the policy sees them: docs/protocol.md section 2.2); 0: raw uint8 arrays."""
    calibration: str = ""
    """Calibration file (``calibration/<robot_id>.json``, '' = none): the executor's initial delay
    estimate, the sim's physics/delay/noise; its id goes into the Hello and every logged episode."""
    randomize_physics: bool = False
    """sim: draw physical parameters per episode from the calibration's ranges."""
    curve_secret_key: str = ""
    """This driver's CURVE key pair file (``name.key_secret``): needed when the server's driver
    port uses CURVE (a non-loopback server); its public key must be in the server's
    ``driver_authorized_dir``."""
    curve_server_key: str = ""
    """The server's public key file (``server.key``), with ``curve_secret_key``."""
    send_transitions: bool = True
    """Stream executed transitions when the server asks for them (it logs episodes)."""
    outbox_dir: str = ""
    """A directory for the robot-side outbox ('' = none): transitions are kept on disk until the
    server acknowledges them, and re-sent after it comes back (exactly once at the learner)."""
    outbox_max_mb: int = 256
    """Largest unacknowledged outbox; beyond it the oldest transitions are dropped (and counted)."""
    outbox_drain_s: float = 30.0
    """At the end of the run, how long to wait for the outbox to be acknowledged."""
    operator: str = "none"
    """The operator in the loop (docs/hardware_finetuning.md): 'keyboard', 'gamepad',
    'spacemouse', 'lerobot' (a leader arm), 'scripted' (the sim's simulated operator) or 'none'.
    Keys/buttons give verdicts (success, failure, discard), take over, pause and end the run;
    after each reset the loop waits for their ready."""
    operator_args: dict[str, Any] = field(default_factory=dict)
    """The operator's settings (``qc_robot.teleop.operator.OperatorConfig``; unknown keys refused)."""
    reset_wait_s: float = 0.0
    """With an operator: the reset phase lasts this many seconds (0: until the operator presses
    ready)."""
    reward: str = "auto"
    """Rewards of the transitions: 'driver' (the driver's own), 'verdict' (the sparse convention
    from the operator's verdicts: -1 a step, 0 and termination on success), 'detector' (the same
    convention from ``reward_model``'s decision, the operator's verdicts overruling it), 'auto'
    ('detector' with a ``reward_model``, else verdicts when an operator is in the loop and the
    robot reports no reward: real arms, the blind sim)."""
    reward_model: str = ""
    """A success detector exported by ``qc-robot reward`` ('' = none). It scores each executed
    step on the robot side; once it fires (``debounce`` consecutive frames at or above
    ``threshold``) the episode ends as a success with the sparse reward. Refused at start when
    its observation keys or shapes differ from the robot's."""
    learner_wait: int = 200
    """Hold the robot at its reset while the server's learner owes more than this many updates to
    its UTD target (a learner slower than the robot: docs/finetune.md); 0: never wait. Costs
    nothing without a learner or with one that keeps up; the time waited is reported."""
    learner_wait_max_s: float = 600.0
    """Longest wait at one reset (0: no cap); then the episode starts anyway (counted)."""
    reward_reload: bool = False
    """Watch ``reward_model``: a new file there (``qc-robot reward`` retrained on the operator's
    overrules, same ``out=``) is loaded at the next episode's start; one that does not load or
    does not fit the robot is reported and the previous detector stays (``drivers/detector_reload.py``)."""
    reward_threshold: float = -1.0
    """The detector's probability threshold (< 0: the one exported with it)."""
    reward_debounce: int = 0
    """Consecutive frames above the threshold for the detector to fire (0: the exported one)."""
    review_s: float = 2.0
    """With an operator and a ``reward_model``: after the detector fires the robot holds this many
    seconds for the operator to overrule it ('failure' or 'discard'); 'success' or the end of the
    window confirms it. Overrules either way (also a 'success' the detector missed) are logged
    and counted."""
    max_steps: int = 0
    """Steps per episode at most (0: twice the driver's own limit, or its default)."""
    blind: bool = False
    """sim: behave like a real arm, which knows no reward: no reward, success or termination at
    the goal reach the loop, its transitions or the server's logs (``operator=scripted`` still
    sees the true outcome, to give its verdicts)."""
    pace_every: int = 0
    """Lockstep drivers: after every N executed steps, act again only with a chunk from a newer
    policy (a learner pushing every N·utd updates then trains between blocks, like the in-process
    loop: the stack's staleness-free arm). 0: off."""
    pace_timeout_s: float = 60.0
    """Longest wait for a newer policy before acting with the old one again."""
    log_level: str = "WARNING"
    video: str = ""
    """sim, lockstep (realtime=false): write the first ``video_episodes`` episodes as a .gif (or
    .mp4 with the video extra) from MuJoCo's offscreen renderer ('' = none)."""
    video_episodes: int = 1
    """Episodes recorded into ``video``."""
    viz: str = ""
    """Live view of the loop in Rerun (observations, actions, chunk seams, latency): 'rerun'
    spawns the viewer, 'FILE.rrd' records for ``rerun FILE.rrd`` ('' = off; the viz extra)."""
