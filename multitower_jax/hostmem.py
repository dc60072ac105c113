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

The tunables are for XLA:CPU only: on a TPU (or GPU) host the step's buffers live on the
device, and one malloc arena would serialize grain's, orbax's and the runtime's threads. So
nothing re-executes where the backend is not the CPU (`backend_is_cpu`), decided without
initializing JAX: from ``JAX_PLATFORMS`` when it is set, else from the accelerators attached.
"""

from __future__ import annotations

import glob
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


# Google's PCI vendor id and the device ids of its TPU chips (as jax._src.hardware_utils lists
# them: v3, v4, v5p, v5e, v6e, TPU7x); NVIDIA and AMD GPUs show as device files.
_GOOGLE_PCI_VENDOR = "0x1ae0"
_TPU_PCI_DEVICES = {"0x0027", "0x005e", "0x0062", "0x0063", "0x006f", "0x0076"}
_GPU_DEVICE_FILES = ("/dev/nvidia0", "/dev/nvidiactl", "/dev/dxg", "/dev/kfd")


def tpu_chips_attached(pci_root: str = "/sys/bus/pci/devices") -> int:
    """TPU chips on this host's PCI bus (0 on a CPU-only machine), read from sysfs."""
    chips = 0
    for vendor in glob.glob(os.path.join(pci_root, "*", "vendor")):
        try:
            with open(vendor) as f:
                if f.read().strip() != _GOOGLE_PCI_VENDOR:
                    continue
            with open(os.path.join(os.path.dirname(vendor), "device")) as f:
                chips += f.read().strip() in _TPU_PCI_DEVICES
        except OSError:
            continue
    return chips


def accelerator_attached() -> bool:
    """A TPU chip or a GPU on this host (what JAX would pick over the CPU)."""
    return tpu_chips_attached() > 0 or any(os.path.exists(f) for f in _GPU_DEVICE_FILES)


def backend_is_cpu(environ: dict[str, str] | None = None) -> bool:
    """Whether JAX will compute on the CPU here: the first of ``JAX_PLATFORMS`` when it is set,
    else no accelerator attached. Decided without importing or initializing JAX."""
    environ = os.environ if environ is None else environ
    platforms = [p.strip().lower() for p in environ.get("JAX_PLATFORMS", "").split(",") if p.strip()]
    if platforms:
        return platforms[0] == "cpu"
    return not accelerator_attached()


def prefer_cpu_without_accelerator() -> None:
    """On a host with no accelerator and no ``JAX_PLATFORMS``, set it to "cpu".

    With the `tpu` extra installed, JAX would otherwise load libtpu in every process, look for
    a TPU, log errors, and hold libtpu's lock file (/tmp/libtpu_lockfile), so a second
    `multitower` process on the machine could not load it (`multitower compile` needs it)."""
    if not os.environ.get("JAX_PLATFORMS") and not accelerator_attached():
        os.environ["JAX_PLATFORMS"] = "cpu"


def reexec_with_retained_memory() -> None:
    """Re-execute this process with `tunables()` in GLIBC_TUNABLES, unless they are set
    already, disabled, the C library is not glibc, or JAX's backend here is not the CPU
    (`backend_is_cpu`). Call it first thing in a program's entry point, before anything is
    printed or started: it does not return when it execs."""
    if (os.environ.get("MULTITOWER_RETAIN_HOST_MEMORY", "1") == "0" or _REEXECUTED in os.environ
            or platform.libc_ver()[0] != "glibc" or not backend_is_cpu()):
        return
    current = os.environ.get("GLIBC_TUNABLES", "")
    wanted = tunables(current)
    if wanted == current:
        return
    os.environ["GLIBC_TUNABLES"], os.environ[_REEXECUTED] = wanted, "1"  # at most once
    os.execv(sys.executable, sys.orig_argv)
