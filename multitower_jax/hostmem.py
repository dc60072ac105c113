"""Keep freed host memory in the process, so XLA:CPU's large buffers do not page-fault anew.

XLA:CPU allocates each step's activations and temporaries with ``malloc`` and frees them at
the end. glibc serves large allocations with a fresh ``mmap`` and gives big freed blocks back
to the kernel, so every step faults in every page again: ~600,000 page faults per training
step of the seeds' search model on a 2-core VM, a third of the step (3.3 s -> 2.3 s without
them). glibc's malloc tunables fix it: no per-allocation mappings, no trimming of the heap,
one arena shared by XLA's threads. The process then keeps its peak heap between steps instead
of returning it, which is what a training or serving process wants.

The tunables are read when a process starts, so the `multitower` command re-executes itself
once with them (`reexec_with_retained_memory`). In your own program, start Python with
``GLIBC_TUNABLES=`` set to `tunables()`. ``MULTITOWER_RETAIN_HOST_MEMORY=0`` keeps glibc's
defaults. Other C libraries ignore the setting, and nothing re-executes there.
"""

from __future__ import annotations

import os
import platform
import sys

_HUGE = str(1 << 46)  # 64 TiB: "never", for the mmap and trim thresholds (size_t tunables)
TUNABLES = {"glibc.malloc.mmap_threshold": _HUGE, "glibc.malloc.trim_threshold": _HUGE,
            "glibc.malloc.arena_max": "1"}
_REEXECUTED = "_MULTITOWER_REEXECUTED"


def tunables(current: str = "") -> str:
    """`current` (a GLIBC_TUNABLES value) with ours added; the user's own settings win."""
    items = [item for item in current.split(":") if item]
    have = {item.split("=", 1)[0] for item in items}
    return ":".join(items + [f"{k}={v}" for k, v in TUNABLES.items() if k not in have])


def reexec_with_retained_memory() -> None:
    """Re-execute this process with `tunables()` in GLIBC_TUNABLES, unless they are set
    already, disabled, or the C library is not glibc. Call it first thing in a program's
    entry point, before anything is printed or started: it does not return when it execs."""
    if (os.environ.get("MULTITOWER_RETAIN_HOST_MEMORY", "1") == "0" or _REEXECUTED in os.environ
            or platform.libc_ver()[0] != "glibc"):
        return
    current = os.environ.get("GLIBC_TUNABLES", "")
    wanted = tunables(current)
    if wanted == current:
        return
    os.environ["GLIBC_TUNABLES"], os.environ[_REEXECUTED] = wanted, "1"  # at most once
    os.execv(sys.executable, sys.orig_argv)
