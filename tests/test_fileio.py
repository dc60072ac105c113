"""fileio: the one atomic-write helper (issue 15, part 5): a failed write leaves the old file and
no temporary behind; the library's writers go through it."""

import re

import pytest

from multitower_jax import fileio
from tests.conftest import REPO


def test_write_replaces_whole_files(tmp_path):
    path = tmp_path / "report.json"
    fileio.write_json(path, {"a": 1})
    fileio.write_json(path, {"a": 2, "b": [1, 2]})
    assert path.read_text() == '{\n  "a": 2,\n  "b": [\n    1,\n    2\n  ]\n}'
    fileio.write_bytes(tmp_path / "x.png", b"\x89PNG")
    assert (tmp_path / "x.png").read_bytes() == b"\x89PNG"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json", "x.png"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "ads.parquet"
    path.write_text("old")
    with pytest.raises(RuntimeError), fileio.replacing(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["ads.parquet"]
    with pytest.raises(TypeError):
        fileio.write_json(path, {"not json": object()})
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["ads.parquet"]


def test_the_temporary_keeps_the_extension_and_is_hidden(tmp_path):
    tmp = fileio.temp_sibling(tmp_path / "reliability_ctr.png")
    assert tmp.parent == tmp_path and tmp.name.startswith(".") and tmp.suffix == ".png"


def test_no_hand_written_write_then_rename_is_left():
    """Every `<tmp>.replace(path)` of a file is fileio's; folders (atomic_dir, ingest's dataset swap) are not files."""
    found = []
    for path in sorted((REPO / "multitower_jax").rglob("*.py")):
        if path.name == "fileio.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if re.search(r"\btmp\w*\.replace\(|\.tmp[\"']", line):
                found.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert not found, "\n".join(found)
