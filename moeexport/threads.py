"""How many CPU threads compute: the default for every runtime and for torch, and a scope that sets torch's.

Runtimes that take every logical CPU run slower on a machine with simultaneous
multithreading or other load (two threads per core contend for one core's
units), so the default is the physical cores this process may run on.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path


def default_threads() -> int:
    """The physical cores among the CPUs this process may use (the logical count where topology is unknown)."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    cores = set()
    for cpu in cpus:
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add(((topology / "physical_package_id").read_text().strip(), (topology / "core_id").read_text().strip()))
        except OSError:
            return len(cpus)
    return len(cores) or len(cpus)


@contextmanager
def torch_threads(threads: int | None):
    """torch computes with `threads` CPU threads inside the scope (None: leaves torch as it is)."""
    import torch

    if threads is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
