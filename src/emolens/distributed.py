"""Ray workers for builds and experiment sweeps: the work on a cluster, the results in order.

`RayWorkers` starts one Ray actor per GPU of the cluster (else per `threads` CPU cores); each
loads the model once and then computes work items sent by the driver: the float64 statistics
of a build shard (`workers.build`, an `emolens.build.Executor`) or the records of a chunk of
trials that share a condition (`workers.trials`, for `run_experiment(executor=...)`). The
driver gets the results back in plan order, so it merges statistics, writes checkpoints and
appends result lines exactly as a single process does.

A worker killed mid-item (SIGKILL, a lost node) is restarted by Ray, which reloads the model,
and its unfinished items run again (`max_restarts` times per worker).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from emolens.errors import EmolensError

if TYPE_CHECKING:
    from emolens.bank import EmotionBank
    from emolens.build import Job, Shard, _State
    from emolens.experiments.runner import Experiment, Trial
    from emolens.models import LoadedModel

log = logging.getLogger("emolens")
ModelSpec = str | os.PathLike | None  # what `load_model` takes (None: the embedded model)
IN_FLIGHT = 2  # items queued per worker, so none waits for the driver between two items
FREE_WAIT = 20.0  # seconds to wait for enough free resources before refusing to start


def require_ray() -> Any:
    """The `ray` module, or a clear error saying how to install it."""
    try:
        import ray
    except ImportError:
        raise EmolensError("--ray needs Ray: pip install 'emolens[ray]'") from None
    return ray


def connect(address: str | None = "auto") -> Any:
    """The `ray` module, connected (unless Ray is already initialised in this process) to the
    cluster at `address`; "auto" finds one started on this machine by `ray start --head`, and
    starts a local one if there is none."""
    ray = require_ray()
    if ray.is_initialized():
        return ray
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    except ConnectionError:
        if address != "auto":
            raise EmolensError(
                f"no Ray cluster at {address!r} (start one with `ray start --head`)"
            ) from None
        log.info("no running Ray cluster found: starting a local one")
        ray.init(include_dashboard=False, log_to_driver=False)
    return ray


class _Worker:
    """A Ray actor: the model, loaded once, and the context of the current run (a build's
    tokenized corpus, or an experiment and its bank), fetched once per run from the object
    store: work items carry a reference to it, so a restarted worker fetches it again."""

    def __init__(self, model: ModelSpec, device: str, dtype: str | None, threads: int) -> None:
        from emolens.models import load_model

        torch.set_num_threads(threads)
        self.lm = load_model(model, device=device, dtype=dtype)
        self.key: str | None = None
        self.context: Any = None

    def pid(self) -> int:
        return os.getpid()

    def _fetch(self, boxed: list, prepare: Callable[[Any], Any]) -> Any:
        """`prepare(value)` of the run context in `boxed` (a list, so Ray does not resolve the
        reference for every item), computed once per run."""
        import ray

        key = boxed[0].hex()
        if key != self.key:
            self.context, self.key = prepare(ray.get(boxed[0])), key
        return self.context

    def _check(self, weights: str) -> None:
        found = str(self.lm.fingerprint.get("weights"))
        if found != weights:
            raise EmolensError(
                f"a worker loaded {self.lm.name} with weights {found}, the driver has {weights}: "
                "every node must load the same model (same files and dtype)"
            )

    def _tokenized(self, job: Job) -> Job:
        from emolens.capture import tokenize

        self._check(job.weights)
        texts = {phase: tokenize(self.lm, t) if t else [] for phase, t in job.texts.items()}
        return replace(job, texts=texts)

    def shard(self, boxed_job: list, shard: Shard) -> tuple[_State, int]:
        """The float64 statistics of one build shard (the corpus is tokenized once per run)."""
        from emolens.build import shard_statistics

        job = self._fetch(boxed_job, self._tokenized)
        phase, numbers = shard
        return shard_statistics(self.lm, job, phase, numbers), os.getpid()

    def _trial_context(self, context: tuple) -> tuple:
        weights, bank, experiment = context
        self._check(weights)
        bank.check_model(self.lm)
        return bank, experiment

    def trials(self, boxed: list, trials: list[Trial]) -> tuple[tuple[list[dict], float], int]:
        """The records of a chunk of trials (one condition), and the seconds per trial."""
        bank, experiment = self._fetch(boxed, self._trial_context)
        began = time.perf_counter()
        records = experiment.run(self.lm, bank, trials)
        return (records, (time.perf_counter() - began) / len(trials)), os.getpid()


class RayWorkers:
    """Ray workers that each load the model once and serve builds and experiments.

    `model` is what each worker loads (a spec for `load_model`, None for the embedded model);
    it must have the driver's weights. `workers` defaults to one per GPU of the cluster, else
    one per `threads` CPU cores; `dtype` is the workers' (None: `load_model`'s default for
    their device); `progress` shows a bar of build batches. Workers start on first use (or
    `start()`) and stay until `close()`. Pass `workers.build` to `emolens.build.build` and
    `workers.trials` to `run_experiment` as their `executor`.
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
        if workers is not None and workers < 1:
            raise EmolensError(f"--workers must be at least 1, not {workers}")
        if threads < 1:
            raise EmolensError(f"threads per worker must be at least 1, not {threads}")
        self.model, self.address, self.workers, self.threads = model, address, workers, threads
        self.dtype, self.max_restarts, self.progress = dtype, max_restarts, progress
        self.actors: list[Any] = []
        self.pids: list[int] = []  # each worker's process id when it started
        self.computed_by: list[int] = []  # the process id behind each item of the last run

    def start(self) -> RayWorkers:
        """Connect to the cluster and start the workers (each loads the model)."""
        if self.actors:
            return self
        ray = connect(self.address)
        total = ray.cluster_resources()
        gpu = bool(total.get("GPU", 0))
        options = {"num_gpus": 1, "num_cpus": 1} if gpu else {"num_cpus": self.threads}
        device = "cuda" if gpu else "cpu"

        def room(resources: dict) -> int:
            cpus = int(resources.get("CPU", 0))
            return min(int(resources.get("GPU", 0)), cpus) if gpu else cpus // self.threads

        count = self.workers or room(total)
        if not 1 <= count <= room(total):
            each = "one GPU" if gpu else f"{self.threads} CPU(s)"
            raise EmolensError(f"{count} worker(s) do not fit the Ray cluster: it has room for "
                               f"{room(total)} ({each} each)")  # fmt: skip
        # workers that do not fit would wait for ever; the resources of workers just stopped
        # (here or by another driver) take a moment to come free
        deadline = time.monotonic() + FREE_WAIT
        while count > room(ray.available_resources()):
            if time.monotonic() > deadline:
                raise EmolensError(
                    f"the Ray cluster is busy: {count} worker(s) do not fit its free resources"
                )
            time.sleep(0.5)
        remote = ray.remote(max_restarts=self.max_restarts, max_task_retries=self.max_restarts,
                            **options)(_Worker)  # fmt: skip
        self.actors = [remote.remote(self.model, device, self.dtype, self.threads)
                       for _ in range(count)]  # fmt: skip
        try:
            self.pids = ray.get([actor.pid.remote() for actor in self.actors])
        except ray.exceptions.RayActorError as error:
            self.close()
            raise EmolensError(f"a Ray worker could not start: {error}") from None
        log.info("%d Ray worker(s) on %s, model loaded", count, device)
        return self

    def close(self) -> None:
        """Stop the workers."""
        if self.actors:
            import ray

            for actor in self.actors:
                ray.kill(actor, no_restart=True)
        self.actors, self.pids = [], []

    def __enter__(self) -> RayWorkers:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def build(self, job: Job, shards: list[Shard]) -> Iterator[_State]:
        """The statistics of each build shard, in order (an `emolens.build.Executor`)."""
        return self._ordered("shard", job, shards, lambda shard: len(shard[1]), self.progress)

    def trials(
        self,
        experiment: Experiment,
        lm: LoadedModel,
        bank: EmotionBank,
        chunks: list[list[Trial]],
    ) -> Iterator[tuple[list[dict], float]]:
        """Each chunk's records and seconds per trial, in order (a runner `TrialExecutor`)."""
        context = (str(lm.fingerprint.get("weights")), bank, experiment)
        return self._ordered("trials", context, chunks, len, progress=False)  # the runner's bar

    def _ordered(
        self, method: str, context: Any, items: Sequence, size: Callable, progress: bool
    ) -> Iterator:
        """Results of `worker.METHOD(context, item)` for every item, in the items' order,
        `IN_FLIGHT` items queued on each worker; `size(item)` weighs the progress bar."""
        if not items:
            return
        self.start()
        import ray

        boxed = [ray.put(context)]
        queue = list(enumerate(items))[::-1]
        running: dict[Any, tuple[int, Any]] = {}
        finished: dict[int, tuple[Any, int]] = {}
        self.computed_by = []

        def submit(actor: Any) -> None:
            if queue:
                index, item = queue.pop()
                running[getattr(actor, method).remote(boxed, item)] = (index, actor)

        for actor in self.actors * IN_FLIGHT:
            submit(actor)
        bar = tqdm(total=sum(map(size, items)), unit="batch", desc="ray", disable=not progress)
        with bar:
            while running:
                [ready], _ = ray.wait(list(running), num_returns=1)
                index, actor = running.pop(ready)
                try:
                    finished[index] = ray.get(ready)
                except ray.exceptions.RayActorError as error:
                    raise EmolensError(
                        f"a Ray worker died more than {self.max_restarts} times: {error}"
                    ) from None
                except ray.exceptions.RayTaskError as error:
                    cause = error.as_instanceof_cause()
                    raise (cause if isinstance(cause, EmolensError) else error) from None
                bar.update(size(items[index]))
                submit(actor)
                while len(self.computed_by) in finished:
                    result, pid = finished.pop(len(self.computed_by))
                    self.computed_by.append(pid)
                    yield result
