"""`multitower generate`: write the synthetic world as TFDS ArrayRecord datasets plus its catalogues."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import ml_collections
import pyarrow as pa

from multitower_jax import config as config_lib
from multitower_jax import features as F
from multitower_jax import workdir as workdir_lib
from multitower_jax.data import builders, catalogue
from multitower_jax.data.synthetic import World

CATALOGUE_DIR = catalogue.CATALOGUE_DIR


def write_catalogues(world: World, out: Path) -> None:
    """ads.parquet (with bids) and users.parquet: the entities behind the impressions, for export."""
    ads = dict(world.ads_table())
    ads["bid"] = world.ad_bids
    arrow = catalogue.to_arrow(ads)
    for column, lists in world.ad_targeting().items():  # targeting: variable-length lists of allowed values
        arrow = arrow.append_column(column, pa.array(lists, type=pa.list_(
            pa.string() if column == "target.placements" else pa.int64())))
    catalogue.write(out, "ads", arrow)
    catalogue.write(out, "users", catalogue.to_arrow(world.users_table()))


def generate(config: ml_collections.ConfigDict, out: str | os.PathLike) -> dict:
    """Generate every configured placement into ``out``; returns rows and seconds per placement."""
    out = Path(out)
    spec = F.parse_spec(config.features)
    world = World(config.synthetic, spec)
    sizes = config.synthetic.impressions
    summary = {}
    for placement in config.data.placements:
        if builders.dataset_dir(out, "synthetic", placement).exists():
            raise FileExistsError(
                f"{builders.dataset_dir(out, 'synthetic', placement)} already exists; "
                "choose another --out or delete it to regenerate")
        start = time.perf_counter()
        builder = builders.SyntheticImpressions(
            spec=spec, placement=placement, block_size=config.data.block_size, with_oracle=True,
            chunk_source=lambda split, p=placement: world.impressions(p, split, sizes[split]),
            metadata={"seed": config.synthetic.seed}, data_dir=str(out))
        builder.download_and_prepare()
        summary[placement] = {"rows": {s: int(sizes[s]) for s in builders.SPLITS},
                              "seconds": round(time.perf_counter() - start, 1)}
    write_catalogues(world, out)
    return summary


def generate_command(config: ml_collections.ConfigDict, out: str | os.PathLike) -> dict:
    """`multitower generate --out D`: refuses a training workdir as D (before writing anything),
    generates, and writes D/config.json with ``data.dir`` recorded as an absolute path."""
    workdir_lib.refuse_training_workdir(out, "generate")
    out = workdir_lib.absolute(out)
    config.data.dir = out
    summary = generate(config, out)
    config_lib.write_resolved(config, out)
    print(json.dumps(summary, indent=2))
    print(f"wrote {out} (use --config.data.dir={out})")
    return summary
