"""The params sections of the model families beside the GPT: word vectors (co-occurrence counts,
GloVe, Word2Vec, their evaluation) and the sentence autoencoders. `pipeline.config` assembles them."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from pipeline.configbase import Distributed, OptionalInput, Section

# ---------------------------------------------------------------- co-occurrence and GloVe

GENSIM_TEST_DATA = "pkg://gensim/test/test_data"


class Cooccur(Distributed):
    """Co-occurrence counts over the train split, with the semantics of Stanford GloVe's `cooccur`,
    for two units: words of the clean text (stage `cooccur`) and BPE ids of the shards (`cooccur_token`).
    With `executor: dask`, splitting texts into words and counting batches of documents run on the
    cluster, each worker keeping its counts (within `memory_mb`); the stage's process merges them."""

    # The 1/d weights are summed exactly as integers over lcm(1..window): 24 keeps that in int64.
    window: int = Field(24, ge=1, le=24, description="units each side of the centre")
    min_count: int = Field(5, ge=1, description="units seen fewer times in train are dropped first")
    memory_mb: float = Field(64, gt=0, description="pair buffers (MiB), reduced and spilled when full")
    workers: int = Field(0, ge=0, description="processes splitting words, threads counting (or processes "
                         "of a local Dask cluster); 0 = all cores")
    batch_texts: int = Field(256, ge=1, description="texts split into words per task (executor dask)")
    batch_chars: int = Field(1 << 20, ge=1, description="and at most this many characters per task (a "
                             "batch of long articles is sent, pickled and held several times over)")


class Words(Section):
    """The word text of the word-vector stages (cooccur, skipgram, cbow): train texts only."""

    pattern: str = Field(r"[^\W\d_]+", description="regex of a word, on lowercased text")
    include_labeled_train: OptionalInput = Field(
        "data/clean/labeled.parquet", description="a labeled set whose train texts follow the corpus's "
        "(never val or test); paths.no_input: none",
    )


class WordBenchmarks(Section):
    """Evaluation files (gensim's formats); `pkg://` paths point into installed packages."""

    wordsim353: str = f"{GENSIM_TEST_DATA}/wordsim353.tsv"
    simlex999: str = f"{GENSIM_TEST_DATA}/simlex999.txt"
    analogy: str = f"{GENSIM_TEST_DATA}/questions-words.txt"


class Glove(Section):
    """GloVe on the co-occurrence triples: AdaGrad as in the reference C code, shuffled mini-batches."""

    dim: int = Field(50, ge=1, description="vector width")
    epochs: int = Field(15, ge=1)
    learning_rate: float = Field(0.05, gt=0, description="AdaGrad eta (vectors; biases use 1 as in C)")
    x_max: float = Field(5.0, gt=0, description="f(x) = (x/x_max)^alpha, capped at 1")
    alpha: float = Field(0.75, gt=0)
    grad_clip: float = Field(100.0, gt=0, description="per-record clip of the vector gradient, as in C")
    batch_size: int = Field(1024, ge=1, description="records per AdaGrad step")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when present")
    seed: int = 1337


class Word2Vec(Section):
    """gensim's Word2Vec (stages skipgram and cbow) on the `words` text: negative sampling, subsampling."""

    dim: int = Field(100, ge=1, description="vector width")
    window: int = Field(10, ge=1, description="words each side of the centre (gensim shrinks it at random)")
    negative: int = Field(10, ge=1, description="noise words per positive pair")
    sample: float = Field(1e-4, ge=0, lt=1, description="frequent-word subsampling threshold; 0 = none")
    min_count: int = Field(5, ge=1, description="words seen fewer times in train are dropped")
    epochs: int = Field(15, ge=1)
    learning_rate: float = Field(0.025, gt=0, description="start of the linear decay")
    min_learning_rate: float = Field(1e-4, gt=0, description="end of the linear decay")
    workers: int = Field(1, ge=0, description="training threads; 1 = bit-exact reruns; 0 = all cores")
    seed: int = 1337


class WordEval(Section):
    """How word vectors (glove, skipgram, cbow) are scored: benchmarks and probe words' neighbours."""

    benchmarks: WordBenchmarks = WordBenchmarks()
    probe_words: list[str] = Field(
        default_factory=lambda: ["war", "music", "france", "king", "philosophy"],
        description="words whose nearest neighbours go into the metrics",
    )
    neighbours: int = Field(8, ge=1)


# ---------------------------------------------------------------- sentence autoencoders


SentenceModelName = Literal["lm", "ae", "dae", "vae", "arae"]


class Autoencode(Section):
    """GRU sentence models on the clean train texts (labeled texts whole, corpus pages split into
    sentences): an lm baseline, an autoencoder, a denoising seq2seq with attention, a sentence VAE and
    ARAE's latent GAN on the autoencoder's codes; each trains `steps` batches."""

    models: list[SentenceModelName] = Field(
        default_factory=lambda: ["lm", "ae", "dae", "vae", "arae"], min_length=1,
        description="the models trained (arae needs ae)")
    min_tokens: int = Field(3, ge=1, description="shorter sentences are left out")
    max_tokens: int = Field(32, ge=2, description="longer sentences are left out")
    n_embd: int = Field(128, ge=1, description="token embedding (tied to the output layer)")
    n_hidden: int = Field(256, ge=1, description="GRU width")
    code: int = Field(64, ge=1, description="ae: the code's size")
    latent: int = Field(32, ge=1, description="vae: the size of z")
    n_layer: int = Field(2, ge=1, description="dae: Transformer layers each side")
    n_head: int = Field(4, ge=1, description="dae: attention heads (dividing n_embd)")
    pointer: bool = Field(True, description="dae: a pointer-generator output that copies source tokens")
    dropout: float = Field(0.0, ge=0, lt=1)
    steps: int = Field(400, ge=1, description="batches per model")
    batch_size: int = Field(32, ge=1)
    learning_rate: float = Field(2e-3, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="end of the cosine decay, a share of the peak")
    warmup_steps: int = Field(30, ge=0)
    weight_decay: float = Field(0.01, ge=0)
    grad_clip: float = Field(1.0, ge=0, description="0 = off")
    kl_anneal_steps: int = Field(250, ge=0, description="vae: the KL weight rises linearly from 0 to 1")
    free_bits: float = Field(0.125, ge=0, description="vae: nats per latent dimension the KL may use freely")
    word_dropout: float = Field(0.0, ge=0, lt=1, description="vae: decoder inputs replaced by the mask")
    mask_rate: float = Field(0.15, ge=0, le=1, description="dae training: tokens masked")
    delete_rate: float = Field(0.05, ge=0, le=1, description="dae training: tokens deleted")
    infill_rate: float = Field(0.05, ge=0, le=1, description="dae training: spans replaced by one mask")
    eval_mask_rate: float = Field(0.15, ge=0, le=1, description="dae test: tokens masked (no other noise)")
    gan_steps: int = Field(1000, ge=1, description="arae: generator steps")
    critic_steps: int = Field(5, ge=1, description="arae: critic steps per generator step")
    gradient_penalty: float = Field(10.0, ge=0, description="arae: WGAN-GP weight")
    gan_learning_rate: float = Field(1e-4, gt=0)
    noise: int = Field(32, ge=1, description="arae: the generator's noise size")
    eval_sentences: int = Field(500, ge=1, description="test sentences scored")
    iwae_samples: int = Field(50, ge=1, description="vae: importance samples per test sentence")
    samples: int = Field(500, ge=1, description="sentences generated per model (forward, reverse ppl)")
    ngram_k: float = Field(0.01, gt=0, description="add-k smoothing of the bigram behind those perplexities")
    checkpoint_every: int = Field(100, ge=1)
    resume: Literal["auto", "never"] = "auto"
    seed: int = 1337

    @model_validator(mode="after")
    def _lengths_and_arae(self) -> Autoencode:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_head ({self.n_head}) does not divide n_embd ({self.n_embd})")
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) is above max_tokens ({self.max_tokens})")
        if "arae" in self.models and "ae" not in self.models:
            raise ValueError("arae trains on the ae's codes: list ae in models too")
        return self
