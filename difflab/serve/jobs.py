"""One job at a time: a queue and a worker thread, so the server answers while a model runs.

A job's failure (a ValueError from the pipeline for a combination the form could not rule
out, or any other exception) is kept as its message; the worker goes on with the next job.
"""

from __future__ import annotations

import queue
import threading
import time
import traceback
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..data import DataError


class QueueFull(RuntimeError):
    """More jobs are waiting than ``ServeLimits.max_queue`` allows."""


@dataclass
class Job:
    """A request's state as the page polls it. ``status``: queued, running, done or error;
    ``nfe``/``expected``: network evaluations done and expected (None: unknown); ``images``:
    PNG bytes when done; ``settings``: what made them (the JSON download)."""

    work: Callable[[Job], list[bytes]]
    settings: dict[str, Any]
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    status: str = "queued"
    nfe: int = 0
    expected: int | None = None
    images: list[bytes] = field(default_factory=list)
    error: str | None = None
    seconds: float | None = None

    def progress(self, done: int, expected: int | None) -> None:
        self.nfe, self.expected = done, expected

    def to_dict(self) -> dict[str, Any]:
        frac = None
        if self.status == "done":
            frac = 1.0
        elif self.expected:
            frac = min(0.99, self.nfe / self.expected)  # adaptive samplers may run past it
        elif self.status == "queued":
            frac = 0.0
        return {"id": self.id, "status": self.status, "progress": frac, "nfe": self.nfe,
                "expected_nfe": self.expected, "error": self.error, "seconds": self.seconds,
                "images": [f"/api/jobs/{self.id}/{i}.png" for i in range(len(self.images))],
                "settings_url": f"/api/jobs/{self.id}/settings.json", "settings": self.settings}


class JobQueue:
    """Runs submitted jobs one after the other on a daemon thread; keeps the last
    ``keep`` finished jobs for the page to fetch."""

    def __init__(self, max_queue: int, keep: int):
        self.max_queue, self.keep = max_queue, keep
        self.jobs: OrderedDict[str, Job] = OrderedDict()
        self.lock = threading.Lock()
        self.pending: queue.Queue[Job | None] = queue.Queue()
        self.thread = threading.Thread(target=self._loop, name="difflab-serve-worker",
                                       daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> int:
        """Queue ``job``; returns how many jobs are ahead of it."""
        with self.lock:
            ahead = sum(j.status in ("queued", "running") for j in self.jobs.values())
            if ahead > self.max_queue:
                raise QueueFull(f"{ahead} jobs are already waiting or running; try again "
                                "when one has finished")
            self.jobs[job.id] = job
            self._forget_old()
        self.pending.put(job)
        return ahead

    def get(self, job_id: str) -> Job | None:
        with self.lock:
            return self.jobs.get(job_id)

    def _forget_old(self) -> None:
        finished = [k for k, j in self.jobs.items() if j.status in ("done", "error")]
        for k in finished[:max(0, len(finished) - self.keep)]:
            del self.jobs[k]

    def _loop(self) -> None:
        while (job := self.pending.get()) is not None:
            job.status = "running"
            start = time.perf_counter()
            try:
                job.images = job.work(job)
                job.status = "done"
            except (ValueError, DataError) as e:
                job.error, job.status = str(e), "error"
            except Exception as e:  # keep serving: report it, log it, go on
                traceback.print_exc()
                job.error, job.status = f"internal error: {type(e).__name__}: {e}", "error"
            job.seconds = round(time.perf_counter() - start, 3)
            with self.lock:
                self._forget_old()

    def close(self, timeout: float | None = None) -> None:
        """Stop the worker after the jobs already queued."""
        self.pending.put(None)
        self.thread.join(timeout)
