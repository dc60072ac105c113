"""Shared base of every experiment: the seeds' features, the synthetic world and the input pipeline.

Experiments import this file and change a few fields:

    from experiments import base   # or load it by path
    def get_config():
        config = base.get_config()
        config.data.batch_size = 4096
        return config
"""

import ml_collections

from multitower_jax import calibration_settings, features
from multitower_jax.retrieval import settings as retrieval_settings
from multitower_jax.serving import settings as serving_settings


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0

    config.data = ml_collections.ConfigDict()
    config.data.source = "synthetic"  # or "logs" (Parquet / CSV / JSONL impression logs)
    # "explicit": rows are impressions, clicked or not. "implicit": every row is an interaction (a
    # positive; the logs need no click / conversion columns), the towers train by the retrieval
    # loss alone (loss.alpha 0, retrieval_positives "impressions") and early stopping watches a
    # retrieval hit rate: experiments/implicit_feedback.py.
    config.data.feedback = "explicit"
    config.data.dir = ""  # where `multitower generate` / `multitower ingest` wrote the TFDS data
    config.data.placements = ("search",)
    config.data.block_size = 256  # impressions per ArrayRecord record (columnar blocks)
    config.data.batch_size = 1024  # global batch, split over JAX processes
    config.data.eval_batch_size = 4096
    config.data.shuffle_seed = 0
    # The train stream is cut into this many shards (block i goes to shard i % num_shards), each
    # read by one process; 0 = one per process. Fix it (to a multiple of every process count you
    # will use) and a run gets the same global batches on any number of hosts.
    config.data.num_shards = 0
    # grain threads reading and preprocessing blocks. 0 (read in the training loop) is fastest on a
    # small host: the work is Python-bound, and async dispatch overlaps it with the device step.
    config.data.reader_threads = 0
    # Keep this fraction of non-clicked impressions in training; the kept ones get weight
    # 1 / rate so the weighted click rate stays unbiased.
    config.data.negative_downsample_rate = 1.0
    config.data.importance_weights = True
    config.data.logs = ml_collections.ConfigDict()
    config.data.logs.paths = ()  # files or globs
    config.data.logs.format = "auto"  # auto | parquet | csv | jsonl
    config.data.logs.placement = "search"  # the placement these logs were served on
    # Our column name (e.g. "user.age_bucket", "click") -> the column in your files.
    config.data.logs.columns = ml_collections.ConfigDict()
    config.data.logs.time_column = "timestamp"
    config.data.logs.validation_start = ""  # rows with time >= this go to validation ...
    config.data.logs.test_start = ""  # ... and >= this to test (ISO date or epoch seconds)
    # Or, instead of paths + validation_start / test_start, files (or globs) per split:
    config.data.logs.split_paths = ml_collections.ConfigDict({"train": (), "validation": (), "test": ()})

    config.synthetic = ml_collections.ConfigDict()
    config.synthetic.seed = 0
    config.synthetic.num_users = 50_000
    config.synthetic.num_ads = 10_000
    config.synthetic.num_advertisers = 1_000
    config.synthetic.num_topics = 100  # latent topics, nested in 30 categories / industries
    config.synthetic.ad_popularity_exponent = 1.0  # Zipf exponent of how often ads are shown
    config.synthetic.impressions = ml_collections.ConfigDict(
        dict(train=2_000_000, validation=200_000, test=200_000))

    config.features = features.default_features()

    # The model (seeds, sections 2-3). Tower widths list the hidden layers; every tower ends
    # in an embed_dim-wide Dense -> LayerNorm -> ReLU -> Dropout block.
    config.model = ml_collections.ConfigDict()
    config.model.embed_dim = 128  # E_user, E_context, E_ad
    config.model.user_hidden = (256,)  # 400 -> 256 -> 128
    config.model.context_hidden = ()  # concat -> 128 (Dense -> LayerNorm)
    config.model.ad_hidden = (256,)  # ~512 -> 256 -> 128
    config.model.tower_dropout = 0.2  # user and ad towers
    config.model.context_dropout = 0.0
    config.model.fusion = "dot"  # "concat" (pattern A) | "dot" (pattern B: + pairwise dot products)
    config.model.fusion_hidden = (256, 128, 64)
    config.model.fusion_dropout = 0.3
    config.model.head = "esmm"  # "ctr" | "ctr_cvr" | "esmm"
    config.model.share_text_encoder = True  # one encoder for query and ad text, or one per tower
    config.model.dtype = "float32"  # compute dtype ("bfloat16" on TPU); parameters stay float32
    config.model.vocab_multiple = 1  # pad embedding-table rows to a multiple (of mesh.model, to shard them)
    config.model.embed_init = "normal"  # embedding rows N(0, 1) per element, or "unit" (row norm ~1)
    config.model.tower_output = "relu"  # towers end Dense -> LayerNorm -> ReLU, or "layernorm" (both signs)
    config.model.wide = False  # wide logit offsets, linear in the context features (models/wide.py)
    # How the wide part pools a text's tokens / a multi-hot's items: "mean" or "sum", for every
    # logit (one entry) or per logit (CTR, CVR), e.g. ("mean", "sum").
    config.model.wide_pooling = ("mean",)
    config.model.wide_init = "zeros"  # "logistic": the wide CVR column starts at a fitted LR (train/wide_init.py)
    config.model.text = ml_collections.ConfigDict()
    config.model.text.dim = 128
    config.model.text.num_layers = 2
    config.model.text.num_heads = 8
    config.model.text.mlp_dim = 512
    config.model.text.positional = "sinusoidal"  # or "learned"
    config.model.text.pooling = "mean"  # or "cls" (a [CLS] token is prepended)
    # "pallas": each layer is one fused Pallas kernel on TPUs (models/fused_encoder.py; needs
    # norm "pre" and dropout 0); "xla" everywhere else.
    config.model.text.kernel = "xla"
    config.model.text.norm = "pre"  # LayerNorm before ("pre") or after ("post") each sublayer
    config.model.text.dropout = 0.1
    # "lsa": the token table starts from LSA of the train split's texts (train/text_init.py), or "random"
    config.model.text.init = "random"

    # loss = alpha * ranking + beta * retrieval (in-batch sampled softmax over Q = E_user + E_context).
    config.loss = ml_collections.ConfigDict()
    config.loss.alpha = 1.0
    config.loss.beta = 0.5
    config.loss.temperature = 0.05  # retrieval logits are similarity / temperature
    config.loss.l2_normalize = True  # cosine similarity (export and index normalized vectors then)
    # subtract log q(ad) from in-batch candidates' logits; q is the ad's share of the batch's stream:
    # its placement's train rows after negative downsampling (FeatureStats.ad_log_q)
    config.loss.logq_correction = True
    config.loss.ctr_weight = 0.7  # head "ctr_cvr": 0.7 * BCE(click) + 0.3 * BCE(conversion | click)
    config.loss.cvr_weight = 0.3
    config.loss.retrieval_positives = "clicks"  # or "impressions": every shown ad is its row's positive
    config.loss.wide_cvr_weight = 0.0  # model.wide: BCE(the wide CVR logit, conversion | click)
    # "pallas": the in-batch softmax by Pallas kernels on TPUs, its logits never written to HBM
    # (train/fused_softmax.py); "xla" everywhere else.
    config.loss.retrieval_kernel = "xla"

    # AdamW, linear warm-up init_lr -> peak_lr, then cosine decay to end_lr over decay_steps.
    config.optim = ml_collections.ConfigDict()
    config.optim.init_lr = 1e-6
    config.optim.peak_lr = 1e-4
    config.optim.end_lr = 1e-5
    config.optim.warmup_steps = 10_000
    config.optim.decay_steps = 1_000_000  # after the warm-up; counted in optimizer updates
    config.optim.weight_decay = 1e-5  # not on biases and LayerNorm parameters
    # Decoupled weight decay of the embedding tables; None: the same as weight_decay.
    config.optim.embedding_weight_decay = ml_collections.config_dict.placeholder(float)
    config.optim.clip_norm = 1.0  # global gradient norm; 0 disables clipping
    config.optim.wide_lr_multiplier = 1.0  # the wide part's (model.wide) updates, relative to the rest
    config.optim.freeze_wide_cvr = False  # true: the wide CVR column keeps its start (model.wide_init)
    # > 0: the run also keeps an exponential moving average of the parameters (Polyak averaging,
    # updated every step with decay min(ema_decay, (1 + step) / (10 + step))), and evaluates,
    # keeps as best, exports and serves it instead of the last step's parameters.
    config.optim.ema_decay = 0.0
    config.optim.accumulation_steps = 1  # > 1: one update every k micro-batches (optax.MultiSteps)
    # Embedding tables of at least large_table_bytes (0: none) may take row-wise Adagrad instead of
    # AdamW (train/optim.py): one accumulator per row, only the batch's rows move, no weight decay;
    # its peak rate is rowwise_learning_rate, on the same warm-up and cosine decay. "adagrad" is
    # the same with one accumulator per element (SparseCore's optimizer; sharding.large_table_placement).
    config.optim.large_table_optimizer = "adamw"  # or "rowwise_adagrad" or "adagrad"
    config.optim.large_table_bytes = 0
    config.optim.rowwise_learning_rate = 0.05
    config.optim.rowwise_initial_accumulator = 0.1
    # With row-wise Adagrad: the train step differentiates the large tables through the batch's
    # rows only (train/batch_rows.py) and updates only those rows and accumulators, instead of a
    # table-sized gradient and a pass over every row (the same result; needs accumulation_steps 1).
    config.optim.sparse_row_updates = True

    config.train = ml_collections.ConfigDict()
    config.train.num_steps = 20_000
    config.train.log_every = 50
    config.train.eval_every = 2_000  # evaluate on the validation split every N steps
    config.train.patience = 3  # early stopping: evaluations without a validation CTR AUC gain
    config.train.min_delta = 1e-4
    # What early stopping watches on the validation split: "ctr_auc", "ctcvr_auc", or the towers'
    # in-split retrieval "hit_rate_at_10" / "hit_rate_at_100" (train/evaluate.py: retrieval_report).
    config.train.early_stopping_metric = "ctr_auc"
    config.train.checkpoint_every = 2_000
    config.train.keep_checkpoints = 2
    config.train.rng_impl = "rbg"  # PRNG for dropout: "rbg" (fast everywhere) or "threefry2x32"

    # Mesh ("data", "model"); data = -1 takes every device. Logical parameter axes -> mesh
    # axes (None = replicated): ("vocab", "model") shards every embedding table row-wise over
    # the "model" devices (set model.vocab_multiple to a multiple of mesh.model, e.g. 128);
    # dense layers stay replicated unless their axes get a rule too.
    config.mesh = ml_collections.ConfigDict(dict(data=-1, model=1))
    config.sharding = ml_collections.ConfigDict()
    config.sharding.rules = (("vocab", None), ("embed", None), ("embed_in", None), ("mlp", None),
                             ("heads", None), ("kv", None), ("pos", None))
    # Embedding tables of at least large_table_bytes (0: none) are row-sharded over every device
    # whatever the rules say (train/sharding.py), and lie in device memory as
    # large_table_layout says: "default" (the backend's choice), "row_major" or "column_major".
    config.sharding.large_table_bytes = 0
    config.sharding.large_table_layout = "default"
    # Where optim.large_table_bytes' tables live (train/sparsecore.py): "tensorcore" (HBM, XLA's
    # lookups) or "sparsecore": on the SparseCores of a v5p / v6e, in their MOD-sharded row
    # order, looked up and updated (optim.large_table_optimizer="adagrad") by jax-tpu-embedding
    # (sparsecore_kernel "tpu"), or by the same arithmetic in XLA on any backend ("reference",
    # which emulates sparsecores_per_chip SparseCores per chip).
    config.sharding.large_table_placement = "tensorcore"
    config.sharding.sparsecore_kernel = "tpu"
    config.sharding.sparsecores_per_chip = 4
    # Ids one SparseCore may send to one other's shard per step; 0: all of its share of the batch
    # (always enough). jax-tpu-embedding sizes its programs by it: XLA estimates pod_v5p's
    # SparseCore part at 4.0 GB per chip with 0 (264), 1.23 GB with 64 and 0.43 GB with 8. A batch
    # over it stops the run with an error (ids are never dropped); the train log's
    # sparsecore_max_ids_per_shard is the most a run has seen.
    config.sharding.sparsecore_max_ids_per_partition = 0

    # Serving (multitower rank / export-scorer / bench score|serve): candidate buckets, K, top-N,
    # objective, user-embedding cache and micro-batching; see multitower_jax/serving/settings.py.
    config.serving = serving_settings.defaults()

    # Calibration (multitower calibrate), per head: "isotonic" | "platt" | "temperature" | "identity"
    # (ctcvr also "product" = calibrated pCTR x pCVR), ECE bins, output clipping;
    # see multitower_jax/calibration_settings.py.
    config.calibration = calibration_settings.default_config()
    # Export, ScaNN index and targeting-aware retrieval (multitower export / index / retrieve-eval);
    # see multitower_jax/retrieval/settings.py.
    config.retrieval = retrieval_settings.default_config()
    return config
