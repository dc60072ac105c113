"""A user's config file loads from any folder (issue 15, part 1): with or without __init__.py, in
a folder whose name is no identifier or is the user's own `experiments`, importing the project's
`experiments.base`; an error in it names the file and line. Each case runs in a fresh Python
started outside the repository, as a user's command would (pytest itself has the repo on sys.path)."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from multitower_jax import config as config_lib
from tests.conftest import QUICKSTART

USER_CONFIG = """
from experiments import base


def get_config():
    config = base.get_config()
    config.data.batch_size = {batch}
    return config
"""

LOAD = """
import json, sys
from multitower_jax import config
try:
    c = config.load(sys.argv[1], sys.argv[2:])
except config.ConfigError as e:
    print(json.dumps({"error": str(e)}))
else:
    print(json.dumps({"batch_size": c.data.batch_size, "placements": list(c.data.placements)}))
"""


def _load_outside(path, cwd, *overrides):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", LOAD, str(path), *overrides], cwd=cwd, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


@pytest.mark.parametrize("folder, init", [
    ("configs", False),  # the AttributeError: 'NoneType' object has no attribute 'loader'
    ("myconfigs", True),  # the ModuleNotFoundError: experiments
    ("my-configs", False),  # not an identifier: was refused
    ("experiments", True),  # the user's own experiments package must not hide the project's
])
def test_a_config_in_any_folder_imports_the_projects_base(tmp_path, folder, init):
    path = _write(tmp_path / "repo" / folder / "mine.py", USER_CONFIG.format(batch=333))
    if init:
        _write(tmp_path / "repo" / folder / "__init__.py", "")
    got = _load_outside(path, tmp_path, "--config.data.placements=('search','cart')")
    assert got == {"batch_size": 333, "placements": ["search", "cart"]}


def test_configs_with_the_same_name_in_two_folders_stay_apart(tmp_path):
    a = _write(tmp_path / "a" / "exp.py", USER_CONFIG.format(batch=11))
    b = _write(tmp_path / "b" / "exp.py", USER_CONFIG.format(batch=22))
    assert config_lib.load(a).data.batch_size == 11
    assert config_lib.load(b).data.batch_size == 22
    assert config_lib.load(a).data.batch_size == 11


def test_a_config_package_imports_its_siblings(tmp_path):
    _write(tmp_path / "teamconfigs" / "__init__.py", "")
    _write(tmp_path / "teamconfigs" / "common.py", USER_CONFIG.format(batch=44))
    path = _write(tmp_path / "teamconfigs" / "variant.py", """
        from teamconfigs import common


        def get_config():
            config = common.get_config()
            config.data.eval_batch_size = 55
            return config
        """)
    config = config_lib.load(path)
    assert (config.data.batch_size, config.data.eval_batch_size) == (44, 55)


def test_the_projects_experiments_still_load_by_path_from_anywhere(tmp_path):
    got = _load_outside(QUICKSTART, tmp_path)
    assert got["batch_size"] == config_lib.load(QUICKSTART).data.batch_size


def test_an_error_in_a_config_names_its_file_and_line(tmp_path, capsys):
    path = _write(tmp_path / "broken" / "bad.py", """
        from experiments import base


        def get_config():
            config = base.get_config()
            config.data.batch_sise = 4
            return config.data.no_such_key
        """)
    with pytest.raises(config_lib.ConfigError, match=rf"{path}:8: AttributeError"):
        config_lib.load(path)
    syntax = _write(tmp_path / "broken" / "syntax.py", "def get_config(:\n")
    with pytest.raises(config_lib.ConfigError, match=rf"{syntax}:1: SyntaxError"):
        config_lib.load(syntax)
    missing = _write(tmp_path / "broken" / "imports.py", "import no_such_module_xyz\n")
    with pytest.raises(config_lib.ConfigError, match=rf"{missing}:1: ModuleNotFoundError"):
        config_lib.load(missing)
    from multitower_jax import cli

    assert cli.main(["generate", "--config", str(path), "--out", str(tmp_path / "data")]) == 2
    err = capsys.readouterr().err
    assert f"{path}:8" in err and "Traceback" not in err
