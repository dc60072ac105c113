"""Ingesting a user's own impression logs (Parquet / CSV / JSONL): values, time split, validation, report."""

import csv
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from multitower_jax import config as config_lib
from multitower_jax import features as F
from multitower_jax.data import builders, logs, schema
from multitower_jax.data.tokenizer import HashTokenizer

QUICKSTART = Path(__file__).resolve().parents[1] / "experiments" / "quickstart.py"
DAY = 86_400
T0 = 1_704_067_200  # 2024-01-01 00:00 UTC
VALIDATION_START, TEST_START = T0 + 7 * DAY, T0 + 9 * DAY
WORDS = [f"w{i}" for i in range(30)]
VOCAB = ("gold", "silver", "bronze")


def make_config(paths, *overrides, columns=None):
    """Quickstart config on logs, with small dense features, a multi-hot list and a vocab categorical."""
    config = config_lib.load(QUICKSTART, [
        "--config.data.source=logs", f"--config.data.logs.paths={tuple(str(p) for p in paths)!r}",
        "--config.data.logs.validation_start=2024-01-08",  # an ISO date ...
        f"--config.data.logs.test_start={TEST_START}",  # ... and epoch seconds
        "--config.data.block_size=16", "--config.features.user.interest_vector.dim=4",
        "--config.features.ad.image_embedding.dim=3", *overrides])
    config.features.context.search.filters = dict(type="multi_hot", size=10, max_items=3, dim=4)
    config.features.user.tier = dict(type="categorical", size=3, dim=4, encoding="vocab", vocab=VOCAB)
    if columns:
        config.data.logs.columns = columns
    return config, F.parse_spec(config.features)


def make_rows(spec, n, seed=0, oracle=False):
    """A valid log table for the search placement, in our column names, as Python values."""
    rng = np.random.default_rng(seed)
    ts = T0 + rng.integers(0, 10 * DAY, n)
    ts[:3] = (T0, VALIDATION_START, TEST_START)  # every split gets rows
    click = rng.random(n) < 0.3
    cols = {"impression_id": list(range(1000 * seed, 1000 * seed + n)), "timestamp": ts.tolist(),
            "user_id": [f"u{i}" for i in rng.integers(0, 20, n)], "ad_id": rng.integers(0, 50, n).tolist(),
            "click": click.astype(int).tolist(), "conversion": (click & (rng.random(n) < 0.5)).astype(int).tolist()}
    if oracle:
        cols["p_click"] = rng.random(n).round(3).tolist()
        cols["p_convert_given_click"] = rng.random(n).round(3).tolist()
    for name, f in spec.columns("search").items():
        if isinstance(f, F.Categorical) and f.encoding == "ids":
            cols[name] = rng.integers(0, f.size, n).tolist()
        elif isinstance(f, F.Categorical) and f.encoding == "hash":
            cols[name] = [f"k{i}" for i in rng.integers(0, 30, n)]
        elif isinstance(f, F.Categorical):
            cols[name] = [VOCAB[i] for i in rng.integers(0, 3, n)]
        elif isinstance(f, F.Numeric):
            cols[name] = rng.gamma(1.0, 3.0, n).round(3).tolist()
        elif isinstance(f, F.Text):
            cols[name] = [" ".join(rng.choice(WORDS, k)) for k in rng.integers(0, f.max_len + 1, n)]
        elif isinstance(f, F.Dense):
            cols[name] = rng.normal(size=(n, f.dim)).round(3).tolist()
        else:
            cols[name] = [rng.integers(0, f.size, k).tolist() for k in rng.integers(0, f.max_items + 1, n)]
    return cols


def expected(spec, cols):
    """What the raw column contract should hold for `cols`."""
    out = {"user_id": schema.stable_hash64(cols["user_id"])}
    for name, values in cols.items():
        f = spec.columns("search").get(name)
        if isinstance(f, F.Categorical) and f.encoding == "hash":
            out[name] = schema.stable_hash64(values)
        elif isinstance(f, F.Categorical) and f.encoding == "vocab":
            out[name] = np.array([VOCAB.index(v) if v in VOCAB else -1 for v in values])
        elif isinstance(f, F.MultiHot):
            out[name] = np.array([(v + [-1] * f.max_items)[:f.max_items] for v in values])
        elif name not in out:
            out[name] = np.array(values)
    return out


def write(path, cols, rename=None, fmt=None):
    """Write `cols` as Parquet, CSV (lists as text) or JSONL, with file columns renamed."""
    path = Path(path)
    cols = {(rename or {}).get(k, k): v for k, v in cols.items()}
    fmt = fmt or path.suffix[1:]
    if fmt == "parquet":
        pq.write_table(pa.table(cols), path)
    elif fmt == "csv":  # lists as text: ids "3|5|7", vectors "0.1 0.2" or "[0.1, 0.2]"
        def cell(name, v):
            if not isinstance(v, list):
                return v
            if all(isinstance(x, int) for x in v):
                return "|".join(map(str, v))
            return f"[{', '.join(map(str, v))}]" if "image" in name else " ".join(map(str, v))
        with open(path, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(cols)
            w.writerows([cell(k, v) for k, v in zip(cols, row)] for row in zip(*cols.values()))
    else:
        with open(path, "w") as fh:
            for row in zip(*cols.values()):
                fh.write(json.dumps(dict(zip(cols, row))) + "\n")
    return path


def read_back(out_dir, split):
    source = builders.open_dataset(out_dir, "logs", "search").as_data_source(split=split)
    blocks = [builders.flatten_block(source[i]) for i in range(len(source))]
    return {k: np.concatenate([b[k] for b in blocks]) for k in blocks[0]}


def split_of(ts):
    return np.where(ts < VALIDATION_START, 0, np.where(ts < TEST_START, 1, 2))


def check_round_trip(spec, out_dir, cols, ids):
    """Every split holds exactly its rows, with the right values (rows matched by impression id)."""
    want = expected(spec, cols)
    which = split_of(np.array(cols["timestamp"]))
    for s, split in enumerate(builders.SPLITS):
        got = read_back(out_dir, split)
        order = np.argsort(got["impression_id"])
        rows = np.flatnonzero(which == s)
        rows = rows[np.argsort(ids[rows])]
        assert np.array_equal(got["impression_id"][order], ids[rows]), split
        for name, values in want.items():
            if name == "impression_id":
                continue
            g = got[name][order]
            if g.dtype == object:
                assert [t.decode() for t in g] == list(values[rows]), name
            elif g.dtype == np.float16:
                np.testing.assert_allclose(g, values[rows], rtol=1e-3, atol=1e-3, err_msg=name)
            else:
                np.testing.assert_allclose(g, values[rows], rtol=1e-6, err_msg=name)


def test_parquet_round_trip_with_mapping_globs_and_arrow_timestamps(tmp_path):
    rename = {"click": "clicked", "user.age_bucket": "age", "context.query": "q", "timestamp": "event_time"}
    config, spec = make_config([tmp_path / "logs" / "*.parquet"], "--config.data.logs.time_column=event_time",
                               columns={"click": "clicked", "user": {"age_bucket": "age"}, "context": {"query": "q"}})
    parts = [make_rows(spec, 70, seed=s, oracle=True) for s in (1, 2)]
    (tmp_path / "logs").mkdir()
    for s, cols in enumerate(parts):
        table = {k: v for k, v in cols.items()}
        table["timestamp"] = pa.array(np.array(cols["timestamp"]) * 1000, pa.timestamp("ms", tz="UTC"))
        write(tmp_path / "logs" / f"part{s}.parquet", table, rename)
    report = logs.ingest(config, spec, tmp_path / "data")
    cols = {k: parts[0][k] + parts[1][k] for k in parts[0]}
    check_round_trip(spec, tmp_path / "data", cols, np.array(cols["impression_id"]))
    which = split_of(np.array(cols["timestamp"]))
    assert report["rows"] == {s: int(np.sum(which == i)) for i, s in enumerate(builders.SPLITS)}
    assert report["with_oracle"] and json.loads((tmp_path / "data" / logs.REPORT_FILE).read_text()) == report
    train = read_back(tmp_path / "data", "train")
    assert not np.all(np.diff(train["timestamp"]) >= 0)  # shuffled, not time-ordered


def test_csv_round_trip_with_iso_times_and_generated_ids(tmp_path):
    config, spec = make_config([tmp_path / "a.csv"])
    cols = make_rows(spec, 90, seed=3)
    del cols["impression_id"]
    iso = [np.datetime_as_string(np.datetime64(t, "s")) for t in cols["timestamp"]]
    write(tmp_path / "a.csv", dict(cols, timestamp=iso))
    report = logs.ingest(config, spec, tmp_path / "data")
    assert sum(report["rows"].values()) == 90 and not report["with_oracle"]
    check_round_trip(spec, tmp_path / "data", cols, np.arange(1, 91))  # generated: (file 0, row)


def test_jsonl_round_trip_with_bools_and_epoch_seconds(tmp_path):
    config, spec = make_config([tmp_path / "a.jsonl"])
    cols = make_rows(spec, 60, seed=4)
    write(tmp_path / "a.jsonl", dict(cols, click=[bool(c) for c in cols["click"]]))
    logs.ingest(config, spec, tmp_path / "data")
    check_round_trip(spec, tmp_path / "data", cols, np.array(cols["impression_id"]))


def _train_rows(spec, n=8):
    cols = make_rows(spec, n, seed=5)
    cols["timestamp"] = [T0 + i for i in range(n)]  # all in train
    return cols


BAD = [  # (format, column, value for row 5, fragment of the message)
    ("parquet", "click", 2, "0 or 1"),
    ("parquet", "conversion", 1, "a conversion without a click"),
    ("parquet", "user.total_clicks_30d", float("nan"), "finite"),
    ("parquet", "user.total_clicks_30d", float("inf"), "finite"),
    ("parquet", "ad.total_impressions", -3.0, "negative count"),
    ("parquet", "user.age_bucket", 2.5, "integer id"),
    ("parquet", "ad.title", None, "None"),
    ("parquet", "user_id", None, "None"),
    ("parquet", "user.interest_vector", [1.0, 2.0], "a list of 4 numbers"),
    ("parquet", "user.interest_vector", [1.0, float("nan"), 0.0, 0.0], "finite"),
    ("parquet", "context.filters", [1, -2], "ids >= 0"),
    ("parquet", "timestamp", "yesterday", "epoch seconds"),
    ("csv", "click", "yes", "0 or 1"),
    ("csv", "user.total_clicks_30d", "abc", "a number"),
    ("csv", "user.age_bucket", "x7", "integer id"),
    ("csv", "user.interest_vector", "0.1 x 0.3 0.4", "a list of 4 numbers"),
    ("csv", "user.interest_vector", "0.1 0.2", "a list of 4 numbers"),
    ("csv", "timestamp", "2024-13-45", "epoch seconds"),
    ("jsonl", "click", 3, "0 or 1"),
    ("jsonl", "ad.description", None, "None"),
    ("jsonl", "timestamp", 1_704_067_200_000, "milliseconds"),
]


@pytest.mark.parametrize("fmt,column,value,fragment", BAD)
def test_bad_values_name_file_row_and_field(tmp_path, fmt, column, value, fragment):
    config, spec = make_config([tmp_path / f"bad.{fmt}"], columns={"click": "clicked"})
    cols = _train_rows(spec)
    if column == "conversion":
        cols["click"][4] = 0
    if fmt == "parquet" and column == "timestamp":
        cols["timestamp"] = [str(t) for t in cols["timestamp"]]
    cols[column][4] = value
    write(tmp_path / f"bad.{fmt}", cols, {"click": "clicked"})
    with pytest.raises(logs.LogError) as e:
        list(logs.read_chunks(config, spec, "search", "train", {}))
    msg = str(e.value)
    file_column = "clicked" if column == "click" else column
    for part in (f"bad.{fmt}", "row 5:", repr(column), repr(file_column), fragment):
        assert part in msg, (part, msg)


def test_missing_column_empty_file_and_no_files(tmp_path):
    config, spec = make_config([tmp_path / "*.parquet"], columns={"user": {"gender": "sex"}})
    cols = _train_rows(spec)
    del cols["user.gender"]
    write(tmp_path / "a.parquet", cols)
    with pytest.raises(logs.LogError, match=r"a.parquet: missing column 'sex' \(our column 'user.gender'.*'ad_id'"):
        list(logs.read_chunks(config, spec, "search", "train", {}))

    config, spec = make_config([tmp_path / "e.csv"])
    (tmp_path / "e.csv").write_text(",".join(make_rows(spec, 3)) + "\n")
    with pytest.raises(logs.LogError, match="e.csv: no rows"):
        list(logs.read_chunks(config, spec, "search", "train", {}))
    config, spec = make_config([tmp_path / "nothing*.jsonl"])
    with pytest.raises(logs.LogError, match="no files match"):
        logs.ingest(config, spec, tmp_path / "data")


def test_oov_and_truncation_counts_are_exact(tmp_path):
    config, spec = make_config([tmp_path / "a.parquet"])
    cols = make_rows(spec, 40, seed=6)  # valid: no OOV ids, no text or list longer than its maximum
    cols["user.age_bucket"][5:8] = [10, 99, -1]
    cols["user.tier"][1], cols["user.tier"][8] = "", "platinum"  # row 2 is a validation row
    cols["context.filters"][9:12] = [[10, 1], [12, 1, 2, 3, 4], [1, 2, 3, 11]]  # 11 is cut off: not counted
    cols["ad.title"][2] = " ".join(["w1"] * (spec.ad["title"].max_len + 1))  # a test row
    cols["context.query"][12] = "a b c " * spec.context("search")["query"].max_len
    write(tmp_path / "a.parquet", cols)
    report = logs.ingest(config, spec, tmp_path / "data")
    assert report["oov"]["user.age_bucket"] == 3 and report["oov"]["user.tier"] == 2
    assert report["oov"]["context.filters"] == 2 and report["truncated_multi_hot"] == {"context.filters": 2}
    assert report["truncated_text"] == {"ad.title": 1, "ad.description": 0, "context.query": 1}
    assert sum(report["oov"].values()) == 7 and "ad.advertiser_id" not in report["oov"]  # hashed: no OOV
    assert report["splits"]["validation"]["oov"]["user.tier"] == 1
    stored = np.concatenate([read_back(tmp_path / "data", s)["user.age_bucket"] for s in builders.SPLITS])
    assert {10, 99, -1} <= set(stored.tolist())  # kept as is; the pipeline maps them to bucket 0


def test_failed_ingest_keeps_the_previous_dataset(tmp_path):
    config, spec = make_config([tmp_path / "a.parquet"])
    cols = make_rows(spec, 50, seed=7)
    write(tmp_path / "a.parquet", cols)
    logs.ingest(config, spec, tmp_path / "data")
    before = read_back(tmp_path / "data", "test")
    report_before = (tmp_path / "data" / logs.REPORT_FILE).read_text()

    bad = dict(cols, click=list(cols["click"]))
    bad["click"][2] = 7  # row 3 is a test row: train and validation are written before it fails
    write(tmp_path / "a.parquet", bad)
    with pytest.raises(logs.LogError, match="a.parquet: row 3: column 'click'"):
        logs.ingest(config, spec, tmp_path / "data")
    after = read_back(tmp_path / "data", "test")
    assert all(np.array_equal(before[k], after[k]) for k in before)
    assert (tmp_path / "data" / logs.REPORT_FILE).read_text() == report_before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary dirs left

    write(tmp_path / "a.parquet", make_rows(spec, 30, seed=8))  # a good ingest replaces it
    assert sum(logs.ingest(config, spec, tmp_path / "data")["rows"].values()) == 30
    assert sum(len(read_back(tmp_path / "data", s)["click"]) for s in builders.SPLITS) == 30


def test_empty_files_empty_splits_and_unknown_mapping(tmp_path):
    config, spec = make_config([tmp_path / "a.parquet"])
    write(tmp_path / "a.parquet", {k: v[:0] for k, v in _train_rows(spec).items()})
    with pytest.raises(logs.LogError, match="a.parquet: no rows"):
        list(logs.read_chunks(config, spec, "search", "train", {}))
    (tmp_path / "b.jsonl").write_text("")
    config, spec = make_config([tmp_path / "b.jsonl"])
    with pytest.raises(logs.LogError, match="b.jsonl"):
        list(logs.read_chunks(config, spec, "search", "train", {}))

    config, spec = make_config([tmp_path / "c.parquet"])
    write(tmp_path / "c.parquet", _train_rows(spec))  # every row before validation_start
    with pytest.raises(logs.LogError, match=r"no rows in the validation split .* timestamps run from 2024-01-01"):
        logs.ingest(config, spec, tmp_path / "data")
    assert not (tmp_path / "data").exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    config, spec = make_config([tmp_path / "c.parquet"], columns={"user": {"age_bucket": "age"}, "usr_id": "uid"})
    with pytest.raises(logs.LogError, match=r"config.data.logs.columns: unknown columns \['usr_id'\]"):
        logs.ingest(config, spec, tmp_path / "data")


def test_time_sorted_row_groups_are_read_once_per_split(tmp_path, monkeypatch):
    """Later passes skip Parquet row groups that an earlier pass saw hold none of their rows."""
    config, spec = make_config([tmp_path / "a.parquet"])
    cols = make_rows(spec, 160, seed=9)
    order = np.argsort(cols["timestamp"], kind="stable")
    cols = {k: [v[i] for i in order] for k, v in cols.items()}
    pq.write_table(pa.table(cols), tmp_path / "a.parquet", row_group_size=16)  # 10 row groups
    reads = []
    real_read = logs._read
    monkeypatch.setattr(logs, "_read", lambda *args: reads.append(args[-1]) or real_read(*args))
    logs.ingest(config, spec, tmp_path / "data")
    check_round_trip(spec, tmp_path / "data", cols, np.array(cols["impression_id"]))
    assert len(reads) <= 10 + 2 + 2 + 2  # train reads all; validation and test only the groups around them


def test_truncation_counts_agree_with_the_tokenizer(tmp_path):
    config, spec = make_config([tmp_path / "a.parquet"])
    cols = _train_rows(spec, 8)
    n = spec.ad["title"].max_len
    cols["ad.title"] = ["A-b_c " * (n // 3), "A-b_c " * (n // 3 + 1), "x" * 40, "Café crème " * n,
                        "İstanbul " * (n - 1) + "x", "KELVIN k " * (n // 2), "42 " * n, ", ;" * 50]
    write(tmp_path / "a.parquet", cols)
    report = {}
    list(logs.read_chunks(config, spec, "search", "train", report))
    tokenizer = HashTokenizer(spec.ad["title"].vocab_size, n)
    assert report["truncated_text"]["ad.title"] == sum(tokenizer.tokenize(t)[1] for t in cols["ad.title"]) == 3


def test_the_input_pipeline_reads_ingested_logs(tmp_path):
    from multitower_jax.data import pipeline

    config, spec = make_config([tmp_path / "a.parquet"], f"--config.data.dir={tmp_path / 'data'}",
                               "--config.data.eval_batch_size=32")
    write(tmp_path / "a.parquet", make_rows(spec, 80, seed=10))
    logs.ingest(config, spec, tmp_path / "data")
    stats = pipeline.load_or_compute_stats(config, spec, tmp_path / "work")
    batch = next(iter(pipeline.make_dataset(config, spec, stats, placement="search", split="train", train=False)))
    assert batch["context"]["filters"].shape == (32, 3) and batch["user"]["tier"].shape == (32,)
    assert batch["valid"].sum() > 0 and set(np.unique(batch["user"]["tier"])) <= {0, 1, 2, 3}


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_id_features_read_the_impression_id_columns(tmp_path, fmt):
    """user.user_id / ad.ad_id need no mapping: they read the logs' user / ad id columns (renamed
    ones too); a file column of the feature's own name, or an explicit mapping, wins."""
    config, spec = make_config([tmp_path / f"a.{fmt}"], columns={"user_id": "uid"})
    config.features.user.user_id = dict(type="categorical", size=64, dim=4, encoding="hash", min_count=2)
    config.features.ad.ad_id = dict(type="categorical", size=64, dim=4)
    spec = F.parse_spec(config.features)
    cols = make_rows(spec, 80, seed=11)
    del cols["user.user_id"], cols["ad.ad_id"]
    write(tmp_path / f"a.{fmt}", cols, rename={"user_id": "uid"})
    logs.ingest(config, spec, tmp_path / "data")
    got = read_back(tmp_path / "data", "train")
    np.testing.assert_array_equal(got["user.user_id"], got["user_id"])
    np.testing.assert_array_equal(got["ad.ad_id"], got["ad_id"])
    order = np.argsort(got["impression_id"])
    want = schema.stable_hash64(np.array(cols["user_id"])[split_of(np.array(cols["timestamp"])) == 0])
    np.testing.assert_array_equal(got["user_id"][order], want)  # the file's strings, hashed

    config.data.logs.columns = {"user_id": "uid", "ad": {"ad_id": "other_ad"}}
    cols["other_ad"] = [(a * 7) % 64 for a in cols["ad_id"]]
    cols["user.user_id"] = [f"x{u}" for u in cols["user_id"]]
    write(tmp_path / f"a.{fmt}", cols, rename={"user_id": "uid"})
    logs.ingest(config, spec, tmp_path / "data")
    got = read_back(tmp_path / "data", "train")
    np.testing.assert_array_equal(got["ad.ad_id"], (got["ad_id"] * 7) % 64)
    assert not np.isin(got["user.user_id"], got["user_id"]).any()  # "x<id>" hashes to other keys
