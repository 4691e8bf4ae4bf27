"""The QC agent: networks, one optimizer, and an update that is one step on the total loss.

``QCAgent`` owns the chunk critic (and its Polyak target), the flow-matching behaviour policy,
and for QC-FQL the one-step actor. It draws all of an update's randomness from its own
``torch.Generator`` (saved in ``state_dict``, with the optimizer), so training is bit-exactly
reproducible and resumable. An update does no host syncs: it returns device scalars.

Throughput: the best-of-N target samples all B·N chunks as one batch (``acting.best_of_n``);
with ``cfg.sample_dtype='bfloat16'`` the flow's no-grad Euler passes (best-of-N candidates and
the distillation target) run on a bf16 copy of the flow's weights, refreshed once per update,
which on CPUs with AVX512-bf16/AMX (oneDNN) is several times faster per matmul than fp32 MKL.
The critic that *ranks* the best-of-N candidates is always the fp32 online critic: at
|Q| ≈ 100–200 bf16's step is 0.5–1.0 and neighbouring candidates would tie.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn

from qc_robot.agent.acting import ActingPolicy, best_of_n, one_step
from qc_robot.agent.encoder import ObsEncoder, random_shift
from qc_robot.agent.fast_sampling import (
    FastCritic,
    FastFlow,
    fast_best_of_n,
    fused_linear_available,
)
from qc_robot.agent.losses import Info, LossNoise, total_loss
from qc_robot.agent.networks import ChunkCritic, FlowActor, OneStepActor
from qc_robot.config import AgentConfig
from qc_robot.data.batch import ChunkBatch

M = TypeVar("M", bound=nn.Module)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def resolve_device(name: str) -> torch.device:
    """'auto' → cuda if available, else cpu; anything else as given."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _cpu_has_bf16() -> bool:
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_sample_dtype(name: str, device: torch.device) -> torch.dtype:
    """dtype of the flow's no-grad Euler passes. 'auto' → bfloat16 where the hardware computes
    it natively (CUDA with bf16, CPUs with AVX512-BF16/AMX), float32 elsewhere (emulated bf16
    is slower than fp32). The ranking critic is fp32 whatever this says: with it, the
    best-of-N choice matches the all-fp32 choice in >= 99% of states at |Q| ≈ 100–200
    (``tests/test_precision.py``, ``benchmarks/bench_update.py``)."""
    if name != "auto":
        return _DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if _cpu_has_bf16() else torch.float32


class _CastIO(nn.Module):
    """Runs a low-precision module on fp32 inputs and returns fp32 outputs."""

    def __init__(self, inner: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.inner, self.dtype = inner, dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.to(self.dtype)).float()


class _LowPrecisionCopy:
    """A copy of a network whose MLP body (``attr``) holds its weights in ``dtype``.

    Normalizer and time features stay fp32 (an observation offset is not representable in
    bf16), so the copy takes and returns fp32 tensors and plugs into ``acting.py`` unchanged.
    Not an ``nn.Module`` attribute of the agent: it is a cache, rebuilt from the source by
    :meth:`refresh`, and never saved.
    """

    def __init__(self, source: M, attr: str, dtype: torch.dtype) -> None:
        self.module: Any = copy.deepcopy(source).requires_grad_(False)
        getattr(self.module, attr).to(dtype)  # keeps Parameter objects: pairing below stays valid
        self._dst = [*self.module.parameters(), *self.module.buffers()]
        self._src = [*source.parameters(), *source.buffers()]
        setattr(self.module, attr, _CastIO(getattr(self.module, attr), dtype))

    @torch.no_grad()
    def refresh(self) -> None:
        torch._foreach_copy_(self._dst, self._src)


class QCAgent(nn.Module):
    """Q-chunking agent (QC best-of-N or QC-FQL; n-step and 1-step baselines by config).

    Args:
        cfg: agent configuration.
        obs_dim, act_dim: sizes of one observation and one (per-step) action.
        seed: seeds initialization and the agent's generators. ``None`` draws from the global
            torch RNG (so a caller's ``torch.manual_seed`` decides everything).
        image_shapes: image keys → (H, W, C) as the encoder sees them (C = 3·frame_stack),
            in the order batches and acting calls list them. With images, one conv encoder
            (:class:`~qc_robot.agent.encoder.ObsEncoder`, ``cfg.vision``) turns (state, images)
            into the flat features every network takes; ``obs_dim`` is then the state's width
            (0 for images only). Without, nothing changes: the networks take the state.
    """

    def __init__(
        self, cfg: AgentConfig, obs_dim: int, act_dim: int, seed: int | None = None,
        image_shapes: Mapping[str, Sequence[int]] | None = None,
    ) -> None:
        super().__init__()
        if cfg.actor_type not in ("best_of_n", "fql"):
            raise ValueError(f"actor_type must be 'best_of_n' or 'fql', got {cfg.actor_type!r}")
        if cfg.obs_norm not in ("none", "std"):
            raise ValueError(f"obs_norm must be 'none' or 'std', got {cfg.obs_norm!r}")
        if cfg.vision.encoder_grad not in ("critic", "all"):
            raise ValueError(f"vision.encoder_grad must be 'critic' or 'all', got {cfg.vision.encoder_grad!r}")
        if cfg.sample_dtype not in (*_DTYPES, "auto"):
            raise ValueError(
                f"sample_dtype must be 'auto' or one of {sorted(_DTYPES)}, got {cfg.sample_dtype!r}"
            )
        self.cfg, self.obs_dim, self.act_dim = cfg, obs_dim, act_dim
        self.policy_horizon = cfg.horizon if cfg.action_chunking else 1
        """Actions per policy query (and per critic input): h with chunking, else 1."""
        self.chunk_dim = self.policy_horizon * act_dim
        self.device = resolve_device(cfg.device)
        self.image_shapes: dict[str, tuple[int, ...]] = {
            k: tuple(int(x) for x in v) for k, v in (image_shapes or {}).items()
        }

        with torch.random.fork_rng(devices=[], enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            else:
                seed = int(torch.randint(0, 2**62, ()))
            feat_dim = obs_dim
            if self.image_shapes:
                v = cfg.vision
                self.encoder: ObsEncoder | None = ObsEncoder(
                    obs_dim, self.image_shapes, v.channels, v.blocks, v.out_dim, v.layer_norm  # type: ignore[arg-type]
                )
                feat_dim = self.encoder.feature_dim
            else:
                self.encoder = None
            self.feature_dim = feat_dim
            """Width of what the networks take: the state, or state + image features."""
            self.critic = ChunkCritic(
                feat_dim, self.chunk_dim, cfg.hidden_dims, cfg.num_qs, cfg.critic_layer_norm
            )
            self.flow = FlowActor(
                feat_dim,
                self.chunk_dim,
                cfg.hidden_dims,
                cfg.actor_layer_norm,
                cfg.fourier_time_dims,
            )
            self.one_step_actor = (
                OneStepActor(feat_dim, self.chunk_dim, cfg.hidden_dims, cfg.actor_layer_norm)
                if cfg.actor_type == "fql"
                else None
            )
        self.target_critic = copy.deepcopy(self.critic).requires_grad_(False)
        # the target critic's encoder: a Polyak copy too (the reference's target critic holds
        # its encoder's parameters)
        self.target_encoder: ObsEncoder | None = (
            copy.deepcopy(self.encoder).requires_grad_(False) if self.encoder is not None else None
        )
        self.to(self.device)

        params = [p for p in self.parameters() if p.requires_grad]
        opt_cls = torch.optim.AdamW if cfg.weight_decay > 0 else torch.optim.Adam
        # fused: one kernel for all params (CPU and CUDA); deterministic run to run.
        self.optimizer = opt_cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
        self.train_generator = torch.Generator(device=self.device).manual_seed(seed)
        self.act_generator = torch.Generator(device=self.device).manual_seed(seed + 1)
        self.num_updates = 0

        dtype = resolve_sample_dtype(cfg.sample_dtype, self.device)
        self.sample_dtype = dtype
        # The networks the no-grad sampling runs on. A plain dict, so nn.Module does not
        # register (and save) them as submodules. Only the flow may be low precision: the
        # critic that ranks best-of-N candidates is the fp32 online critic, always.
        self._lp: list[_LowPrecisionCopy] = []
        self._sampling: dict[str, Any] = {"flow": self.flow, "critic": self.critic}
        if dtype != torch.float32:
            self._lp = [_LowPrecisionCopy(self.flow, "mlp", dtype)]
            self._sampling = {"flow": self._lp[0].module, "critic": self.critic}

        # The fast sampler replaces the module path (and its bf16 module copy) for the update's
        # no-grad sampling; acting and export keep the modules.
        self._fast_flow: FastFlow | None = None
        self._fast_critic: FastCritic | None = None
        if cfg.fast_sampling and cfg.fourier_time_dims == 0:
            self._fast_flow = FastFlow(self.flow, dtype, fused_linear_available(self.device, dtype))
            if cfg.actor_type == "best_of_n":  # the critic ranks in fp32
                self._fast_critic = FastCritic(self.critic, fused_linear_available(self.device))
            self._lp = []
            self._sampling = {"flow": self.flow, "critic": self.critic}

        self._target_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = self._target_actions
        self._loss_fn: Callable[..., tuple[torch.Tensor, Info]] = total_loss
        if cfg.compile:
            if self._fast_flow is None:  # the fast sampler is already one fused call per layer
                self._target_fn = torch.compile(self._target_actions, dynamic=False)
            self._loss_fn = torch.compile(total_loss, dynamic=False)

    # -- setup -------------------------------------------------------------------------------
    def set_normalizer(
        self, mean: np.ndarray | torch.Tensor, std: np.ndarray | torch.Tensor, eps: float = 1e-3
    ) -> None:
        """Set the observation statistics of every network (target critic included); ``std``
        is floored at ``eps``. Not calling it leaves raw observations (the reference's way)."""
        mean_t = torch.as_tensor(mean, dtype=torch.float32, device=self.device)
        std_t = torch.as_tensor(std, dtype=torch.float32, device=self.device)
        if self.encoder is not None:  # the state is normalized once, inside the encoder
            for enc in (self.encoder, self.target_encoder):
                assert enc is not None
                enc.normalizer.set_stats(mean_t, std_t, eps)
            return
        for net in (self.critic, self.target_critic, self.flow, self.one_step_actor):
            if net is not None:
                net.normalizer.set_stats(mean_t, std_t, eps)

    def acting_policy(self) -> ActingPolicy:
        """The acting rule over this agent's live (fp32) networks: (obs, noise) → (B, H, A)."""
        return ActingPolicy(
            self.cfg.actor_type,
            self.flow,
            self.critic if self.cfg.actor_type == "best_of_n" else None,
            self.one_step_actor,
            self.policy_horizon,
            self.act_dim,
            self.cfg.flow_steps,
            self.cfg.q_agg,
            encoder=self.encoder,
        )

    @property
    def image_keys(self) -> list[str]:
        return list(self.image_shapes)

    def noise_shape(self, batch_size: int) -> tuple[int, ...]:
        """Shape of the acting/target noise for ``batch_size`` states."""
        if self.cfg.actor_type == "best_of_n":
            return (batch_size, self.cfg.num_samples, self.chunk_dim)
        return (batch_size, self.chunk_dim)

    # -- acting ------------------------------------------------------------------------------
    @torch.no_grad()
    def act(
        self, obs: np.ndarray | torch.Tensor, generator: torch.Generator | None = None,
        images: Sequence[np.ndarray | torch.Tensor] | None = None,
    ) -> np.ndarray:
        """Chunks for a batch of raw observations (B, O) → (B, policy_horizon, act_dim) in [-1, 1].

        Noise comes from ``generator`` (default: the agent's acting generator, separate from the
        training one so evaluation does not change training's random stream). Image agents
        also take ``images``: uint8 (B, H, W, C) per image key, in :attr:`image_keys` order.
        """
        obs_t = torch.as_tensor(obs, dtype=torch.float32).to(self.device)
        imgs = None
        if self.encoder is not None:
            if images is None:
                raise ValueError(f"this agent needs images for {self.image_keys}")
            imgs = [torch.as_tensor(np.asarray(i)).to(self.device) for i in images]
        gen = generator if generator is not None else self.act_generator
        noise = torch.randn(self.noise_shape(obs_t.shape[0]), generator=gen, device=self.device)
        was_training = self.training
        self.eval()
        try:
            chunk = self.acting_policy()(obs_t, noise, imgs)  # (B, H, A)
        finally:
            self.train(was_training)
        return chunk.cpu().numpy()

    # -- learning ----------------------------------------------------------------------------
    def _target_actions(self, next_obs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """a' ~ π(s') for the bootstrap (no grad): best-of-N ranked by the online critic, or μ."""
        if self.cfg.actor_type == "best_of_n":
            if self._fast_flow is not None and self._fast_critic is not None:
                self._fast_flow.refresh()  # from the live weights: cheap next to the sampling
                self._fast_critic.refresh()
                return fast_best_of_n(
                    self._fast_flow, self._fast_critic, next_obs, noise, self.cfg.flow_steps, self.cfg.q_agg
                )
            return best_of_n(
                self._sampling["flow"],
                self._sampling["critic"],
                next_obs,
                noise,
                self.cfg.flow_steps,
                self.cfg.q_agg,
            )
        assert self.one_step_actor is not None
        return one_step(self.one_step_actor, next_obs, noise)

    def update(self, batch: ChunkBatch) -> dict[str, torch.Tensor]:
        """One gradient step on the total loss, then the Polyak step; returns detached scalars."""
        if batch.observations.device != self.device:
            batch = batch.to(self.device)
        b, gen, dev = batch.batch_size, self.train_generator, self.device
        # Fixed draw order (target, x0, t, z): part of the reproducibility contract.
        target_noise = torch.randn(self.noise_shape(b), generator=gen, device=dev)
        noise = LossNoise(
            x0=torch.randn(b, self.chunk_dim, generator=gen, device=dev),
            t=torch.rand(b, 1, generator=gen, device=dev),
            z=torch.randn(b, self.chunk_dim, generator=gen, device=dev)
            if self.cfg.actor_type == "fql"
            else None,
        )
        actor_obs: torch.Tensor | None = None
        next_obs = batch.next_observations
        if self.encoder is not None:
            batch, actor_obs, next_obs = self._encode(batch, gen)
        for lp in self._lp:
            lp.refresh()
        distill_target = None
        with torch.no_grad():
            if self._fast_flow is not None and noise.z is not None:
                # QC-FQL's distillation target Euler(v, s, z), before any weight moves
                self._fast_flow.refresh()
                obs_in = batch.observations if actor_obs is None else actor_obs.detach()
                distill_target = self._fast_flow.sample(obs_in, noise.z, self.cfg.flow_steps)
            next_actions = self._target_fn(next_obs, target_noise)  # (B, D)
        extra = {} if actor_obs is None else {"actor_observations": actor_obs}
        loss, info = self._loss_fn(
            self.critic,
            self.target_critic,
            self.flow,
            self.one_step_actor,
            batch,
            next_actions,
            noise,
            self.cfg,
            self._sampling["flow"],
            distill_target,
            **extra,
        )
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self._polyak()
        self.num_updates += 1
        return info

    def _encode(
        self, batch: ChunkBatch, gen: torch.Generator
    ) -> tuple[ChunkBatch, torch.Tensor, torch.Tensor]:
        """Image batch → (feature batch for the losses, the actors' features, s' features for
        sampling the target actions).

        Random shifts (``vision.aug_pad``) are drawn independently for s and s' from the training
        generator, after the update's other draws. The critic sees s's features with gradient
        (the encoder learns from the TD loss); the actors see them detached unless
        ``vision.encoder_grad='all'``. s' is encoded without gradient twice: by the target
        encoder for the target critic, by the online encoder for the policy that samples a'
        (best-of-N ranks with the online critic, as without images).
        """
        assert self.encoder is not None and self.target_encoder is not None
        if batch.images is None or batch.next_images is None:
            raise ValueError(f"this agent needs images for {self.image_keys}; the batch has none")
        pad = self.cfg.vision.aug_pad
        imgs = [random_shift(i, pad, gen) for i in batch.images]
        next_imgs = [random_shift(i, pad, gen) for i in batch.next_images]
        feat = self.encoder(batch.observations, imgs)  # (B, F)
        with torch.no_grad():
            next_online = self.encoder(batch.next_observations, next_imgs)  # (B, F)
            next_target = self.target_encoder(batch.next_observations, next_imgs)  # (B, F)
        actor_obs = feat if self.cfg.vision.encoder_grad == "all" else feat.detach()
        enc = dataclasses.replace(batch, observations=feat, next_observations=next_target, images=None,
                                  next_images=None)
        return enc, actor_obs, next_online

    @torch.no_grad()
    def _polyak(self) -> None:
        """θ̄ ← (1 − τ) θ̄ + τ θ for the target critic's parameters (and its encoder's)."""
        target: list[torch.Tensor] = list(self.target_critic.parameters())
        online: list[torch.Tensor] = list(self.critic.parameters())
        if self.encoder is not None and self.target_encoder is not None:
            target += list(self.target_encoder.parameters())
            online += list(self.encoder.parameters())
        torch._foreach_lerp_(target, online, self.cfg.tau)

    # -- state -------------------------------------------------------------------------------
    def get_extra_state(self) -> dict[str, Any]:
        """Optimizer, generators and counter ride along in ``state_dict()['_extra_state']``."""
        return {
            "optimizer": self.optimizer.state_dict(),
            "train_generator": self.train_generator.get_state(),
            "act_generator": self.act_generator.get_state(),
            "num_updates": self.num_updates,
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        # deepcopy: never alias the optimizer moments of the agent the state came from.
        self.optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))
        self.train_generator.set_state(state["train_generator"].cpu())
        self.act_generator.set_state(state["act_generator"].cpu())
        self.num_updates = int(state["num_updates"])
