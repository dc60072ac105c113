"""A workdir no command can break (issue 15, part 3): run identity on every artifact, resume
guards, dataset commands that refuse a workdir, absolute paths, checkpoint fallback, the reports
of `evaluate`, empty catalogues, and errors that name the line or the key."""

import json
import shutil
import warnings

import numpy as np
import pyarrow.parquet as pq
import pytest

from multitower_jax import calibration, cli, run_identity
from multitower_jax import workdir as workdir_lib
from multitower_jax.data import logs
from multitower_jax.inference import load_trained
from multitower_jax.retrieval import export as export_lib
from multitower_jax.retrieval import index as index_lib
from multitower_jax.retrieval.retriever import Retriever
from multitower_jax.retrieval.settings import RetrievalSettings
from multitower_jax.serving import portable, requests
from multitower_jax.train import checkpoint_fallback, loop
from multitower_jax.train import trainer as trainer_lib
from tests.conftest import QUICKSTART, TINY_MODEL, synthetic_config
from tests.test_logs import make_config, make_rows, write

# Every evaluation counts as a gain (min_delta -1), so best/ keeps steps 8 and 12; checkpoints 4, 8, 12.
RUN = ["--config.train.num_steps=12", "--config.train.eval_every=4", "--config.train.checkpoint_every=4",
       "--config.train.keep_checkpoints=3", "--config.train.min_delta=-1.0", "--config.train.patience=3"]


@pytest.fixture(scope="module")
def trained(synthetic_dir, tmp_path_factory):
    """A tiny trained workdir, its eval_test.json, an export and an index of it. Tests copy it
    before changing anything."""
    root = tmp_path_factory.mktemp("integrity")
    workdir = root / "run"
    result = loop.train(synthetic_config(synthetic_dir, *RUN), workdir)
    export_lib.export(load_trained(workdir), root / "export")
    index_lib.build_from_export(root / "export", root / "index", RetrievalSettings())
    return {"root": root, "workdir": workdir, "result": result, "data": synthetic_dir}


def _copy(trained, tmp_path, name="copy"):
    dst = tmp_path / name
    shutil.copytree(trained["workdir"], dst)
    return dst


def _snapshot(folder):
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.stat().st_size)
            for p in sorted(folder.rglob("*")) if p.is_file()}


# -- run identity ---------------------------------------------------------------------------------

def test_run_identity_is_written_and_carried_by_export_and_index(trained):
    identity = json.loads((trained["workdir"] / run_identity.FILE).read_text())
    assert len(identity["run_id"]) == 32
    shapes = identity["param_shapes"]
    assert shapes["ad_tower/mlp/block_0/dense/kernel"][1] == 32  # TINY_MODEL's ad_hidden=(32,)
    assert identity["params_digest"] == run_identity.shapes_digest(shapes)
    want = {"run_id": identity["run_id"], "params_digest": identity["params_digest"]}
    assert load_trained(trained["workdir"]).identity == want
    export = json.loads((trained["root"] / "export" / "manifest.json").read_text())
    index = json.loads((trained["root"] / "index" / "manifest.json").read_text())
    assert export["run"] == index["run"] == want


def test_index_of_another_run_with_the_same_config_is_refused(trained, tmp_path):
    # The same config trained again: same fingerprint, other weights (the old check let it through).
    other = _copy(trained, tmp_path)
    run_identity.create(other, load_trained(other).params)
    model = load_trained(other)
    assert model.fingerprint == load_trained(trained["workdir"]).fingerprint
    with pytest.raises(run_identity.RunMismatchError, match="--allow-other-run"):
        Retriever.load(trained["root"] / "index", model)
    with pytest.warns(run_identity.RunMismatchWarning):
        Retriever.load(trained["root"] / "index", model, allow_other_run=True)
    Retriever.load(trained["root"] / "index", load_trained(trained["workdir"]))  # its own run loads
    # The CLI: retrieve-eval refuses, clearly, with exit code 2.
    rc = cli.main(["retrieve-eval", "--workdir", str(other), "--index", str(trained["root"] / "index")])
    assert rc == 2
    # `index --workdir` checks the export against that workdir's run.
    rc = cli.main(["index", "--embeddings", str(trained["root"] / "export"), "--out", str(tmp_path / "ix"),
                   "--workdir", str(other)])
    assert rc == 2 and not (tmp_path / "ix").exists()


def test_calibration_of_another_run_is_refused(trained, tmp_path):
    workdir = _copy(trained, tmp_path)
    cal = calibration.Calibration.identity(calibration.heads_of(load_trained(workdir).config), 1.0, 1e-6)
    own = run_identity.stamp(run_identity.read(workdir))
    calibration.save(cal, workdir, run=own)
    calibration.load(workdir)  # its own run
    calibration.save(cal, workdir, run={"run_id": "0" * 32, "params_digest": own["params_digest"]})
    with pytest.raises(run_identity.RunMismatchError, match="calibration.json"):
        calibration.load(workdir)
    with pytest.warns(run_identity.RunMismatchWarning):
        calibration.load(workdir, allow_other_run=True)


def test_portable_scorer_of_another_run_is_refused(trained, tmp_path):
    folder = tmp_path / "scorer"
    folder.mkdir()
    other = {"run_id": "f" * 32, "params_digest": "0" * 16}
    (folder / "manifest.json").write_text(json.dumps({"kind": portable.KIND, "format": portable.FORMAT,
                                                      "run": other, "placements": {}}))
    with pytest.raises(run_identity.RunMismatchError, match="scorer"):
        portable.PortableScorer.load(folder, workdir=trained["workdir"])
    assert portable.PortableScorer.load(folder).placements == ()  # without a workdir: not checked


def test_parameter_shapes_are_part_of_the_identity():
    a = {"params": {"w": np.zeros((4, 8)), "b": np.zeros(8)}}
    b = {"params": {"w": np.zeros((4, 16)), "b": np.zeros(16)}}
    sa, sb = run_identity.param_shapes(a), run_identity.param_shapes(b)
    assert sa == {"params/b": [8], "params/w": [4, 8]}
    assert run_identity.shapes_digest(sa) != run_identity.shapes_digest(sb)
    with pytest.raises(run_identity.RunMismatchError, match="parameters"):
        run_identity.check({"run_id": "x", "params_digest": run_identity.shapes_digest(sa)},
                           {"run_id": "x", "params_digest": run_identity.shapes_digest(sb)}, "export")


# -- resume and dataset guards --------------------------------------------------------------------

def test_resume_that_changes_the_model_is_refused_before_writing(trained, tmp_path, capsys):
    workdir = _copy(trained, tmp_path)
    before = _snapshot(workdir)
    config = synthetic_config(trained["data"], *RUN, "--config.train.num_steps=16", "--config.model.embed_dim=32",
                              "--config.data.batch_size=64")
    with pytest.raises(workdir_lib.WorkdirError) as e:
        loop.train(config, workdir)
    assert "model.embed_dim: 16 -> 32" in str(e.value) and "data.batch_size: 128 -> 64" in str(e.value)
    assert "train.num_steps" not in str(e.value)  # training longer is a resume
    assert _snapshot(workdir) == before  # nothing written: config.json, checkpoints, metrics as they were
    # The CLI prints the keys, no traceback, exit code 2.
    rc = cli.main(["train", "--config", str(QUICKSTART), "--workdir", str(workdir),
                   f"--config.data.dir={trained['data']}", "--config.data.block_size=64",
                   "--config.data.batch_size=128", "--config.data.eval_batch_size=512",
                   "--config.synthetic.num_users=2000", *TINY_MODEL, *RUN, "--config.model.embed_dim=64"])
    err = capsys.readouterr().err
    assert rc == 2 and "model.embed_dim: 16 -> 64" in err and "Traceback" not in err
    assert _snapshot(workdir) == before


def test_resume_conflicts_lists_only_what_a_resume_cannot_change():
    saved = {"seed": 0, "model": {"embed_dim": 16}, "data": {"batch_size": 128, "eval_batch_size": 512},
             "train": {"num_steps": 10}, "optim": {"peak_lr": 1e-3, "accumulation_steps": 1}}
    new = {"seed": 0, "model": {"embed_dim": 16, "extra": 1}, "data": {"batch_size": 128, "eval_batch_size": 64},
           "train": {"num_steps": 20}, "optim": {"peak_lr": 1e-4, "accumulation_steps": 4}}
    assert workdir_lib.resume_conflicts(saved, new) == ["model.extra: (absent) -> 1", "optim.accumulation_steps: 1 -> 4"]


@pytest.mark.parametrize("command", ["generate", "ingest"])
def test_dataset_commands_refuse_a_training_workdir(trained, tmp_path, capsys, command):
    workdir = _copy(trained, tmp_path)
    before = _snapshot(workdir)
    extra = [] if command == "generate" else [
        "--config.data.source=logs", f"--config.data.logs.paths=('{tmp_path}/logs.csv',)",
        "--config.data.logs.validation_start=2024-01-08", "--config.data.logs.test_start=2024-01-10"]
    rc = cli.main([command, "--config", str(QUICKSTART), "--out", str(workdir), *extra])
    err = capsys.readouterr().err
    assert rc == 2 and "holds a training workdir" in err and "checkpoints" in err
    assert _snapshot(workdir) == before


def test_paths_are_recorded_absolute(trained, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc = cli.main(["generate", "--config", str(QUICKSTART), "--out", "rel/data", "--config.synthetic.num_users=50",
                   "--config.synthetic.num_ads=20", "--config.synthetic.num_advertisers=5",
                   "--config.synthetic.impressions.train=64", "--config.synthetic.impressions.validation=64",
                   "--config.synthetic.impressions.test=64", "--config.data.block_size=16"])
    assert rc == 0
    assert json.loads((tmp_path / "rel/data/config.json").read_text())["data"]["dir"] == str(tmp_path / "rel/data")
    # train: a relative data.dir (or the default <workdir>/data) is resolved before it is recorded.
    config = synthetic_config("rel/data")
    loop.ensure_data(config, tmp_path / "w")
    assert config.data.dir == str(tmp_path / "rel/data")
    config.data.dir = ""
    loop.resolve_data_dir(config, "w2")
    assert config.data.dir == str(tmp_path / "w2" / "data")
    # An artifact records the workdir it came from as an absolute path, given a relative one.
    monkeypatch.chdir(trained["workdir"].parent)
    assert str(load_trained(trained["workdir"].name).workdir) == str(trained["workdir"])


# -- checkpoints ----------------------------------------------------------------------------------

def _truncate_largest(folder):
    files = sorted((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    victim = files[-1]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 3])
    return victim


def test_corrupt_latest_checkpoint_falls_back_to_the_newest_intact_one(trained, tmp_path):
    workdir = _copy(trained, tmp_path)
    _truncate_largest(workdir / "checkpoints" / "12")
    config = synthetic_config(trained["data"], *RUN, "--config.train.num_steps=16")
    with pytest.warns(checkpoint_fallback.CorruptCheckpointWarning, match="checkpoints/12"):
        result = loop.train(config, workdir)
    assert result["step"] == 16  # resumed from step 8 and trained on, saving step 12 again
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [8, 12, 16]
    assert [p.name.split("-")[:2] for p in (workdir / checkpoint_fallback.CORRUPT_DIR).iterdir()] == [["checkpoints", "12"]]
    metrics = [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert metrics == sorted(metrics)


def test_corrupt_best_parameters_fall_back_and_evaluate_states_its_step(trained, tmp_path):
    workdir = _copy(trained, tmp_path)
    _truncate_largest(workdir / "best" / "12")
    with pytest.warns(checkpoint_fallback.CorruptCheckpointWarning, match="best/12"):
        result = loop.evaluate_workdir(synthetic_config(trained["data"], *RUN), workdir, "test")
    train = trained["result"]
    assert result["params_step"] == 8 and result["params_from"] == "best"
    assert result["step"] == train["step"] == 12
    assert result["stopped_early"] is train["stopped_early"] is False
    assert result["best_validation_ctr_auc"] == pytest.approx(train["best_validation_ctr_auc"], abs=1e-12)
    assert json.loads((workdir / "eval_test.json").read_text())["params_step"] == 8
    with pytest.raises(checkpoint_fallback.CheckpointError, match="best"):  # nothing intact at all: a clear error
        _truncate_largest(workdir / "best" / "8")
        trainer_lib.Trainer(synthetic_config(trained["data"], *RUN), workdir).restore_best_step(
            trainer_lib.Trainer(synthetic_config(trained["data"], *RUN), workdir).best_manager())


def test_evaluate_keeps_trains_keys(trained, tmp_path):
    workdir = _copy(trained, tmp_path)
    result = loop.evaluate_workdir(synthetic_config(trained["data"], *RUN), workdir, "test")
    train = trained["result"]
    assert train["params_step"] == 12 and train["params_from"] == "best"
    for key in ("step", "stopped_early", "best_validation_ctr_auc", "params_step", "params_from"):
        assert result[key] == train[key], key
    assert result["ctr_auc"] == pytest.approx(train["ctr_auc"], abs=1e-9)


# -- inputs ---------------------------------------------------------------------------------------

def test_empty_ads_catalogue_is_an_error_at_export(trained, tmp_path):
    table = pq.read_table(trained["data"] / "catalogue" / "ads.parquet")
    pq.write_table(table.slice(0, 0), tmp_path / "ads.parquet")
    with pytest.raises(export_lib.CatalogueError, match="ads.parquet: the ads catalogue has no rows"):
        export_lib.export(load_trained(trained["workdir"]), tmp_path / "export", tmp_path / "ads.parquet")
    assert not (tmp_path / "export").exists()


def test_unknown_keys_inside_context_and_user_are_rejected(trained):
    spec = load_trained(trained["workdir"]).spec
    context = {f.name: 0 for f in spec.context("search").features}
    with pytest.raises(requests.RequestError, match=r"request.context: unknown keys \['qurey'\]"):
        requests.tower_columns(spec.context("search"), [{**context, "qurey": "shoes"}], ["request.context"])
    user = {f.name: 0 for f in spec.user.features}
    with pytest.raises(requests.RequestError, match=r"request.user: unknown keys \['age'\]"):
        requests.tower_columns(spec.user, [{**user, "age": 30}], ["request.user"])


def test_log_parse_errors_name_1_based_lines(tmp_path):
    config, spec = make_config([tmp_path / "a.jsonl"])
    write(tmp_path / "a.jsonl", make_rows(spec, 300))
    lines = (tmp_path / "a.jsonl").read_text().splitlines()
    lines[200] = lines[200].replace(",", ",,", 1)  # line 201 of the file
    (tmp_path / "a.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(logs.LogError, match=r"a.jsonl: .*line 201: not a JSON object"):
        list(logs.read_chunks(config, spec, "search", "train", {}))

    config, spec = make_config([tmp_path / "b.csv"])
    write(tmp_path / "b.csv", make_rows(spec, 20))
    raw = (tmp_path / "b.csv").read_bytes().split(b"\n")
    raw[5] = raw[5].replace(b"w", b"\xff", 1)  # line 6: not UTF-8
    (tmp_path / "b.csv").write_bytes(b"\n".join(raw))
    with pytest.raises(logs.LogError, match=r"b.csv: .*line 6: not UTF-8"):
        list(logs.read_chunks(config, spec, "search", "train", {}))

    for name in ("c.csv", "d.jsonl"):
        (tmp_path / name).write_text("")
        config, spec = make_config([tmp_path / name])
        with pytest.raises(logs.LogError, match=f"{name}: the file is empty"):
            list(logs.read_chunks(config, spec, "search", "train", {}))


def test_artifacts_older_than_run_identities_are_not_checked():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run_identity.check(None, {"run_id": "a", "params_digest": "b"}, "legacy artifact")  # older: not checked


def test_evaluate_with_a_corrupt_latest_checkpoint_still_reports(trained, tmp_path):
    workdir = _copy(trained, tmp_path)
    for path in (workdir / "checkpoints" / "12").rglob("*"):
        if path.is_file():
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    shutil.rmtree(workdir / "best")
    with pytest.warns(checkpoint_fallback.CorruptCheckpointWarning):
        result = loop.evaluate_workdir(synthetic_config(trained["data"], *RUN), workdir, "test")
    assert result["params_step"] == 8 and result["params_from"] == "latest checkpoint"
    assert result["best_validation_ctr_auc"] == pytest.approx(trained["result"]["best_validation_ctr_auc"], abs=1e-12)
