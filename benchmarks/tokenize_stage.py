"""Tokenize-stage throughput against its raw limit, and its memory at 1x versus 4x the corpus.

- Stage: `pipeline.stages.tokenize.run` reusing a trained tokenizer (no training), from clean Parquet to
  shards on disk, in a child process whose peak RSS is read back.
- Limit: `Tokenizer.encode_batch` on the same texts in the same batches, in memory, no I/O.
The corpus is the default clean corpus repeated `k` times (each copy a new set of documents).

    python benchmarks/tokenize_stage.py [--repeats 3]   # after `make run` (needs data/clean, data/tokenizer)
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[0] = str(ROOT)

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402

from pipeline.config import load_config  # noqa: E402
from pipeline.stages import tokenize  # noqa: E402

CHILD = """
import json, resource, sys, time
from pathlib import Path
from pipeline.stages import tokenize
from pipeline.config import load_config
root, tokenizer_file = Path(sys.argv[1]), sys.argv[2]
cfg = load_config(overrides={"tracking.enabled": False, "tokenize.tokenizer_file": tokenizer_file})
started = time.perf_counter()
tokenize.run(cfg, root / "clean", root / "tokenizer", root / "tokens", root / "tokenize.json")
print(json.dumps({"seconds": time.perf_counter() - started,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def repeated_corpus(clean_dir: Path, out: Path, times: int) -> list[str]:
    table = pq.read_table(clean_dir / tokenize.CORPUS_FILE)
    out.mkdir(parents=True)
    rows = load_config().data.clean.row_group_rows  # as the clean stage writes it
    pq.write_table(pa.concat_tables([table] * times), out / tokenize.CORPUS_FILE, row_group_size=rows)
    labeled = pq.read_table(clean_dir / tokenize.LABELED_FILE)
    pq.write_table(labeled.take(list(range(0, labeled.num_rows, 50))), out / tokenize.LABELED_FILE)
    return table.column("text").to_pylist() * times


def stage(root: Path, tokenizer_file: Path) -> dict[str, float]:
    result = subprocess.run([sys.executable, "-c", CHILD, str(root), str(tokenizer_file)], cwd=ROOT,
                            capture_output=True, text=True, check=True,
                            env={**os.environ, "TOKENIZERS_PARALLELISM": "true"})
    return json.loads(result.stdout.strip().splitlines()[-1])


def limit(texts: list[str], tokenizer: Tokenizer, batch: int) -> float:
    started = time.perf_counter()
    for i in range(0, len(texts), batch):
        tokenizer.encode_batch(texts[i : i + batch], add_special_tokens=False)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    cfg = load_config()
    clean_dir, tokenizer_file = ROOT / cfg.paths.clean, ROOT / cfg.paths.tokenizer / "tokenizer.json"
    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    result: dict[str, object] = {"cores": os.cpu_count()}
    with tempfile.TemporaryDirectory() as tmp:
        for times in (1, 4):
            root = Path(tmp) / f"x{times}"
            texts = repeated_corpus(clean_dir, root / "clean", times)
            mb = sum(len(t.encode()) for t in texts) / 1e6
            runs, limits = [], []
            for _ in range(args.repeats):  # alternate, never overlap
                runs.append(stage(root, tokenizer_file))
                limits.append(limit(texts, tokenizer, cfg.tokenize.batch_documents))
            seconds = statistics.median(r["seconds"] for r in runs)
            result[f"{times}x"] = {
                "text_mb": round(mb, 2),
                "stage_mb_per_s": round(mb / seconds, 2),
                "encode_batch_mb_per_s": round(mb / statistics.median(limits), 2),
                "ratio_stage_over_limit": round(statistics.median(limits) / seconds, 3),
                "peak_rss_mib": round(max(r["peak_rss_mib"] for r in runs), 1),
            }
    one, four = result["1x"], result["4x"]
    assert isinstance(one, dict) and isinstance(four, dict)
    print(f"{'corpus':7} {'text MB':>8} {'stage MB/s':>11} {'limit MB/s':>11} {'ratio':>6} {'RSS MiB':>8}")
    for key, row in (("1x", one), ("4x", four)):
        print(f"{key:7} {row['text_mb']:8.2f} {row['stage_mb_per_s']:11.2f} "
              f"{row['encode_batch_mb_per_s']:11.2f} {row['ratio_stage_over_limit']:6.3f} "
              f"{row['peak_rss_mib']:8.1f}")
    result["rss_growth_4x_over_1x"] = round(four["peak_rss_mib"] / one["peak_rss_mib"], 3)
    print(f"peak RSS 4x / 1x: {result['rss_growth_4x_over_1x']} (goal: flat); ratio goal >= 0.9")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
