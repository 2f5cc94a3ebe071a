"""The thin command line every stage shares: `python -m pipeline.<stage> [--params FILE]`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from pipeline.config import DEFAULT_PARAMS, Config, ConfigError, load_config
from pipeline.files import InputError


def stage_main(
    stage: str,
    doc: str | None,
    execute: Callable[[Config], str],
    argv: list[str] | None = None,
    errors: tuple[type[Exception], ...] = (),
) -> int:
    """Parse `--params`, run `execute(config)` and print its summary line; a bad input or config
    (or one of `errors`) prints one `error: ...` line and exits 2."""
    description = (doc or stage).strip().split("\n")[0]
    parser = argparse.ArgumentParser(prog=f"python -m pipeline.{stage}", description=description)
    parser.add_argument("--params", type=Path, default=DEFAULT_PARAMS, help="params file")
    args = parser.parse_args(argv)
    try:
        summary = execute(load_config(args.params))
    except (InputError, ConfigError, *errors) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if summary:
        print(summary)
    return 0
