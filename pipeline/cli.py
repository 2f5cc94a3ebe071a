"""The `pipeline` console script: run stages, validate params, inspect outputs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from pipeline.config import ConfigError, load_config, project_root

app = typer.Typer(help="Reproducible LLM training pipeline: clean -> tokenize -> ... -> evaluate.",
                  no_args_is_help=True, add_completion=False)
ParamsOption = Annotated[Path | None, typer.Option(
    "--params", "-p", help="params file [default: params.yaml of the project around the current directory]")]


@app.command()
def params(params: ParamsOption = None) -> None:
    """Validate a params file and print the resolved configuration (defaults filled in)."""
    import yaml

    try:
        cfg = load_config(params)
    except ConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))


# stage name -> (summary, module in pipeline/stages/, its arguments): what `dvc repro <name>` runs
STAGES: dict[str, tuple[str, str, list[str]]] = {
    "ingest": ("Copy the raw sources into data/raw", "ingest", []),
    "clean": ("Clean the corpus sources into data/clean/corpus.parquet", "clean", ["--kind", "corpus"]),
    "clean_labeled": ("Clean the labeled sources into data/clean/labeled.parquet", "clean",
                      ["--kind", "labeled"]),
    "tokenize": ("Train the BPE tokenizer and encode the corpus into token shards", "tokenize",
                 ["--part", "corpus"]),
    "tokenize_labeled": ("Encode the labeled set with the tokenizer", "tokenize", ["--part", "labeled"]),
    "cooccur": ("Count word co-occurrences over the train split", "cooccur", ["--unit", "word"]),
    "cooccur_token": ("Count token co-occurrences over the train shards", "cooccur", ["--unit", "token"]),
    "glove": ("Train GloVe word vectors and evaluate them on word benchmarks", "glove", ["--unit", "word"]),
    "glove_token": ("Train GloVe token vectors (the language model's embedding init)", "glove",
                    ["--unit", "token"]),
    "skipgram": ("Train Word2Vec skip-gram word vectors and evaluate them", "word2vec",
                 ["--method", "skipgram"]),
    "cbow": ("Train Word2Vec CBOW word vectors and evaluate them", "word2vec", ["--method", "cbow"]),
    "pretrain": ("Train the language model (torchrun for several processes)", "pretrain", []),
    "finetune": ("Fine-tune a sentiment classifier on the pretrained model", "finetune", []),
    "autoencode": ("Train the sentence models (lm, ae, dae, vae, arae) and score them on test",
                   "autoencode", []),
    "evaluate": ("Evaluate the models against baselines and write reports/report.html", "evaluate", []),
}


def add_stage_command(name: str, summary: str, module: str, arguments: list[str]) -> None:
    def command(params: ParamsOption = None) -> None:
        import importlib

        stage = importlib.import_module(f"pipeline.stages.{module}")
        raise typer.Exit(stage.main([*(["--params", str(params)] if params else []), *arguments]))

    command.__doc__ = f"{summary} (what `dvc repro {name}` runs)."
    app.command(name=name)(command)


for _name, (_summary, _module, _arguments) in STAGES.items():
    add_stage_command(_name, _summary, _module, _arguments)


@app.command()
def generate(
    checkpoint: Annotated[Path, typer.Option("--checkpoint", help="a model directory (data/lm)")],
    prompt: Annotated[str, typer.Option("--prompt", help="text to continue")] = "",
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1)] = 100,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 = greedy")] = 0.8,
    top_k: Annotated[int | None, typer.Option("--top-k", min=1)] = 50,
    top_p: Annotated[float | None, typer.Option("--top-p", min=0.0, max=1.0)] = None,
    seed: Annotated[int, typer.Option(help="same seed, same text")] = 0,
) -> None:
    """Sample a continuation of PROMPT from a pretrained model."""
    from pipeline.files import InputError
    from pipeline.generate import generate as sample_text

    try:
        typer.echo(sample_text(checkpoint, prompt, max_new_tokens, temperature, top_k, top_p, seed))
    except InputError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


@app.command()
def classify(
    texts: Annotated[list[str], typer.Argument(help="texts to classify")],
    model: Annotated[Path, typer.Option("--model", help="a classifier directory")] = Path("data/classifier"),
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Print the predicted label and the class probabilities of each text."""
    import json

    from pipeline.classify import Classifier
    from pipeline.files import InputError

    try:
        classifier = Classifier.load(model)
    except InputError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    labels, probs = classifier.predict(texts)
    for text, label, row in zip(texts, labels, probs, strict=True):
        scores = {name: round(float(p), 4) for name, p in zip(classifier.labels, row, strict=True)}
        line = json.dumps({"text": text, "label": label, "probabilities": scores}) if as_json else \
            f"{label}\t" + "  ".join(f"{n}={p:.3f}" for n, p in scores.items()) + f"\t{text}"
        typer.echo(line)


@app.command()
def export(
    out: Annotated[Path, typer.Argument(help="the transformers model directory to write")],
    model: Annotated[Path | None, typer.Argument(
        help="a model directory of this pipeline [default: the project's paths.lm]")] = None,
    fmt: Annotated[str, typer.Option("--format", help="hf: Hugging Face transformers")] = "hf",
    params: ParamsOption = None,
) -> None:
    """Export a language model (GPT2LMHeadModel) or a last-token classifier
    (GPT2ForSequenceClassification) with its tokenizer to a transformers directory (safetensors); a
    classifier fine-tuned from a transformers model goes back as its own family."""
    from pipeline.files import InputError

    if fmt != "hf":
        typer.echo(f"error: unknown format '{fmt}' (hf)", err=True)
        raise typer.Exit(2)
    from pipeline.hf import export as export_hf

    cfg = load_config(params)
    tok = cfg.tokenize
    source = model or project_root() / cfg.paths.lm
    try:
        kind = export_hf(source, out, {"eot": tok.eot_token, "pad": tok.pad_token, "mask": tok.mask_token})
    except InputError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"export: {source} -> {out} ({kind}, safetensors, with its tokenizer)")


@app.command()
def lineage(
    target: Annotated[str, typer.Argument(
        help="an output path, an MLflow run id or models:/name@alias (with --impacted: any input path)")],
    impacted: Annotated[bool, typer.Option("--impacted", help="list what was built from TARGET")] = False,
    verify: Annotated[bool, typer.Option("--verify", help="recompute hashes along TARGET's chain")] = False,
    rev: Annotated[str | None, typer.Option("--rev", help="read dvc.lock at this git revision")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Trace an output back to the raw bytes it came from (dvc.lock + MLflow runs)."""
    import json

    from pipeline import lineage as lin
    from pipeline.files import InputError
    from pipeline.tracking import tracking_uri

    try:
        if verify:
            result: Any = lin.verify(target)
        elif impacted:
            result = lin.impacted(target, rev=rev, tracking_uri=tracking_uri(load_config().tracking))
        else:
            result = lin.trace(target, rev=rev, tracking_uri=tracking_uri(load_config().tracking))
    except InputError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    if as_json:
        typer.echo(json.dumps(result, indent=2))
    elif verify:
        for p in result:
            typer.echo(f"CHANGED {p['path']}: recorded {p['recorded']}, now {p['actual']}")
            for f in p["changed_files"]:
                typer.echo(f"  file {f}")
            typer.echo(f"  stale downstream: {', '.join(p['downstream']) or 'none'}")
        typer.echo(f"{len(result)} mismatch(es)" if result else "verified: every artifact matches dvc.lock")
    elif impacted:
        typer.echo(f"built from {result['input']}:")
        for stage, outs in result["stages"].items():
            run_id = result["mlflow_runs"].get(stage) or "-"
            typer.echo(f"  stage {stage} (mlflow run {run_id}) -> {', '.join(outs)}")
        for version in result["model_versions"]:
            typer.echo(f"  registered model {version}")
    else:
        print_chain(result)
    raise typer.Exit(1 if verify and result else 0)


def print_chain(chain: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.tree import Tree

    tree = Tree(f"[bold]{chain['target']}[/] ({chain['rev']})")
    for stage in chain["stages"]:
        run = stage["mlflow"] or {}
        node = tree.add(f"stage [bold]{stage['stage']}[/]  mlflow run {run.get('run_id', '-')}  "
                        f"git {run.get('git_commit', '-')[:12]}")
        for out in stage["outs"]:
            node.add(f"out  {out['path']}  md5 {out['md5']}")
        for dep in stage["deps"]:
            node.add(f"dep  {dep['path']}  md5 {dep['md5']}")
        if stage["params"]:
            node.add(f"params {', '.join(sorted(stage['params']))}")
    raw = tree.add("[bold]raw sources[/]")
    for source in chain["raw_sources"]:
        raw.add(f"{source['path']}  md5 {source['md5']}  from {source['origin']}")
    Console().print(tree)


@app.command()
def status() -> None:
    """Which stages `pipeline run` would rerun, and why (code, params, data, outputs, upstream)."""
    from pipeline.status import render, stale_stages

    root = project_root()
    if not (root / "dvc.yaml").exists():
        typer.echo(f"error: {root}: no dvc.yaml here or above", err=True)
        raise typer.Exit(2)
    typer.echo(render(*stale_stages(root)))


@app.command()
def run(
    stage: Annotated[str | None, typer.Argument(help="stop after this DVC stage (default: all)")] = None,
    force: Annotated[bool, typer.Option(help="rerun even when nothing changed")] = False,
) -> None:
    """Reproduce the pipeline with DVC (only stages whose inputs or params changed rerun), under one
    MLflow parent run that every stage's run nests in."""
    from pipeline import tracking

    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # not MLflow's INFO lines (store creation)
    command = [sys.executable, "-m", "dvc", "repro", *(["--force"] if force else [])]
    command += [stage] if stage else []
    with tracking.pipeline_run(load_config().tracking, "pipeline", {"trigger": "pipeline run"}) as parent:
        # stages run `python -m pipeline.<stage>`: make it this environment's python
        path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
        root = project_root()
        code = subprocess.call(command, cwd=root, env={**os.environ, "PATH": path})
        lock_md5 = tracking.path_md5(root / "dvc.lock")
        parent.set_tags({"exit_code": str(code), "dvc.lock.md5": lock_md5})
    raise typer.Exit(code)


if __name__ == "__main__":
    app()
