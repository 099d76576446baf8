"""Was the machine busy while a runtime was timed? Then its speed figures are not facts.

A runtime that computes with every core slows down far more than its share when anything else runs: on a
2-core machine with other work, llama.cpp decoded ~100x slower than with one thread minutes later. So bench
and a build's profile measure the load beside their runs and print a warning beside the numbers instead of
presenting them as the machine's speed.

The load is the other work that wants a core: the tasks ready to run (/proc/loadavg's running count, less this
process), sampled just before each run, when none of ours computes. Not the load average: it would count the
build that ran a minute before as other work. The cores are those this process may run on. The spread is how
far repeated runs of one artifact disagree: (max - min) / median of a speed.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

SPARE_CORES = 0.5  # other work tolerated beyond the cores the timed runtime leaves free
SPREAD_LIMIT = 0.25  # repeats that disagree by more than this are not one speed
SAMPLES, SAMPLE_GAP_S = 5, 0.02  # readings of the ready tasks averaged into one load (one reading is a moment)


@dataclass(frozen=True)
class MachineLoad:
    load: float  # other work wanting a core, in cores
    cores: int  # cores this process may run on
    threads: int  # the timed runtime's threads
    spread: float | None  # the largest (max - min) / median of a timed speed over repeats; None: one run
    warning: str | None  # None: the machine looked quiet

    @property
    def busy(self) -> bool:
        return self.warning is not None

    def to_dict(self) -> dict:
        return asdict(self) | {"busy": self.busy}


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def other_load() -> float:
    """Other tasks ready to run on the machine, this process left out, averaged over a few readings; where the
    system does not say, the 1-minute load average (0 where there is none either)."""
    readings = []
    for sample in range(SAMPLES):
        try:
            running = Path("/proc/loadavg").read_text().split()[3].split("/")[0]
        except (OSError, IndexError):
            break
        readings.append(max(int(running) - 1, 0))
        if sample < SAMPLES - 1:
            time.sleep(SAMPLE_GAP_S)
    if readings:
        return statistics.fmean(readings)
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return 0.0


def judge(load: float, cores: int, threads: int, spread: float | None = None) -> MachineLoad:
    """Busy when other work wants more than the cores the runtime's `threads` leave free (plus SPARE_CORES), or
    when repeated runs disagree by more than SPREAD_LIMIT."""
    reasons = []
    if load > max(cores - threads, 0) + SPARE_CORES:
        reasons.append(f"load {load:.1f} on {cores} core{'s' if cores != 1 else ''}, timed with {threads} "
                       f"thread{'s' if threads != 1 else ''}")
    if spread is not None and spread > SPREAD_LIMIT:
        reasons.append(f"repeated runs differ by {spread:.0%}")
    warning = f"machine busy: {'; '.join(reasons)}; the speeds are not reliable" if reasons else None
    return MachineLoad(round(load, 2), cores, threads, spread, warning)


def relative_spread(values: list[float]) -> float | None:
    """(max - min) / median of repeated measurements; None for fewer than two."""
    if len(values) < 2:
        return None
    median = statistics.median(values)
    return (max(values) - min(values)) / median if median > 0 else None
