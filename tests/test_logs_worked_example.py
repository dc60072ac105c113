"""The README's worked example ("Your own logs"): its exact commands, from the raw files `generate --as-logs`
writes to a `rank` answer, run in order at a tiny size (overrides appended; the features stay the same)."""

import json
import re
import shlex

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from multitower_jax import cli
from tests.conftest import REPO

TINY = {  # appended to the README's commands: later overrides win
    "generate": ["--config.synthetic.num_users=200", "--config.synthetic.num_ads=60",
                 "--config.synthetic.num_advertisers=20", "--config.synthetic.impressions.train=1200",
                 "--config.synthetic.impressions.validation=300", "--config.synthetic.impressions.test=200"],
    "train": ["--config.model.embed_dim=16", "--config.model.user_hidden=(32,)", "--config.model.ad_hidden=(32,)",
              "--config.model.fusion_hidden=(32,16)", "--config.model.text.dim=16", "--config.model.text.mlp_dim=32",
              "--config.model.text.num_heads=2", "--config.model.text.num_layers=1", "--config.data.batch_size=64",
              "--config.data.eval_batch_size=512", "--config.train.num_steps=4", "--config.train.eval_every=4",
              "--config.train.checkpoint_every=4", "--config.optim.warmup_steps=2", "--config.optim.decay_steps=4"],
}


def readme_commands() -> list[list[str]]:
    text = (REPO / "README.md").read_text()
    block = text[text.index("<!-- worked example: begin -->"):text.index("<!-- worked example: end -->")]
    block = re.search(r"```bash\n(.*?)```", block, re.S).group(1).replace("\\\n", " ")
    return [shlex.split(line) for line in block.splitlines() if line.strip()]


def test_the_readme_worked_example_runs_from_raw_logs_to_rank(tmp_path, monkeypatch, capsys):
    commands = readme_commands()
    assert [c[:2] for c in commands] == [["multitower", c] for c in
                                         ("generate", "ingest", "train", "export", "index", "rank")]
    monkeypatch.chdir(tmp_path)  # the README's relative runs/... paths land here
    for argv in commands:
        argv = [str(REPO / a) if a.startswith("experiments/") else a for a in argv[1:]]
        capsys.readouterr()
        assert cli.main(argv + TINY.get(argv[0], [])) == 0, argv
        if argv[0] == "ingest":
            report = json.loads((tmp_path / "runs/my_logs/data/ingest_report.json").read_text())
    answer = json.loads(capsys.readouterr().out)

    # The config generate wrote splits the CSV where the world's splits are.
    assert report["rows"] == {"train": 1200, "validation": 300, "test": 200}
    logs = pcsv.read_csv(tmp_path / "runs/my_logs/impressions.csv", convert_options=pcsv.ConvertOptions(
        column_types={"event_time": pa.string()})).to_pydict()
    assert len(logs["event_time"]) == 1700 and logs["event_time"][0].endswith("Z")
    assert report["catalogue"]["ads"] == len(set(logs["ad_id"])) and report["catalogue"]["ads_with_default_bid"] == 0

    # rank answered the generated request with the top ads of the ingested catalogue, bids from the logs.
    request = json.loads((tmp_path / "runs/my_logs/request.json").read_text())
    assert answer["placement"] == "search" and answer["user_id"] == request["user_id"]
    assert len(answer["ads"]) == request["top_n"]
    bid_of = dict(zip(logs["ad_id"], logs["bid"]))
    catalogue = pq.read_table(tmp_path / "runs/my_logs/data/catalogue/ads.parquet").to_pydict()
    for ad in answer["ads"]:
        assert ad["ad_id"] in catalogue["ad_id"]
        np.testing.assert_allclose(ad["bid"], bid_of[ad["ad_id"]], rtol=1e-3)
        np.testing.assert_allclose(ad["ecpm"], ad["bid"] * ad["pctr"] * ad["quality"] * 1000, rtol=1e-2)
    ecpm = [ad["ecpm"] for ad in answer["ads"]]
    assert ecpm == sorted(ecpm, reverse=True)
