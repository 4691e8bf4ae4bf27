"""``qc-robot serve``: build the policy, episode logger, learner link and server from the config;
serve until Ctrl-C / SIGTERM, or exit with code 70 when a server thread dies (so a supervisor
restarts a server that could no longer answer)."""

from __future__ import annotations

import gc
import logging
import os
import signal
import sys
import threading
import zlib
from typing import Any

from qc_robot.policies.base import Policy
from qc_robot.server.app import ControlServer
from qc_robot.server.config import ServeConfig
from qc_robot.server.episode_log import EpisodeLogger
from qc_robot.server.learner_link import CurveKeys, LearnerLink, same_spec
from qc_robot.server.metadata import policy_metadata

log = logging.getLogger("qc_robot.server")
EXIT_THREAD_DIED = 70
"""Exit code when one of the server's threads died (EX_SOFTWARE)."""


def load_policy(ref: str, threads: int = 1, providers: str = "auto", seed: int | None = None) -> Policy:
    """A policy from ``--policy``: an ONNX file, 'default' (the shipped one), or
    ``hold:...``/``random:...`` for bring-up; ``seed``: of its sampling noise (None: OS entropy)."""
    from qc_robot.policies.scripted import scripted_from_ref

    if ref in ("", "default"):
        from qc_robot.assets import default_policy_path

        ref = str(default_policy_path())

    scripted = scripted_from_ref(ref, seed)
    if scripted is not None:
        return scripted
    from qc_robot.policies.onnx_policy import OnnxPolicy  # onnxruntime only when serving a model

    return OnnxPolicy(ref, providers=providers, threads=threads, seed=seed)


def run_serve(cfg: ServeConfig) -> int:
    """``qc-robot serve``: serve until Ctrl-C / SIGTERM; returns the process exit code."""
    # The socket loop hands observations to inference workers through the GIL; a short switch
    # interval bounds that hand-off while the loop is busy refusing a flood (default 5 ms).
    sys.setswitchinterval(0.0005)
    logging.basicConfig(level=cfg.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        policy = load_policy(cfg.policy, cfg.threads, cfg.providers, cfg.seed)
    except (OSError, ValueError) as e:
        log.error("cannot load policy %r: %s", cfg.policy, e)
        return 2
    logger = None
    try:
        curve = _driver_curve(cfg)
        if cfg.log_dir:
            logger = EpisodeLogger(cfg.log_dir, _env_args(policy))
            log.info("logging served episodes to %s", logger.path)
        link = _learner_link(cfg)
        if link is not None and cfg.resume_policy:
            policy = _resumed_policy(link, policy)
        server = ControlServer(policy, cfg.bind, workers=cfg.workers, max_clients=cfg.max_clients,
                               heartbeat_s=cfg.heartbeat_s, session_timeout_s=cfg.session_timeout_s,
                               episode_logger=logger, allow_remote=cfg.allow_remote, learner_link=link,
                               curve=curve, insecure_remote=cfg.insecure_remote,
                               max_message_bytes=cfg.max_message_bytes, max_inflight=cfg.max_inflight,
                               delay_ms=cfg.delay_ms)
        server.start()
    except (ValueError, RuntimeError, OSError) as e:
        log.error("%s", e)
        if logger is not None:
            logger.close()
        return 2
    # Everything loaded so far (policy, numpy, zmq, h5py, the CLI's config machinery) lives until
    # exit: keep it out of the cyclic GC, whose full passes over it would stall the socket loop.
    gc.freeze()
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    code = 0
    while not done.wait(0.5):
        dead = server.dead_thread()
        if dead is not None:  # never a live process that answers nothing: let a supervisor restart us
            log.critical("%s died: exiting with code %d", dead, EXIT_THREAD_DIED)
            code = EXIT_THREAD_DIED
            break
    server.stop()
    log.info("stopped: %d messages received, %d chunks served, %d transitions, errors %s (%d unanswered), "
             "%d dropped unread from flooding peers", server.stats.received, server.stats.chunks,
             server.stats.transitions, server.stats.errors or "none", server.stats.unanswered,
             server.stats.flood_dropped)
    if code:
        logging.shutdown()
        os._exit(code)  # a wedged thread must not keep the process alive
    return 0


def _driver_curve(cfg: ServeConfig) -> CurveKeys | None:
    """CURVE keys for the driver port (None: keyless, only allowed on loopback or when insecure)."""
    if not cfg.driver_authorized_dir:
        return None
    if not cfg.curve_secret_key:
        raise ValueError("driver_authorized_dir needs curve_secret_key (the server's key pair)")
    return CurveKeys.from_files(cfg.curve_secret_key, authorized_dir=cfg.driver_authorized_dir)


def _learner_link(cfg: ServeConfig) -> LearnerLink | None:
    """The learner port from the config (None when ``learner_bind`` is empty)."""
    if not cfg.learner_bind:
        return None
    from qc_robot.policies.onnx_policy import OnnxPolicy
    from qc_robot.server.journal import Journal
    curve = None
    if cfg.curve_secret_key:
        curve = CurveKeys.from_files(cfg.curve_secret_key, authorized_dir=cfg.curve_authorized_dir)

    def loader(path: str, version: str) -> Policy:  # each pushed policy its own noise stream, seeded or not
        seed = None if cfg.seed is None else zlib.crc32(f"{cfg.seed}:{version}".encode())
        return OnnxPolicy(path, providers=cfg.providers, threads=cfg.threads, version=version, seed=seed)

    return LearnerLink(cfg.learner_bind, Journal(cfg.journal_dir), curve=curve, prune=cfg.journal_prune,
                       timeout_s=cfg.learner_timeout_s, policy_loader=loader)


def _resumed_policy(link: LearnerLink, policy: Policy) -> Policy:
    """The newest policy a learner pushed to an earlier run on this journal, if it fits the robot
    ``policy`` serves; else ``policy`` (never an older push: that would be a policy from another day)."""
    accepted = link.accepted_policies()
    if not accepted:
        return policy
    version = max(accepted)
    path = accepted[version]
    try:
        newest = link.policy_loader(str(path), str(version))
        problems = same_spec(policy.spec, newest.spec)
    except Exception as e:  # an unreadable file costs the resume, not the server
        problems = [f"cannot load it: {type(e).__name__}: {e}"]
    if problems:
        log.warning("not resuming the learner's newest policy %s (%s): serving %s", path, "; ".join(problems),
                    policy.spec.version)
        return policy
    log.info("serving policy v%d (%s), the newest the learner pushed before this restart, instead of the "
             "startup policy (resume_policy=false serves that)", version, path)
    return newest


def _env_args(policy: Policy) -> dict[str, Any]:
    spec = policy.spec
    return {"source": "qc-robot serve", "policy_version": str(spec.version), "actor_type": spec.actor_type,
            "obs_keys": [f.key for f in spec.obs_fields], "action_dim": spec.action_dim,
            "chunk_len": spec.chunk_len, "control_hz": float(spec.control_hz),
            "task": policy_metadata(policy).get("task", "")}  # the policy's task: what the logged episodes are of
