"""A deterministic mock robot: a point that integrates velocity commands toward a goal.

First-class driver (no mujoco, lockstep, seeded), used for bring-up of the whole stack and by
the conformance tests. Observation ``state`` = [position (A), goal (A), zero padding to obs_dim].
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qc_robot.drivers.base import Driver, DriverSpec
from qc_robot.policies.base import ObsField

DEFAULT_EPISODE_STEPS = 100


@dataclass
class MockConfig:
    """The mock robot (``qc-robot drive driver=mock driver_args.KEY=VALUE``)."""

    action_dim: int = 5
    obs_dim: int = 0
    """0: 2·action_dim; larger values pad with zeros (to match a policy's obs size, e.g. 28 for
    the shipped cube-single policy)."""
    policy: str = ""
    """Take obs_dim, action_dim and control_hz from this policy's spec: an exported ONNX file
    (its metadata), 'default' (the shipped policy) or a bring-up ref such
    as 'hold:28:5:5'. '' = use the keys above."""
    control_hz: float = 20.0
    max_episode_steps: int = DEFAULT_EPISODE_STEPS
    """Steps before an episode is truncated; 0 (what ``drive`` passes when ``env.max_episode_steps``
    is unset) keeps the mock's own 100."""
    gain: float = 0.1
    """Position change per step for a unit command."""
    success_radius: float = 0.1
    seed: int = 0
    obs_key: str = "state"


class MockDriver(Driver):
    """position += gain · action each step; success when within ``success_radius`` of the goal."""

    name = "mock"
    realtime = False
    reports_reward = True

    def __init__(self, cfg: MockConfig | None = None) -> None:
        self.cfg = cfg = cfg or MockConfig()
        a, obs_dim, hz = cfg.action_dim, cfg.obs_dim, cfg.control_hz
        if cfg.policy:
            a, obs_dim, hz = policy_dims(cfg.policy, cfg.obs_key)
        self._obs_dim = max(obs_dim, 2 * a)
        self.spec = DriverSpec([ObsField(cfg.obs_key, (self._obs_dim,), "float32")], a, -np.ones(a), np.ones(a),
                               hz, cfg.max_episode_steps or DEFAULT_EPISODE_STEPS)
        self._rng = np.random.default_rng(cfg.seed)
        self._pos = np.zeros(a)
        self._goal = np.zeros(a)
        self._reset_steps()
        self._connected = False

    def connect(self) -> None:
        self._connected = True

    def close(self) -> None:
        self._connected = False

    def reset(self, seed: int | None = None) -> dict[str, np.ndarray]:
        if seed is not None:
            self._rng = np.random.default_rng(seed)
        self._pos = self._rng.uniform(-0.5, 0.5, self.spec.action_dim)
        self._goal = self._rng.uniform(-0.5, 0.5, self.spec.action_dim)
        self._reset_steps()
        return self.get_observation()

    def get_observation(self) -> dict[str, np.ndarray]:
        obs = np.zeros(self._obs_dim, np.float32)
        a = self.spec.action_dim
        obs[:a], obs[a : 2 * a] = self._pos, self._goal
        return {self.cfg.obs_key: obs}

    def _apply(self, action: np.ndarray) -> None:
        self._pos = self._pos + self.cfg.gain * action
        dist = float(np.linalg.norm(self._pos - self._goal))
        success = dist < self.cfg.success_radius
        self._count_step(self.spec.max_episode_steps, reward=-dist, success=success, terminated=success)


def policy_dims(ref: str, obs_key: str = "state") -> tuple[int, int, float]:
    """``(action_dim, obs_dim, control_hz)`` of policy ``ref``, for a mock that matches it.

    The policy must observe one flat vector under ``obs_key`` (as every policy this project
    exports does); anything else cannot be mimicked by a point robot and is a ValueError.
    """
    from qc_robot.policies.scripted import scripted_from_ref

    if ref == "default":
        from qc_robot.assets import default_policy_path

        ref = str(default_policy_path())
    scripted = scripted_from_ref(ref)
    if scripted is not None:
        spec = scripted.spec
        fields, act_dim, hz = spec.obs_fields, spec.action_dim, spec.control_hz
    else:
        import onnxruntime as ort  # the robot-side runtime; only when sizing from a file

        from qc_robot.policies.onnx_metadata import PolicyMetadata

        opts = ort.SessionOptions()
        opts.log_severity_level = 3  # the optional noise/RTC inputs are overridable initializers by design
        session = ort.InferenceSession(ref, opts, providers=["CPUExecutionProvider"])
        meta = PolicyMetadata.from_props(dict(session.get_modelmeta().custom_metadata_map))
        fields, act_dim, hz = meta.obs_fields, meta.action_dim, meta.control_hz
    if len(fields) != 1 or fields[0].key != obs_key or len(fields[0].shape) != 1:
        raise ValueError(f"mock driver: policy {ref} observes {[(f.key, f.shape) for f in fields]}; "
                         f"the mock offers one flat vector {obs_key!r}")
    return int(act_dim), int(fields[0].shape[0]), float(hz)
