"""The DVC graph is exact: under each configuration, a change to a raw source or to a params section
reaches exactly the stages that read it, directly or through what they read: first on DVC's own
index, then as `dvc status` reports it on a project whose outputs are committed; and every stage
names the code behind its results."""

from __future__ import annotations

import contextlib
import importlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline import sourcecode
from pipeline.config import Finetune, Pretrain, project_root
from pipeline.configfamilies import Autoencode
from pipeline.status import stale_stages

REPO = project_root(Path(__file__).parent)
EVERY = {"ingest", "clean", "clean_labeled", "tokenize", "tokenize_labeled", "cooccur", "glove", "skipgram",
         "cbow", "cooccur_token", "glove_token", "pretrain", "finetune", "evaluate", "autoencode"}
WORDS = {"cooccur", "glove", "skipgram", "cbow"}  # the word-vector stages
LM = {"tokenize", "cooccur_token", "glove_token", "pretrain"}  # what the language model is built from
CLASSIFIER = {"tokenize_labeled", "finetune", "evaluate"}
SENTENCES = {"autoencode", "evaluate"}  # the sentence models read the clean texts, tokenizer, GloVe
TUNED = {"finetune", "evaluate"}  # what the language model reaches
LABELED = "data/clean/labeled.parquet"
NONE = "inputs/none"

CONFIGS = {  # name: (params changed, the stages a raw labeled source reaches, those the glove params reach)
    "default": ({}, {"clean_labeled", *WORDS, *CLASSIFIER, *SENTENCES},
                {"glove", "glove_token", "pretrain", *TUNED, *SENTENCES}),
    "random embedding": ({"pretrain": {"init_embeddings": NONE}},
                         {"clean_labeled", *WORDS, *CLASSIFIER, *SENTENCES},
                         {"glove", "glove_token", *SENTENCES}),
    "labeled texts in the LM": ({"tokenize": {"include_labeled_train": LABELED}}, EVERY - {"ingest", "clean"},
                                {"glove", "glove_token", "pretrain", *TUNED, *SENTENCES}),
    "labeled texts not in the words": ({"words": {"include_labeled_train": NONE}},
                                       {"clean_labeled", *CLASSIFIER, *SENTENCES},
                                       {"glove", "glove_token", "pretrain", *TUNED, *SENTENCES}),
}


def reached(root: Path, path: str | None = None, section: str | None = None) -> set[str]:
    """The stages DVC's index says read `path` or a key of params `section`, and all built from them."""
    import networkx as nx
    from dvc.repo import Repo

    with contextlib.chdir(root), Repo(str(root)) as repo:
        graph = repo.index.graph  # an edge runs from a stage to a stage it depends on
        direct = set()
        for stage in graph.nodes:
            for dep in stage.deps:
                keys = getattr(dep, "params", None)
                if keys is not None:
                    hit = section is not None and any(k == section or k.startswith(f"{section}.")
                                                     or section.startswith(f"{k}.") for k in keys)
                else:
                    own = Path(dep.def_path).as_posix()
                    hit = path is not None and (own == path or path.startswith(f"{own}/")
                                                or own.startswith(f"{path}/"))
                if hit:
                    direct.add(stage)
        found = set(direct).union(*(nx.ancestors(graph, s) for s in direct))
        return {s.name for s in found}


@pytest.fixture(scope="module")
def projects(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The repository's dvc.yaml and params.yaml, once per configuration, each its own DVC project."""
    made = {}
    for name, (changes, _, _) in CONFIGS.items():
        root = tmp_path_factory.mktemp(name.replace(" ", "-"))
        tracked = subprocess.run(["git", "ls-files", "pipeline"], cwd=REPO, capture_output=True, text=True,
                                 check=True).stdout.split()
        for path in ("dvc.yaml", "inputs/none/README.md", "models/init/README.md", "metrics/backbones.json",
                     *tracked):
            (root / path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(REPO / path, root / path)
        params = yaml.safe_load((REPO / "params.yaml").read_text())
        for section, values in changes.items():
            params[section].update(values)
        (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "--quiet"], cwd=root, check=True)
        made[name] = root
    return made


@pytest.mark.parametrize("config", CONFIGS)
def test_raw_sources_reach_exactly_their_readers(projects: dict[str, Path], config: str) -> None:
    root, (_, labeled_reach, _) = projects[config], CONFIGS[config]
    assert reached(root, "data/raw/labeled/sentiment/sentiment.csv") == labeled_reach
    # the corpus: its tokenizer encodes the labeled set too; labeled cleaning never reads it
    assert reached(root, "data/raw/corpus/enwiki/dump.xml.bz2") == EVERY - {"ingest", "clean_labeled"}


@pytest.mark.parametrize("config", CONFIGS)
def test_params_sections_reach_exactly_their_readers(projects: dict[str, Path], config: str) -> None:
    root, (_, _, glove_reach) = projects[config], CONFIGS[config]
    assert reached(root, section="glove") == glove_reach
    assert reached(root, section="word2vec") == {"skipgram", "cbow", "evaluate"}
    # the counts feed only the GloVe fits (skip-gram and CBOW read the clean text themselves)
    assert reached(root, section="cooccur") == glove_reach | {"cooccur", "cooccur_token"}
    assert reached(root, section="finetune") == {"finetune", "evaluate"}
    assert reached(root, section="evaluate") == {"evaluate"}
    assert reached(root, section="pretrain") == {"pretrain", "finetune", "evaluate"}
    # the labeled set's encoding reads two tokenize keys; the corpus side reads the whole section
    before_tokens = {"ingest", "clean", "clean_labeled", *WORDS}
    assert reached(root, section="tokenize.max_length") == EVERY - before_tokens
    assert reached(root, section="tokenize.vocab_size") == LM | CLASSIFIER | SENTENCES
    assert reached(root, section="autoencode") == SENTENCES
    assert reached(root, section="data") == EVERY  # which sources, and how each is cleaned


# one key of each section (and the top-level seed) to change
EDITS = {"data.clean.split.salt": "changed", "tokenize.vocab_size": 4000, "tokenize.max_length": 64,
         "words.pattern": "[a-z]+", "cooccur.window": 5, "glove.seed": 2, "word2vec.epochs": 3,
         "pretrain.seed": 2, "finetune.seed": 2, "evaluate.samples": 1, "autoencode.seed": 2, "seed": 7}


def committed(root: Path) -> None:
    """Stand-in outputs (a file, or a folder holding one) for every stage, recorded in dvc.lock."""
    from dvc.repo import Repo

    with contextlib.chdir(root), Repo(str(root)) as repo:
        outs = [Path(out.def_path) for stage in repo.index.stages for out in stage.outs]
    for out in outs:
        path = root / out if out.suffix else root / out / "part"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(str(out))
    for kind, name in (("corpus", "enwiki"), ("labeled", "sentiment")):
        (root / "data/raw" / kind / name).mkdir(parents=True, exist_ok=True)
        (root / "data/raw" / kind / name / "source").write_text(name)
    subprocess.run([sys.executable, "-m", "dvc", "commit", "--force", "--quiet"], cwd=root, check=True)


def rerun(root: Path) -> set[str]:
    stale, _ = stale_stages(root)
    return {status.name for status in stale if status.reasons}


@pytest.mark.parametrize("config", CONFIGS)
def test_dvc_status_agrees(projects: dict[str, Path], config: str) -> None:
    root = projects[config]
    committed(root)
    assert rerun(root) == set()
    for kind, name in (("corpus", "enwiki"), ("labeled", "sentiment")):
        source = root / "data/raw" / kind / name / "source"
        original = source.read_text()
        source.write_text(original + " changed")
        # ingest's output was modified in place: it reruns, and so does every reader of the source
        assert rerun(root) == reached(root, f"data/raw/{kind}/{name}/source") | {"ingest"}
        source.write_text(original)
    text = (root / "params.yaml").read_text()
    for key, value in EDITS.items():
        params = yaml.safe_load(text)
        *parents, leaf = key.split(".")
        node = params
        for part in parents:
            node = node[part]
        node[leaf] = value
        (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        assert rerun(root) == reached(root, section=key), key
    (root / "params.yaml").write_text(text)


def test_every_stage_names_the_code_behind_its_results() -> None:
    """dvc.yaml's code deps of each stage cover every package module its module imports, directly or
    through others (less the plumbing): a change to one reruns the stage, as it invalidates the
    checkpoints of a training stage."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        module = stage["cmd"].split()[2]  # python -m <module> ...
        named = [dep for dep in stage["deps"] if dep.startswith(f"{sourcecode.PACKAGE}/")]
        code = sourcecode.result_code(module)
        missing = [f for f in code if not any(f == dep or f.startswith(f"{dep}/") for dep in named)]
        assert not missing, f"{name}: dvc.yaml does not name {missing}"


def test_the_code_digest_follows_imported_modules_not_plumbing(tmp_path: Path, monkeypatch) -> None:
    shutil.copytree(REPO / sourcecode.PACKAGE, tmp_path / sourcecode.PACKAGE,
                    ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(sourcecode, "ROOT", tmp_path)
    module = "pipeline.stages.pretrain"
    before = sourcecode.code_digest(module)
    assert "pipeline/progress.py" not in sourcecode.result_code(module)
    assert "pipeline/models/gpt.py" in sourcecode.result_code(module)  # through `from pipeline.models import`
    with (tmp_path / "pipeline/progress.py").open("a") as plumbing:
        plumbing.write("# reporting only\n")
    assert sourcecode.code_digest(module) == before
    with (tmp_path / "pipeline/models/gpt.py").open("a") as model:
        model.write("# a change to the model\n")
    assert sourcecode.code_digest(module) != before
    (tmp_path / "pipeline/models/gpt.py").write_bytes((REPO / "pipeline/models/gpt.py").read_bytes())
    assert sourcecode.code_digest(module) == before
    assert "pipeline/models/gpt.py" not in sourcecode.result_code("pipeline.stages.clean")


@pytest.mark.parametrize(("stage", "config", "inputs"), [
    ("pretrain", Pretrain, ("data",)), ("finetune", Finetune, ("base", "labeled")),
    ("autoencode", Autoencode, ("vae", "data"))])
def test_a_training_stage_s_checkpoint_fingerprint_holds_its_code(stage: str, config: type, inputs: tuple,
                                                                  monkeypatch) -> None:
    """The checkpoint's fingerprint holds the code's digest as a part of its own, so a checkpoint of
    other code is not resumed and the refusal can name the code as what differs."""
    module = importlib.import_module(f"pipeline.stages.{stage}")
    before = module.fingerprint(config(), *inputs)
    assert module.fingerprint(config(), *inputs) == before
    monkeypatch.setattr(module, "code_digest", lambda name: "the digest of changed code")
    after = module.fingerprint(config(), *inputs)
    assert {part for part in before if after[part] != before[part]} == {"code"}
