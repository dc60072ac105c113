"""The `multitower` command line: parse flags, log devices, call the library. Nothing else lives here."""

from __future__ import annotations

import argparse
import json
import sys

from multitower_jax import distributed, hostmem
from multitower_jax.retrieval import commands as retrieval_commands  # export, index, retrieve-eval
from multitower_jax.serving import commands as serving_commands  # rank, export-scorer

COMMANDS = {
    "generate": "write the built-in synthetic world (TFDS ArrayRecord splits + catalogues)",
    "ingest": "turn your impression logs (Parquet / CSV / JSONL) into TFDS ArrayRecord splits",
    "train": "train the model (resumes from the workdir's latest checkpoint), then evaluate on test",
    "evaluate": "evaluate a trained workdir on a split: writes <workdir>/eval_<split>.json (and prints the model "
                "next to the baselines when <workdir>/eval_baseline.json is there)",
    "baseline": "fit the built-in baselines (per-id smoothed rates, logistic regression on hashed ids, words and "
                "crosses, LightGBM trees when installed) on the workdir's train split, tune them on validation, "
                "score a split: writes <workdir>/eval_baseline.json with eval_test.json's keys",
    "calibrate": "fit calibrators per head on validation, report ECE / log loss / AUC before and after on "
                 "test: writes <workdir>/calibration.json, calibration_report.json, reliability_<head>.png",
    "bench": "benchmarks: `bench input` (input pipeline examples/s), `bench train` (step examples/s, fraction of peak), "
             "`bench rows` (train step ms with the row-wise Adagrad tables updated through the batch's rows against "
             "the plain step, interleaved; needs a config that gives tables row-wise Adagrad), "
             "`bench score` (scorer p50/p99 for 500 candidates, micro-batched requests/s), `bench serve` (whole "
             "request p50/p99 over a --num-ads index, K=500, top-20), `bench ceiling` (oracle AUC without each latent term "
             "no feature reveals, and with the user bias and ad quality inferred from the train split: what the "
             "synthetic world lets a model reach), `bench report` (every bench above, each in its own process: one "
             "Markdown table and one JSON with each bench's date, machine, CPU model and load average)",
    "compile": "compile the train step, eval step and scorer for the config's TPU topology on this machine "
               "(needs the tpu extra): per-chip HBM, FLOPs, collectives and a roofline step-time estimate",
}
BENCHES = ("input", "train", "rows", "retrieve", "score", "serve", "ceiling", "report")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="multitower",
        description="Multi-tower CTR/CVR ads model in JAX. Commands that start from an experiment take "
                    "--config FILE (a config file in any folder); commands on a trained workdir read its "
                    "config.json. Both take overrides like --config.data.batch_size=4096.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name, **kw):
        p = sub.add_parser(name, help=COMMANDS[name], description=COMMANDS[name], **kw)
        p.add_argument("--config", required=True, help="experiment file, e.g. experiments/quickstart.py")
        return p

    p = add("generate")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--out", help="folder for the datasets (becomes config.data.dir)")
    where.add_argument("--as-logs", metavar="DIR", help="instead, write the world as raw logs a user brings: "
                       "DIR/impressions.csv (config.data.logs.placement, every split), ads.parquet and users.parquet "
                       "(the catalogues), request.json (a rank request) and config.py (the config with "
                       "config.data.logs set for them), for `multitower ingest --config DIR/config.py`")
    p = add("ingest")
    p.add_argument("--out", required=True, help="folder for the datasets (becomes config.data.dir)")
    p = add("train")
    p.add_argument("--workdir", required=True,
                   help="checkpoints, metrics.jsonl, tensorboard/, eval_test.json (a folder or gs://bucket/path)")
    p.add_argument("--seeds", default=None,
                   help="e.g. 0,1,2: one run per seed in <workdir>/seed_<s> with config.seed and config.data.shuffle_seed "
                        "set to s (init, dropout, batch order and downsampling vary; the data is the same, generated "
                        "once into <workdir>/data when config.data.dir is empty), then <workdir>/seeds_summary.json: "
                        "each metric's mean, std, min, max and spread over the seeds")
    distributed.add_flags(p)
    p = sub.add_parser("evaluate", help=COMMANDS["evaluate"], description=COMMANDS["evaluate"])
    p.add_argument("--workdir", required=True, help="a workdir written by `multitower train`")
    p.add_argument("--split", default="test", choices=("train", "validation", "test"))
    p.add_argument("--predictions", default=None, help="also write one row per impression to this Parquet file")
    retrieval_commands.add_allow_flag(p)
    distributed.add_flags(p)
    p = sub.add_parser("baseline", help=COMMANDS["baseline"], description=COMMANDS["baseline"] + ". Settings: "
                       "--config.baselines.* (run=('rates','lr','gbdt'), lr.C, gbdt.max_train_rows, ...)")
    p.add_argument("--workdir", required=True, help="a workdir with config.json (from train), or a folder written by "
                   "generate / ingest; eval_baseline.json is written into it")
    p.add_argument("--split", default="test", choices=("validation", "test"))
    p.add_argument("--config", default=None, help="an experiment file to use instead of <workdir>/config.json")
    p = sub.add_parser("calibrate", help=COMMANDS["calibrate"], description=COMMANDS["calibrate"] + ". Methods "
                       "and bins: --config.calibration.ctr=isotonic|platt|temperature|identity, .cvr=..., "
                       ".ctcvr=product|..., .ece_bins=15")
    p.add_argument("--workdir", required=True, help="a workdir written by `multitower train` (written into)")
    distributed.add_flags(p)
    retrieval_commands.add_parsers(sub)
    serving_commands.add_parsers(sub)
    p = add("bench")
    p.add_argument("what", choices=BENCHES, help="what to benchmark")
    p.add_argument("--workdir", default="runs/bench", help="where data and statistics are kept")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    p.add_argument("--num-ads", type=int, default=1_000_000, help="bench retrieve, bench serve: catalogue size")
    p.add_argument("--dim", type=int, default=128, help="bench retrieve: embedding dimension")
    p.add_argument("--queries", type=int, default=2_000, help="bench retrieve: number of queries; bench score, "
                   "bench serve: number of timed requests")
    p.add_argument("--benches", default=None, help="bench report: which benches, comma-separated (default: "
                   "input,train,retrieve,score,serve,ceiling). --num-ads and --queries size retrieve, score and serve "
                   "only when given; otherwise each runs at its default size; --json writes the report's JSON")
    p.add_argument("--markdown", default=None, help="bench report: also write the Markdown table to this file")
    p.add_argument("--readme", default=None, help="bench report: replace the generated table in this README "
                   "(between its '<!-- bench report: begin ... -->' and '<!-- bench report: end -->' lines)")
    p.add_argument("--data", choices=("structured", "hard"), default="structured", help="bench retrieve: the "
                   "synthetic set (hard: 10k Zipf-popular centres plus noise of the centres' energy)")
    p.add_argument("--embeddings", default=None, metavar="E", help="bench retrieve: a `multitower export` folder "
                   "to benchmark on instead (its ads; its user embeddings as queries)")
    p = add("compile")
    p.add_argument("--topology", default=None, help="TPU topology, e.g. v5e:2x2, v5:4x4x4 (v5p), v6e:4x8 "
                   "(default: config.tpu.topology)")
    p.add_argument("--num-slices", type=int, default=None, help="slices (default: config.tpu.num_slices or 1)")
    p.add_argument("--json", default=None, help="also write the report to this JSON file")
    return parser


def _user_errors() -> tuple[type[Exception], ...]:
    # imported when an error is caught: `multitower --help` and the parser stay free of JAX
    from multitower_jax.config import ConfigError
    from multitower_jax.run_identity import RunMismatchError
    from multitower_jax.workdir import WorkdirError
    from multitower_jax.data.logs import LogError
    from multitower_jax.data.preprocess import StatsError
    from multitower_jax.baselines import BaselineError
    from multitower_jax.features import SpecError
    from multitower_jax.data.catalogue_columns import CatalogueError
    from multitower_jax.retrieval.index import IndexMismatchError
    from multitower_jax.retrieval.targeting import TargetingError
    from multitower_jax.calibration import CalibrationError
    from multitower_jax.serving.commands import user_errors as serving_errors
    from multitower_jax.train.aot import CompileError
    from multitower_jax.train.checkpoint_fallback import CheckpointError

    return (ConfigError, LogError, BaselineError, StatsError, SpecError, CalibrationError, distributed.DistributedError,
            IndexMismatchError, CatalogueError, CompileError, CheckpointError, RunMismatchError, WorkdirError,
            TargetingError, *serving_errors(), FileNotFoundError, FileExistsError)


def _log_devices() -> None:
    import jax

    print(f"JAX {jax.__version__}: process {jax.process_index()} of {jax.process_count()}, "
          f"{jax.local_device_count()} local / {jax.device_count()} global {jax.devices()[0].platform} devices")


def entry() -> int:
    """The `multitower` program: first re-executes itself with glibc's malloc set to keep freed
    memory (see `hostmem`: a third of a CPU training step was page faults; CPU backend only),
    then `main`. Without an accelerator, JAX is told to use the CPU (no libtpu probing)."""
    hostmem.prefer_cpu_without_accelerator()
    hostmem.reexec_with_retained_memory()
    return main()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args, rest = _parser().parse_known_args(argv)
    bad = [a for a in rest if not a.startswith("--config.")]
    if bad:
        _parser().error(f"unrecognized arguments: {' '.join(bad)}")

    if args.command in ("train", "evaluate", "calibrate"):  # join the other processes before any JAX work
        try:
            distributed.initialize(distributed.settings_from(args))
        except distributed.DistributedError as e:
            print(f"multitower: {e}", file=sys.stderr)
            return 2

    from multitower_jax import config as config_lib  # heavy imports after --help

    try:  # each command imports its modules when it runs (start-up time)
        if args.command == "evaluate":  # the workdir's resolved config, plus overrides
            config = config_lib.apply_overrides(config_lib.from_json(f"{args.workdir}/config.json"), rest)
            config_lib.validate(config)
        elif args.command == "calibrate":  # the workdir's config with calibration defaults, plus overrides
            from multitower_jax.calibration import workflow

            config = workflow.workdir_config(args.workdir, rest)
        elif args.command == "baseline":  # the workdir's config (or --config) with the baselines section
            from multitower_jax.baselines import settings as baseline_settings

            config = baseline_settings.baseline_config(args.workdir, args.config, rest)
        elif args.command in ("export", "index", "retrieve-eval", "rank", "export-scorer"):
            config = None  # they read the workdir's (or the export's) config themselves
        else:
            config = config_lib.load(args.config, rest)
    except (config_lib.ConfigError, FileNotFoundError) as e:
        print(f"multitower: {e}", file=sys.stderr)
        return 2

    try:
        if args.command == "generate" and args.as_logs:
            from multitower_jax.data.as_logs import as_logs_command

            as_logs_command(config, args.config, args.as_logs)
        elif args.command == "generate":
            from multitower_jax.data.generate import generate_command

            generate_command(config, args.out)
        elif args.command == "ingest":
            from multitower_jax.data.logs import ingest_command

            ingest_command(config, args.out)
        elif args.command == "train" and args.seeds:
            from multitower_jax.train import seeds

            _log_devices()
            summary = seeds.train_seeds(config, args.workdir, seeds.parse_seeds(args.seeds))
            if "metrics" in summary:
                print(seeds.table(summary))
                print(f"wrote {args.workdir}/{seeds.SUMMARY_FILE}")
            else:  # a run was stopped by a signal
                print(json.dumps(summary, indent=2))
        elif args.command == "train":
            from multitower_jax.train import loop

            _log_devices()
            result = loop.train(config, args.workdir)
            print(json.dumps(result, indent=2))
            print(f"metrics: {args.workdir}/metrics.jsonl, {args.workdir}/eval_test.json, "
                  f"tensorboard --logdir {args.workdir}/tensorboard")
        elif args.command == "evaluate":
            from multitower_jax.train import loop

            result = loop.evaluate_workdir(config, args.workdir, args.split, args.predictions,
                                           allow_other_run=args.allow_other_run)
            print(json.dumps(result, indent=2))
            from multitower_jax.baselines import report as baseline_report

            table = baseline_report.comparison(result, args.workdir, args.split)
            if table:
                print(table, file=sys.stderr)
        elif args.command == "baseline":
            from multitower_jax.baselines import commands as baseline_commands

            report = baseline_commands.run(config, args.workdir, args.split)
            print(baseline_commands.summary(report))
            print(f"wrote {args.workdir}/{baseline_commands.RESULT_FILE} ({report['seconds']:.0f} s)")
        elif args.command == "calibrate":
            result = workflow.calibrate_workdir(config, args.workdir)
            print(json.dumps(result, indent=2))
        elif args.command in ("export", "index", "retrieve-eval"):
            from multitower_jax.retrieval import commands as retrieval_commands

            print(json.dumps(retrieval_commands.run(args, rest), indent=2))
        elif args.command in ("rank", "export-scorer"):
            from multitower_jax.serving import commands as serving_commands

            print(json.dumps(serving_commands.run(args, rest), indent=2))
        elif args.command == "bench" and args.what in ("score", "serve"):
            from multitower_jax.bench import score as bench_score
            from multitower_jax.bench import serve as bench_serve

            _log_devices()
            if args.what == "score":
                bench_score.run(config, args.queries, args.json)
            else:
                bench_serve.run(config, args.num_ads, args.queries, args.json)
        elif args.command == "bench" and args.what == "retrieve":
            from multitower_jax.bench import retrieve as bench_retrieve

            bench_retrieve.run(config, args.num_ads, args.dim, args.queries, args.json, data=args.data,
                               embeddings=args.embeddings)
        elif args.command == "bench" and args.what == "input":
            from multitower_jax.bench import input as bench_input

            bench_input.run(config, args.workdir, args.json)
        elif args.command == "bench" and args.what == "train":
            from multitower_jax.bench import train as bench_train

            _log_devices()
            bench_train.run(config, args.json)
        elif args.command == "bench" and args.what == "rows":
            from multitower_jax.bench import row_updates as bench_rows

            _log_devices()
            bench_rows.run(config, args.json)
        elif args.command == "compile":
            from multitower_jax.train import aot

            aot.run(config, args.topology, args.num_slices, args.json)
        elif args.command == "bench" and args.what == "report":
            from multitower_jax.bench import reporting as bench_report

            def given(flag: str, value):  # only flags on the command line size the benches
                return value if any(a == flag or a.startswith(flag + "=") for a in argv) else None

            try:
                bench_report.run(args.config, rest, args.benches, given("--num-ads", args.num_ads),
                                 given("--queries", args.queries), given("--workdir", args.workdir), args.json,
                                 args.markdown, args.readme)
            except bench_report.ReportError as e:
                print(f"multitower: {e}", file=sys.stderr)
                return 2
        elif args.command == "bench" and args.what == "ceiling":
            from multitower_jax.bench import ceiling as bench_ceiling

            bench_ceiling.run(config, args.json)
    except _user_errors() as e:  # bad input, not a bug: the message names the file, row or key
        print(f"multitower: {e}", file=sys.stderr)
        return 2
    return 0
