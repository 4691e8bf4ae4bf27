"""Independent numbered tasks (episodes) on Ray actors: ``eval workers=N``, ``datagen workers=N``.

Task ``i`` of ``0..n-1`` is fully determined by ``i`` (its seeds derive from it), so the order in
which the workers finish does not matter: results are put back in index order and the output is
the sequential run's. Each actor runs one task at a time; a worker that dies (its process killed,
its node lost) loses only the task it was running, which goes back to the front of the queue for
a fresh actor. A task's result is taken once, from the one run that completed it, so nothing is
counted twice. A task that *raises* is a bug or a bad input, not a lost worker: it is not retried.

Ray is imported only here, and only when ``workers`` > 1 is asked for (the ``cluster`` extra).
``address`` '' starts a local Ray instance in-process (``ray.init()``, ``workers`` CPUs, no
dashboard) and shuts it down afterwards; ``address="auto"`` or ``ray://host:10001`` joins a
running cluster, whose workers must have qc-robot installed and see the same input files.
"""

from __future__ import annotations

import importlib.util
import logging
from collections import deque
from collections.abc import Callable, Generator, Iterator
from typing import Any, Generic, TypeVar

from qc_robot.cli_errors import UserError

R = TypeVar("R")

CLUSTER_INSTALL = 'pip install "qc-robot[cluster]"'


def check_workers(workers: int, ray_address: str = "", verb: str = "", key: str = "workers",
                  always: bool = False) -> None:
    """UserError (one line, exit 2) for a ``workers`` value this install cannot run; imports nothing.
    ``always``: the verb runs on Ray whatever the count (``fleet robots=N``)."""
    if workers < 1:
        raise UserError(f"{key}={workers}: give 1 (in this process) or more (Ray actors)")
    if (always or workers > 1 or ray_address) and importlib.util.find_spec("ray") is None:
        what = f"{key}={workers}" if always or workers > 1 else f"ray_address={ray_address}"
        raise UserError(f"{what} runs {verb + ' ' if verb else ''}episodes on Ray actors, and ray is not "
                        f"installed: {CLUSTER_INSTALL}" + ("" if always else " (or workers=1)"))


class WorkerLost(RuntimeError):
    """A task lost its worker more often than the retry budget allows."""


class _Actor(Generic[R]):
    """The actor body: builds its task function once (load the checkpoint, make the env)."""

    def __init__(self, make_task: Callable[[], Callable[[int], R]]) -> None:
        from qc_robot.cli import quiet_known_warnings

        quiet_known_warnings()  # the worker's own process: the CLI's filters do not reach it
        self.task = make_task()

    def run(self, i: int) -> tuple[int, R]:
        return i, self.task(i)


def run_tasks(make_task: Callable[[], Callable[[int], R]], n: int, workers: int, *, address: str = "",
              max_retries: int = 3, progress: bool = False, desc: str = "tasks") -> list[R]:
    """``[make_task()(i) for i in range(n)]``, computed on ``workers`` Ray actors.

    ``make_task`` is pickled to each actor (module-level callables and dataclasses of plain
    values travel well). A task whose actor dies is rerun on a new actor, at most ``max_retries``
    times; then :class:`WorkerLost` is raised."""
    return list(iter_tasks(make_task, n, workers, address=address, max_retries=max_retries,
                           progress=progress, desc=desc))


def iter_tasks(make_task: Callable[[], Callable[[int], R]], n: int, workers: int, *, address: str = "",
               max_retries: int = 3, progress: bool = False, desc: str = "tasks") -> Generator[R, None, None]:
    """:func:`run_tasks`' results one by one in index order, each as soon as it and every earlier
    one are done (a caller writing a file keeps only the out-of-order ones in memory)."""
    import ray
    from tqdm import tqdm

    started = not ray.is_initialized()
    if started:
        ray.init(address=address or None, num_cpus=None if address else workers, include_dashboard=False,
                 logging_level=logging.ERROR, configure_logging=False)
    try:
        waiting: dict[int, R] = {}
        nxt = 0
        for i, value in _schedule(ray, make_task, n, workers, max_retries,
                                  tqdm(total=n, desc=desc, disable=not progress, leave=False)):
            waiting[i] = value
            while nxt in waiting:
                yield waiting.pop(nxt)
                nxt += 1
    finally:
        if started:
            ray.shutdown()


def _schedule(ray: Any, make_task: Callable[[], Callable[[int], R]], n: int, workers: int,
              max_retries: int, bar: Any) -> Iterator[tuple[int, R]]:
    """(index, result) of every task once, in the order they finish."""
    remote_actor = ray.remote(num_cpus=1, max_restarts=0, max_task_retries=0)(_Actor)
    queue: deque[int] = deque(range(n))
    lost = [0] * n
    done: set[int] = set()
    running: dict[Any, tuple[Any, int]] = {}  # object ref -> (actor, task index)

    def submit(actor: Any) -> None:
        if queue:
            i = queue.popleft()
            running[actor.run.remote(i)] = (actor, i)
        else:  # no work left: end it now, without the interpreter's teardown (a sim camera's
            ray.kill(actor)  # renderer, collected after its GL context, printed EGL tracebacks)

    for _ in range(min(workers, n)):
        submit(remote_actor.remote(make_task))
    try:
        while running:
            (ref,), _ = ray.wait(list(running), num_returns=1)
            actor, i = running.pop(ref)
            try:
                j, value = ray.get(ref)
            except ray.exceptions.RayActorError as e:  # the worker died: rerun its task elsewhere
                lost[i] += 1
                if lost[i] > max_retries:
                    raise WorkerLost(f"task {i} lost its worker {lost[i]} times; last: {e}") from e
                queue.appendleft(i)
                ray.kill(actor)
                submit(remote_actor.remote(make_task))
                continue
            except ray.exceptions.RayTaskError as e:  # the task itself raised: report its error
                raise e.as_instanceof_cause() from None
            if j != i or j in done:  # cannot happen: one result per task, from the one run
                raise RuntimeError(f"task {i}: result for {j} (already had it: {j in done})")
            done.add(i)
            bar.update(1)
            submit(actor)  # before handing the result on: the actor works while the caller writes
            yield i, value
    finally:
        bar.close()
        for actor, _ in running.values():
            ray.kill(actor)
