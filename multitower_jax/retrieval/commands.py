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
    "index": "build a ScaNN index (exact search below config.retrieval.exact_below ads) from an export",
    "retrieve-eval": "recall of the index vs exact search, and retrieval hit rates of the model (and, on "
                     "synthetic data, of the oracle) on a split: writes <index>/retrieval_eval.json",
}
RETRIEVAL_KNOBS = ("Knobs: --config.retrieval.<key>=VALUE (num_leaves, leaves_to_search, leaves_fraction, "
                   "training_sample_size, dims_per_block, anisotropic_threshold, reorder_multiplier, min_reorder, "
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
    add_allow_flag(p)
    p = sub.add_parser("retrieve-eval", help=COMMANDS["retrieve-eval"], description=COMMANDS["retrieve-eval"])
    p.add_argument("--workdir", required=True, help="the trained workdir the index was built from")
    p.add_argument("--index", required=True, help="a folder written by `multitower index`")
    p.add_argument("--split", default="test", choices=("train", "validation", "test"))
    p.add_argument("--max-queries", type=int, default=20_000, help="evaluate on at most this many clicked impressions")
    add_allow_flag(p)


def add_allow_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(run_identity.ALLOW_FLAG, action="store_true", help="use artifacts (index, export, calibration, "
                   "scorer) built from another training run than the workdir's (refused by default)")


def _workdir_config(workdir: str | Path, overrides) -> ml_collections.ConfigDict:
    """The workdir's resolved config with `retrieval` defaults (older workdirs lack it), plus overrides."""
    config = config_lib.from_json(epath.Path(workdir) / "config.json")
    if "retrieval" not in config:
        with config.unlocked():
            config.retrieval = settings_lib.default_config()
    config = config_lib.apply_overrides(config, overrides)
    config_lib.validate(config)
    return config


def _load_trained(workdir: str, overrides, step: int | None = None):
    """load_trained with `config.retrieval` present (defaults + overrides), even for older workdirs."""
    from multitower_jax.inference import load_trained

    config = _workdir_config(workdir, overrides)
    trained = load_trained(workdir, step=step,
                           overrides=tuple(o for o in overrides if not o.startswith("--config.retrieval.")))
    with trained.config.unlocked():
        trained.config.retrieval = config.retrieval
    return trained


def run(args: argparse.Namespace, overrides) -> dict[str, Any]:
    from multitower_jax.retrieval.settings import RetrievalSettings

    if args.command == "export":
        from multitower_jax.retrieval import export

        trained = _load_trained(args.workdir, overrides, args.step)
        manifest = export.export(trained, args.out, args.catalogue, args.users)
        print(f"wrote {args.out} ({manifest['num_ads']:,} ads, {manifest['num_users']:,} users)")
        return manifest
    if args.command == "index":
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
        index = index_lib.build_from_export(args.embeddings, args.out, RetrievalSettings.from_config(config))
        print(f"wrote {args.out} ({len(index):,} ads, {index.mode}, {index.manifest['num_leaves']} leaves, "
              f"{index.manifest['build_seconds']} s)")
        return {k: index.manifest[k] for k in ("mode", "num_leaves", "built_size", "build_seconds", "fingerprint")}
    if args.command == "retrieve-eval":
        from multitower_jax.retrieval import evaluate

        from multitower_jax.retrieval import index as index_lib

        trained = _load_trained(args.workdir, overrides)
        settings = None
        explicit = [o for o in overrides if o.startswith("--config.retrieval.")]
        if explicit:  # search-time knobs: the index's own settings with these changed
            built = index_lib.read_manifest(args.index, "multitower-index")["settings"]
            settings = RetrievalSettings.from_config(config_lib.apply_overrides(
                ml_collections.ConfigDict({"retrieval": built}), explicit))
        return evaluate.evaluate(trained, args.index, args.split, max_queries=args.max_queries, settings=settings,
                                 allow_other_run=args.allow_other_run)
    raise ValueError(f"not a retrieval command: {args.command}")
