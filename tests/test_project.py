"""Commands act on the project around the current directory, also from a non-editable install."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.config import project_root

REPO = project_root(Path(__file__).parent)


def other_project(root: Path, seed: int) -> Path:
    """A second project: the repo's dvc.yaml and params.yaml with another seed, and a subdirectory."""
    root.mkdir()
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["seed"] = seed
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    (root / "notes" / "deeper").mkdir(parents=True)
    return root


def printed_seed(command: list[str], cwd: Path, env: dict[str, str] | None = None) -> int:
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, check=False, env=env)
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)["seed"]


def test_the_root_is_the_nearest_directory_with_dvc_yaml_or_dot_dvc(tmp_path):
    project = other_project(tmp_path / "p", seed=7)
    assert project_root(project / "notes" / "deeper") == project.resolve()
    (project / "notes" / ".dvc").mkdir()
    assert project_root(project / "notes" / "deeper") == (project / "notes").resolve()
    bare = tmp_path / "bare"
    bare.mkdir()
    assert project_root(bare) == bare.resolve()  # none above: the directory itself


def test_the_console_script_reads_the_params_of_the_project_it_runs_in(tmp_path):
    project = other_project(tmp_path / "p", seed=7)
    command = [sys.executable, "-m", "pipeline", "params"]
    assert printed_seed(command, project / "notes" / "deeper") == 7
    assert printed_seed(command, REPO) == yaml.safe_load((REPO / "params.yaml").read_text())["seed"]


def test_a_missing_params_file_is_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "pipeline.stages.pretrain"], cwd=tmp_path,
                            capture_output=True, text=True, check=False)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "params.yaml: params file not found" in result.stderr


@pytest.mark.slow
def test_a_non_editable_install_acts_on_the_current_project(tmp_path):
    source, target = tmp_path / "source", tmp_path / "site"  # setuptools builds inside the source tree
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "pipeline", "flows"):
        copy = shutil.copytree if (REPO / name).is_dir() else shutil.copy
        copy(REPO / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(source)], check=True, capture_output=True)
    installed = target / "pipeline" / "config.py"
    assert installed.exists() and not (target / "params.yaml").exists()
    project = other_project(tmp_path / "p", seed=11)
    env = {**os.environ, "PYTHONPATH": str(target)}
    script = ("import pipeline, sys; assert pipeline.__file__.startswith(sys.argv[1]); "
              "from pipeline.cli import app; app(['params'])")
    command = [sys.executable, "-c", script, str(target)]
    assert printed_seed(command, project / "notes", env) == 11
