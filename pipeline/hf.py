"""Export to Hugging Face transformers: the GPT decoder as `GPT2LMHeadModel`, a classifier on it that
reads the last real token as `GPT2ForSequenceClassification` (with `id2label`), the tokenizer as
`PreTrainedTokenizerFast` with its special tokens; safetensors only.

Exact where the architecture is GPT-2's: learned positions, pre-norm blocks, exact-erf GELU, a
final norm and a head tied to the token embedding. Refused, because no transformers class computes
the same function: rotary positions (ours rotate interleaved channel pairs after a LayerNorm; the
Llama family rotates halves after an RMSNorm), the encoder (BERT-family blocks normalise after the
residual, ours before), the LSTM / GRU models, and mean pooling (GPT-2's classifier reads the last
real token). A classifier fine-tuned from a transformers model is written back as that model's
family, with its own tokenizer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from pipeline.checkpoint import load_model
from pipeline.classify import LABELS_FILE, TOKENIZER_FILE, read_labels
from pipeline.files import InputError, atomic_dir
from pipeline.models import GPT, SequenceClassifier, TransformersClassifier

if TYPE_CHECKING:
    from transformers import GPT2Config


def check_exportable(model: torch.nn.Module, where: Path) -> GPT:
    """The GPT decoder inside `model`, or a one-line refusal naming what has no GPT-2 equivalent."""
    backbone = model.backbone if isinstance(model, SequenceClassifier) else model
    if not isinstance(backbone, GPT):
        raise InputError(f"{where}: only GPT models export to transformers (a recurrent model has no "
                         "transformers equivalent)")
    if not backbone.cfg.causal:
        raise InputError(f"{where}: the encoder (objective mlm) has no exact transformers equivalent "
                         "(BERT-family blocks are post-norm, ours pre-norm)")
    if backbone.cfg.positions != "learned":
        raise InputError(f"{where}: rotary positions have no exact transformers equivalent (Llama rotates "
                         "channel halves after RMSNorm; ours rotates pairs after LayerNorm)")
    if isinstance(model, SequenceClassifier) and model.pooling != "last":
        raise InputError(f"{where}: a classifier with {model.pooling} pooling has no transformers "
                         "equivalent (GPT2ForSequenceClassification reads the last token); fine-tune "
                         "with finetune.pooling: last to export it")
    return backbone


def gpt2_config(gpt: GPT, special_ids: dict[str, int], **extra: Any) -> GPT2Config:
    from transformers import GPT2Config

    cfg = gpt.cfg
    return GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.context, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
        n_head=cfg.n_head, n_inner=4 * cfg.n_embd, activation_function="gelu",  # exact erf, as F.gelu
        resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout, layer_norm_epsilon=1e-5,
        bos_token_id=special_ids["eot"], eos_token_id=special_ids["eot"], pad_token_id=special_ids["pad"],
        tie_word_embeddings=True, **extra,
    )


def gpt2_modules(n_layer: int) -> list[tuple[str, str, bool]]:
    """(our module, GPT-2's module, whether GPT-2 stores the weight transposed) for every module with a
    weight and a bias, beyond the embeddings. GPT-2's Conv1D stores (in, out), nn.Linear (out, in)."""
    pairs = [("ln_f", "ln_f", False)]
    for i in range(n_layer):
        pairs += [(f"blocks.{i}.{ours}", f"h.{i}.{theirs}", transposed) for ours, theirs, transposed in (
            ("ln_1", "ln_1", False), ("ln_2", "ln_2", False), ("attn.qkv", "attn.c_attn", True),
            ("attn.proj", "attn.c_proj", True), ("mlp.fc", "mlp.c_fc", True),
            ("mlp.proj", "mlp.c_proj", True))]
    return pairs


def gpt2_weights(gpt: GPT) -> dict[str, torch.Tensor]:
    """Our GPT's weights under GPT-2's names; a model without biases gets zero biases."""
    assert gpt.wpe is not None
    ours = gpt.state_dict()
    state = {"transformer.wte.weight": ours["wte.weight"], "transformer.wpe.weight": ours["wpe.weight"]}
    for mine, theirs, transposed in gpt2_modules(gpt.cfg.n_layer):
        weight = ours[f"{mine}.weight"]
        state[f"transformer.{theirs}.weight"] = weight.t() if transposed else weight
        state[f"transformer.{theirs}.bias"] = ours.get(f"{mine}.bias", torch.zeros(weight.shape[0]))
    return {k: v.detach().clone().contiguous() for k, v in state.items()}


def is_transformers_dir(directory: Path) -> bool:
    """A transformers model directory: its config.json names a `model_type` (ours names an `arch`)."""
    config = directory / "config.json"
    return config.exists() and "model_type" in json.loads(config.read_text())


def gpt_weights_from_gpt2(directory: Path, gpt: GPT, vocabulary: dict[str, int]) -> dict[str, torch.Tensor]:
    """The weights of a transformers GPT-2 directory under our GPT's names (the inverse of
    `gpt2_weights`), for starting pretraining from it. Refused in one line unless it has our shape
    (layers, heads, width, context, 4x MLP), our tokenizer's vocabulary, and zero biases when our model
    has none; a tanh-approximated GELU (GPT-2's own) is accepted with a note (an initialisation)."""
    import sys

    from safetensors.torch import load_file
    from tokenizers import Tokenizer

    config = json.loads((directory / "config.json").read_text())
    cfg = gpt.cfg
    if config.get("model_type") != "gpt2":
        raise InputError(f"{directory}: a {config.get('model_type')} model; pretraining starts from a "
                         "GPT-2 only")
    theirs = tuple(config[k] for k in ("n_layer", "n_head", "n_embd", "n_positions", "vocab_size"))
    ours = (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.context, cfg.vocab_size)
    if theirs != ours or (config.get("n_inner") or 4 * cfg.n_embd) != 4 * cfg.n_embd:
        raise InputError(f"{directory}: shape (layers, heads, width, context, vocab) {theirs} is not "
                         f"pretrain.model's {ours}")
    tokenizer = directory / TOKENIZER_FILE
    if not tokenizer.exists() or Tokenizer.from_file(str(tokenizer)).get_vocab() != vocabulary:
        raise InputError(f"{directory}: its tokenizer is not this pipeline's (train on its vocabulary with "
                         "tokenize.tokenizer_file)")
    if config.get("activation_function", "gelu_new") != "gelu":
        print(f"pretrain: {directory} uses {config.get('activation_function', 'gelu_new')}; ours is the "
              "exact GELU (an initialisation, not the same function)", file=sys.stderr)
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise InputError(f"{directory}: no safetensors weights")
    state = {k.removeprefix("transformer."): v for f in files for k, v in load_file(str(f)).items()}
    mapped = {"wte.weight": state["wte.weight"], "wpe.weight": state["wpe.weight"]}
    biases = {}
    for mine, theirs, transposed in gpt2_modules(cfg.n_layer):
        weight = state[f"{theirs}.weight"]
        mapped[f"{mine}.weight"] = weight.t() if transposed else weight
        biases[f"{mine}.bias"] = state[f"{theirs}.bias"]
    if cfg.bias:
        mapped.update(biases)
    elif any(b.abs().max() > 0 for b in biases.values()):
        raise InputError(f"{directory}: its biases are not zero; set pretrain.model.bias: true to keep them")
    return {k: v.contiguous() for k, v in mapped.items()}


def fold_head_bias(weights: dict[str, torch.Tensor], head: torch.nn.Linear) -> None:
    """GPT-2's classification head has no bias: shift the final norm's bias by d with W d = b (W has
    full row rank: fewer classes than channels), so W (h + d) = W h + b."""
    w, b = head.weight.detach().double(), head.bias.detach().double()
    shift = torch.linalg.pinv(w) @ b
    weights["transformer.ln_f.bias"] = (weights["transformer.ln_f.bias"].double() + shift).float()
    weights["score.weight"] = head.weight.detach().clone()


def special_ids(tokenizer_file: Path, tokens: dict[str, str]) -> dict[str, int]:
    """The ids of the special tokens (eot, pad, mask) that this tokenizer has."""
    added = {t["content"]: t["id"] for t in json.loads(tokenizer_file.read_text())["added_tokens"]}
    if tokens["eot"] not in added or tokens["pad"] not in added:
        raise InputError(f"{tokenizer_file}: no {tokens['eot']} or {tokens['pad']} token "
                         "(is it the tokenizer these tokenize params made?)")
    return {name: added[token] for name, token in tokens.items() if token in added}


def save_tokenizer(tokenizer_file: Path, tokens: dict[str, str], max_length: int, out: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=str(tokenizer_file), bos_token=tokens["eot"], eos_token=tokens["eot"],
        unk_token=tokens["eot"], pad_token=tokens["pad"], mask_token=tokens.get("mask"),
        model_max_length=max_length, padding_side="right",
    )
    tokenizer.save_pretrained(str(out))


def export_transformers(model: TransformersClassifier, model_dir: Path, max_length: int, out: Path) -> str:
    """A classifier fine-tuned from a transformers model: that model and its own tokenizer, which
    truncates where the classifier was trained to read."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    tokenizer.model_max_length = max_length
    with atomic_dir(out) as tmp:
        model.model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
    return type(model.model).__name__


def export(model_dir: Path, out: Path, tokens: dict[str, str]) -> str:
    """Write `model_dir` (a language model or classifier of this pipeline) to `out` as a transformers
    model directory; `tokens`: the eot, pad and mask token strings (tokenize params). Returns the
    transformers class written."""
    from transformers import GPT2ForSequenceClassification, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # its shard-writing bar: not for a pipeline log
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"{out}: exists and is not an empty directory (nothing written; remove it or "
                         "choose another)")
    model, config = load_model(model_dir)
    if isinstance(model, TransformersClassifier):
        return export_transformers(model, model_dir, int(config["max_length"]), out)
    gpt = check_exportable(model, model_dir)
    tokenizer_file = model_dir / TOKENIZER_FILE
    if not tokenizer_file.exists():
        raise InputError(f"{tokenizer_file}: no tokenizer beside the model")
    ids = special_ids(tokenizer_file, tokens)
    tokens = {name: token for name, token in tokens.items() if name in ids}
    weights = gpt2_weights(gpt)
    if isinstance(model, SequenceClassifier):
        labels = read_labels(model_dir / LABELS_FILE)
        id2label = {i: name for name, i in labels.items()}
        hf_config = gpt2_config(gpt, ids, num_labels=model.n_classes, id2label=id2label,
                                label2id=labels)
        hf_model: torch.nn.Module = GPT2ForSequenceClassification(hf_config)
        fold_head_bias(weights, model.classifier)
        max_length = int(config["max_length"])
    else:
        hf_model = GPT2LMHeadModel(gpt2_config(gpt, ids))
        max_length = gpt.cfg.context
    missing, unexpected = hf_model.load_state_dict(weights, strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:  # the head is tied to wte
        raise InputError(f"{model_dir}: weights do not map onto GPT-2 ({missing or unexpected})")
    with atomic_dir(out) as tmp:
        hf_model.save_pretrained(str(tmp), safe_serialization=True)
        save_tokenizer(tokenizer_file, tokens, max_length, tmp)
    return type(hf_model).__name__
