"""The ``config.model``, ``config.loss`` and ``config.optim`` sections: their choices and their checks.

The model code (`multitower_jax.models`, `train.optim`, `train.losses`) reads these sections; the
names it accepts live here, free of JAX, so that `config.validate` checks every section at module
level (loading a config or `multitower --help` does not import JAX), in the one style of
`config_checks`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import ml_collections

from multitower_jax.config_checks import (
    is_int,
    is_positive_int,
    require,
    require_bool,
    require_choice,
    require_fraction,
    require_number,
    require_positive_int,
    require_present,
)

# How the towers meet (`models.fusion`).
FUSIONS = ("concat", "dot", "product")
# CTR only; CTR and a click-only CVR; ESMM's CTR and CTCVR over every impression (`models.heads`).
HEADS = ("ctr", "ctr_cvr", "esmm")
DTYPES = ("float32", "bfloat16")  # the compute dtype (`model.dtype`)
# How embedding rows start: "unit" draws N(0, 1/dim) per element, so a row has norm ~1 whatever
# its width and a 64-d id does not drown a 128-d image vector (norm 1) in the tower's first
# layer; "normal" draws N(0, 1) per element (row norm ~sqrt(dim)), as nn.Embed does.
EMBED_INITS = ("unit", "normal")
TOWER_OUTPUTS = ("relu", "layernorm")  # a tower's last block ends at ReLU or at its LayerNorm
# How the wide part's CVR column starts (`model.wide_init`): at zero, or at a logistic regression
# of conversion given click on the train split's clicked rows (`train.wide_init`).
WIDE_INITS = ("zeros", "logistic")
# How a text's tokens (a multi-hot's items) are pooled (`model.wide_pooling`): the "mean" of their
# weights, or their "sum" (a bag of words, as a one-hot logistic regression has it: a word's
# weight is its whole effect, whatever the query's length). One for every logit, ("sum",), or one
# per logit, CTR then CVR, ("mean", "sum") (a CTR-only head reads the first).
WIDE_POOLINGS = ("mean", "sum")
TEXT_INITS = ("random", "lsa")  # the token table: random, or the LSA warm start (`train.text_init`)
# How a text-encoder layer (`model.text.kernel`, `models.fused_encoder`) and the in-batch softmax
# (`loss.retrieval_kernel`, `train.fused_softmax`) run: XLA's ops, or Pallas kernels on TPUs
# (XLA's ops on other devices), or those kernels in Pallas' interpreter anywhere (slow: for tests).
KERNELS = ("xla", "pallas", "pallas_interpret")
RETRIEVAL_POSITIVES = ("clicks", "impressions")  # the retrieval softmax's rows (`train.losses`)
# Embedding tables of at least `optim.large_table_bytes` may take row-wise Adagrad (one accumulator
# per row) or Adagrad (one per element, as SparseCore's) instead of AdamW (`train.optim`).
LARGE_TABLE_OPTIMIZERS = ("adamw", "rowwise_adagrad", "adagrad")
ADAGRADS = ("rowwise_adagrad", "adagrad")
# `sharding.large_table_placement`: where the large tables live and are looked up and updated
# (`train.sparsecore`); `sharding.sparsecore_kernel`: SparseCore's own ("tpu", jax-tpu-embedding)
# or the same lookup and update in XLA ("reference", any backend).
LARGE_TABLE_PLACEMENTS = ("tensorcore", "sparsecore")
SPARSECORE_KERNELS = ("tpu", "reference")


def on_sparsecore(config: ml_collections.ConfigDict) -> bool:
    """Whether the large tables are placed on the SparseCores (``sharding.large_table_placement``)."""
    return "sharding" in config and config.sharding.get("large_table_placement", "tensorcore") == "sparsecore"


def updates_batch_rows(optim: ml_collections.ConfigDict) -> bool:
    """Whether the train step updates the large tables through the batch's rows (`train.batch_rows`):
    (row-wise) Adagrad on tables of ``optim.large_table_bytes`` > 0, with ``optim.sparse_row_updates``."""
    return (optim.get("large_table_optimizer", "adamw") in ADAGRADS and bool(optim.get("sparse_row_updates", True))
            and int(optim.get("large_table_bytes", 0) or 0) > 0)


def num_logits(head: str) -> int:
    """How many logits a head has (CTR, then CVR)."""
    return 1 if head == "ctr" else 2


def str_or_tuple(value: Any) -> Any:
    """A config's string, or its list / tuple as a tuple (JSON round trips turn tuples into lists)."""
    return tuple(value) if isinstance(value, list | tuple) else value


def logit_poolings(pooling: str | Sequence[str], logits: int) -> tuple[str, ...]:
    """`model.wide_pooling` -> one pooling per logit (a pair is (CTR, CVR): a head with the CTR
    logit only reads the first); ConfigError for anything else."""
    out = (pooling,) if isinstance(pooling, str) else tuple(pooling)
    require(len(out) in (1, 2) and all(p in WIDE_POOLINGS for p in out), "model.wide_pooling",
            f"a tuple of {' / '.join(map(repr, WIDE_POOLINGS))}: one for every logit or a pair (CTR, CVR)", pooling)
    return out * logits if len(out) == 1 else out[:logits]


def _widths(value: Any, key: str, allow_empty: bool) -> None:
    ok = isinstance(value, tuple | list) and all(is_positive_int(w) for w in value) and (allow_empty or value)
    require(ok, key, "a tuple of positive layer widths" + ("" if allow_empty else " (at least one)"), value)


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Check ``config.model``, ``config.loss`` and ``config.optim``; ConfigError names the bad key."""
    require_present(config, ("model", "loss", "optim"))
    m = config.model
    require_present(m, ("embed_dim", "user_hidden", "context_hidden", "ad_hidden", "tower_dropout", "context_dropout",
                        "fusion", "fusion_hidden", "fusion_dropout", "head", "share_text_encoder", "text", "dtype"),
                    "model")
    require_positive_int(m.embed_dim, "model.embed_dim")
    for key in ("user_hidden", "context_hidden", "ad_hidden"):
        _widths(m[key], f"model.{key}", allow_empty=True)
    _widths(m.fusion_hidden, "model.fusion_hidden", allow_empty=False)
    for key in ("tower_dropout", "context_dropout", "fusion_dropout"):
        require_fraction(m[key], f"model.{key}")
    require_choice(m.fusion, "model.fusion", FUSIONS)
    require_choice(m.head, "model.head", HEADS)
    require_choice(m.dtype, "model.dtype", DTYPES)
    require_choice(m.get("embed_init", "normal"), "model.embed_init", EMBED_INITS)
    require_choice(m.get("tower_output", "relu"), "model.tower_output", TOWER_OUTPUTS)
    require_positive_int(m.get("vocab_multiple", 1), "model.vocab_multiple")
    require_bool(m.share_text_encoder, "model.share_text_encoder")
    require_bool(m.get("wide", False), "model.wide")
    require_choice(m.get("wide_init", "zeros"), "model.wide_init", WIDE_INITS)
    logit_poolings(str_or_tuple(m.get("wide_pooling", ("mean",))), num_logits(m.head))
    if m.get("wide_init", "zeros") == "logistic":  # the ctr head ignores it
        require(m.get("wide", False), "model.wide_init",
                "'zeros' unless model.wide=True ('logistic' fits the wide part's CVR column)", m.wide_init)
    t = m.text
    for key in ("dim", "num_layers", "num_heads", "mlp_dim"):
        require_positive_int(t.get(key), f"model.text.{key}")
    require(t.dim % t.num_heads == 0, "model.text.num_heads", f"a divisor of model.text.dim={t.dim}", t.num_heads)
    require_choice(t.get("positional"), "model.text.positional", ("sinusoidal", "learned"))
    require_choice(t.get("pooling"), "model.text.pooling", ("mean", "cls"))
    require_choice(t.get("norm"), "model.text.norm", ("pre", "post"))
    require_fraction(t.get("dropout"), "model.text.dropout")
    require_choice(t.get("init", "random"), "model.text.init", TEXT_INITS)
    require_choice(t.get("kernel", "xla"), "model.text.kernel", KERNELS)
    if t.get("kernel", "xla") != "xla":
        require(t.norm == "pre", "model.text.norm", f"'pre' with model.text.kernel={t.kernel!r}", t.norm)
        require(t.dropout == 0.0, "model.text.dropout", f"0.0 with model.text.kernel={t.kernel!r} "
                "(the fused layer has no dropout)", t.dropout)

    loss = config.loss
    for key in ("alpha", "beta", "ctr_weight", "cvr_weight"):
        require_number(loss.get(key), f"loss.{key}", allow_zero=True)
    require_number(loss.get("wide_cvr_weight", 0.0), "loss.wide_cvr_weight", allow_zero=True)
    if loss.get("wide_cvr_weight", 0.0):
        require(m.get("wide", False), "loss.wide_cvr_weight",
                "0 unless model.wide=True (it fits the wide part's CVR logit)", loss.wide_cvr_weight)
    require_number(loss.get("temperature"), "loss.temperature")
    require_choice(loss.get("retrieval_positives", "clicks"), "loss.retrieval_positives", RETRIEVAL_POSITIVES)
    require_choice(loss.get("retrieval_kernel", "xla"), "loss.retrieval_kernel", KERNELS)
    for key in ("logq_correction", "l2_normalize"):
        require_bool(loss.get(key), f"loss.{key}")

    o = config.optim
    for key in ("init_lr", "peak_lr", "end_lr"):
        require_number(o.get(key), f"optim.{key}", allow_zero=True)
    warmup = o.get("warmup_steps")
    require(is_int(warmup) and warmup >= 0, "optim.warmup_steps", "a non-negative integer", warmup)
    require_positive_int(o.get("decay_steps"), "optim.decay_steps")
    require_number(o.get("weight_decay"), "optim.weight_decay", allow_zero=True)
    if o.get("embedding_weight_decay") is not None:
        require_number(o.get("embedding_weight_decay"), "optim.embedding_weight_decay", allow_zero=True)
    require_number(o.get("clip_norm"), "optim.clip_norm", allow_zero=True)
    require_number(o.get("wide_lr_multiplier", 1.0), "optim.wide_lr_multiplier")
    require_fraction(o.get("ema_decay", 0.0), "optim.ema_decay", "a decay in [0, 1) (0: no moving average)")
    if o.get("freeze_wide_cvr", False):  # the ctr head ignores it
        require(m.get("wide", False), "optim.freeze_wide_cvr", "false unless model.wide=True", o.freeze_wide_cvr)
    require_positive_int(o.get("accumulation_steps"), "optim.accumulation_steps")
    require_choice(o.get("large_table_optimizer", "adamw"), "optim.large_table_optimizer", LARGE_TABLE_OPTIMIZERS)
    require_bool(o.get("sparse_row_updates", True), "optim.sparse_row_updates")
    if on_sparsecore(config):
        require(o.get("large_table_optimizer", "adamw") == "adagrad", "optim.large_table_optimizer",
                "'adagrad' with sharding.large_table_placement='sparsecore' (SparseCore's optimizer)",
                o.get("large_table_optimizer", "adamw"))
        require(int(o.get("large_table_bytes", 0) or 0) > 0, "optim.large_table_bytes",
                "> 0 with sharding.large_table_placement='sparsecore' (it chooses the tables placed there)",
                o.get("large_table_bytes", 0))
        require_number(o.get("rowwise_initial_accumulator", 0.1), "optim.rowwise_initial_accumulator")
        row_sharded = int(config.sharding.get("large_table_bytes", 0) or 0)
        require(0 < row_sharded <= int(o.get("large_table_bytes", 0) or 0), "sharding.large_table_bytes",
                "> 0 and at most optim.large_table_bytes with sharding.large_table_placement='sparsecore' (its "
                "tables are row-sharded over every chip's SparseCores)", row_sharded)
        require(int(o.accumulation_steps) == 1, "optim.accumulation_steps",
                "1 with sharding.large_table_placement='sparsecore' (the SparseCores update the tables "
                "every step)", o.accumulation_steps)
    elif updates_batch_rows(o):
        require(int(o.accumulation_steps) == 1, "optim.accumulation_steps",
                "1 with optim.sparse_row_updates (each micro-batch has its own rows; set "
                "optim.sparse_row_updates=False to accumulate)", o.accumulation_steps)
