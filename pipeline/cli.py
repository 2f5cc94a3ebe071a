"""The `pipeline` console script: run stages, validate params, inspect outputs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Annotated

import typer

from pipeline.config import DEFAULT_PARAMS, PROJECT_ROOT, ConfigError, load_config

app = typer.Typer(help="Reproducible LLM training pipeline: clean -> tokenize -> ... -> evaluate.",
                  no_args_is_help=True, add_completion=False)
ParamsOption = Annotated[Path, typer.Option("--params", "-p", help="params file to read")]


@app.command()
def params(params: ParamsOption = DEFAULT_PARAMS) -> None:
    """Validate a params file and print the resolved configuration (defaults filled in)."""
    import yaml

    try:
        cfg = load_config(params)
    except ConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))


@app.command()
def clean(params: ParamsOption = DEFAULT_PARAMS) -> None:
    """Clean the raw sources into data/clean (what `dvc repro clean` runs)."""
    from pipeline import clean as stage

    raise typer.Exit(stage.main(["--params", str(params)]))


@app.command()
def run(
    stage: Annotated[str | None, typer.Argument(help="stop after this DVC stage (default: all)")] = None,
    force: Annotated[bool, typer.Option(help="rerun even when nothing changed")] = False,
) -> None:
    """Reproduce the pipeline with DVC (only stages whose inputs or params changed rerun)."""
    command = [sys.executable, "-m", "dvc", "repro", *(["--force"] if force else [])]
    command += [stage] if stage else []
    raise typer.Exit(subprocess.call(command, cwd=PROJECT_ROOT))


if __name__ == "__main__":
    app()
