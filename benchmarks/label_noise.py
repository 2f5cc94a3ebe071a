"""How much of the sentiment test set is a matter of opinion: macro-F1 of the classifier and of the
tuned TF-IDF baseline per band of annotator confidence (the raw CSV's `confidence` column, which the
clean stage does not keep; rows are joined to the clean labeled set by the clean stage's own id).

    python benchmarks/label_noise.py    # after `make run` (reads data/raw, data/clean, data/classifier)
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[0] = str(ROOT)

import numpy as np  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from sklearn.metrics import f1_score  # noqa: E402

from pipeline.classify import Classifier, read_labels  # noqa: E402
from pipeline.config import Config, load_config, project_root  # noqa: E402
from pipeline.sources import read_source  # noqa: E402
from pipeline.stages.clean import clean_document  # noqa: E402
from pipeline.stages.evaluate import tfidf_baseline  # noqa: E402

BANDS = ((0.0, 0.5), (0.5, 0.7), (0.7, 0.99), (0.99, 1.01))
CONFIDENCE_FIELD = "confidence"


def confidences(cfg: Config, raw_dir: Path) -> dict[str, float]:
    """Clean-stage id -> annotator confidence, for every labeled source row that has one."""
    found: dict[str, float] = {}
    for source in cfg.data.sources:
        if not source.label_field:
            continue
        reading = source.model_copy(update={"label_field": CONFIDENCE_FIELD})  # read confidence as the label
        for path in sorted((raw_dir / source.kind / source.name).rglob("*")):
            if path.is_file():
                for doc in read_source(reading, path):
                    if doc.label:
                        found[clean_document(doc).id] = float(doc.label)
    return found


def main() -> None:
    cfg = load_config()
    root = project_root()
    labeled = root / cfg.paths.clean / "labeled.parquet"
    table = pq.read_table(labeled, columns=["id", "text", "label", "split"]).to_pydict()
    test = [i for i, s in enumerate(table["split"]) if s == "test"]
    mapping = read_labels(root / cfg.paths.tokens / "labeled" / "labels.json")
    actual, tfidf, chosen = tfidf_baseline(labeled, mapping, cfg.evaluate, cfg.seed)
    names, _ = Classifier.load(root / cfg.paths.classifier).predict([table["text"][i] for i in test])
    ours = np.array([mapping[n] for n in names])
    known = confidences(cfg, root / cfg.paths.raw)
    confidence = np.array([known.get(table["id"][i], np.nan) for i in test])
    given = int(np.isfinite(confidence).sum())
    print(f"test texts {len(test)}, with a confidence {given}; TF-IDF C {chosen['C']}")
    print("| annotator confidence | texts | TF-IDF + LR macro-F1 | classifier macro-F1 |")
    print("|---|---|---|---|")
    bands = [(f"[{lo:.2f}, {min(hi, 1.0):.2f}{')' if hi < 1 else ']'}",
              (confidence >= lo) & (confidence < hi)) for lo, hi in BANDS]
    bands += [("none given", ~np.isfinite(confidence)), ("all", np.ones(len(test), dtype=bool))]
    for name, rows in bands:
        scores = [f1_score(actual[rows], p[rows], average="macro") for p in (tfidf, ours)]
        print(f"| {name} | {rows.sum()} | {scores[0]:.3f} | {scores[1]:.3f} |")


if __name__ == "__main__":
    main()
