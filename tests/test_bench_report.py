"""`multitower bench report`: the commands it runs, its Markdown table and JSON, and the README
block it rewrites (the benches themselves are replaced by a stub: each has its own test)."""

import json

import pytest

from multitower_jax import cli
from multitower_jax.bench import reporting
from tests.conftest import REPO


def _record(what, figures=None, error=None):
    r = {"bench": what, "command": f"multitower bench {what} --config C", "date": "2026-12-02 21:00 UTC",
         "machine": "vm", "cpu_model": "Some CPU", "cpus": 2, "load_average_before": [1.5, 1.0, 0.5],
         "load_average_after": [2.25, 1.0, 0.5], "seconds": 12.3}
    if figures is not None:
        r["figures"] = figures
    else:
        r["error"] = error
    return r


def test_commands_sized_only_when_asked():
    assert reporting.bench_command("serve", "c.py", ["--config.x=1"], None, None, None) == [
        "bench", "serve", "--config", "c.py", "--config.x=1"]
    assert reporting.bench_command("serve", "c.py", [], None, 200_000, 300)[-4:] == [
        "--num-ads", "200000", "--queries", "300"]
    assert reporting.bench_command("score", "c.py", [], None, 200_000, 300)[-2:] == ["--queries", "300"]
    assert "--num-ads" not in reporting.bench_command("train", "c.py", [], "w", 5, 5)
    assert reporting.bench_command("input", "c.py", [], "w", None, None)[-2:] == ["--workdir", "w"]
    rows = reporting.bench_command("rows", "c.py", ["--config.x=1"], "w", 5, 5)
    assert rows[:5] == ["bench", "rows", "--config", "c.py", "--config.x=1"]
    assert "--config.optim.large_table_optimizer=rowwise_adagrad" in rows and "--num-ads" not in rows
    assert reporting.parse_benches(None) == reporting.BENCHES
    assert reporting.parse_benches("score, serve") == ("score", "serve")
    with pytest.raises(reporting.ReportError, match="unknown \\['nope'\\]"):
        reporting.parse_benches("score,nope")
    # every bench the report runs is a `multitower bench` target
    assert set(reporting.BENCHES) == set(cli.BENCHES) - {"report"}


def test_markdown_rows_carry_conditions_and_chosen_figures():
    table = reporting.markdown([
        _record("score", {"fusion": "product", "p50_ms": 0.81234, "p99_ms": 2.5, "other": 7,
                          "microbatch_speedup": 3.25}),
        _record("serve", error="exit 1: boom | more"),
    ])
    lines = table.splitlines()
    assert len(lines) == 4 and lines[1] == "|---|---|---|---|"
    score = lines[2]
    assert score.startswith("| score | `multitower bench score --config C` | 2026-12-02 21:00 UTC; vm, Some CPU x 2;")
    assert "load 1.5 / 2.2" in score or "load 1.5 / 2.3" in score
    assert "fusion product, p50_ms 0.8123, p99_ms 2.5, microbatch_speedup 3.25" in score
    assert "other" not in score  # only the chosen figures (the JSON has all)
    assert lines[3].count("|") == 5 and "failed: exit 1: boom / more" in lines[3]


def test_run_writes_json_markdown_and_the_readme_block(tmp_path, monkeypatch):
    calls = []

    def fake_run_one(what, args, folder):
        calls.append(args)
        return _record(what, {"p50_ms": 1.0 + len(calls)})

    monkeypatch.setattr(reporting, "run_one", fake_run_one)
    readme = tmp_path / "README.md"
    readme.write_text(f"# T\n\nbefore\n{reporting.BEGIN_MARKER}\nold table\n{reporting.END_MARKER}\nafter\n")
    report = reporting.run("c.py", ["--config.a=1"], "score,serve", None, 50, None, str(tmp_path / "r.json"),
                           str(tmp_path / "r.md"), str(readme))
    assert [a[:2] for a in calls] == [["bench", "score"], ["bench", "serve"]]
    assert calls[0][-2:] == ["--queries", "50"]
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved == json.loads(json.dumps(report))
    assert [b["bench"] for b in saved["benches"]] == ["score", "serve"] and saved["cpu_model"]
    table = (tmp_path / "r.md").read_text()
    text = readme.read_text()
    assert "old table" not in text and text.startswith("# T\n\nbefore\n") and text.endswith(
        f"{reporting.END_MARKER}\nafter\n")
    assert f"{reporting.BEGIN_MARKER}\n{table}{reporting.END_MARKER}" in text
    # a README without the markers is refused before any bench runs
    calls.clear()
    readme.write_text("no markers\n")
    with pytest.raises(reporting.ReportError, match="markers"):
        reporting.run("c.py", [], "score", readme=str(readme))
    assert calls == []


def test_the_readme_has_one_generated_block():
    reporting.check_markers(REPO / "README.md")


def test_cli_bench_report_bad_input_exits_2(tmp_path, capsys):
    config = str(REPO / "experiments" / "quickstart.py")
    assert cli.main(["bench", "report", "--config", config, "--benches", "nope"]) == 2
    assert "unknown ['nope']" in capsys.readouterr().err
    (tmp_path / "R.md").write_text("nothing\n")
    assert cli.main(["bench", "report", "--config", config, "--readme", str(tmp_path / "R.md")]) == 2
    assert "markers" in capsys.readouterr().err
