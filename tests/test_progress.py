"""Progress off a terminal: one line every N seconds with the figures, rate and ETA, and a last line."""

from __future__ import annotations

import io

from pipeline.config import parse_config
from pipeline.progress import Progress, duration
from pipeline.stages import glove


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_lines_come_every_n_seconds_with_rate_and_eta():
    clock, out = Clock(), io.StringIO()
    bar = Progress("pretrain", 100, "step", rate=("tokens", 2048), stream=out, every=30, clock=clock)
    for _ in range(10):  # 10 steps, 5 s each: a line at 30 s
        clock.now += 5
        bar.update(1, loss=4.5)
    bar.update(0, val_loss=4.25)
    bar.close()
    lines = out.getvalue().splitlines()
    assert lines[0] == ("pretrain: step 6/100 (6%), loss 4.5000, 410 tokens/s, elapsed 30s, ETA 7m50s")
    assert lines[-1] == ("pretrain: step 10/100 (10%), loss 4.5000, val_loss 4.2500, 410 tokens/s, "
                         "elapsed 50s, ETA 7m30s")
    assert len(lines) == 2


def test_a_resumed_count_rates_only_the_new_work_and_an_unknown_total_has_no_eta():
    clock, out = Clock(), io.StringIO()
    bar = Progress("cooccur", None, "unit", initial=0, stream=out, every=0, clock=clock)
    clock.now = 2
    bar.update(5000)
    assert out.getvalue().strip() == "cooccur: unit 5,000, 2,500 units/s, elapsed 2s"
    out, clock = io.StringIO(), Clock()
    resumed = Progress("finetune", 10, "step", initial=8, stream=out, every=0, clock=clock)
    clock.now = 1
    resumed.update(1)
    assert out.getvalue().strip() == "finetune: step 9/10 (90%), 1.00 steps/s, elapsed 1s, ETA 1s"
    quiet = Progress("rank 1", 10, "step", stream=(silent := io.StringIO()), every=0, enabled=False)
    quiet.update(3)
    quiet.close()
    assert silent.getvalue() == ""
    assert duration(3725) == "1h02m"


def test_a_stage_reports_progress_when_not_on_a_terminal(small_project, tmp_path, monkeypatch, capsys):
    from pipeline.stages import cooccur

    root, params = small_project
    monkeypatch.setenv("PIPELINE_PROGRESS_SECONDS", "0")
    cfg = parse_config({**params, "glove": {**params["glove"], "epochs": 3, "dim": 8}})
    co = tmp_path / "co"
    cooccur.run(cfg, root / "clean", root / "tokenizer", root / "tokens", co, tmp_path / "co.json")
    glove.run(cfg, co, tmp_path / "glove", tmp_path / "metrics")
    lines = capsys.readouterr().err.splitlines()
    epochs = [line for line in lines if line.startswith("glove: epoch")]
    expected = [f"glove: epoch {e}/3 ({e / 3:.0%})" for e in (1, 2, 3)]
    assert [line.split(",")[0] for line in epochs[:3]] == expected
    assert all("loss " in line and "epochs/s" in line for line in epochs)
    assert any(line.startswith("cooccur: unit ") for line in lines)
