"""The typed model of `params.yaml`: every knob, its default and its unit, validated once.

Stage code receives this model (or one of its sections), never raw dicts. An unknown key, a wrong
type or an out-of-range value stops with one line that names the key (and the closest valid key
for a typo): see `load_config`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from pipeline.configbase import Distributed, OptionalInput, Section
from pipeline.configerrors import describe_error
from pipeline.configfamilies import (
    Autoencode,
    Cooccur,
    Glove,
    Word2Vec,
    WordEval,
    Words,
)

PROJECT_MARKERS = ("dvc.yaml", ".dvc")


def project_root(start: Path | None = None) -> Path:
    """The project a command acts on: the nearest directory at or above `start` (default: the current
    directory) holding `dvc.yaml` or `.dvc/`, as DVC finds its root; `start` itself when none does."""
    start = (start or Path.cwd()).resolve()
    for directory in (start, *start.parents):
        if any((directory / marker).exists() for marker in PROJECT_MARKERS):
            return directory
    return start


def default_params() -> Path:
    return project_root() / "params.yaml"


class ConfigError(ValueError):
    """A params file that does not describe a valid pipeline configuration."""


# ---------------------------------------------------------------- data sources and cleaning


class Filters(Section):
    """Quality filters; a document failing any of them is dropped and counted under its name."""

    min_chars: int = Field(200, ge=0, description="minimum characters after cleaning")
    max_chars: int = Field(2_000_000, ge=1, description="maximum characters after cleaning")
    min_words: int = Field(20, ge=0, description="minimum whitespace-separated words")
    max_nonletter_ratio: float = Field(
        0.5, ge=0, le=1, description="maximum share of non-letter, non-space characters"
    )
    max_repeated_line_ratio: float = Field(
        0.3, ge=0, le=1, description="maximum share of non-empty lines that repeat an earlier line"
    )


class FilterOverrides(Section):
    """Per-source changes to the global filters (unset fields keep the global value)."""

    min_chars: int | None = Field(None, ge=0)
    max_chars: int | None = Field(None, ge=1)
    min_words: int | None = Field(None, ge=0)
    max_nonletter_ratio: float | None = Field(None, ge=0, le=1)
    max_repeated_line_ratio: float | None = Field(None, ge=0, le=1)


SourceFormat = Literal["mediawiki", "text", "jsonl", "csv", "parquet"]


class Source(Section):
    """One raw input. `path` is a file, a directory, a glob, or `pkg://package/path/in/package`."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    format: SourceFormat
    path: str = Field(min_length=1)
    text_field: str | None = Field(None, description="column holding the text (tabular formats)")
    label_field: str | None = Field(None, description="column holding the label: a labeled set")
    encoding: str = Field("auto", description="'auto' detects; else a Python codec name")
    filters: FilterOverrides = FilterOverrides()

    @model_validator(mode="after")
    def _fields_fit_format(self) -> Source:
        tabular = self.format in ("jsonl", "csv", "parquet")
        if tabular and not self.text_field:
            raise ValueError(f"source '{self.name}': format {self.format} needs text_field")
        if not tabular and (self.text_field or self.label_field):
            raise ValueError(f"source '{self.name}': text_field/label_field only apply to tables")
        return self

    @property
    def labeled(self) -> bool:
        return self.label_field is not None

    @property
    def kind(self) -> str:
        """'labeled' or 'corpus': the folder under paths.raw and the clean stage that take it."""
        return "labeled" if self.labeled else "corpus"


class Dedup(Section):
    exact: bool = Field(True, description="drop documents whose normalised text was seen before")
    near: bool = Field(True, description="drop near-duplicates found by MinHash LSH")
    threshold: float = Field(0.8, gt=0, lt=1, description="estimated Jaccard similarity to drop")
    num_perm: int = Field(128, ge=16, le=1024, description="MinHash permutations")
    shingle_words: int = Field(3, ge=1, le=10, description="words per shingle")
    seed: int = 1


class Split(Section):
    """Train/val/test shares per source. New documents are drawn in a salted-hash order into the split
    furthest below its share; the split manifest (`paths.splits`) keeps every earlier assignment."""

    train: float = Field(0.8, gt=0, lt=1)
    val: float = Field(0.1, gt=0, lt=1)
    test: float = Field(0.1, gt=0, lt=1)
    salt: str = Field("split-v1", description="change (or change a ratio) to redraw every split")

    @model_validator(mode="after")
    def _sums_to_one(self) -> Split:
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-9:
            raise ValueError(f"split ratios must sum to 1, got {total:g}")
        return self


class Clean(Distributed):
    filters: Filters = Filters()
    dedup: Dedup = Dedup()
    split: Split = Split()
    workers: int = Field(0, ge=0, description="processes for wikitext parsing (or of a local Dask cluster); "
                         "0 = all cores")
    batch_pages: int = Field(64, ge=1, description="pages handed to a worker at a time")
    row_group_rows: int = Field(
        1024, ge=1, description="Parquet rows per row group: readers hold one group in memory at a time"
    )
    row_group_bytes: int = Field(
        4 << 20, ge=1, description="a row group also ends once its texts reach this many UTF-8 bytes "
        "(long articles: the group stays small in memory)"
    )


class Data(Section):
    sources: list[Source] = Field(min_length=1)
    clean: Clean = Clean()

    @model_validator(mode="after")
    def _unique_names(self) -> Data:
        names = [s.name for s in self.sources]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"source names must be unique, repeated: {', '.join(dupes)}")
        return self


# ---------------------------------------------------------------- tokenize


class Tokenize(Distributed):
    """Byte-level BPE trained on the train split, and the token shards it encodes (the encoding on a
    Dask cluster with `executor: dask`)."""

    vocab_size: int = Field(8192, ge=1, le=2**32, description="tokens, special tokens included")
    min_frequency: int = Field(2, ge=1, description="minimum pair count for a merge")
    eot_token: str = Field("<|endoftext|>", min_length=1, description="separates documents")
    pad_token: str = Field("<|pad|>", min_length=1, description="pads labeled examples")
    mask_token: str = Field("<|mask|>", min_length=1, description="hides tokens in masked-language modelling")
    tokenizer_file: str | None = Field(None, description="reuse this tokenizer.json instead of training")
    shard_tokens: int = Field(1_048_576, ge=1024, description="tokens per shard (the last is shorter)")
    batch_documents: int = Field(256, ge=1, description="documents encoded per encode_batch call "
                                 "(executor dask: per task)")
    workers: int = Field(0, ge=0, description="processes of a local Dask cluster (executor dask, no "
                         "scheduler); 0 = all cores")
    max_length: int = Field(128, ge=2, description="labeled examples are truncated to this many tokens")
    include_labeled_train: OptionalInput = Field(
        "inputs/none", description="domain-adaptive pretraining: a labeled set (paths.clean/labeled.parquet) "
        "whose train texts (not labels) join the tokenizer's training text and the train shards; "
        "paths.no_input: none",
    )


# ---------------------------------------------------------------- pretrain


class Model(Section):
    """The language model's shape; `arch` picks the GPT decoder or a recurrent baseline."""

    arch: Literal["gpt", "lstm", "gru"] = "gpt"
    context: int = Field(128, ge=2, description="tokens per training window")
    n_layer: int = Field(4, ge=1)
    n_head: int = Field(4, ge=1, description="attention heads (gpt only)")
    n_embd: int = Field(192, ge=8, description="model width")
    dropout: float = Field(0.0, ge=0, lt=1)
    bias: bool = Field(False, description="biases in linear layers and norms (gpt only)")
    positions: Literal["learned", "rotary"] = "learned"


class Pretrain(Section):
    """The language model's training: `objective` clm (next token, a GPT decoder) or mlm (masked
    tokens, a bidirectional encoder of the same shape)."""

    objective: Literal["clm", "mlm"] = Field("clm", description="clm: causal LM; mlm: masked LM (encoder)")
    mask_rate: float = Field(0.15, gt=0, lt=1, description="mlm: share of tokens chosen (80/10/10)")
    model: Model = Model()
    batch_size: int = Field(16, ge=1, description="windows per micro-batch, per process")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    max_steps: int = Field(800, ge=1, description="optimizer steps")
    learning_rate: float = Field(3e-3, gt=0)
    min_learning_rate: float = Field(3e-4, ge=0, description="end of the cosine decay")
    warmup_steps: int = Field(50, ge=0)
    weight_decay: float = Field(0.1, ge=0, description="applied to matrices only")
    beta1: float = Field(0.9, gt=0, lt=1)
    beta2: float = Field(0.99, gt=0, lt=1)
    grad_clip: float = Field(1.0, ge=0, description="max global grad norm; 0 = off")
    eval_every: int = Field(100, ge=1, description="steps between validations")
    eval_windows: int = Field(64, ge=1, description="fixed val windows per validation")
    patience: int = Field(5, ge=1, description="validations without improvement before stopping")
    checkpoint_every: int = Field(100, ge=1, description="steps between resumable checkpoints")
    resume: Literal["auto", "never"] = Field("auto", description="auto: continue from the last checkpoint")
    compile: bool = Field(False, description="torch.compile the model")
    parallel: Literal["ddp", "fsdp"] = Field("ddp", description="under torchrun: ddp (a whole model per "
                                             "rank) or fsdp (FSDP2: parameters and state sharded)")
    init_embeddings: OptionalInput = Field(
        "data/glove_token", description="start the token embedding from these token vectors "
        "(paths.glove_token); paths.no_input: random")
    init_from: str = Field("models/init", description="start from the model in this directory, if it "
                           "holds one (ours or a transformers GPT-2 of the same shape and vocabulary)")
    seed: int = 1337

    @model_validator(mode="after")
    def _mlm_needs_attention(self) -> Pretrain:
        if self.objective == "mlm" and self.model.arch != "gpt":
            raise ValueError(f"objective mlm needs model.arch gpt, not {self.model.arch} (reads left only)")
        return self


# ---------------------------------------------------------------- fine-tuning and evaluation


class Finetune(Section):
    """A classification head on the pretrained model, trained on the labeled set's train split."""

    base: str = Field("data/lm", description="the model to fine-tune: this pipeline's LM (paths.lm) or a "
                      "local transformers model directory (its own tokenizer and pooling)")
    mode: Literal["full", "frozen"] = Field("full", description="frozen: train the head only (linear probe)")
    pooling: Literal["last", "mean"] = Field("last", description="last real position, or the mean of all")
    class_weights: bool = Field(True, description="weight the loss by inverse class frequency")
    epochs: int = Field(2, ge=1, description="passes over the train examples (early stopping may stop first)")
    max_examples: int | None = Field(None, ge=1, description="use only this many train examples")
    batch_size: int = Field(32, ge=1)
    dropout: float | None = Field(None, ge=0, lt=1, description="the backbone's dropout while fine-tuning; "
                                  "null keeps the pretrained model's")
    learning_rate: float = Field(5e-4, gt=0, description="backbone peak learning rate (mode full)")
    head_learning_rate: float = Field(3e-3, gt=0, description="classification head peak learning rate")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="end of the cosine decay, a share of the peak")
    warmup_steps: int = Field(50, ge=0)
    weight_decay: float = Field(0.01, ge=0, description="applied to matrices only")
    grad_clip: float = Field(1.0, ge=0, description="max global grad norm; 0 = off")
    eval_every: int = Field(200, ge=1, description="steps between validations (macro-F1 on val)")
    patience: int = Field(3, ge=1, description="validations without improvement before stopping")
    checkpoint_every: int = Field(200, ge=1)
    resume: Literal["auto", "never"] = "auto"
    seed: int = 1337


class Evaluate(Section):
    bigram_k: float = Field(0.01, gt=0, description="add-k smoothing of the bigram baseline")
    tfidf_max_features: int | None = Field(None, ge=1, description="cap the baseline's vocabulary")
    tfidf_c: list[float] = Field(
        default_factory=lambda: [0.5, 1.0, 2.0, 4.0, 8.0, 16.0], min_length=1,
        description="the baseline's inverse regularisation strengths; the best on val (with or without "
        "balanced class weights) is scored on test",
    )
    pseudo_perplexity_windows: int = Field(8, ge=1, description="mlm: test windows scored token by token")
    samples: list[str] = Field(
        default_factory=lambda: ["The history of", "In mathematics,", "The city is"],
        description="prompts for the report's generated samples",
    )
    sample_tokens: int = Field(40, ge=1)
    sample_seed: int = 0
    temperature: float = Field(0.8, ge=0)
    top_k: int = Field(50, ge=1)


# ---------------------------------------------------------------- paths and tracking


class Paths(Section):
    """Where stages read and write, relative to the project root (dvc.yaml interpolates these)."""

    raw: str = "data/raw"
    clean: str = "data/clean"
    splits: str = "data/splits"
    tokenizer: str = "data/tokenizer"
    tokens: str = "data/tokens"
    cooccur: str = "data/cooccur"              # word unit
    cooccur_token: str = "data/cooccur_token"  # token unit
    glove: str = "data/glove"                  # word vectors
    glove_token: str = "data/glove_token"      # token vectors (pretrain.init_embeddings)
    skipgram: str = "data/skipgram"            # Word2Vec word vectors
    cbow: str = "data/cbow"
    lm: str = "data/lm"
    checkpoints: str = "checkpoints/pretrain"
    classifier: str = "data/classifier"
    finetune_checkpoints: str = "checkpoints/finetune"
    autoencode: str = "data/autoencode"
    autoencode_checkpoints: str = "checkpoints/autoencode"
    reports: str = "reports"
    metrics: str = "metrics"
    # An optional input set to this is off: a git-tracked folder that never changes, because DVC has
    # no conditional dependencies (an input a stage reads only sometimes is a path-valued param).
    no_input: str = "inputs/none"

    def given(self, value: str) -> bool:
        """Whether an optional input is on (not `no_input`)."""
        return Path(value) != Path(self.no_input)

    def optional_inputs(self) -> dict[str, str]:
        """Each optional input's dotted key and the one output it may name (else `no_input`)."""
        labeled = f"{self.clean}/labeled.parquet"
        return {"tokenize.include_labeled_train": labeled, "words.include_labeled_train": labeled,
                "pretrain.init_embeddings": self.glove_token}


class Tracking(Section):
    enabled: bool = True
    experiment: str = "llm-pipeline"
    uri: str | None = Field(None, description="MLflow tracking URI; default sqlite:///<project>/mlflow.db")
    classifier_model: str = Field("sentiment-classifier", description="registered model name (finetune)")
    lm_model: str = Field("pretrained-lm", description="registered model name (pretrain)")


# ---------------------------------------------------------------- the whole file


class Config(Section):
    seed: int = 1337
    paths: Paths = Paths()
    data: Data
    tokenize: Tokenize = Tokenize()
    words: Words = Words()
    cooccur: Cooccur = Cooccur()
    glove: Glove = Glove()
    word2vec: Word2Vec = Word2Vec()
    word_eval: WordEval = WordEval()
    pretrain: Pretrain = Pretrain()
    finetune: Finetune = Finetune()
    evaluate: Evaluate = Evaluate()
    autoencode: Autoencode = Autoencode()
    tracking: Tracking = Tracking()

    @model_validator(mode="after")
    def _optional_inputs_are_known(self) -> Config:
        """Each optional input names the output it reads, or nothing: what DVC tracks is what is read."""
        none = self.paths.no_input
        for key, path in self.paths.optional_inputs().items():
            section, name = key.split(".")
            value = getattr(getattr(self, section), name)
            if Path(value) not in (Path(path), Path(none)):
                raise ValueError(f"{key}: '{value}' is neither {path} nor paths.no_input ({none})")
        return self


def parse_config(raw: Any, source: str = "params") -> Config:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level")
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(describe_error(Config, exc.errors()[0], source)) from None


def load_config(path: Path | str | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Read and validate a params file; `overrides` maps dotted keys to values (`a.b: 3`)."""
    path = Path(path) if path is not None else default_params()
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: params file not found") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    for dotted, value in (overrides or {}).items():
        node = raw
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return parse_config(raw, str(path))
