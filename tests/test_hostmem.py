"""`hostmem`: the glibc tunables that keep freed memory, and the re-exec that applies them."""

import os
import platform
import subprocess
import sys

import pytest

from multitower_jax import hostmem

# The child touches a 400 MB buffer, frees it and touches a new one: the page faults of the
# second touch show whether freed memory was kept (0) or handed back to the kernel (~100,000
# 4 KiB pages; numpy is told not to ask for huge pages, as XLA does not).
CHILD = """
import os, resource, sys
from multitower_jax import hostmem
hostmem.reexec_with_retained_memory()
import numpy as np
def touch():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    a = np.empty(100_000_000, np.float32)
    a[::1024] = 1.0
    del a
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
touch()
print(os.environ.get("GLIBC_TUNABLES", ""), touch())
"""


def test_tunables_add_ours_and_keep_the_users():
    assert hostmem.tunables("") == ":".join(f"{k}={v}" for k, v in hostmem.TUNABLES.items())
    mine = "glibc.malloc.arena_max=4:glibc.pthread.rseq=0"
    merged = hostmem.tunables(mine)
    assert merged.startswith(mine + ":") and merged.count("arena_max") == 1
    assert "glibc.malloc.trim_threshold=" in merged and hostmem.tunables(merged) == merged


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc tunables")
def test_reexec_keeps_freed_memory_and_can_be_turned_off():
    def run(**env):
        base = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "_MULTITOWER_REEXECUTED")}
        out = subprocess.run([sys.executable, "-c", CHILD], env={**base, "NUMPY_MADVISE_HUGEPAGE": "0", **env},
                             capture_output=True,
                             text=True, check=True).stdout.split()
        return (out[0] if len(out) == 2 else ""), int(out[-1])

    tunables, faults = run()
    assert tunables == hostmem.tunables() and faults < 100
    tunables, faults_off = run(MULTITOWER_RETAIN_HOST_MEMORY="0")
    assert tunables == "" and faults_off > 10_000


def test_backend_is_cpu_follows_jax_platforms_then_the_attached_accelerators(tmp_path, monkeypatch):
    assert hostmem.backend_is_cpu({"JAX_PLATFORMS": "cpu"})
    assert not hostmem.backend_is_cpu({"JAX_PLATFORMS": "tpu"})
    assert not hostmem.backend_is_cpu({"JAX_PLATFORMS": "tpu,cpu"})
    # A fake sysfs: one v5e chip (Google vendor 0x1ae0, device 0x0063) and an unrelated device.
    for name, vendor, device in (("0000:00:04.0", "0x1ae0", "0x0063"), ("0000:00:05.0", "0x8086", "0x0063")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "vendor").write_text(vendor + "\n")
        (tmp_path / name / "device").write_text(device + "\n")
    assert hostmem.tpu_chips_attached(str(tmp_path)) == 1
    monkeypatch.setattr(hostmem, "accelerator_attached", lambda: True)
    assert not hostmem.backend_is_cpu({})
    monkeypatch.setattr(hostmem, "accelerator_attached", lambda: False)
    assert hostmem.backend_is_cpu({})


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc tunables")
def test_no_reexec_where_the_backend_is_not_the_cpu(monkeypatch):
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.delenv("_MULTITOWER_REEXECUTED", raising=False)
    monkeypatch.setenv("JAX_PLATFORMS", "tpu")
    monkeypatch.setattr(os, "execv", lambda *a: pytest.fail("re-executed on a TPU backend"))
    hostmem.reexec_with_retained_memory()  # returns: nothing to do on a TPU host
    assert "GLIBC_TUNABLES" not in os.environ
