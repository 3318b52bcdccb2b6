"""Long-lived Ray actors fed batch after batch: the one "map tasks over actors" every job uses.

As in Ray's `map_batches(CallableClass)` examples, the actor's `__init__` builds the job's step
(loading the models once) and each call runs one batch; unlike a Ray Data pipeline, the pool
lives for the whole job, so round after round reuses the loaded models.

Failures: a transient error inside a step (`pipelines.counterfactuals.is_transient`: OOM,
storage) and a lost actor (Ray restarts it) resubmit the batch, up to `max_retries` times, then
the job fails naming the cause; any other exception is a bug and is raised with its remote traceback.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import ray
from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError

from prism_ray.pipelines.counterfactuals import is_transient

log = logging.getLogger("prism_ray.actors")


@ray.remote
class StepActor:
    """Holds one step (`step_factory()`, e.g. a CounterfactualStep) for the life of the job."""

    def __init__(self, step_factory: Callable[[], Callable], torch_threads: int):
        import torch

        torch.set_num_threads(torch_threads)
        self.step = step_factory()
        self.batches = 0

    def __call__(self, batch: list) -> Any:
        self.batches += 1
        return self.step(batch)

    def stats(self) -> dict:
        return {"model_loads": getattr(self.step, "model_loads", None), "batches": self.batches, "pid": os.getpid()}


class ActorPool:
    """`size` StepActors; `map(work, on_result)` feeds them every batch of `work`, retrying as above."""

    def __init__(self, step_factory: Callable, *, size: int, num_cpus: float, num_gpus: float = 0.0,
                 max_retries: int = 2, env_vars: dict[str, str] | None = None, torch_threads: int | None = None):
        options: dict[str, Any] = {"num_cpus": num_cpus, "max_restarts": max_retries, "max_task_retries": 0}
        if num_gpus:
            options["num_gpus"] = num_gpus
        if env_vars:
            options["runtime_env"] = {"env_vars": dict(env_vars)}
        threads = torch_threads or max(1, int(num_cpus))
        self.actors = [StepActor.options(**options).remote(step_factory, threads) for _ in range(size)]
        self.max_retries = max_retries
        self.retries = 0
        self.lost_actors = 0
        self.dead: set[int] = set()

    def map(self, work: list[list], on_result: Callable[[Any], None]) -> None:
        queue = deque((i, 0) for i in range(len(work)))  # (batch index, attempt)
        idle = deque(i for i in range(len(self.actors)) if i not in self.dead)
        # ref -> (actor, batch, attempt); batch None marks a probe of a restarting actor
        pending: dict[ray.ObjectRef, tuple[int, int | None, int]] = {}
        while queue or pending:
            while queue and idle:
                b, attempt = queue.popleft()
                actor = idle.popleft()
                pending[self.actors[actor].__call__.remote(work[b])] = (actor, b, attempt)
            if not pending:
                raise RuntimeError(f"every actor of the pool died ({len(self.dead)}); the job cannot go on")
            [ref], _ = ray.wait(list(pending), num_returns=1)
            actor, b, attempt = pending.pop(ref)
            try:
                result = ray.get(ref)
            except ActorUnavailableError:  # lost mid-batch and restarting, or a probe during the restart
                if b is not None:
                    self.lost_actors += 1
                    self._retry(queue, b, attempt, "actor lost (restarting)", None)
                time.sleep(0.5)
                pending[self.actors[actor].stats.remote()] = (actor, None, 0)
                continue
            except RayActorError as err:  # the process died (OOM kill, lost node): Ray restarts it
                if b is None:  # a probe: the actor is gone for good
                    self.dead.add(actor)
                    continue
                self.lost_actors += 1
                self._retry(queue, b, attempt, f"actor lost ({err.__class__.__name__})", err)
                pending[self.actors[actor].stats.remote()] = (actor, None, 0)  # back in use once restarted
                continue
            except RayTaskError as err:
                cause = err.cause
                if not is_transient(cause):
                    raise  # a bug or a wrong setting: the remote traceback says where
                self._retry(queue, b, attempt, f"{type(cause).__name__}: {cause}", err)
                idle.append(actor)
                continue
            idle.append(actor)
            if b is not None:
                on_result(result)

    def _retry(self, queue: deque, b: int, attempt: int, reason: str, err: BaseException | None) -> None:
        if attempt >= self.max_retries:
            raise RuntimeError(f"a batch failed {attempt + 1} times, last: {reason}") from err
        self.retries += 1
        log.warning("batch %d: %s; retrying (%d/%d)", b, reason, attempt + 1, self.max_retries)
        queue.append((b, attempt + 1))

    def stats(self) -> dict:
        per_actor = ray.get([a.stats.remote() for i, a in enumerate(self.actors) if i not in self.dead])
        return {
            "model_loads_per_actor": [s["model_loads"] for s in per_actor],
            "batches_per_actor": [s["batches"] for s in per_actor],
            "batch_retries": self.retries,
            "actor_restarts": self.lost_actors,
        }

    def close(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
