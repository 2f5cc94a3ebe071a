"""The thin command line every stage shares: `python -m pipeline.stages.<stage> [--params FILE]`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from pipeline.config import ConfigError, load_config
from pipeline.files import InputError
from pipeline.tracking import TrackingError


def stage_main(
    stage: str,
    doc: str | None,
    execute: Callable[..., str],
    argv: list[str] | None = None,
    errors: tuple[type[Exception], ...] = (),
    choices: dict[str, tuple[str, ...]] | None = None,
) -> int:
    """Parse `--params` (and each of `choices` as `--name`, its first value the default), run
    `execute(config, **choices)` and print its summary line; a bad input or config, an unreachable tracking
    server (or one of `errors`) prints one `error: ...` line and exits 2."""
    description = (doc or stage).strip().split("\n")[0]
    parser = argparse.ArgumentParser(prog=f"python -m pipeline.stages.{stage}", description=description)
    parser.add_argument("--params", type=Path, default=None,
                        help="params file (default: params.yaml of the project around the current directory)")
    for name, values in (choices or {}).items():
        parser.add_argument(f"--{name}", choices=values, default=values[0], help=f"default {values[0]}")
    args = parser.parse_args(argv)
    chosen = {name: getattr(args, name) for name in choices or {}}
    try:
        summary = execute(load_config(args.params), **chosen)
    except (InputError, ConfigError, TrackingError, *errors) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if summary:
        print(summary)
    return 0
