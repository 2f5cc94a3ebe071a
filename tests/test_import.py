"""Fine-tuning a local transformers model (`finetune.base: <dir>`): tiny randomly initialised BERT-
and GPT-2-family models with their own tokenizers, made here (no hub anywhere), fine-tuned on the tiny
real labeled slice; their tokenizers used as they are, exact resume, evaluation, export, lineage."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from conftest import Interrupt, StopAt  # a fine-tune killed mid-run
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from pipeline.classify import Classifier, read_examples
from pipeline.config import parse_config, project_root
from pipeline.files import InputError
from pipeline.stages import evaluate, finetune
from pipeline.tracking import path_md5

REPO = project_root(Path(__file__).parent)


def labeled_texts(root: Path) -> list[str]:
    return read_examples(root / "tokens" / "labeled", "train").texts


def tiny_bert(directory: Path, texts: list[str]) -> Path:
    """A 2-layer BERT (masked-LM checkpoint, so the pooler and head are new) with a WordPiece vocab."""
    from transformers import BertConfig, BertForMaskedLM, BertTokenizerFast

    wordpiece = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    wordpiece.normalizer = normalizers.BertNormalizer(lowercase=True)
    wordpiece.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    wordpiece.train_from_iterator(texts, trainers.WordPieceTrainer(
        vocab_size=300, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]))
    cls_id, sep_id = wordpiece.token_to_id("[CLS]"), wordpiece.token_to_id("[SEP]")
    wordpiece.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    tokenizer = BertTokenizerFast(tokenizer_object=wordpiece, pad_token="[PAD]", unk_token="[UNK]",
                                  cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=wordpiece.get_vocab_size(), hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=48)
    BertForMaskedLM(config).save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    return directory


def tiny_gpt2(directory: Path, texts: list[str]) -> Path:
    """A 2-layer GPT-2 with a byte-level BPE and no pad token (as GPT-2's own tokenizer has none)."""
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=alphabet))
    tokenizer = GPT2TokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                  unk_token="<|endoftext|>")
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=bpe.get_vocab_size(), n_embd=32, n_layer=2, n_head=2, n_positions=48,
                        eos_token_id=0, bos_token_id=0)
    GPT2LMHeadModel(config).save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    return directory


@pytest.fixture(scope="module", params=["bert", "gpt2"])
def base(request, tiny_project, tmp_path_factory) -> tuple[str, Path]:
    root, _ = tiny_project
    make = tiny_bert if request.param == "bert" else tiny_gpt2
    return request.param, make(tmp_path_factory.mktemp(request.param), labeled_texts(root))


def import_params(params: dict[str, Any], base_dir: Path, out: Path, **overrides: Any) -> dict[str, Any]:
    params = copy.deepcopy(params)
    params["paths"].update(classifier=str(out / "classifier"), finetune_checkpoints=str(out / "ckpt"),
                           metrics=str(out / "metrics"))
    params["finetune"] = {"base": str(base_dir), "max_examples": 96, "epochs": 8, "batch_size": 16,
                          "eval_every": 6, "checkpoint_every": 6, "warmup_steps": 2, "patience": 10,
                          "learning_rate": 0.003, **overrides}
    return params


def run_import(root: Path, params: dict[str, Any], out: Path) -> dict[str, Any]:
    return finetune.run(parse_config(params), Path(params["finetune"]["base"]), root / "tokens",
                        out / "classifier", out / "ckpt", out / "metrics")


@pytest.fixture(scope="module")
def tuned(base, tiny_project, tmp_path_factory) -> tuple[str, Path, Path, dict[str, Any], dict[str, Any]]:
    root, params = tiny_project
    kind, base_dir = base
    out = tmp_path_factory.mktemp(f"tuned-{kind}")
    params = import_params(params, base_dir, out)
    return kind, base_dir, out, params, run_import(root, params, out)


def test_a_transformers_model_fine_tunes_with_its_own_tokenizer(tuned, tiny_project) -> None:
    from transformers import AutoTokenizer

    kind, base_dir, out, _, metrics = tuned
    root, _ = tiny_project
    rows = (out / "metrics" / "plots" / "finetune_train.csv").read_text().splitlines()[1:]
    losses = [float(r.split(",")[1]) for r in rows]
    assert metrics["steps"] == len(losses) == 8 * 6 and metrics["pooling"] == "transformers"
    assert np.mean(losses[-6:]) < np.mean(losses[:6])  # 96 examples, 8 epochs: it learns them
    classifier = Classifier.load(out / "classifier")
    assert type(classifier.model.model).__name__ == ("BertForSequenceClassification" if kind == "bert"
                                                     else "GPT2ForSequenceClassification")
    # the directory's tokenizer as it is: its special tokens, truncated at its context
    texts = read_examples(root / "tokens" / "labeled", "test").texts[:50]
    theirs = AutoTokenizer.from_pretrained(str(base_dir))(texts, truncation=True, max_length=48)["input_ids"]
    ours = [e.ids for e in classifier.tokenizer.encode_batch(texts, add_special_tokens=True)]
    assert ours == theirs and max(map(len, ours)) == 48
    if kind == "bert":
        assert all(ids[0] == classifier.tokenizer.token_to_id("[CLS]") for ids in ours)
    labels, probs = classifier.predict(texts)
    assert probs.shape == (50, 3) and np.allclose(probs.sum(1), 1, atol=1e-5)
    assert set(labels) <= set(classifier.labels)


def test_padding_changes_no_prediction(tuned) -> None:
    """Attention masks from the lengths (BERT) and the last non-pad token (GPT-2): a text scores the
    same alone as in a batch padded to a longer text."""
    _, _, out, _, _ = tuned
    classifier = Classifier.load(out / "classifier")
    short, long = "late again", "the flight was late again and nobody at the gate told us anything at all"
    alone = classifier.predict([short], batch_size=1)[1]
    batched = classifier.predict([short, long], batch_size=2)[1][:1]
    assert np.abs(alone - batched).max() < 1e-5


def test_an_interrupted_import_resumes_to_identical_weights_and_evaluates(tuned, tiny_project,
                                                                          tmp_path: Path) -> None:
    _, base_dir, out, _, metrics = tuned
    root, params = tiny_project
    params = import_params(params, base_dir, tmp_path)
    cfg = parse_config(params)
    with pytest.raises(Interrupt):  # checkpoint at step 12, killed at 15
        finetune.run(cfg, base_dir, root / "tokens", tmp_path / "classifier", tmp_path / "ckpt",
                     tmp_path / "metrics", StopAt(15))
    resumed = run_import(root, params, tmp_path)
    assert resumed["val_macro_f1"] == metrics["val_macro_f1"]
    assert (tmp_path / "classifier" / "model.safetensors").read_bytes() == \
        (out / "classifier" / "model.safetensors").read_bytes()
    labels = list(json.loads((root / "tokens" / "labeled" / "labels.json").read_text()))
    scores, pairs = evaluate.classifier_metrics(out / "classifier", root / "tokens", labels)
    test = read_examples(root / "tokens" / "labeled", "test")
    assert pairs[:, 0].tolist() == test.labels.tolist()
    predicted = Classifier.load(out / "classifier").predict(test.texts)[1].argmax(1)
    assert pairs[:, 1].tolist() == predicted.tolist() and 0 <= scores["macro_f1"] <= 1


def test_the_base_directory_is_a_dvc_input_and_named_in_lineage(tuned, tiny_project, tmp_path: Path,
                                                                 monkeypatch) -> None:
    from dvc.repo import Repo
    from mlflow import MlflowClient

    kind, base_dir, _, _, _ = tuned
    _, params = tiny_project
    project = tmp_path / "project"
    project.mkdir()
    (project / "dvc.yaml").write_text((REPO / "dvc.yaml").read_text())
    defaults = yaml.safe_load((REPO / "params.yaml").read_text())
    defaults["finetune"]["base"] = f"models/my-{kind}"
    (project / "params.yaml").write_text(yaml.safe_dump(defaults))
    monkeypatch.chdir(project)  # DVC reads params.yaml from the working directory
    Repo.init(str(project), no_scm=True)
    with Repo(str(project)) as repo:
        (stage,) = repo.stage.collect("finetune")
        assert f"models/my-{kind}" in [d.def_path for d in stage.deps]
        assert "data/lm" not in [d.def_path for d in stage.deps]
        (pretraining,) = repo.stage.collect("pretrain")  # its starting model is an input too
        assert "models/init" in [d.def_path for d in pretraining.deps]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    params = import_params(params, base_dir, tmp_path, epochs=1)
    params["tracking"] = {"enabled": True, "experiment": "import"}
    finetune.execute(parse_config(params))
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("import").experiment_id])
    assert run.data.tags["input.base.md5"] == path_md5(base_dir)
    assert run.data.tags["output.classifier.md5"] == path_md5(tmp_path / "classifier")


def test_an_imported_classifier_exports_as_its_own_family(tuned, tiny_project, tmp_path: Path) -> None:
    from transformers import pipeline as hf_pipeline

    from pipeline.hf import export

    _, _, out, _, _ = tuned
    root, _ = tiny_project
    written = export(out / "classifier", tmp_path / "hf", {})
    classifier = Classifier.load(out / "classifier")
    assert written == type(classifier.model.model).__name__
    texts = read_examples(root / "tokens" / "labeled", "test").texts[:100]
    labels, probs = classifier.predict(texts)
    theirs = hf_pipeline("text-classification", model=str(tmp_path / "hf"), top_k=None, device="cpu")(
        texts, truncation=True)
    assert [max(row, key=lambda r: r["score"])["label"] for row in theirs] == labels
    scores = np.array([[next(r["score"] for r in row if r["label"] == name) for name in classifier.labels]
                       for row in theirs])
    assert np.abs(scores - probs).max() < 1e-4


def test_not_a_transformers_directory_is_one_line(tiny_project, tmp_path: Path) -> None:
    root, params = tiny_project
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps({"model_type": "no-such-family"}))
    with pytest.raises(InputError, match="not a usable transformers model directory") as failure:
        run_import(root, import_params(params, broken, tmp_path), tmp_path)
    assert "\n" not in str(failure.value)
    assert not (tmp_path / "classifier").exists()
