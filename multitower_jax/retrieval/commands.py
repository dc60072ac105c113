"""The retrieval commands behind the CLI: `export`, `index`, `retrieve-eval` (thin wrappers that
resolve configs and paths, so `cli.py` stays a dispatcher)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import ml_collections
from etils import epath

from multitower_jax import config as config_lib
from multitower_jax import run_identity
from multitower_jax.retrieval import settings as settings_lib

COMMANDS = {
    "export": "run the ad tower over the catalogue (and the user tower over known users): writes "
              "embeddings, ad ids, bids, quality, targeting and a manifest to --out",
    "index": "build a ScaNN index (exact search below config.retrieval.exact_below ads) from an export; with "
             "--target-recall R, tune leaves_to_search and the re-ranking budget on held-out queries for the "
             "highest QPS at recall@K >= R against exact search",
    "retrieve-eval": "recall of the index vs exact search, and retrieval hit rates of the model (and, on "
                     "synthetic data, of the oracle) on a split: writes <index>/retrieval_eval.json",
}
RETRIEVAL_KNOBS = ("Knobs: --config.retrieval.<key>=VALUE (num_leaves, leaves_to_search, leaves_fraction, "
                   "training_sample_size, dims_per_block, anisotropic_threshold, soar_lambda, reorder_multiplier, "
                   "min_reorder, "
                   "exact_below, overfetch, exact_eligible_below, rebuild_fraction, auto_rebuild, export_batch_size).")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help=COMMANDS["export"], description=COMMANDS["export"] + ". " + RETRIEVAL_KNOBS)
    p.add_argument("--workdir", required=True, help="a workdir written by `multitower train` (its config.json is used)")
    p.add_argument("--out", required=True, help="output folder (replaced atomically)")
    p.add_argument("--catalogue", default=None, help="ads Parquet: ad_id, bid, every raw ad.<feature>, optional "
                   "quality and target.countries/devices/placements (default <data.dir>/catalogue/ads.parquet)")
    p.add_argument("--users", default=None, help="users Parquet: user_id and every raw user.<feature> (default "
                   "<data.dir>/catalogue/users.parquet if present; '' skips user embeddings)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the best validation "
                   "evaluation's, as `train` tests it, else the latest)")
    p = sub.add_parser("index", help=COMMANDS["index"], description=COMMANDS["index"] + ". " + RETRIEVAL_KNOBS)
    p.add_argument("--embeddings", required=True, help="a folder written by `multitower export`")
    p.add_argument("--out", required=True, help="index folder (replaced atomically)")
    p.add_argument("--workdir", default=None, help="take config.retrieval from this workdir's config.json "
                   "(default: the workdir recorded in the export, if it is there); given, the export must come "
                   "from this workdir's training run")
    p.add_argument("--target-recall", type=_recall, default=None, metavar="R",
                   help="tune the search settings for recall@K >= R (a number in (0, 1]) against exact search, "
                   "on queries of the validation split (the model's E_user + E_context of clicked impressions, "
                   "when the workdir and its data are there; else the export's user embeddings; else a sample "
                   "of ad embeddings); one half tunes, the other measures; the manifest's `tuning` records the "
                   "chosen settings, recall and QPS")
    p.add_argument("--k", type=_at_least(1), default=100, help="with --target-recall: the K of recall@K (default 100)")
    p.add_argument("--tuning-queries", type=_at_least(4), default=2_000, metavar="N",
                   help="with --target-recall: queries drawn for tuning and measuring (default 2000)")
    add_allow_flag(p)
    p = sub.add_parser("retrieve-eval", help=COMMANDS["retrieve-eval"], description=COMMANDS["retrieve-eval"])
    p.add_argument("--workdir", required=True, help="the trained workdir the index was built from")
    p.add_argument("--index", required=True, help="a folder written by `multitower index`")
    p.add_argument("--split", default="test", choices=("train", "validation", "test"))
    p.add_argument("--max-queries", type=int, default=20_000, help="evaluate on at most this many clicked impressions")
    add_allow_flag(p)


def _recall(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a recall in (0, 1], got {text!r}")
    return value


def _at_least(low: int):
    def parse(text: str) -> int:
        try:
            return_value = int(text)
        except ValueError:
            return_value = low - 1
        if return_value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}")
        return return_value
    return parse


def tuning_queries(export_dir: str, manifest: dict, workdir: str | None, overrides, count: int
                   ) -> tuple[Any, str]:
    """Queries to tune an index on: Q = E_user + E_context (the query rule) of clicked validation
    impressions when `workdir` has a checkpoint and data; else the export's user embeddings; else a
    random sample of its ad embeddings. Returns (float32[Q, D], a description)."""
    import numpy as np

    rng = np.random.default_rng(0)
    normalize = bool(manifest["query_rule"]["l2_normalize"])
    if workdir and (epath.Path(workdir) / "config.json").is_file():
        # imported on use: cli.py imports this module to build its parser, before --help
        from multitower_jax.retrieval import evaluate

        trained = _load_trained(workdir, overrides)
        placement = trained.config.data.placements[0]
        q = evaluate.clicked_queries(trained, placement, "validation", max_rows=count)
        Q = (q["e_user"] + q["e_context"]).astype(np.float32)
        source = f"model E_user + E_context of {len(Q):,} clicked validation impressions ({placement})"
    else:
        users = Path(export_dir) / "user_embeddings.npy"
        use_users = manifest.get("num_users", 0) > 0 and users.is_file()
        pool = np.load(users if use_users else Path(export_dir) / "embeddings.npy", mmap_mode="r")
        rows = np.sort(rng.choice(len(pool), min(count, len(pool)), replace=False))
        Q = np.asarray(pool[rows], np.float32)
        source = f"{len(Q):,} exported {'user' if use_users else 'ad'} embeddings (no workdir to embed queries with)"
    if normalize:
        Q = Q / np.maximum(np.linalg.norm(Q, axis=1, keepdims=True), 1e-12)
    return Q, source


def add_allow_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(run_identity.ALLOW_FLAG, action="store_true", help="use artifacts (index, export, calibration, "
                   "scorer) built from another training run than the workdir's (refused by default)")


def _workdir_config(workdir: str | Path, overrides) -> ml_collections.ConfigDict:
    """The workdir's resolved config, its `retrieval` section completed with the defaults (older
    workdirs lack the section or its newer keys, which then take overrides too), plus overrides."""
    config = config_lib.from_json(epath.Path(workdir) / "config.json")
    retrieval = settings_lib.default_config()
    retrieval.update(config.get("retrieval") or {})
    with config.unlocked():
        config.retrieval = retrieval
    config = config_lib.apply_overrides(config, overrides)
    config_lib.validate(config)
    return config


def _load_trained(workdir: str, overrides, step: int | None = None):
    """load_trained with `config.retrieval` present (defaults + overrides), even for older workdirs."""
    # imported on use: cli.py imports this module to build its parser, before --help
    from multitower_jax.inference import load_trained

    config = _workdir_config(workdir, overrides)
    trained = load_trained(workdir, step=step,
                           overrides=tuple(o for o in overrides if not o.startswith("--config.retrieval.")))
    with trained.config.unlocked():
        trained.config.retrieval = config.retrieval
    return trained


def run(args: argparse.Namespace, overrides) -> dict[str, Any]:
    if args.command == "export":
        # imported on use: cli.py imports this module to build its parser, before --help
        from multitower_jax.retrieval import export

        trained = _load_trained(args.workdir, overrides, args.step)
        manifest = export.export(trained, args.out, args.catalogue, args.users)
        print(f"wrote {args.out} ({manifest['num_ads']:,} ads, {manifest['num_users']:,} users)")
        return manifest
    if args.command == "index":
        # imported on use: cli.py imports this module to build its parser, before --help
        from multitower_jax.retrieval import index as index_lib

        manifest = index_lib.read_manifest(args.embeddings, "multitower-export")
        if args.workdir:
            run_identity.check(manifest.get("run"), run_identity.stamp(run_identity.read(args.workdir)),
                               f"export {args.embeddings}", allow_other_run=args.allow_other_run)
        workdir = args.workdir or manifest.get("workdir")
        config = None
        if workdir and (epath.Path(workdir) / "config.json").is_file():
            config = _workdir_config(workdir, overrides)
        elif overrides:
            config = config_lib.apply_overrides(
                ml_collections.ConfigDict({"retrieval": settings_lib.default_config()}), overrides)
        tune = None
        if args.target_recall is not None:
            # imported on use: cli.py imports this module to build its parser, before --help
            from multitower_jax.retrieval import tuning

            queries, source = tuning_queries(args.embeddings, manifest, workdir, overrides, args.tuning_queries)
            tune = lambda index: tuning.tune_index(index, queries, args.k, args.target_recall, source=source)
        settings = settings_lib.RetrievalSettings.from_config(config)
        index = index_lib.build_from_export(args.embeddings, args.out, settings, tune)
        print(f"wrote {args.out} ({len(index):,} ads, {index.mode}, {index.manifest['num_leaves']} leaves, "
              f"{index.manifest['build_seconds']} s)")
        keys = ("mode", "num_leaves", "built_size", "build_seconds", "fingerprint", "tuning")
        return {k: index.manifest[k] for k in keys if k in index.manifest}
    if args.command == "retrieve-eval":
        # imported on use: cli.py imports this module to build its parser, before --help
        from multitower_jax.retrieval import evaluate
        from multitower_jax.retrieval import index as index_lib

        trained = _load_trained(args.workdir, overrides)
        settings = None
        explicit = [o for o in overrides if o.startswith("--config.retrieval.")]
        if explicit:  # search-time knobs: the index's own settings with these changed
            built = index_lib.read_manifest(args.index, "multitower-index")["settings"]
            settings = settings_lib.RetrievalSettings.from_config(config_lib.apply_overrides(
                ml_collections.ConfigDict({"retrieval": built}), explicit))
        return evaluate.evaluate(trained, args.index, args.split, max_queries=args.max_queries, settings=settings,
                                 allow_other_run=args.allow_other_run)
    raise ValueError(f"not a retrieval command: {args.command}")
