"""Ray executors: a build's shards and an experiment's trial chunks on a cluster of workers.

Each worker is a Ray actor that loads the model once (one GPU per worker where the cluster
has GPUs, else `threads` CPU cores) and then computes work items sent by the driver: the
float64 statistics of a build shard (`RayBuild`, for `emolens.build.build(executor=...)`) or
the records of a chunk of trials that share a condition (`RayTrials`, for
`run_experiment(executor=...)`). The driver gets the results back in plan order, so it merges
statistics, writes checkpoints and appends result lines exactly as a single process does.

A worker killed mid-item (SIGKILL, a lost node) is restarted by Ray, which reloads the model
and runs its unfinished items again (`max_restarts` times per worker).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Union

import torch
from tqdm.auto import tqdm

from emolens.errors import EmolensError

if TYPE_CHECKING:
    from emolens.bank import EmotionBank
    from emolens.build import Job, Shard, _State
    from emolens.experiments.runner import Experiment, Trial
    from emolens.models import LoadedModel

log = logging.getLogger("emolens")
ModelSpec = Union[str, os.PathLike, None]  # what `load_model` takes (None: the embedded model)
IN_FLIGHT = 2  # items queued per worker, so none waits for the driver between two items


def connect(address: str | None = "auto") -> Any:
    """The `ray` module, connected: to the running cluster (if Ray is not already initialised
    in this process) at `address`; "auto" finds one started on this machine by `ray start`
    and starts a local one if there is none."""
    try:
        import ray
    except ImportError:
        raise EmolensError("--ray needs Ray: pip install 'emolens[ray]'") from None
    if ray.is_initialized():
        return ray
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    except ConnectionError:
        if address != "auto":
            raise EmolensError(f"no Ray cluster at {address!r} (start one with `ray start --head`)")
        log.info("no running Ray cluster found: starting a local one")
        ray.init(include_dashboard=False, log_to_driver=False)
    return ray


class _Worker:
    """A Ray actor's state: the model, loaded once; `weights` must match the driver's."""

    def __init__(
        self, model: ModelSpec, device: str, dtype: str | None, threads: int, weights: str
    ) -> None:
        from emolens.models import load_model

        torch.set_num_threads(threads)
        self.lm = load_model(model, device=device, dtype=dtype)
        found = str(self.lm.fingerprint.get("weights"))
        if found != weights:
            raise EmolensError(
                f"a worker loaded {self.lm.name} with weights {found}, the driver has {weights}: "
                "every node must load the same model (same files and dtype)"
            )

    def pid(self) -> int:
        return os.getpid()


class _BuildWorker(_Worker):
    """Computes the statistics of build shards; the corpus is tokenized once per worker."""

    def __init__(
        self, model: ModelSpec, device: str, dtype: str | None, threads: int, job: Job
    ) -> None:
        from emolens.capture import tokenize

        super().__init__(model, device, dtype, threads, job.weights)
        texts = {phase: tokenize(self.lm, t) if t else [] for phase, t in job.texts.items()}
        self.job = replace(job, texts=texts)

    def run(self, shard: Shard) -> tuple[_State, int]:
        from emolens.build import shard_statistics

        phase, numbers = shard
        return shard_statistics(self.lm, self.job, phase, numbers), os.getpid()


class _TrialWorker(_Worker):
    """Runs chunks of trials of one experiment with the driver's bank."""

    def __init__(
        self,
        model: ModelSpec,
        device: str,
        dtype: str | None,
        threads: int,
        weights: str,
        bank: EmotionBank,
        experiment: Experiment,
    ) -> None:
        super().__init__(model, device, dtype, threads, weights)
        self.bank, self.experiment = bank, experiment

    def run(self, trials: list[Trial]) -> tuple[tuple[list[dict], float], int]:
        import time

        began = time.perf_counter()
        records = self.experiment.run(self.lm, self.bank, trials)
        return (records, (time.perf_counter() - began) / len(trials)), os.getpid()


class _Pool:
    """Worker placement and the ordered dispatch shared by both executors."""

    def __init__(
        self,
        model: ModelSpec,
        *,
        address: str | None,
        workers: int | None,
        threads: int,
        dtype: str | None,
        max_restarts: int,
        progress: bool,
    ) -> None:
        if workers is not None and workers < 1:
            raise EmolensError(f"--workers must be at least 1, not {workers}")
        if threads < 1:
            raise EmolensError(f"threads per worker must be at least 1, not {threads}")
        self.model, self.address, self.workers, self.threads = model, address, workers, threads
        self.dtype, self.max_restarts, self.progress = dtype, max_restarts, progress
        self.pids: list[int] = []  # each worker's first process id
        self.computed_by: list[int] = []  # the process id that returned each item, in order

    def _start(self, ray: Any, actor_class: type, *args: Any) -> list[Any]:
        resources = ray.cluster_resources()
        gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 0))
        if gpus:
            options, device, room = {"num_gpus": 1, "num_cpus": 1}, "cuda", gpus
        else:
            options, device, room = {"num_cpus": self.threads}, "cpu", cpus // self.threads
        count = self.workers or max(room, 1)
        if count > room:
            unit = "GPU(s)" if gpus else f"CPU(s) at {self.threads} thread(s) per worker"
            raise EmolensError(
                f"{count} workers do not fit the Ray cluster ({gpus or cpus} {unit}); "
                f"give --workers {max(room, 1)} or fewer"
            )
        remote = ray.remote(max_restarts=self.max_restarts, max_task_retries=self.max_restarts,
                            **options)(actor_class)  # fmt: skip
        actors = [remote.remote(self.model, device, self.dtype, self.threads, *args)
                  for _ in range(count)]  # fmt: skip
        try:
            self.pids = ray.get([actor.pid.remote() for actor in actors])
        except ray.exceptions.RayActorError as error:
            raise EmolensError(f"a Ray worker could not start: {error}") from None
        log.info("%d Ray worker(s) on %s, model loaded", count, device)
        return actors

    def _ordered(self, ray: Any, actors: list[Any], items: Sequence, size: Callable) -> Iterator:
        """Results of `actor.run(item)` for every item, in the items' order, `IN_FLIGHT` items
        queued on each worker; `size(item)` is the item's weight on the progress bar."""
        queue = list(enumerate(items))[::-1]
        running: dict[Any, tuple[int, Any]] = {}
        finished: dict[int, Any] = {}
        following = 0

        def submit(actor: Any) -> None:
            if queue:
                index, item = queue.pop()
                running[actor.run.remote(item)] = (index, actor)

        for actor in actors * IN_FLIGHT:
            submit(actor)
        bar = tqdm(total=sum(map(size, items)), desc="ray", disable=not self.progress)
        with bar:
            while running:
                [ready], _ = ray.wait(list(running), num_returns=1)
                index, actor = running.pop(ready)
                try:
                    result, pid = ray.get(ready)
                except ray.exceptions.RayActorError as error:
                    raise EmolensError(
                        f"a Ray worker died more than {self.max_restarts} times: {error}"
                    ) from None
                finished[index] = (result, pid)
                bar.update(size(items[index]))
                submit(actor)
                while following in finished:
                    result, pid = finished.pop(following)
                    self.computed_by.append(pid)
                    following += 1
                    yield result

    def _run(self, actor_class: type, args: tuple, items: Sequence, size: Callable) -> Iterator:
        if not items:
            return
        ray = connect(self.address)
        actors = self._start(ray, actor_class, *(ray.put(a) for a in args))
        try:
            yield from self._ordered(ray, actors, items, size)
        finally:
            for actor in actors:
                ray.kill(actor, no_restart=True)


class RayBuild(_Pool):
    """A build executor: shards of the batch plan on Ray workers, statistics back in order.

    `model` is what each worker loads (a spec for `load_model`, None for the embedded model);
    it must have the driver's weights. `workers` defaults
    to one per GPU of the cluster, else one per `threads` CPU cores. `dtype` is the workers'
    (None: `load_model`'s default for their device).
    """

    def __init__(
        self,
        model: ModelSpec = None,
        *,
        address: str | None = "auto",
        workers: int | None = None,
        threads: int = 1,
        dtype: str | None = None,
        max_restarts: int = 3,
        progress: bool = True,
    ) -> None:
        super().__init__(model, address=address, workers=workers, threads=threads, dtype=dtype,
                         max_restarts=max_restarts, progress=progress)  # fmt: skip

    def __call__(self, job: Job, shards: list[Shard]) -> Iterator[_State]:
        return self._run(_BuildWorker, (job,), shards, lambda shard: len(shard[1]))


class RayTrials(_Pool):
    """An experiment executor: chunks of trials (one condition each) on Ray workers that load
    the model and receive the driver's bank and experiment once; records back in order.

    Options as `RayBuild`'s."""

    def __init__(
        self,
        model: ModelSpec = None,
        *,
        address: str | None = "auto",
        workers: int | None = None,
        threads: int = 1,
        dtype: str | None = None,
        max_restarts: int = 3,
        progress: bool = False,
    ) -> None:
        super().__init__(model, address=address, workers=workers, threads=threads, dtype=dtype,
                         max_restarts=max_restarts, progress=progress)  # fmt: skip

    def __call__(
        self,
        experiment: Experiment,
        lm: LoadedModel,
        bank: EmotionBank,
        chunks: list[list[Trial]],
    ) -> Iterator[tuple[list[dict], float]]:
        weights = str(lm.fingerprint.get("weights"))
        return self._run(_TrialWorker, (weights, bank, experiment), chunks, len)
