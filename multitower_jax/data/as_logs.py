"""`multitower generate --as-logs DIR`: the synthetic world as the raw files a user brings, for a worked
example of `ingest` -> `train` -> `export` -> `index` -> `rank` (README, "Your own logs").

Writes into DIR:

* ``impressions.csv``: every split of ``config.data.logs.placement``'s impressions in time order, as logs
  hold them: ``event_time`` (ISO, UTC), ``impression_id``, ``user_id``, ``ad_id``, ``click``, ``conversion``,
  the ad's ``bid`` and one column per feature (``user.age_bucket``, ``context.query``, ...); multi-hot
  lists as ``3|5|7``, vectors as ``0.12 -0.5 ...`` (3 decimals); no oracle columns;
* ``ads.parquet`` / ``users.parquet``: the whole catalogues (ingest's hold only the ads and users
  the logs show), for ``export --catalogue`` / ``--users``;
* ``request.json``: a `rank` request made from the first test impression;
* ``config.py``: the experiment config with ``config.data.logs`` set for these files (the time column,
  the split boundaries of the synthetic world): the config a user writes for their own logs.
"""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path

import ml_collections
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from multitower_jax import features as F
from multitower_jax import fileio
from multitower_jax.data import builders, catalogue
from multitower_jax.data.synthetic import EPOCH, SPLIT_DAYS, World

IMPRESSIONS = "impressions.csv"
TIME_COLUMN = "event_time"
CONFIG_TEMPLATE = '''"""Logs written by `multitower generate --as-logs`: {experiment} with config.data.logs set for them.

Your own logs need the same few lines: where the files are, the time column, the split boundaries
(or files per split, data.logs.split_paths), and data.logs.columns if your column names differ.
"""

from multitower_jax import config as config_lib


def get_config():
    config = config_lib.load_config_file({experiment!r})
    config.data.source = "logs"
    config.data.placements = ({placement!r},)
    config.data.logs.placement = {placement!r}
    config.data.logs.paths = ({impressions!r},)
    config.data.logs.time_column = {time_column!r}
    config.data.logs.validation_start = {validation_start!r}
    config.data.logs.test_start = {test_start!r}
    return config
'''


def _day(offset_days: int) -> str:
    return datetime.datetime.fromtimestamp(EPOCH + offset_days * 86_400, datetime.timezone.utc).strftime("%Y-%m-%d")


def _joined(values: np.ndarray, keep: np.ndarray, separator: str) -> pa.Array:
    """Rows of a 2-d array as text: the kept items of each row, joined."""
    counts = keep.sum(axis=1)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    items = pc.cast(pa.array(values[keep]), pa.string())
    return pc.binary_join(pa.ListArray.from_arrays(pa.array(offsets), items), separator)


def _csv_column(f: F.Feature | None, values: np.ndarray) -> pa.Array:
    if isinstance(f, F.Dense):
        rounded = np.round(values.astype(np.float64), 3) + 0.0  # + 0.0: no "-0"
        return _joined(rounded, np.ones(rounded.shape, bool), " ")
    if isinstance(f, F.MultiHot):
        return _joined(values, values >= 0, "|")
    if isinstance(f, F.Text):
        return pa.array(values.tolist(), pa.string())
    return pa.array(values)


def _to_csv(chunk: dict[str, np.ndarray], features: dict[str, F.Feature], bids: np.ndarray) -> pa.Table:
    times = pa.array(chunk["timestamp"], pa.timestamp("s", "UTC"))
    columns = {TIME_COLUMN: pc.strftime(times, format="%Y-%m-%dT%H:%M:%SZ")}
    for name in ("impression_id", "user_id", "ad_id", "click", "conversion"):
        columns[name] = pa.array(chunk[name])
    columns["bid"] = pa.array(np.round(bids[chunk["ad_id"]].astype(np.float64), 4))
    for name, f in features.items():
        columns[name] = _csv_column(f, chunk[name])
    return pa.table(columns)


def _raw(f: F.Feature, value):
    """One stored value as a request holds it (JSON)."""
    if isinstance(f, F.MultiHot):
        return [int(v) for v in value if v >= 0]
    if isinstance(f, F.Dense):
        return [round(float(v), 3) for v in value]
    if isinstance(f, F.Text):
        return value.decode() if isinstance(value, bytes) else str(value)
    return float(value) if isinstance(f, F.Numeric) else int(value)


def write_logs(config: ml_collections.ConfigDict, config_path: str | os.PathLike, out: str | os.PathLike) -> dict:
    """Write DIR's files (see the module docstring); returns what was written."""
    out = Path(out).absolute()
    if (out / IMPRESSIONS).exists():
        raise FileExistsError(f"{out / IMPRESSIONS} already exists; choose another --as-logs folder or delete it")
    out.mkdir(parents=True, exist_ok=True)
    spec = F.parse_spec(config.features)
    placement = config.data.logs.placement
    world = World(config.synthetic, spec)
    features = spec.columns(placement)
    rows, request = {}, None
    with fileio.replacing(out / IMPRESSIONS) as tmp:
        writer = None
        for split in builders.SPLITS:
            rows[split] = 0
            for chunk in world.impressions(placement, split, int(config.synthetic.impressions[split])):
                table = _to_csv(chunk, features, world.ad_bids)
                writer = writer or pcsv.CSVWriter(str(tmp), table.schema)
                writer.write_table(table)
                rows[split] += table.num_rows
                if request is None and split == "test" and table.num_rows:
                    request = {"placement": placement, "user_id": int(chunk["user_id"][0]), "context": {
                        f.name: _raw(f, chunk[f"context.{f.name}"][0]) for f in spec.context(placement).features},
                        "top_n": 5}
        if writer is None:
            raise ValueError("config.synthetic.impressions: no rows to write")
        writer.close()
    ads = dict(world.ads_table())
    ads["bid"] = world.ad_bids
    catalogues = {}
    for name, table in (("ads", ads), ("users", world.users_table())):
        path = out / f"{name}.parquet"
        with fileio.replacing(path) as tmp:
            pq.write_table(catalogue.to_arrow(table), str(tmp))
        catalogues[name] = str(path)
    if request is not None:
        fileio.write_json(out / "request.json", request, indent=2)
    boundaries = {"validation_start": _day(SPLIT_DAYS["validation"][0]), "test_start": _day(SPLIT_DAYS["test"][0])}
    (out / "config.py").write_text(CONFIG_TEMPLATE.format(
        experiment=str(Path(config_path).expanduser().resolve()), placement=placement,
        impressions=str(out / IMPRESSIONS), time_column=TIME_COLUMN, **boundaries))
    return {"impressions": str(out / IMPRESSIONS), "rows": rows, "catalogues": catalogues,
            "request": str(out / "request.json") if request is not None else None,
            "config": str(out / "config.py"), "placement": placement, **boundaries}


def as_logs_command(config: ml_collections.ConfigDict, config_path: str | os.PathLike,
                    out: str | os.PathLike) -> dict:
    """`multitower generate --as-logs DIR`: writes the files and says what to run next."""
    summary = write_logs(config, config_path, out)
    print(json.dumps(summary, indent=2))
    print(f"next: multitower ingest --config {summary['config']} --out {Path(summary['config']).parent / 'data'}")
    return summary
