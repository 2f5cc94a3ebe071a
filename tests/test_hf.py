"""Export to transformers: a GPT and a last-token classifier of this pipeline (random weights, the
tiny project's real tokenizer and texts) against the exported GPT2 models, and the refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from tokenizers import Tokenizer

from pipeline import hf
from pipeline.checkpoint import load_model, save_model
from pipeline.classify import Classifier
from pipeline.files import InputError
from pipeline.generate import sample
from pipeline.models import GPT, GPTConfig, SequenceClassifier
from pipeline.shards import TokenShards

TOKENS = {"eot": "<|endoftext|>", "pad": "<|pad|>", "mask": "<|mask|>"}
LABELS = {"negative": 0, "neutral": 1, "positive": 2}


def tiny_gpt(vocab_size: int, **changes: Any) -> GPT:
    torch.manual_seed(0)
    fields = {"vocab_size": vocab_size, "context": 32, "n_layer": 2, "n_head": 2, "n_embd": 32, **changes}
    gpt = GPT(GPTConfig(**fields))
    with torch.no_grad():  # non-trivial norms, so a misplaced norm weight cannot pass
        for name, p in gpt.named_parameters():
            if "ln" in name:
                p.add_(0.1 * torch.randn_like(p))
    return gpt


def saved(directory: Path, model: torch.nn.Module, tokenizer: Path, extra: dict[str, Any]) -> Path:
    save_model(directory, model, extra)
    shutil.copy(tokenizer, directory / "tokenizer.json")
    (directory / "labels.json").write_text(json.dumps(LABELS))
    return directory


@pytest.fixture(scope="module")
def tokenizer_file(tiny_project: tuple[Path, dict[str, Any]]) -> Path:
    return tiny_project[0] / "tokenizer" / "tokenizer.json"


def test_the_language_model_exports_with_equal_logits_and_generation(tiny_project, tokenizer_file,
                                                                      tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root, _ = tiny_project
    vocab = Tokenizer.from_file(str(tokenizer_file)).get_vocab_size()
    ours = saved(tmp_path / "lm", tiny_gpt(vocab), tokenizer_file, {"eot_id": 0})
    assert hf.export(ours, tmp_path / "out", TOKENS) == "GPT2LMHeadModel"
    assert not list((tmp_path / "out").glob("*.bin")) and (tmp_path / "out" / "model.safetensors").exists()
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    model, _ = load_model(ours)
    windows = torch.from_numpy(TokenShards(root / "tokens", "test").slice(0, 4 * 32).astype(np.int64))
    with torch.no_grad():
        expected, got = model.eval()(windows.view(4, 32)), theirs(windows.view(4, 32)).logits
    assert torch.allclose(expected, got, atol=1e-4, rtol=0)

    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    text = "The history of the city <|endoftext|> begins"
    assert tokenizer(text).input_ids == Tokenizer.from_file(str(tokenizer_file)).encode(
        text, add_special_tokens=False).ids
    assert (tokenizer.eos_token, tokenizer.pad_token, tokenizer.mask_token) == tuple(TOKENS.values())
    prompt = tokenizer("The history of", return_tensors="pt").input_ids
    generated = theirs.generate(prompt, max_new_tokens=12, do_sample=False, min_new_tokens=12)
    assert generated[0].tolist() == sample(model, prompt[0].tolist(), 12, temperature=0)


def test_a_last_token_classifier_exports_with_the_same_labels(tiny_project, tokenizer_file,
                                                               tmp_path: Path) -> None:
    from transformers import pipeline as hf_pipeline

    root, _ = tiny_project
    vocab = Tokenizer.from_file(str(tokenizer_file)).get_vocab_size()
    classifier = SequenceClassifier(tiny_gpt(vocab), len(LABELS), "last")
    with torch.no_grad():
        classifier.classifier.weight.normal_(0, 1.0)
        classifier.classifier.bias.copy_(torch.tensor([0.3, -0.2, 0.1]))  # folded into the final norm
    extra = {"pad_id": 1, "max_length": 32, "labels": LABELS}
    ours = saved(tmp_path / "clf", classifier, tokenizer_file, extra)
    assert hf.export(ours, tmp_path / "out", TOKENS) == "GPT2ForSequenceClassification"

    table = pq.read_table(root / "clean" / "labeled.parquet", columns=["text", "split"]).to_pydict()
    texts = [t for t, s in zip(table["text"], table["split"], strict=True) if s == "test"][:200]
    expected_labels, expected = Classifier.load(ours).predict(texts)
    pipe = hf_pipeline("text-classification", model=str(tmp_path / "out"), top_k=None, truncation=True)
    results = pipe(texts, batch_size=16)
    got = np.array([[next(r["score"] for r in result if r["label"] == name) for name in LABELS]
                    for result in results])
    assert [max(result, key=lambda r: r["score"])["label"] for result in results] == expected_labels
    assert np.abs(got - expected).max() < 1e-4


@pytest.mark.parametrize(("model", "refusal"), [
    (lambda v: SequenceClassifier(tiny_gpt(v), 3, "mean"), "mean pooling"),
    (lambda v: tiny_gpt(v, causal=False), "encoder"),
    (lambda v: tiny_gpt(v, positions="rotary"), "rotary positions"),
])
def test_models_without_an_exact_equivalent_are_refused(model, refusal: str, tokenizer_file,
                                                         tmp_path: Path) -> None:
    vocab = Tokenizer.from_file(str(tokenizer_file)).get_vocab_size()
    ours = saved(tmp_path / "m", model(vocab), tokenizer_file, {"eot_id": 0, "pad_id": 1, "max_length": 32})
    with pytest.raises(InputError, match=refusal):
        hf.export(ours, tmp_path / "out", TOKENS)
    assert not (tmp_path / "out").exists()


def test_the_export_command_writes_a_model_or_refuses_in_one_line(tokenizer_file, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from pipeline.cli import app

    vocab = Tokenizer.from_file(str(tokenizer_file)).get_vocab_size()
    lm = saved(tmp_path / "lm", tiny_gpt(vocab), tokenizer_file, {"eot_id": 0})
    result = CliRunner().invoke(app, ["export", "--format", "hf", str(tmp_path / "out"), str(lm)])
    assert result.exit_code == 0 and "GPT2LMHeadModel" in result.output
    assert (tmp_path / "out" / "config.json").exists() and (tmp_path / "out" / "tokenizer.json").exists()
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    result = CliRunner().invoke(app, ["export", str(tmp_path / "out"), str(lm)])
    assert result.exit_code == 2 and result.output.count("\n") == 1
    assert "not an empty directory" in result.output
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before
    mean = saved(tmp_path / "mean", SequenceClassifier(tiny_gpt(vocab), 3, "mean"), tokenizer_file,
                 {"pad_id": 1, "max_length": 32})
    result = CliRunner().invoke(app, ["export", str(tmp_path / "out2"), str(mean)])
    assert result.exit_code == 2 and result.output.count("\n") == 1 and "error:" in result.output
