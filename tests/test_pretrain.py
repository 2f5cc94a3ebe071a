"""The pretrain stage on a tiny real token set: exact resume after SIGKILL (one process, and FSDP on
two), DDP and FSDP over gloo against one process, NaN stop, tampered checkpoints, generation."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import NO_INPUT
from safetensors.torch import load_file

from pipeline.checkpoint import STATE, WEIGHTS, fingerprint_of, load_model, load_state, restore, save_state
from pipeline.config import parse_config, project_root
from pipeline.files import InputError, file_digest
from pipeline.generate import generate
from pipeline.stages import pretrain
from pipeline.vectors import VECTORS_FILE, VOCAB_FILE, read_vocabulary

REPO = project_root(Path(__file__).parent)  # the checkout these tests belong to

TINY_MODEL = {"arch": "gpt", "context": 64, "n_layer": 2, "n_head": 2, "n_embd": 64}


def pretrain_params(project: tuple[Path, dict[str, Any]], out: Path, **overrides: Any) -> dict[str, Any]:
    _, params = project
    params = copy.deepcopy(params)
    params["paths"].update(lm=str(out / "lm"), checkpoints=str(out / "checkpoints"), metrics=str(out / "m"))
    params["pretrain"] = {"model": TINY_MODEL, "batch_size": 8, "max_steps": 12, "warmup_steps": 2,
                          "eval_every": 4, "eval_windows": 8, "checkpoint_every": 4,
                          "init_embeddings": NO_INPUT,
                          **overrides}
    return params


def launch(params: dict[str, Any], out: Path, ranks: int = 1) -> subprocess.Popen[str]:
    out.mkdir(parents=True, exist_ok=True)
    (out / "params.yaml").write_text(yaml.safe_dump(params))
    prefix = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"] \
        if ranks > 1 else [sys.executable]
    env = {**os.environ, "OMP_NUM_THREADS": "1"} if ranks > 1 else dict(os.environ)
    command = [*prefix, "-m", "pipeline.stages.pretrain", "--params", str(out / "params.yaml")]
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def descendants(pid: int) -> list[int]:
    children = Path(f"/proc/{pid}/task/{pid}/children")
    found = [int(c) for c in children.read_text().split()] if children.exists() else []
    return found + [d for c in found for d in descendants(c)]


def kill_tree(process: subprocess.Popen[str]) -> None:
    """SIGKILL a process and its descendants (torchrun's workers, in sessions of their own)."""
    tree = [process.pid, *descendants(process.pid)]
    for pid in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def finish(process: subprocess.Popen[str]) -> str:
    output, _ = process.communicate(timeout=240)
    assert process.returncode == 0, output
    return output


@pytest.mark.parametrize(("objective", "ranks"), [("clm", 1), ("mlm", 1), ("clm", 2)],
                         ids=["clm", "mlm", "clm-fsdp-2"])
def test_sigkill_then_resume_gives_bit_identical_weights(tiny_project, tmp_path: Path,
                                                        objective: str, ranks: int) -> None:
    # a model big enough that 24 steps take seconds, so the kill lands mid-run
    model = {**TINY_MODEL, "n_embd": 128, "context": 128}
    shape = {"model": model, "max_steps": 24, "batch_size": 16 // ranks, "objective": objective,
             "parallel": "fsdp" if ranks > 1 else "ddp"}
    params = pretrain_params(tiny_project, tmp_path / "whole", **shape)
    finish(launch(params, tmp_path / "whole", ranks))
    broken = pretrain_params(tiny_project, tmp_path / "broken", **shape)
    process = launch(broken, tmp_path / "broken", ranks)
    state = tmp_path / "broken" / "checkpoints" / STATE
    deadline = time.time() + 120
    while time.time() < deadline and not (state.exists() and load_state(state)["step"] >= 8):
        time.sleep(0.02)
    kill_tree(process)
    process.wait()
    killed_at = load_state(state)["step"]
    assert process.returncode == -signal.SIGKILL and 8 <= killed_at < 24
    output = finish(launch(broken, tmp_path / "broken", ranks))
    assert f"resuming at step {killed_at}" in output
    for name in ("checkpoints/model", "checkpoints/best", "lm"):
        whole = tmp_path / "whole" / name / WEIGHTS
        resumed = tmp_path / "broken" / name / WEIGHTS
        assert file_digest(whole) == file_digest(resumed), name


def test_ddp_and_fsdp_on_two_gloo_processes_match_one_process(tiny_project, tmp_path: Path) -> None:
    """The same global batch (8 windows: 4 per rank) gives the same run: losses to 1e-5, weights to 1e-5."""
    runs = {"one": (1, "ddp", 8), "ddp": (2, "ddp", 4), "fsdp": (2, "fsdp", 4)}
    curves, weights = {}, {}
    for name, (ranks, parallel, batch) in runs.items():
        params = pretrain_params(tiny_project, tmp_path / name, batch_size=batch, max_steps=12, eval_every=4,
                                 grad_accum=2, parallel=parallel)
        finish(launch(params, tmp_path / name, ranks))
        metrics = json.loads((tmp_path / name / "m" / "pretrain.json").read_text())
        assert metrics["world_size"] == ranks and metrics["parallel"] == (parallel if ranks > 1 else "none")
        curves[name] = [float(row.split(",")[1]) for plot in ("train", "val") for row in
                        (tmp_path / name / "m" / "plots" / f"pretrain_{plot}.csv").read_text().split()[1:]]
        weights[name] = load_file(tmp_path / name / "lm" / WEIGHTS)
    assert len(curves["one"]) == 12 + 3 and curves["one"][11] < curves["one"][0] - 0.5  # it learns
    for name in ("ddp", "fsdp"):
        assert max(abs(a - b) for a, b in zip(curves[name], curves["one"], strict=True)) < 1e-5, name
        assert max((weights[name][k] - w).abs().max().item() for k, w in weights["one"].items()) < 1e-5


def test_non_finite_loss_stops_with_the_step_and_keeps_the_checkpoint(tiny_project, tmp_path: Path,
                                                                        monkeypatch) -> None:
    params = parse_config(pretrain_params(tiny_project, tmp_path, checkpoint_every=2, max_steps=8))
    real = pretrain.batch_loss
    calls = {"n": 0}

    def poisoned(model, batch, device):  # the fifth training step's loss becomes NaN
        loss = real(model, batch, device)
        if not model.training:
            return loss
        calls["n"] += 1
        return loss * float("nan") if calls["n"] == 5 else loss

    monkeypatch.setattr(pretrain, "batch_loss", poisoned)
    root, _ = tiny_project
    with pytest.raises(pretrain.TrainingError, match="loss is nan at step 5"):
        pretrain.run(params, root / "tokens", root / "tokenizer", tmp_path / "lm", tmp_path / "checkpoints",
                     tmp_path / "m")
    assert load_state(tmp_path / "checkpoints" / STATE)["step"] == 4
    load_model(tmp_path / "checkpoints" / "model")  # still whole


def test_tampered_checkpoint_is_refused_and_generation_is_deterministic(tiny_project, tmp_path: Path) -> None:
    root, _ = tiny_project
    params = parse_config(pretrain_params(tiny_project, tmp_path, max_steps=4))
    metrics = pretrain.run(params, root / "tokens", root / "tokenizer", tmp_path / "lm",
                           tmp_path / "checkpoints", tmp_path / "m")
    assert metrics["steps"] == 4 and metrics["val_bits_per_byte"] > 0
    first = generate(tmp_path / "lm", "The history of", max_new_tokens=12, seed=3)
    assert first == generate(tmp_path / "lm", "The history of", max_new_tokens=12, seed=3)
    assert first.startswith("The history of")
    weights = tmp_path / "lm" / WEIGHTS
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(InputError, match="sha256 does not match"):
        load_model(tmp_path / "lm")
    with pytest.raises(InputError, match="no checkpoint here"):
        load_model(tmp_path / "missing")


def test_learning_rate_warms_up_then_decays() -> None:
    cfg = parse_config({"data": {"sources": [{"name": "x", "format": "text", "path": "x"}]},
                        "pretrain": {"max_steps": 100, "warmup_steps": 10}}).pretrain
    rates = [pretrain.lr_at(s, cfg) for s in range(100)]
    assert rates[0] < rates[9] == pytest.approx(cfg.learning_rate)
    assert rates[9] > rates[50] > rates[99] >= cfg.min_learning_rate


def test_rerun_of_a_finished_run_restores_the_model_without_training(tiny_project, tmp_path: Path) -> None:
    import shutil

    root, _ = tiny_project
    params = parse_config(pretrain_params(tiny_project, tmp_path, max_steps=4))
    stage_args = (root / "tokens", root / "tokenizer", tmp_path / "lm", tmp_path / "checkpoints",
                  tmp_path / "m")
    first = pretrain.run(params, *stage_args)
    before = file_digest(tmp_path / "lm" / WEIGHTS)
    shutil.rmtree(tmp_path / "lm")  # what DVC does to an output before rerunning its stage
    metrics = pretrain.run(params, *stage_args)
    assert metrics["steps"] == 4 and file_digest(tmp_path / "lm" / WEIGHTS) == before
    # the training's own figures, not a re-measured peak: the rerun reports the same throughput
    assert first["mfu"] > 0
    assert (metrics["tokens_per_s"], metrics["mfu"]) == (first["tokens_per_s"], first["mfu"])


def test_a_finished_run_by_other_code_is_trained_again(tiny_project, tmp_path: Path, monkeypatch,
                                                      capfd) -> None:
    """The checkpoint's fingerprint holds the digest of the code behind the stage: DVC reruns the
    stage when that code changes, and the rerun must train, not hand back the old code's model."""
    root, _ = tiny_project
    params = parse_config(pretrain_params(tiny_project, tmp_path, max_steps=4))
    stage_args = (root / "tokens", root / "tokenizer", tmp_path / "lm", tmp_path / "checkpoints",
                  tmp_path / "m")
    pretrain.run(params, *stage_args)
    capfd.readouterr()
    monkeypatch.setattr(pretrain, "code_digest", lambda module: "the digest of changed code")
    metrics = pretrain.run(params, *stage_args)
    printed = capfd.readouterr().err
    assert "pretrain: checkpoint belongs to other code; starting fresh" in printed
    assert "resuming" not in printed
    assert metrics["steps"] == 4


def test_a_refused_checkpoint_names_what_differs(tmp_path: Path, capfd) -> None:
    fresh = {"step": 0}
    expected = fingerprint_of(params={"lr": 1}, data="d", code="c")
    other = fingerprint_of(params={"lr": 2}, data="d", code="e")
    save_state(tmp_path / STATE, {"step": 3, "fingerprint": other})
    assert restore(tmp_path, expected, None, None, fresh, "pretrain") is fresh
    assert "pretrain: checkpoint belongs to other params and code; starting fresh" in capfd.readouterr().err
    save_state(tmp_path / STATE, {"step": 3, "fingerprint": "a digest of the whole, as before parts"})
    assert restore(tmp_path, expected, None, None, fresh, "pretrain") is fresh
    assert "checkpoint from an older version of the pipeline; starting fresh" in capfd.readouterr().err


def test_glove_token_vectors_initialise_the_embedding(tiny_project, tmp_path: Path) -> None:
    from pipeline.stages import cooccur, glove

    root, params = tiny_project
    params = copy.deepcopy(params)
    params["cooccur"].update(min_count=5)
    params["glove"].update(epochs=2, dim=16)
    cfg = parse_config(params)
    cooccur.run(cfg, root / "clean", root / "tokenizer", root / "tokens", tmp_path / "co", tmp_path / "j",
                unit="token")
    glove.run(cfg, tmp_path / "co", tmp_path / "glove", tmp_path / "m")
    ids = read_vocabulary(tmp_path / "co" / VOCAB_FILE).token_ids
    initial = torch.randn(512, 64) * 0.02
    table = pretrain.glove_embedding(tmp_path / "glove", initial)
    vectors = load_file(tmp_path / "glove" / VECTORS_FILE)["vectors"].double()
    vectors -= vectors.mean(0)
    # the first 16 columns of GloVe-covered rows: the centred vectors, one common scale; the rest untouched
    scale = table[ids[0], 0].item() / vectors[0, 0].item()
    torch.testing.assert_close(table[ids, :16].double(), vectors * scale, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(table[:, 16:], initial[:, 16:])
    uncovered = sorted(set(range(512)) - set(ids.tolist()))
    torch.testing.assert_close(table[uncovered], initial[uncovered])
    narrow = pretrain.glove_embedding(tmp_path / "glove", torch.randn(512, 8) * 0.02)  # wider GloVe: PCA
    assert narrow.shape == (512, 8) and not torch.equal(narrow[ids], torch.zeros(len(ids), 8))
    # a tiny pretrain run starts from them
    run_params = pretrain_params(tiny_project, tmp_path / "run", max_steps=2,
                                 init_embeddings=str(tmp_path / "glove"))
    run_params["paths"]["glove_token"] = str(tmp_path / "glove")
    finish(launch(run_params, tmp_path / "run"))


def test_word_vectors_are_refused_as_an_embedding_init(tiny_project, tmp_path: Path) -> None:
    from pipeline.stages import cooccur, glove

    root, params = tiny_project
    params = copy.deepcopy(params)
    params["glove"].update(epochs=1, dim=8)
    cfg = parse_config(params)
    cooccur.run(cfg, root / "clean", root / "tokenizer", root / "tokens", tmp_path / "co", tmp_path / "j")
    glove.run(cfg, tmp_path / "co", tmp_path / "glove", tmp_path / "m")
    with pytest.raises(InputError, match="word vectors"):
        pretrain.glove_embedding(tmp_path / "glove", torch.zeros(512, 64))


def test_mlm_encoder_trains_scores_masked_tokens_and_refuses_to_generate(tiny_project,
                                                                         tmp_path: Path) -> None:
    from pipeline.cli import app

    root, _ = tiny_project
    params = parse_config(pretrain_params(tiny_project, tmp_path, max_steps=8, objective="mlm"))
    metrics = pretrain.run(params, root / "tokens", root / "tokenizer", tmp_path / "lm",
                           tmp_path / "checkpoints", tmp_path / "m")
    assert metrics["objective"] == "mlm" and "val_bits_per_byte" not in metrics
    assert 0 < metrics["val_mlm_accuracy"] < 1 and metrics["val_mlm_loss"] > 0
    curve = (tmp_path / "m" / "plots" / "pretrain_train.csv").read_text().split()[1:]
    assert float(curve[-1].split(",")[1]) < float(curve[0].split(",")[1])  # it learns
    assert load_model(tmp_path / "lm")[1]["model"]["causal"] is False
    with pytest.raises(InputError, match=r"masked-language model .* does not generate"):
        generate(tmp_path / "lm", "The history of")
    from typer.testing import CliRunner

    result = CliRunner().invoke(app, ["generate", "--checkpoint", str(tmp_path / "lm"), "--prompt", "Hi"])
    assert result.exit_code != 0
    assert result.output.strip().count("\n") == 0 and "does not generate" in result.output


def test_a_missing_tokenizer_is_refused_before_training(tiny_project, tmp_path: Path) -> None:
    root, _ = tiny_project
    params = parse_config(pretrain_params(tiny_project, tmp_path, max_steps=2))
    with pytest.raises(InputError, match=r"tokenizer\.json: tokenizer not found \(run the tokenize stage\)"):
        pretrain.run(params, root / "tokens", tmp_path / "no-tokenizer", tmp_path / "lm",
                     tmp_path / "checkpoints", tmp_path / "m")
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "lm").exists()


def test_pretraining_starts_from_our_lm_or_its_gpt2_export_alike(tiny_project, tmp_path: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    from pipeline.hf import export

    root, params = tiny_project
    tokens = {"eot": params["tokenize"]["eot_token"], "pad": params["tokenize"]["pad_token"]}

    def pretrain_from(name: str, init: Path) -> dict[str, Any]:
        cfg = parse_config(pretrain_params(tiny_project, tmp_path / name, max_steps=3, eval_every=3))
        out = tmp_path / name
        pretrain.run(cfg, root / "tokens", root / "tokenizer", out / "lm", out / "ck", out / "m",
                     init_dir=init)
        rows = (out / "m" / "plots" / "pretrain_train.csv").read_text().split()[1:]
        return {"losses": [float(r.split(",")[1]) for r in rows], "weights": load_file(out / "lm" / WEIGHTS)}

    first = pretrain_from("first", tmp_path / "no-model-here")
    export(tmp_path / "first" / "lm", tmp_path / "gpt2", tokens)
    ours = pretrain_from("ours", tmp_path / "first" / "lm")
    theirs = pretrain_from("theirs", tmp_path / "gpt2")
    assert ours["losses"][0] < first["losses"][0] - 0.3  # it starts where the first model ended
    assert max(abs(a - b) for a, b in zip(ours["losses"], theirs["losses"], strict=True)) < 1e-5
    assert max((ours["weights"][k] - w).abs().max().item() for k, w in theirs["weights"].items()) < 1e-5
    narrow = tmp_path / "narrow"
    config = GPT2Config(vocab_size=512, n_embd=32, n_layer=2, n_head=2, n_positions=64)
    GPT2LMHeadModel(config).save_pretrained(str(narrow))
    with pytest.raises(InputError, match=r"is not pretrain\.model's") as refused:
        pretrain_from("narrow", narrow)
    assert "\n" not in str(refused.value)
