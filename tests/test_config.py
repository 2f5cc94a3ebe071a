"""params.yaml validation: one clear line naming the key, with a suggestion for a typo."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.config import ConfigError, load_config, project_root

REPO = project_root(Path(__file__).parent)  # the checkout these tests belong to


def write_params(tmp_path: Path, edit: str, value: object) -> Path:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    node = params
    *parents, leaf = edit.split(".")
    for part in parents:
        node = node[int(part)] if part.isdigit() else node[part]
    node[leaf] = value
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def test_default_params_are_valid() -> None:
    cfg = load_config()
    assert [s.name for s in cfg.data.sources] == ["enwiki", "sentiment"]
    assert cfg.data.sources[1].labeled and not cfg.data.sources[0].labeled


def test_params_yaml_lists_every_setting() -> None:
    """`dvc exp run -S key=value` only sets keys params.yaml has, and params.yaml is the documentation."""

    def missing(defaults: dict, written: dict, prefix: str = "") -> list[str]:
        keys = []
        for key, value in defaults.items():
            if key not in written:
                keys.append(prefix + key)
            elif isinstance(value, dict) and isinstance(written[key], dict):
                keys += missing(value, written[key], f"{prefix}{key}.")
        return keys

    written = yaml.safe_load((REPO / "params.yaml").read_text())
    assert missing(load_config().model_dump(), written) == []


def test_typo_suggests_the_closest_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(write_params(tmp_path, "data.clean.filters.min_char", 5))
    message = str(caught.value)
    assert "unknown key 'data.clean.filters.min_char'" in message
    assert "did you mean 'min_chars'" in message and "\n" not in message


def test_wrong_type_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"'data\.clean\.dedup\.num_perm' \(got 'many'\)"):
        load_config(write_params(tmp_path, "data.clean.dedup.num_perm", "many"))


def test_out_of_range_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"'data\.clean\.dedup\.threshold' \(got 1\.5\)"):
        load_config(write_params(tmp_path, "data.clean.dedup.threshold", 1.5))


def test_split_ratios_must_sum_to_one(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="sum to 1"):
        load_config(write_params(tmp_path, "data.clean.split.train", 0.7))


def test_tabular_source_needs_a_text_field(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="needs text_field"):
        load_config(write_params(tmp_path, "data.sources.1.text_field", None))


def test_optional_input_is_a_path_not_a_switch(tmp_path: Path) -> None:
    """An old `include_labeled_train: false` gets one line saying what to write instead."""
    with pytest.raises(ConfigError) as caught:
        load_config(write_params(tmp_path, "tokenize.include_labeled_train", False))
    assert "'tokenize.include_labeled_train'" in str(caught.value) and "inputs/none" in str(caught.value)
    assert "\n" not in str(caught.value)


def test_optional_input_names_what_it_reads(tmp_path: Path) -> None:
    """Any other path would make DVC track a file the stage does not read."""
    with pytest.raises(ConfigError, match=r"pretrain\.init_embeddings: 'data/glove' is neither "
                                          r"data/glove_token nor paths\.no_input \(inputs/none\)"):
        load_config(write_params(tmp_path, "pretrain.init_embeddings", "data/glove"))
    cfg = load_config(overrides={"words.include_labeled_train": "inputs/none",
                                 "tokenize.include_labeled_train": "data/clean/labeled.parquet"})
    assert not cfg.paths.given(cfg.words.include_labeled_train)
    assert cfg.paths.given(cfg.tokenize.include_labeled_train)


def test_overrides_use_dotted_keys() -> None:
    cfg = load_config(overrides={"data.clean.split.salt": "other"})
    assert cfg.data.clean.split.salt == "other"


def test_stage_cli_exits_2_with_one_line(tmp_path: Path) -> None:
    bad = write_params(tmp_path, "data.clean.filters.min_wrods", 3)
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.stages.clean", "--params", str(bad)],
        cwd=REPO, capture_output=True, text=True, check=False,
    )
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "did you mean 'min_words'" in result.stderr
