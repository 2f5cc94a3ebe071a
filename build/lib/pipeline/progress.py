"""Progress of long loops: a tqdm bar on a terminal; anywhere else (`dvc repro` under Prefect, CI, a
piped `make run`) one line every `PIPELINE_PROGRESS_SECONDS` seconds (default 30; 0 = every update)
with the same figures, and a last line at the end:

    pretrain: step 300/800 (38%), loss 4.1203, 3,870 tokens/s, elapsed 2m36s, ETA 4m20s
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

from tqdm import tqdm

SECONDS_ENV = "PIPELINE_PROGRESS_SECONDS"
DEFAULT_SECONDS = 30.0


def duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def figure(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


class Progress:
    """Counts `unit`s towards `total` (None: unknown). `rate` names what the rate counts and how many
    of it one unit holds (("tokens", 2048): tokens per second for steps of 2048 tokens)."""

    def __init__(self, desc: str, total: int | None, unit: str, initial: int = 0,
                 rate: tuple[str, float] | None = None, stream: TextIO | None = None,
                 every: float | None = None, clock: Callable[[], float] = time.monotonic,
                 enabled: bool = True) -> None:
        self.desc, self.total, self.unit, self.done = desc, total, unit, initial
        self.rate_name, self.rate_scale = rate or (f"{unit}s", 1.0)
        self.stream = stream or sys.stderr
        self.every = float(os.environ.get(SECONDS_ENV, DEFAULT_SECONDS)) if every is None else every
        if not enabled:  # e.g. ranks other than 0
            self.every = float("inf")
        self.clock = clock
        self.started = self.last_line = clock()
        self.first = initial
        self.figures: dict[str, Any] = {}
        terminal = enabled and getattr(self.stream, "isatty", lambda: False)()
        self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, file=self.stream,
                        dynamic_ncols=True) if terminal else None

    def update(self, n: int = 1, **figures: Any) -> None:
        self.done += n
        self.figures.update(figures)
        if self.bar is not None:
            self.bar.update(n)
            if figures:
                self.bar.set_postfix({k: figure(v) for k, v in self.figures.items()}, refresh=False)
        elif self.clock() - self.last_line >= self.every:
            self.write_line()

    def line(self) -> str:
        elapsed = self.clock() - self.started
        total = self.total
        counted = f"{self.done}/{total} ({self.done / total:.0%})" if total else f"{self.done:,}"
        parts = [f"{self.desc}: {self.unit} {counted}"]
        parts += [f"{name} {figure(value)}" for name, value in self.figures.items()]
        per_second = (self.done - self.first) / elapsed if elapsed > 0 else 0.0
        rate = per_second * self.rate_scale
        if rate > 0:
            parts.append(f"{rate:,.{0 if rate >= 100 else 2}f} {self.rate_name}/s")
        parts.append(f"elapsed {duration(elapsed)}")
        if self.total and per_second > 0 and self.done < self.total:
            parts.append(f"ETA {duration((self.total - self.done) / per_second)}")
        return ", ".join(parts)

    def write_line(self) -> None:
        self.last_line = self.clock()
        print(self.line(), file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.done > self.first and self.every != float("inf"):
            self.write_line()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
