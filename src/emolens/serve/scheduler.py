"""Continuous batching: one thread owns the model and one `Decoder`; requests that arrive while
others decode join the running batch at the next step and leave when they finish.

Each `Job` brings its prompt, sampling, steering, what it reads and its guard, and an `emit`
callback (called from the scheduler thread; it must be thread-safe) that receives events:
`{"type": "token", "index", "text", "emolens", "guard"}` per generated token,
`{"type": "done", "finish", "prompt_tokens", "completion_tokens", "emolens"}` at the end, or
`{"type": "error", "message"}`. `cancel` removes a job (a client that went away): its row
leaves the batch at the next step and the others carry on.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

import torch

from emolens.errors import EmolensError
from emolens.generation import Decoder, Sampling, Step
from emolens.guard import Guard, Watch, act
from emolens.models import LoadedModel
from emolens.serve.lens import Lens, Reading
from emolens.steer import SteeringVector

log = logging.getLogger("emolens")
FINISH = {"stop": "stop", "length": "length", "halt": "content_filter"}


@dataclass
class Job:
    """One request's row (see the module docstring). `guard_vector` is what a "steer" firing
    adds to `steering`."""

    key: str
    prompt: list[int]
    sampling: Sampling
    emit: Callable[[dict], None]
    steering: SteeringVector | None = None
    mode: str = "all"
    reading: Reading | None = None
    guard: Guard | None = None
    guard_vector: SteeringVector | None = None
    watch: Watch | None = field(default=None, repr=False)
    total: torch.Tensor | None = field(default=None, repr=False)
    count: int = 0

    @property
    def reads(self) -> bool:
        return self.reading is not None or self.guard is not None


class Scheduler:
    """The decoding thread (see the module docstring)."""

    def __init__(self, lm: LoadedModel, lens: Lens) -> None:
        self.lm, self.lens = lm, lens
        self.decoder = Decoder(lm, [lens.layer])
        self._lock = threading.Condition()
        self._inbox: list[Job] = []
        self._cancelled: set[str] = set()
        self._jobs: dict[Hashable, Job] = {}
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="emolens-decoder", daemon=True)
        self.steps = 0  # decoding steps run
        self.peak = 0  # most rows decoded together in one step

    @property
    def active(self) -> int:
        """Jobs waiting or decoding."""
        with self._lock:
            return len(self._inbox) + len(self._jobs)

    def start(self) -> None:
        self._thread.start()

    def close(self, timeout: float = 10.0) -> None:
        with self._lock:
            self._closed = True
            self._lock.notify()
        self._thread.join(timeout)

    def submit(self, job: Job, limit: int | None = None) -> bool:
        """Queue a job; False (and nothing queued) when `limit` jobs are already active."""
        if job.guard is not None:
            job.watch = Watch(job.guard, float(self.lens.scale[self.lens.emotions.index(
                job.guard.emotion)]))  # fmt: skip
        with self._lock:
            if self._closed:
                raise EmolensError("the server is shutting down")
            if limit is not None and len(self._inbox) + len(self._jobs) >= limit:
                return False
            self._inbox.append(job)
            self._lock.notify()
        return True

    def cancel(self, key: str) -> None:
        """Remove a job whose client went away (no more events are sent for it)."""
        with self._lock:
            self._cancelled.add(key)
            self._lock.notify()

    # --- the decoding thread --------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._lock:
                while not (self._inbox or self._cancelled or self.decoder.busy or self._closed):
                    self._lock.wait()
                if self._closed:
                    break
                inbox, self._inbox = self._inbox, []
                cancelled, self._cancelled = self._cancelled, set()
            try:
                self._admit(inbox, cancelled)
                for key in cancelled:
                    self._drop(key)
                steps = self.decoder.step()
                self.steps += 1
                self.peak = max(self.peak, len(steps))
                self._deliver(steps)
                self._collect()
            except Exception as error:  # a failed step must not take the server down
                log.exception("decoding step failed")
                self._fail_all(f"decoding failed: {type(error).__name__}: {error}")

    def _admit(self, inbox: list[Job], cancelled: set[str]) -> None:
        for job in inbox:
            if job.key in cancelled:
                continue
            try:
                self.decoder.add(job.key, job.prompt, job.sampling, job.steering, job.mode)
            except EmolensError as error:
                job.emit({"type": "error", "message": str(error)})
                continue
            with self._lock:
                self._jobs[job.key] = job

    def _drop(self, key: str) -> None:
        with self._lock:
            job = self._jobs.pop(key, None)
        if job is None:
            return
        if any(row.key == key for row in self.decoder.rows):
            self.decoder.halt(key)
        self.decoder.finished.pop(key, None)

    @torch.inference_mode()
    def _deliver(self, steps: list[Step]) -> None:
        jobs = [self._jobs.get(step.key) for step in steps]
        reading = [i for i, job in enumerate(jobs) if job is not None and job.reads]
        projections = None
        if reading:
            states = torch.stack([steps[i].residuals[self.lens.layer] for i in reading])
            projections = dict(zip(reading, self.lens.project(states), strict=True))
        for i, (step, job) in enumerate(zip(steps, jobs, strict=True)):
            if job is None:
                continue
            event: dict = {"type": "token", "index": step.index, "text": step.text}
            if projections is not None and i in projections:
                projection = projections[i]
                job.total = projection.double() + (0 if job.total is None else job.total)
                job.count += 1
                if job.reading is not None:
                    event["emolens"] = self.lens.token(projection, job.reading)
                if job.watch is not None:
                    assert job.guard is not None
                    index = self.lens.emotions.index(job.guard.emotion)
                    fired = job.watch.push(float(projection[index]))
                    if fired is not None:
                        event["guard"] = fired.to_dict()
                        if step.finish is None:
                            act(fired, self.decoder, job.key, job.steering, job.mode,
                                job.guard_vector)  # fmt: skip
            job.emit(event)

    def _collect(self) -> None:
        for key in list(self.decoder.finished):
            generation = self.decoder.finished.pop(key)
            with self._lock:
                job = self._jobs.pop(key, None)
            if job is None:
                continue
            summary = None
            if job.reading is not None or job.watch is not None:
                reading = job.reading or Reading((), (), 0)
                total = job.total if job.total is not None else torch.zeros(len(self.lens.emotions))
                summary = self.lens.summary(total.float(), job.count, reading)
                if job.watch is not None:
                    summary["fired"] = [fired.to_dict() for fired in job.watch.fired]
            job.emit({
                "type": "done",
                "finish": FINISH[generation.finish],
                "prompt_tokens": len(generation.prompt),
                "completion_tokens": len(generation.tokens),
                "emolens": summary,
            })  # fmt: skip

    def _fail_all(self, message: str) -> None:
        with self._lock:
            jobs, self._jobs = list(self._jobs.values()), {}
        for job in jobs:
            job.emit({"type": "error", "message": message})
        self.decoder = Decoder(self.lm, [self.lens.layer])
