"""Where the Pallas kernels run: the choice of ``model.text.kernel`` and ``loss.retrieval_kernel``
(`model_settings.KERNELS`)."""

from __future__ import annotations

import jax
from jax.sharding import Mesh


def runs_fused(kernel: str, mesh: Mesh | None) -> bool:
    """Whether a part runs as its Pallas kernel: "pallas" where the devices are TPUs (the mesh's,
    else the default backend's; elsewhere XLA's ops, the same math), "pallas_interpret" on any
    device (Pallas' interpreter: slow, for tests), "xla" never."""
    if kernel == "pallas_interpret":
        return True
    if kernel != "pallas":
        return False
    platform = mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()
    return platform == "tpu"
