"""Lineage over a dvc.lock: trace back to raw bytes, verify hashes, list what an input impacts."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline import lineage
from pipeline.files import InputError
from pipeline.tracking import path_md5


def entry(root: Path, path: str) -> dict[str, str]:
    return {"path": path, "md5": path_md5(root / path)}


@pytest.fixture
def chain(tmp_path: Path) -> Path:
    """raw -> clean -> tokens, with code deps, as dvc.lock records such a pipeline."""
    for name, text in {"data/raw/wiki/dump.xml": "<page/>", "data/raw/labels/x.csv": "a,b\n",
                       "data/clean/corpus.parquet": "corpus", "data/tokens/train/t.arrow": "ids",
                       "ingest.py": "1", "clean.py": "2", "tokenize.py": "3"}.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    stages = {
        "ingest": {"cmd": "python -m pipeline.stages.ingest", "deps": [entry(tmp_path, "ingest.py")],
                   "params": {"params.yaml": {"data.sources": ["wiki", "labels"]}},
                   "outs": [entry(tmp_path, "data/raw")]},
        "clean": {"cmd": "python -m pipeline.stages.clean",
                  "deps": [entry(tmp_path, "data/raw"), entry(tmp_path, "clean.py")],
                  "params": {"params.yaml": {"data": {"sources": [{"name": "wiki"},
                                                                  {"name": "labels", "label_field": "y"}]}}},
                  "outs": [entry(tmp_path, "data/clean")]},
        "tokenize": {"cmd": "python -m pipeline.stages.tokenize",
                     "deps": [entry(tmp_path, "data/clean"), entry(tmp_path, "tokenize.py")],
                     "params": {"params.yaml": {"tokenize": {"vocab_size": 512}}},
                     "outs": [entry(tmp_path, "data/tokens")]},
    }
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": stages}))
    return tmp_path


def test_trace_walks_back_to_the_raw_stage(chain: Path) -> None:
    result = lineage.trace("data/tokens/train/t.arrow", root=chain)
    assert [s["stage"] for s in result["stages"]] == ["tokenize", "clean", "ingest"]
    assert result["stages"][0]["params"] == {"tokenize": {"vocab_size": 512}}
    assert result["stages"][2]["outs"][0]["md5"] == path_md5(chain / "data/raw")


def test_clean_workspace_verifies_and_a_tampered_file_is_named(chain: Path) -> None:
    assert lineage.verify("data/tokens", root=chain) == []
    (chain / "data/clean/corpus.parquet").write_text("corpus!")
    problems = lineage.verify("data/tokens", root=chain)
    assert [p["path"] for p in problems] == ["data/clean"]
    assert problems[0]["downstream"] == ["tokenize"]


def test_missing_artifact_is_reported(chain: Path) -> None:
    (chain / "data/raw/labels/x.csv").unlink()
    problems = lineage.verify("data/tokens", root=chain)
    assert [p["path"] for p in problems] == ["data/raw"]
    assert problems[0]["downstream"] == ["clean", "tokenize"]
    (chain / "tokenize.py").unlink()
    actual = {p["path"]: p["actual"] for p in lineage.verify("data/tokens", root=chain)}
    assert actual["tokenize.py"] == "missing"


def test_impacted_lists_everything_downstream(chain: Path) -> None:
    # the clean and tokenize contracts keep a labeled source out of the corpus, its shards and their
    # manifest (the labeled set's summary lives beside its own shards)
    result = lineage.impacted("data/raw/labels/x.csv", root=chain)
    assert result["stages"] == {"clean": ["data/clean/labeled.parquet"], "tokenize": ["data/tokens/labeled"]}
    result = lineage.impacted("data/raw/wiki/dump.xml", root=chain)
    assert result["stages"] == {"clean": ["data/clean/corpus.parquet"], "tokenize": ["data/tokens"]}
    assert lineage.impacted("tokenize.py", root=chain)["stages"] == {"tokenize": ["data/tokens"]}


WORD_DEPS = ("data/clean/corpus.parquet", "data/clean/labeled.parquet")


@pytest.mark.parametrize(("stage", "deps", "include_labeled", "reached"), [
    ("cooccur", WORD_DEPS, True, True),
    ("cooccur", WORD_DEPS, False, False),
    ("cooccur_token", ("data/tokens/train",), True, False),  # the shards hold no labeled text here
])
def test_labeled_texts_reach_the_cooccurrences_only_where_counted(
    chain: Path, stage: str, deps: tuple[str, ...], include_labeled: bool, reached: bool
) -> None:
    (chain / "data/clean/labeled.parquet").write_text("labeled")
    (chain / f"data/{stage}").mkdir()
    (chain / f"data/{stage}/cooccur.parquet").write_text("triples")
    lock = yaml.safe_load((chain / "dvc.lock").read_text())
    lock["stages"][stage] = {
        "cmd": f"python -m pipeline.stages.cooccur --unit {'token' if 'token' in stage else 'word'}",
        "deps": [entry(chain, p) for p in deps],
        "params": {"params.yaml": {"words": {"include_labeled_train": include_labeled}}},
        "outs": [entry(chain, f"data/{stage}")]}
    (chain / "dvc.lock").write_text(yaml.safe_dump(lock))
    assert (stage in lineage.impacted("data/raw/labels/x.csv", root=chain)["stages"]) == reached
    assert stage in lineage.impacted("data/raw/wiki/dump.xml", root=chain)["stages"]


def test_unknown_target_is_a_clear_error(chain: Path) -> None:
    with pytest.raises(InputError, match=r"no stage in dvc\.lock produced this path"):
        lineage.trace("data/nothing.bin", root=chain)
    with pytest.raises(InputError, match="records no stage that reads or writes"):
        lineage.impacted("elsewhere.txt", root=chain)
