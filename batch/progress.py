"""Progress of a batch run: one structured log line per stage, and a bar for Spark work.

>>> from lambdalake.logs import get_logger
>>> stages = Stages(get_logger("batch"), run_id="r1")
>>> with stages.stage("pin") as s:  # doctest: +SKIP
...     s["files"] = 12
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


class Stages:
    """Times named stages and logs ``batch.stage stage=... seconds=... <counts>`` for each."""

    def __init__(self, log: Any, run_id: str) -> None:
        self.log = log
        self.run_id = run_id
        self.seconds: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[dict[str, Any]]:
        info: dict[str, Any] = {}
        t0 = time.perf_counter()
        yield info
        seconds = round(time.perf_counter() - t0, 3)
        self.seconds[name] = seconds
        for key, value in info.items():
            if isinstance(value, int) and not isinstance(value, bool):
                self.counts[key] = value
        self.log.info("batch.stage", run_id=self.run_id, stage=name, seconds=seconds, **info)


@contextmanager
def spark_progress(
    spark: Any, group: str, description: str, log: Any, *, unit: str = "task"
) -> Iterator[None]:
    """Show the progress of the Spark jobs started inside the block.

    A bar (tqdm, on stderr) when stderr is a terminal, else a log line every
    10 seconds. Progress is tasks completed over tasks known so far, across the
    jobs of the block's job group.
    """
    from tqdm import tqdm

    sc = spark.sparkContext
    sc.setJobGroup(group, description)
    stop = threading.Event()
    tty = sys.stderr.isatty()
    bar = tqdm(total=0, desc=description, unit=unit, file=sys.stderr, disable=not tty)

    def poll() -> None:
        tracker = sc.statusTracker()
        last_log = time.monotonic()
        while not stop.wait(0.5):
            done = total = 0
            try:
                for job_id in tracker.getJobIdsForGroup(group):
                    job = tracker.getJobInfo(job_id)
                    for stage_id in job.stageIds if job else []:
                        st = tracker.getStageInfo(stage_id)
                        if st is not None:
                            total += st.numTasks
                            done += st.numCompletedTasks
            except Exception:  # the tracker is best-effort; never fail the run over it
                continue
            if total:
                bar.total = total
                bar.n = done
                bar.refresh()
                if not tty and time.monotonic() - last_log >= 10:
                    log.info("batch.progress", what=description, done=done, total=total)
                    last_log = time.monotonic()

    thread = threading.Thread(target=poll, name=f"progress-{group}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=2)
        bar.n = bar.total
        bar.close()
        sc.setLocalProperty("spark.jobGroup.id", None)
        sc.setLocalProperty("spark.job.description", None)
