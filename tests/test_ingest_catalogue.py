"""`ingest` writes the ads and users catalogues `export` reads (issue 15, part 2): the newest row
of every ad and user in the logs, in the stored form, with bids from a mapped column or the
documented default."""

import numpy as np
import pyarrow.parquet as pq
import pytest

from multitower_jax import features as F
from multitower_jax.data import catalogue, logs, schema
from multitower_jax.data.catalogue_columns import read_column
from multitower_jax.retrieval import export
from tests.test_logs import expected, make_config, make_rows, write


def _newest(ids, cols):
    """Row of the newest impression (largest timestamp, then impression id) of every id, by id."""
    ts, imp = np.array(cols["timestamp"]), np.array(cols["impression_id"])
    out = {}
    for i in np.unique(ids):
        rows = np.flatnonzero(ids == i)
        out[i] = rows[np.lexsort((imp[rows], ts[rows]))[-1]]
    return out


def _check(table, id_column, ids, rows, want, columns):
    got = table.to_pydict()
    assert got[id_column] == sorted(rows)
    for name in columns:
        values = [want[name][rows[i]] for i in sorted(rows)]
        if isinstance(values[0], str):
            assert got[name] == values, name
        else:
            np.testing.assert_allclose(np.array(got[name], np.float64), np.array(values, np.float64),
                                       rtol=1e-6, err_msg=name)


def test_ingest_writes_the_newest_row_of_every_ad_and_user(tmp_path):
    config, spec = make_config([tmp_path / "a.parquet"], columns={"bid": "price"})
    cols = make_rows(spec, 300, seed=5)
    cols["price"] = np.random.default_rng(1).uniform(0.1, 3.0, 300).round(3).tolist()
    # A tie: ad 7's two newest impressions at the same second; the larger impression id wins.
    cols["ad_id"][10], cols["ad_id"][11] = 7, 7
    cols["timestamp"][10] = cols["timestamp"][11] = max(cols["timestamp"]) + 5
    write(tmp_path / "a.parquet", cols)
    report = logs.ingest(config, spec, tmp_path / "data")

    want = expected(spec, cols)
    want["price"] = np.array(cols["price"], np.float32)
    ad_ids = np.array(cols["ad_id"])
    ads = pq.read_table(tmp_path / "data" / catalogue.CATALOGUE_DIR / "ads.parquet")
    ad_rows = _newest(ad_ids, cols)
    assert ad_rows[7] == 11
    _check(ads.rename_columns(["price" if c == "bid" else c for c in ads.column_names]), "ad_id", ad_ids,
           ad_rows, {**want, "ad_id": ad_ids}, ["price", *(f"ad.{f.name}" for f in spec.ad.features)])
    user_ids = schema.stable_hash64(cols["user_id"])  # string ids are hashed, as in the datasets
    users = pq.read_table(tmp_path / "data" / catalogue.CATALOGUE_DIR / "users.parquet")
    _check(users, "user_id", user_ids, _newest(user_ids, cols), want, [f"user.{f.name}" for f in spec.user.features])
    assert report["catalogue"]["ads"] == len(np.unique(ad_ids)) and report["catalogue"]["ads_with_default_bid"] == 0
    assert report["catalogue"]["bid"] == "file column 'price'"

    # What `export` reads: every column it requires, each converted as it converts them.
    config.data.dir = str(tmp_path / "data")
    path = export.default_catalogue(config, "ads")
    file = export._open(path, ["ad_id", "bid", *(f"ad.{f.name}" for f in spec.ad.features)], "ad")
    batch = next(file.iter_batches())
    for f in spec.ad.features:
        column = read_column(batch, f"ad.{f.name}", f, 0, path)
        assert len(column) == batch.num_rows
        if isinstance(f, F.MultiHot | F.Dense):
            assert column.shape[1] == (f.max_items if isinstance(f, F.MultiHot) else f.dim)


def test_without_a_bid_column_every_ad_gets_the_default_bid(tmp_path):
    config, spec = make_config([tmp_path / "a.csv"])
    write(tmp_path / "a.csv", make_rows(spec, 60, seed=2))
    report = logs.ingest(config, spec, tmp_path / "data")
    bids = pq.read_table(tmp_path / "data" / "catalogue" / "ads.parquet").column("bid").to_pylist()
    assert bids and set(bids) == {catalogue.DEFAULT_BID}
    assert report["catalogue"]["ads_with_default_bid"] == len(bids) and "data.logs.columns.bid" in \
        report["catalogue"]["bid"]


def test_a_bad_bid_names_its_row(tmp_path):
    config, spec = make_config([tmp_path / "a.csv"])
    cols = make_rows(spec, 30, seed=3)
    cols["bid"] = [1.0] * 30
    cols["bid"][12] = -2.0
    write(tmp_path / "a.csv", cols)
    with pytest.raises(logs.LogError, match=r"a.csv: row 13: column 'bid'.*a bid > 0, got -2.0"):
        logs.ingest(config, spec, tmp_path / "data")
    assert not (tmp_path / "data" / "catalogue").exists()


def test_latest_by_id_keeps_the_newest_row_across_merges():
    latest = catalogue.LatestById("ad_id", ["value"])
    rng = np.random.default_rng(0)
    ids, ts = rng.integers(0, 50, 200_000), rng.integers(0, 1000, 200_000)
    imp = np.arange(200_000)
    for s in range(0, 200_000, 7_000):  # enough chunks for several merges
        latest.add({"ad_id": ids[s:s + 7000], "timestamp": ts[s:s + 7000], "impression_id": imp[s:s + 7000],
                    "value": imp[s:s + 7000] * 10})
    table = latest.table()
    order = np.lexsort((imp, ts, ids))
    newest = order[np.r_[ids[order][1:] != ids[order][:-1], True]]
    assert table["ad_id"].tolist() == ids[newest].tolist() and table["value"].tolist() == (imp[newest] * 10).tolist()


def test_export_reads_catalogue_values_raw_as_in_the_logs(tmp_path):
    """Strings for `hash` / `vocab` categoricals and multi-hot lists of any length, as the logs give
    them, read as the stored form a generated or ingested catalogue holds."""
    import pyarrow as pa

    brand = F.Categorical(name="brand_id", size=4096, dim=8, encoding="hash")
    tier = F.Categorical(name="tier", size=3, dim=4, encoding="vocab", vocab=("gold", "silver", "bronze"))
    kind = F.Categorical(name="campaign_type", size=5, dim=4)
    tags = F.MultiHot(name="tags", size=10, max_items=2, dim=4)
    raw = pa.record_batch({"ad.brand_id": ["acme", "zeta", "acme"], "ad.tier": ["silver", "platinum", "gold"],
                           "ad.campaign_type": ["2", "x", "1"], "ad.tags": [[1, 2, 3], [4], []]})
    stored = pa.record_batch({"ad.brand_id": schema.stable_hash64(["acme", "zeta", "acme"]),
                              "ad.tags": pa.FixedSizeListArray.from_arrays(pa.array([1, 2, 4, -1, -1, -1]), 2)})
    path = tmp_path / "ads.parquet"
    hashed = read_column(raw, "ad.brand_id", brand, 0, path)
    assert hashed.tolist() == schema.stable_hash64(["acme", "zeta", "acme"]).tolist()
    assert hashed.tolist() == read_column(stored, "ad.brand_id", brand, 0, path).tolist()
    assert read_column(raw, "ad.tier", tier, 0, path).tolist() == [1, -1, 0]  # -1: out of the vocabulary
    padded = read_column(raw, "ad.tags", tags, 0, path)
    assert padded.tolist() == [[1, 2], [4, -1], [-1, -1]]  # truncated to max_items, padded with -1
    assert padded.tolist() == read_column(stored, "ad.tags", tags, 0, path).tolist()
    with pytest.raises(export.CatalogueError, match="'ad.campaign_type' holds strings.*encoding 'ids'"):
        read_column(raw, "ad.campaign_type", kind, 0, path)
