"""The tokenize stage and the shard readers, on a slice of the real cleaned corpus."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import follow_paths, tokenize_all
from tokenizers import Tokenizer

from pipeline.config import Config, parse_config, project_root
from pipeline.files import InputError, file_digest
from pipeline.shards import TokenShards, WindowPosition, read_manifest, write_shard
from pipeline.stages import clean, ingest, tokenize

REPO = project_root(Path(__file__).parent)  # the checkout these tests belong to

MULTI_SCRIPT = [
    "Plain ASCII with  double spaces, tabs\tand a trailing newline\n",
    "Ελληνικά: η γρήγορη καφέ αλεπού. Русский текст: съешь же ещё этих мягких булок.",
    "中文文本：敏捷的棕色狐狸跳过了懒狗。日本語のテキスト：いろはにほへと。한국어 문장입니다.",
    "العربية: نص قصير للاختبار. עברית: טקסט קצר. हिन्दी: परीक्षण के लिए पाठ।",
    "Emoji 🙂🚀👩‍👩‍👧‍👦 and flags 🇫🇷🇯🇵, combining e\u0301 vs é, zero-width\u200djoiner.",
]


def tiny_params(root: Path, vocab_size: int = 400) -> dict[str, Any]:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["paths"] = {"raw": str(root / "raw"), "clean": str(root / "clean"), "metrics": str(root),
                       "tokenizer": str(root / "tokenizer"), "tokens": str(root / "tokens")}
    params["tracking"] = {"enabled": False}
    params["tokenize"].update(vocab_size=vocab_size, shard_tokens=4096, max_length=16)
    return follow_paths(params)


def small_clean_dir(root: Path, source: Path) -> Path:
    """A clean-stage output made from a slice of the real cleaned corpus plus multi-script texts."""
    corpus = pq.read_table(source / clean.CORPUS_FILE).to_pylist()
    taken = [r for split, n in (("train", 14), ("val", 3), ("test", 3))
             for r in [r for r in corpus if r["split"] == split][:n]]
    texts = [r["text"] for r in taken] + MULTI_SCRIPT
    splits = [r["split"] for r in taken] + ["train", "train", "val", "test", "test"]
    out = root / "clean"
    out.mkdir(parents=True)
    pq.write_table(pa.table({"id": [str(i) for i in range(len(texts))], "source": ["s"] * len(texts),
                             "text": texts, "split": splits}), out / clean.CORPUS_FILE)
    labeled = pq.read_table(source / clean.LABELED_FILE)
    labeled = labeled.take(list(range(0, labeled.num_rows, 100)))  # the file is sorted by label
    pq.write_table(labeled, out / clean.LABELED_FILE)
    return out


@pytest.fixture(scope="module")
def real_clean(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("real")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["paths"] = {"raw": str(root / "raw"), "clean": str(root / "clean"), "metrics": str(root)}
    params["tracking"] = {"enabled": False}
    cfg = parse_config(follow_paths(params))
    ingest.run(cfg, root / "raw")
    clean.run(cfg, root / "raw", root / "clean", root / "clean.json")
    return root / "clean"


def run_stage(cfg: Config, root: Path) -> dict[str, Any]:
    return tokenize_all(cfg, root / "clean", root, root)


@pytest.fixture(scope="module")
def tokenized(real_clean: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    root = tmp_path_factory.mktemp("tok")
    small_clean_dir(root, real_clean)
    return root, run_stage(parse_config(tiny_params(root)), root)


def test_round_trip_is_exact(tokenized: tuple[Path, dict[str, Any]]) -> None:
    root, _ = tokenized
    tokenizer = Tokenizer.from_file(str(root / "tokenizer" / "tokenizer.json"))
    corpus = pq.read_table(root / "clean" / clean.CORPUS_FILE).column("text").to_pylist()
    for text in corpus + MULTI_SCRIPT:
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        assert tokenizer.decode(ids, skip_special_tokens=False) == text


def test_documents_in_shards_decode_to_the_corpus(tokenized: tuple[Path, dict[str, Any]]) -> None:
    root, _ = tokenized
    tokenizer = Tokenizer.from_file(str(root / "tokenizer" / "tokenizer.json"))
    table = pq.read_table(root / "clean" / clean.CORPUS_FILE).to_pydict()
    for split in ("train", "val", "test"):
        expected = [t for t, s in zip(table["text"], table["split"], strict=True) if s == split]
        docs = [tokenizer.decode(d.tolist()) for d in TokenShards(root / "tokens", split).documents()]
        assert docs == expected


def test_transformers_gives_the_same_ids(tokenized: tuple[Path, dict[str, Any]]) -> None:
    from transformers import PreTrainedTokenizerFast

    root, _ = tokenized
    path = str(root / "tokenizer" / "tokenizer.json")
    fast = PreTrainedTokenizerFast(tokenizer_file=path)
    raw = Tokenizer.from_file(path)
    for text in MULTI_SCRIPT:
        assert fast(text)["input_ids"] == raw.encode(text).ids


def test_manifest_counts_and_hashes_match_the_shards(tokenized: tuple[Path, dict[str, Any]]) -> None:
    root, metrics = tokenized
    manifest = json.loads((root / "tokens" / "manifest.json").read_text())
    assert manifest["tokenizer_sha256"] == file_digest(root / "tokenizer" / "tokenizer.json")
    assert manifest["dtype"] == "uint16"
    assert len([s for s in manifest["shards"] if s["split"] == "train"]) > 1  # 4096-token shards
    for shard in manifest["shards"]:
        path = root / "tokens" / shard["file"]
        assert file_digest(path) == shard["sha256"]
        with pa.memory_map(str(path)) as source:
            tokens = pa.ipc.open_file(source).read_all().column("tokens").to_numpy()
        assert len(tokens) == shard["tokens"] and tokens.dtype == np.uint16
        assert np.count_nonzero(tokens == manifest["eot_id"]) == shard["documents"]
    for split in ("train", "val", "test"):
        assert metrics["tokens"][split] == len(TokenShards(root / "tokens", split))
        assert 1.0 < metrics["bytes_per_token"][split] < 8.0


def test_labeled_set_is_encoded_with_a_label_mapping(tokenized: tuple[Path, dict[str, Any]]) -> None:
    root, _ = tokenized
    mapping = json.loads((root / "tokens" / "labeled" / "labels.json").read_text())
    assert mapping == {"negative": 0, "neutral": 1, "positive": 2}
    with pa.memory_map(str(root / "tokens" / "labeled" / "train.arrow")) as source:
        table = pa.ipc.open_file(source).read_all().to_pydict()
    assert max(len(ids) for ids in table["ids"]) == 16
    assert set(table["label"]) <= {0, 1, 2}
    summary = json.loads((root / "tokens" / "labeled" / "summary.json").read_text())
    assert summary["labels"] == mapping and summary["splits"]["train"]["examples"] == len(table["label"])
    assert "labeled" not in read_manifest(root / "tokens")  # the corpus manifest knows no labeled text
    tokenizer = Tokenizer.from_file(str(root / "tokenizer" / "tokenizer.json"))
    assert summary["pad_id"] == tokenizer.token_to_id("<|pad|>")


def test_the_corpus_part_never_reads_the_labeled_set_and_the_labeled_part_leaves_it(
        real_clean: Path, tmp_path: Path) -> None:
    """What DVC's graph says: `tokenize` reads the labeled set only when include_labeled_train names
    it, and `tokenize_labeled` writes only tokens/labeled (beside the corpus shards, untouched)."""
    root = tmp_path / "run"
    small_clean_dir(root, real_clean)
    cfg = parse_config(tiny_params(root))
    (root / "clean" / clean.LABELED_FILE).rename(tmp_path / "labeled.parquet")
    tokenize.run(cfg, root / "clean", root / "tokenizer", root / "tokens", root / "tokenize.json")
    def digests() -> dict[str, str]:
        files = (p for p in (root / "tokens").rglob("*") if p.is_file())
        return {p.relative_to(root).as_posix(): file_digest(p) for p in files}

    corpus_files = digests()
    with pytest.raises(InputError, match="clean_labeled"):
        tokenize.run_labeled(cfg, root / "clean", root / "tokenizer", root / "tokens", root / "labeled.json")
    (tmp_path / "labeled.parquet").rename(root / "clean" / clean.LABELED_FILE)
    tokenize.run_labeled(cfg, root / "clean", root / "tokenizer", root / "tokens", root / "labeled.json")
    after = digests()
    assert {k: v for k, v in after.items() if "/labeled/" not in k} == corpus_files
    assert {"tokens/labeled/train.arrow", "tokens/labeled/summary.json"} <= after.keys()


def test_two_runs_are_byte_identical(real_clean: Path, tmp_path: Path) -> None:
    digests = []
    for name in ("a", "b"):
        root = tmp_path / name
        small_clean_dir(root, real_clean)
        run_stage(parse_config(tiny_params(root)), root)
        files = sorted(p for p in root.rglob("*") if p.is_file() and "clean" not in p.parts)
        digests.append({p.relative_to(root).as_posix(): file_digest(p) for p in files})
    assert digests[0] == digests[1]


def test_windows_are_deterministic_and_differ_by_rank(tokenized: tuple[Path, dict[str, Any]]) -> None:
    root, _ = tokenized
    shards = TokenShards(root / "tokens", "train")
    first = next(shards.random_windows(32, 4, WindowPosition(seed=1, rank=0, step=0)))
    again = next(shards.random_windows(32, 4, WindowPosition(seed=1, rank=0, step=0)))
    ranks = [next(shards.random_windows(32, 2, WindowPosition(seed=1, rank=r, step=0, world=2)))
             for r in (0, 1)]
    assert np.array_equal(np.concatenate(ranks), first)  # two ranks read one process's global batch
    other = ranks[1]
    stream = shards.random_windows(32, 4, WindowPosition(seed=1, rank=0, step=0))
    next(stream)
    resumed = next(shards.random_windows(32, 4, WindowPosition(seed=1, rank=0, step=1)))
    assert first.shape == (4, 33) and np.array_equal(first, again) and not np.array_equal(ranks[0], other)
    assert np.array_equal(next(stream), resumed)


def test_sequential_windows_cover_every_token_once(tokenized: tuple[Path, dict[str, Any]]) -> None:
    root, _ = tokenized
    shards = TokenShards(root / "tokens", "val")
    windows = np.concatenate(list(shards.sequential_windows(64, 8)))
    targets = windows[:, 1:].reshape(-1)
    everything = shards.slice(0, len(shards))
    assert np.array_equal(targets, everything[1 : 1 + len(targets)])
    assert len(targets) > len(shards) - 65


def test_reading_windows_does_not_grow_memory_with_shard_size(tmp_path: Path) -> None:
    def anonymous_kib() -> int:
        status = Path("/proc/self/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines() if line.startswith("RssAnon")))

    big = np.arange(64 * 2**20, dtype=np.uint32) % 50_000  # a 256 MiB shard
    (tmp_path / "train").mkdir()
    write_shard(tmp_path / "train" / "train-00000.arrow", big)
    manifest = {"eot_id": 0, "shards": [{"split": "train", "file": "train/train-00000.arrow",
                                         "sha256": "", "tokens": len(big), "documents": 0}]}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    del big
    before = anonymous_kib()
    shards = TokenShards(tmp_path, "train", verify=False)
    stream = shards.random_windows(256, 16, WindowPosition(seed=0, rank=0, step=0))
    total = sum(int(next(stream).sum() > 0) for _ in range(200))
    grown_mib = (anonymous_kib() - before) / 1024
    assert total == 200 and len(shards) == 64 * 2**20
    assert grown_mib < 32, f"anonymous memory grew {grown_mib:.0f} MiB reading a 256 MiB shard"


def test_reading_texts_holds_no_more_arrow_memory_for_a_longer_file(real_clean: Path, tmp_path: Path) -> None:
    def arrow_bytes_held(copies: int) -> int:
        path = tmp_path / f"corpus-{copies}.parquet"
        pq.write_table(pa.concat_tables([corpus] * copies), path, row_group_size=8)
        held = 0
        for texts in tokenize.read_texts(path, "train", batch=4):
            held = max(held, pa.total_allocated_bytes())
            assert texts
        return held

    corpus = pq.read_table(real_clean / clean.CORPUS_FILE, columns=["text", "split"])
    once, eight_times = arrow_bytes_held(1), arrow_bytes_held(8)
    assert eight_times < 1.2 * once, f"Arrow held {once} bytes for the corpus, {eight_times} for it 8 times"


# ---------------------------------------------------------------- bad input


def test_tampered_shard_is_refused(tokenized: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    root, _ = tokenized
    copy_dir = tmp_path / "tokens"
    import shutil

    shutil.copytree(root / "tokens", copy_dir)
    shard = copy_dir / "val" / "val-00000.arrow"
    data = bytearray(shard.read_bytes())
    data[-200] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(InputError, match=r"val-00000\.arrow: sha256 does not match"):
        TokenShards(copy_dir, "val")


def expect_failure(params: dict[str, Any], root: Path, pattern: str) -> None:
    with pytest.raises(InputError, match=pattern):
        run_stage(parse_config(params), root)
    assert not (root / "tokens").exists() and not (root / "tokenizer").exists()


def test_vocabulary_too_small(real_clean: Path, tmp_path: Path) -> None:
    small_clean_dir(tmp_path, real_clean)
    expect_failure(tiny_params(tmp_path, vocab_size=200), tmp_path, "vocab_size 200 is too small")


def test_missing_and_unparsable_tokenizer_file(real_clean: Path, tmp_path: Path) -> None:
    small_clean_dir(tmp_path, real_clean)
    params = tiny_params(tmp_path)
    params["tokenize"]["tokenizer_file"] = str(tmp_path / "none.json")
    expect_failure(copy.deepcopy(params), tmp_path, "none.json: tokenizer file not found")
    (tmp_path / "bad.json").write_text("{not json")
    params["tokenize"]["tokenizer_file"] = str(tmp_path / "bad.json")
    expect_failure(params, tmp_path, "bad.json: not a tokenizer.json")


def test_empty_split(real_clean: Path, tmp_path: Path) -> None:
    out = small_clean_dir(tmp_path, real_clean)
    table = pq.read_table(out / clean.CORPUS_FILE).to_pydict()
    table["split"] = ["train" if s == "test" else s for s in table["split"]]
    pq.write_table(pa.table(table), out / clean.CORPUS_FILE)
    expect_failure(tiny_params(tmp_path), tmp_path, "split 'test' holds no documents")


def test_reusing_a_tokenizer_file_gives_the_same_ids(tokenized: tuple[Path, dict[str, Any]],
                                                     real_clean: Path, tmp_path: Path) -> None:
    root, _ = tokenized
    small_clean_dir(tmp_path, real_clean)
    params = tiny_params(tmp_path)
    params["tokenize"]["tokenizer_file"] = str(root / "tokenizer" / "tokenizer.json")
    run_stage(parse_config(params), tmp_path)
    assert file_digest(tmp_path / "tokens" / "val" / "val-00000.arrow") == \
        file_digest(root / "tokens" / "val" / "val-00000.arrow")


def test_domain_adaptive_pretraining_appends_labeled_train_texts(real_clean: Path, tmp_path: Path) -> None:
    small_clean_dir(tmp_path, real_clean)
    params = tiny_params(tmp_path)
    params["tokenize"]["include_labeled_train"] = str(tmp_path / "clean" / clean.LABELED_FILE)
    run_stage(parse_config(params), tmp_path)
    tokenizer = Tokenizer.from_file(str(tmp_path / "tokenizer" / "tokenizer.json"))
    corpus = pq.read_table(tmp_path / "clean" / clean.CORPUS_FILE).to_pydict()
    labeled = pq.read_table(tmp_path / "clean" / clean.LABELED_FILE).to_pydict()
    expected = [t for t, s in zip(corpus["text"], corpus["split"], strict=True) if s == "train"]
    expected += [t for t, s in zip(labeled["text"], labeled["split"], strict=True) if s == "train"]
    docs = [tokenizer.decode(d.tolist()) for d in TokenShards(tmp_path / "tokens", "train").documents()]
    assert docs == expected  # the corpus, then the labeled train texts; val and test shards unchanged
    val = [t for t, s in zip(corpus["text"], corpus["split"], strict=True) if s == "val"]
    assert [tokenizer.decode(d.tolist()) for d in TokenShards(tmp_path / "tokens", "val").documents()] == val
    # the manifest marks where the corpus ends, for a baseline of the corpus alone
    train = TokenShards(tmp_path / "tokens", "train")
    totals = read_manifest(tmp_path / "tokens")["totals"]
    first = totals["train"]["corpus_tokens"]
    prefix = train.slice(0, first)
    corpus_train = sum(s == "train" for s in corpus["split"])
    assert first < totals["train"]["tokens"] and prefix[-1] == train.eot_id
    assert int((prefix == train.eot_id).sum()) == corpus_train
    assert totals["val"]["corpus_tokens"] == totals["val"]["tokens"]
