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
    """raw -> clean, clean_labeled -> tokenize, tokenize_labeled, with code deps, as dvc.lock records
    such a pipeline (one clean and one tokenize stage per kind of text, as in dvc.yaml)."""
    for name, text in {"data/raw/corpus/wiki/dump.xml": "<page/>", "data/raw/labeled/labels/x.csv": "a,b\n",
                       "data/clean/corpus.parquet": "corpus", "data/clean/labeled.parquet": "labeled",
                       "data/tokens/train/t.arrow": "ids", "data/tokens/labeled/train.arrow": "ids",
                       "ingest.py": "1", "clean.py": "2", "tokenize.py": "3"}.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)

    def stage(module: str, deps: list[str], outs: list[str], params: dict | None = None) -> dict:
        return {"cmd": f"python -m pipeline.stages.{module}", "deps": [entry(tmp_path, d) for d in deps],
                "params": {"params.yaml": params or {}}, "outs": [entry(tmp_path, o) for o in outs]}

    stages = {
        "ingest": stage("ingest", ["ingest.py"], ["data/raw"], {"data.sources": ["wiki", "labels"]}),
        "clean": stage("clean --kind corpus", ["data/raw/corpus", "clean.py"], ["data/clean/corpus.parquet"]),
        "clean_labeled": stage("clean --kind labeled", ["data/raw/labeled", "clean.py"],
                               ["data/clean/labeled.parquet"]),
        "tokenize": stage("tokenize", ["data/clean/corpus.parquet", "tokenize.py"], ["data/tokens/train"],
                          {"tokenize": {"vocab_size": 512}}),
        "tokenize_labeled": stage("tokenize --part labeled", ["data/clean/labeled.parquet", "tokenize.py"],
                                  ["data/tokens/labeled"]),
    }
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": stages}))
    return tmp_path


def test_trace_walks_back_to_the_raw_stage(chain: Path) -> None:
    result = lineage.trace("data/tokens/train/t.arrow", root=chain)
    assert [s["stage"] for s in result["stages"]] == ["tokenize", "clean", "ingest"]
    assert result["stages"][0]["params"] == {"tokenize": {"vocab_size": 512}}
    assert result["stages"][2]["outs"][0]["md5"] == path_md5(chain / "data/raw")


def test_clean_workspace_verifies_and_a_tampered_file_is_named(chain: Path) -> None:
    assert lineage.verify("data/tokens/train", root=chain) == []
    (chain / "data/clean/corpus.parquet").write_text("corpus!")
    problems = lineage.verify("data/tokens/train", root=chain)
    assert [p["path"] for p in problems] == ["data/clean/corpus.parquet"]
    assert problems[0]["downstream"] == ["tokenize"]


def test_missing_artifact_is_reported(chain: Path) -> None:
    (chain / "data/raw/labeled/labels/x.csv").unlink()
    problems = lineage.verify("data/tokens/labeled", root=chain)
    assert [p["path"] for p in problems] == ["data/raw/labeled", "data/raw"]  # a dep, and ingest's output
    assert problems[0]["downstream"] == ["clean_labeled", "tokenize_labeled"]
    (chain / "tokenize.py").unlink()
    actual = {p["path"]: p["actual"] for p in lineage.verify("data/tokens/train", root=chain)}
    assert actual["tokenize.py"] == "missing"


def test_impacted_lists_everything_downstream(chain: Path) -> None:
    # DVC's graph alone: a labeled source reaches the labeled stages only, a corpus source the corpus's
    result = lineage.impacted("data/raw/labeled/labels/x.csv", root=chain)
    assert result["stages"] == {"clean_labeled": ["data/clean/labeled.parquet"],
                                "tokenize_labeled": ["data/tokens/labeled"]}
    result = lineage.impacted("data/raw/corpus/wiki/dump.xml", root=chain)
    assert result["stages"] == {"clean": ["data/clean/corpus.parquet"], "tokenize": ["data/tokens/train"]}
    assert lineage.impacted("tokenize.py", root=chain)["stages"] == {
        "tokenize": ["data/tokens/train"], "tokenize_labeled": ["data/tokens/labeled"]}


@pytest.mark.parametrize(("labeled_input", "reached"), [("data/clean/labeled.parquet", True),
                                                        ("inputs/none", False)])
def test_labeled_texts_reach_the_cooccurrences_only_where_counted(
    chain: Path, labeled_input: str, reached: bool
) -> None:
    """words.include_labeled_train is the path cooccur depends on (the labeled set, or inputs/none)."""
    (chain / "inputs/none").mkdir(parents=True)
    (chain / "inputs/none/README.md").write_text("no input")
    (chain / "data/cooccur").mkdir()
    (chain / "data/cooccur/cooccur.parquet").write_text("triples")
    lock = yaml.safe_load((chain / "dvc.lock").read_text())
    lock["stages"]["cooccur"] = {
        "cmd": "python -m pipeline.stages.cooccur --unit word",
        "deps": [entry(chain, "data/clean/corpus.parquet"), entry(chain, labeled_input)],
        "params": {"params.yaml": {"words": {"include_labeled_train": labeled_input}}},
        "outs": [entry(chain, "data/cooccur")]}
    (chain / "dvc.lock").write_text(yaml.safe_dump(lock))
    assert ("cooccur" in lineage.impacted("data/raw/labeled/labels/x.csv", root=chain)["stages"]) == reached
    assert "cooccur" in lineage.impacted("data/raw/corpus/wiki/dump.xml", root=chain)["stages"]


def test_unknown_target_is_a_clear_error(chain: Path) -> None:
    with pytest.raises(InputError, match=r"no stage in dvc\.lock produced this path"):
        lineage.trace("data/nothing.bin", root=chain)
    with pytest.raises(InputError, match="records no stage that reads or writes"):
        lineage.impacted("elsewhere.txt", root=chain)
