"""Task heads on the fused representation (seeds, section 3).

ctr      one logit -> pCTR
ctr_cvr  two logits -> pCTR and pCVR (the CVR loss sees clicked impressions only)
esmm     two logits -> pCTR, pCVR and pCTCVR = pCTR x pCVR (a product, not a third head);
         the CVR head learns only through the CTCVR loss on all impressions
Both two-logit heads also return pCTCVR, so a CPA auction can rank either by it.
Logits and probabilities come out in float32 whatever the compute dtype.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from multitower_jax.model_settings import HEADS
from multitower_jax.models import layers

Array = jax.Array
Dtype = Any

def head_outputs(ctr_logit_B: Array, cvr_logit_B: Array | None) -> dict[str, Array]:
    """Logits -> the output dict (probabilities included); used by the heads and the scorer."""
    out = {"ctr_logit": ctr_logit_B, "pctr": jax.nn.sigmoid(ctr_logit_B)}
    if cvr_logit_B is not None:
        out["cvr_logit"] = cvr_logit_B
        out["pcvr"] = jax.nn.sigmoid(cvr_logit_B)
        # exp of a sum of log-sigmoids: exact for tiny products where pctr * pcvr underflows.
        out["pctcvr"] = jnp.exp(jax.nn.log_sigmoid(ctr_logit_B) + jax.nn.log_sigmoid(cvr_logit_B))
    return out


class Heads(nn.Module):
    """fused [B, H] -> dict of float32 [B] logits and probabilities."""

    kind: str = "esmm"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, h_BxH: Array, offsets_BxK: Array | None = None) -> dict[str, Array]:
        """`offsets_BxK`: added to the logits (column 0 to CTR, 1 to CVR), e.g. the `Wide` terms."""
        if self.kind not in HEADS:
            raise ValueError(f"head: expected one of {HEADS}, got {self.kind!r}")

        def logit(name: str, column: int) -> Array:
            logit_B = layers.dense(1, name, self.dtype, ("mlp", None))(h_BxH)[:, 0].astype(jnp.float32)
            return logit_B if offsets_BxK is None else logit_B + offsets_BxK[:, column].astype(jnp.float32)

        ctr_logit_B = logit("ctr", 0)
        cvr_logit_B = logit("cvr", 1) if self.kind in ("ctr_cvr", "esmm") else None
        return head_outputs(ctr_logit_B, cvr_logit_B)
