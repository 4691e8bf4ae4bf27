"""The QC agent's objective as pure functions: each returns ``(loss, info)``.

``info`` holds detached scalar tensors (no ``.item()``: an update never waits on the device).
All randomness (flow noise, flow time, target actions) is drawn by the caller and passed in, so
each loss is a deterministic function of the networks and the batch and can be checked by hand.

Normalizations (all follow the reference implementation, github.com/ColinQiyangLi/qc):

- critic:  ``mean_{k,b} valid[b,-1] · (Q_k(s_b, a_b) − y_b)²`` with
  ``y_b = R[b,-1] + γ^h · mask[b,-1] · agg_k Q̄_k(s'_b, a'_b)`` (no gradient through y). The mean
  runs over all E·B entries, padded chunks included (they add 0 but count in the denominator).
- BC flow: ``Σ_{b,i,j} valid[b,i] · (v_{b,i,j} − (x1 − x0)_{b,i,j})² / (B·H·A)``: the mean of the
  masked squared error reshaped (B, H, A); padded steps count in the denominator as zeros.
- distillation: ``α · mean_{b,d} (μ(s, z) − Euler(v, s, z))²`` over all B·D entries (no mask:
  the target is the flow's own sample, defined for every chunk).
- Q loss: ``−mean_b mean_k Q_k(s_b, clip(μ(s_b, z_b), −1, 1))``: ensemble *mean* (as the
  reference, whatever ``q_agg`` says), no normalization by |Q|; gradients reach μ only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.func import functional_call

from qc_robot.agent.acting import euler_sample
from qc_robot.agent.networks import ChunkCritic, FlowActor, OneStepActor, aggregate_q
from qc_robot.config import AgentConfig
from qc_robot.data.batch import ChunkBatch

Info = dict[str, torch.Tensor]


@dataclass
class LossNoise:
    """The random inputs of one loss evaluation, drawn by the caller."""

    x0: torch.Tensor  # (B, D) flow-matching source noise
    t: torch.Tensor  # (B, 1) flow time in [0, 1)
    z: torch.Tensor | None = None  # (B, D) one-step actor noise (QC-FQL only)


def policy_actions(batch: ChunkBatch, cfg: AgentConfig) -> torch.Tensor:
    """The part of the data chunk the critic and actor see: all h actions, or only the first
    (``action_chunking=False``, the n-step baselines). Returns (B, H_pi, A)."""
    return batch.actions if cfg.action_chunking else batch.actions[:, :1]


def policy_valid(batch: ChunkBatch, cfg: AgentConfig) -> torch.Tensor:
    """``valid`` restricted like :func:`policy_actions`: (B, H_pi)."""
    return batch.valid if cfg.action_chunking else batch.valid[:, :1]


def critic_loss(
    critic: ChunkCritic,
    target_critic: ChunkCritic,
    batch: ChunkBatch,
    next_actions: torch.Tensor,
    cfg: AgentConfig,
) -> tuple[torch.Tensor, Info]:
    """Chunked TD loss. ``next_actions`` (B, H_pi·A) were sampled at ``batch.next_observations``.

    The discount power is the batch's own backup length h (``rewards.shape[1]``), also when
    ``action_chunking=False``: the backup is then the (uncorrected) h-step return.
    """
    h = batch.rewards.shape[1]
    with torch.no_grad():
        next_q = aggregate_q(
            target_critic(batch.next_observations, next_actions.detach()), cfg.q_agg
        )
        target = batch.rewards[:, -1] + (cfg.discount**h) * batch.masks[:, -1] * next_q  # (B,)
    acts = policy_actions(batch, cfg)
    q = critic(batch.observations, acts.reshape(acts.shape[0], -1))  # (E, B)
    loss = (batch.valid[:, -1] * (q - target).square()).mean()
    qd = q.detach()
    info = {
        "loss": loss.detach(),
        "q_mean": qd.mean(),
        "q_max": qd.max(),
        "q_min": qd.min(),
        "target_mean": target.mean(),
    }
    return loss, info


def flow_bc_loss(
    flow: FlowActor,
    observations: torch.Tensor,
    actions: torch.Tensor,
    valid: torch.Tensor,
    x0: torch.Tensor,
    t: torch.Tensor,
) -> tuple[torch.Tensor, Info]:
    """Flow-matching behaviour cloning on chunks, masked per step by ``valid``.

    observations (B, O), actions (B, H, A), valid (B, H), x0 (B, H·A), t (B, 1).
    """
    b, h, a = actions.shape
    x1 = actions.reshape(b, h * a)  # (B, H·A)
    x_t = (1.0 - t) * x0 + t * x1
    pred = flow(observations, x_t, t)  # (B, H·A)
    sq = (pred - (x1 - x0)).square().reshape(b, h, a)  # (B, H, A)
    loss = (sq * valid.unsqueeze(-1)).mean()
    return loss, {"bc_flow_loss": loss.detach()}


def distill_loss(
    actor_actions: torch.Tensor,
    flow: FlowActor,
    observations: torch.Tensor,
    noise: torch.Tensor,
    flow_steps: int,
    alpha: float,
    target: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Info]:
    """QC-FQL distillation ``α · mean (μ(s, z) − Euler(v, s, z))²``; the target is detached.

    ``actor_actions`` = μ(s, z) (B, D) is passed in so the caller runs μ once for this loss and
    :func:`q_loss`. ``flow`` may be a low-precision copy: it only produces the target.
    ``target`` = Euler(v, s, z) when the caller sampled it already (the agent's fast sampler).
    """
    if target is None:
        with torch.no_grad():
            target = euler_sample(flow, observations, noise, flow_steps)  # (B, D), clipped
    mse = (actor_actions - target).square().mean()
    return alpha * mse, {"distill_loss": mse.detach()}


def q_loss(
    critic: ChunkCritic, observations: torch.Tensor, actor_actions: torch.Tensor
) -> tuple[torch.Tensor, Info]:
    """QC-FQL's policy improvement ``−mean Q(s, clip(μ(s, z), −1, 1))``, ensemble mean.

    The critic's parameters are detached (as the reference evaluates the critic with the
    non-differentiated params), so this loss moves only the actor even though it is summed
    with the critic loss before one optimizer step.
    """
    frozen = {name: p.detach() for name, p in critic.named_parameters()}
    qs = functional_call(critic, frozen, (observations, actor_actions.clamp(-1.0, 1.0)))  # (E, B)
    q = qs.mean(dim=0)
    loss = -q.mean()
    return loss, {"q_loss": loss.detach(), "q": q.detach().mean()}


def total_loss(
    critic: ChunkCritic,
    target_critic: ChunkCritic,
    flow: FlowActor,
    one_step_actor: OneStepActor | None,
    batch: ChunkBatch,
    next_actions: torch.Tensor,
    noise: LossNoise,
    cfg: AgentConfig,
    sampling_flow: FlowActor | None = None,
    distill_target: torch.Tensor | None = None,
    actor_observations: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Info]:
    """critic + (BC flow [+ α·distill + Q loss for 'fql']); info keys ``critic/…``, ``actor/…``.

    ``sampling_flow`` (default ``flow``) computes the no-grad distillation target; the agent
    passes a bf16 copy when ``cfg.sample_dtype='bfloat16'``; ``distill_target`` skips that
    sampling when the caller has done it. ``actor_observations`` (default
    ``batch.observations``) is what the actor losses see: image agents pass the encoder's
    features, detached unless the actor losses are to train the encoder too. The Q loss always
    sees them detached: maximizing Q must move the actor, not the representation.
    """
    c_loss, c_info = critic_loss(critic, target_critic, batch, next_actions, cfg)
    obs = batch.observations if actor_observations is None else actor_observations
    bc, a_info = flow_bc_loss(
        flow, obs, policy_actions(batch, cfg), policy_valid(batch, cfg), noise.x0, noise.t
    )
    actor = bc
    if cfg.actor_type == "fql":
        if one_step_actor is None or noise.z is None:
            raise ValueError("actor_type='fql' needs the one-step actor and noise.z")
        mu = one_step_actor(obs, noise.z)  # (B, D)
        d_loss, d_info = distill_loss(
            mu, sampling_flow or flow, obs, noise.z, cfg.flow_steps, cfg.alpha, distill_target
        )
        ql, q_info = q_loss(critic, obs.detach(), mu)
        actor = actor + d_loss + ql
        a_info = {**a_info, **d_info, **q_info}
    info = {f"critic/{k}": v for k, v in c_info.items()}
    info.update({f"actor/{k}": v for k, v in a_info.items()})
    info["actor/loss"] = actor.detach()
    total = c_loss + actor
    info["total_loss"] = total.detach()
    return total, info
