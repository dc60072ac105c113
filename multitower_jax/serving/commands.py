"""The serving commands behind the CLI: `rank` and `export-scorer` (thin wrappers; `cli.py` dispatches)."""

from __future__ import annotations

import argparse
from typing import Any

from multitower_jax.retrieval.commands import add_allow_flag
from multitower_jax.serving.settings import ServingConfigError

COMMANDS = {
    "rank": "answer one ranking request from the command line: user embedding -> context tower -> retrieve K "
            "-> calibrated scoring -> eCPM ranking -> top-N (prints the answer as JSON)",
    "export-scorer": "write the calibrated scoring function as a serialized jax.export artifact + manifest "
                     "(runs with jax and numpy only: no model code, no config)",
}
SERVING_KNOBS = ("Knobs: --config.serving.<key>=VALUE (buckets, num_candidates, top_n, objective=ecpm|weighted, "
                 "ctr_weight, cvr_weight, cache_ttl_s, cache_size, max_batch_size, max_wait_ms).")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("rank", help=COMMANDS["rank"], description=COMMANDS["rank"] + ". " + SERVING_KNOBS)
    p.add_argument("--workdir", required=True, help="a workdir written by `multitower train` (calibrated or not)")
    p.add_argument("--index", required=True, help="a folder written by `multitower index`")
    p.add_argument("--request", required=True, help="request JSON (format: experiments/requests/search.json)")
    p.add_argument("--users", default=None, help="users Parquet to look up a user_id's raw features on a cache "
                   "miss (default <data.dir>/catalogue/users.parquet if present)")
    add_allow_flag(p)
    p = sub.add_parser("export-scorer", help=COMMANDS["export-scorer"],
                       description=COMMANDS["export-scorer"] + ". " + SERVING_KNOBS)
    p.add_argument("--workdir", required=True, help="a workdir written by `multitower train` (its calibration.json "
                   "is baked in when present)")
    p.add_argument("--out", required=True, help="output folder (replaced atomically)")
    p.add_argument("--platforms", default=None, help="comma-separated platforms to lower for, e.g. cpu,cuda "
                   "(default: this machine's)")
    add_allow_flag(p)


def user_errors() -> tuple[type[Exception], ...]:
    # imported on use: cli.py imports this module to build its parser, before --help
    from multitower_jax.serving.portable import PortableScorerError
    from multitower_jax.serving.requests import RequestError

    return (RequestError, PortableScorerError)


def run(args: argparse.Namespace, overrides) -> dict[str, Any]:
    bad = [o for o in overrides if not o.startswith("--config.serving.")]
    if bad:
        raise ServingConfigError(f"`multitower {args.command}` takes only --config.serving.* overrides, got {bad}")
    if args.command == "rank":
        # imported on use: cli.py imports this module to build its parser, before --help
        from multitower_jax.serving import requests as requests_lib
        from multitower_jax.serving.ranker import Ranker

        ranker = Ranker.load(args.workdir, args.index, tuple(overrides), args.users,
                             allow_other_run=args.allow_other_run)
        try:
            request = requests_lib.load(args.request, ranker.placements, ranker.settings.top_n)
            return ranker.rank(request)
        finally:
            ranker.close()
    if args.command == "export-scorer":
        # imported on use: cli.py imports this module to build its parser, before --help
        from multitower_jax.serving.portable_export import export_scorer

        platforms = tuple(p.strip() for p in args.platforms.split(",")) if args.platforms else None
        manifest = export_scorer(args.workdir, args.out, tuple(overrides), platforms,
                                 allow_other_run=args.allow_other_run)
        print(f"wrote {args.out} (placements {list(manifest['placements'])}, top_n {manifest['top_n']}, "
              f"buckets {manifest['buckets']})")
        return {k: v for k, v in manifest.items() if k != "calibration"}
    raise ValueError(f"not a serving command: {args.command}")
