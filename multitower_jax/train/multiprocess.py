"""Programs that every JAX process compiles before any of them runs it.

A program's first collective sets up its communicator, and on CPU gloo gives up when the
processes arrive more than 30 s apart (``Gloo context initialization failed: DEADLINE_EXCEEDED:
GetKeyValue() timed out``): on a loaded machine one process's compile can take that much longer
than another's. So every process compiles first and meets the others at a barrier of the
coordination service (which waits up to COMPILE_BARRIER_SECONDS), then runs.
"""

from __future__ import annotations

import itertools

import jax
import orbax.checkpoint as ocp

COMPILE_BARRIER_SECONDS = 3600
_barriers = itertools.count()  # every process passes the same barriers in the same order
# (`train.loop` compiles the train step this way; evaluation does not: a barrier there, tried,
# was followed by one hung multi-host test run, so it stays out until that is understood)


def compiled_together(jitted, *args):
    """``jitted`` compiled for ``args``, returned once every process has compiled it (at once
    with one process). Calling ``jitted`` on such args afterwards reuses this compilation."""
    compiled = jitted.lower(*args).compile()
    if jax.process_count() > 1:
        key = f"multitower_compiled_{next(_barriers)}"
        ocp.multihost.get_barrier_sync_fn()(key=key, timeout_ms=COMPILE_BARRIER_SECONDS * 1000)
    return compiled
