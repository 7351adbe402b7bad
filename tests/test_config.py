from pathlib import Path

import pytest

from terarec.config import ConfigError, SparseOptimKind, config_to_dict, load_config

MIN = "name: x\ntables: [{name: t, dim: 8}]\n"


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_minimal_and_defaults(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, MIN))
    assert cfg.optimizer.sparse.kind == SparseOptimKind.ADAM
    assert config_to_dict(cfg)["optimizer"]["sparse"]["kind"] == "adam"


@pytest.mark.parametrize(
    "text, msg",
    [
        (MIN + "bogus: 1\n", "bogus: unknown key"),
        (MIN + "optimizer: {sparse: {lr: -1}}\n", "optimizer.sparse.lr: must be > 0"),
        (MIN + "optimizer: {sparse: {kind: adamw}}\n", "must be one of"),
        ("name: x\ntables: [{name: t, dim: eight}]\n", r"tables\[0\].dim: expected an integer"),
        ("name: x\n", "tables: required key is missing"),
        (MIN + "train: {steps: 0}\n", "train.steps: must be >= 1"),
        (MIN + "data: {kind: criteo}\n", "data.path: required"),
        (MIN + "data: {batch_size: true}\n", "data.batch_size: expected an integer"),
        (MIN + "train: [1]\n", "train: expected a mapping"),
        (
            "name: x\ntables: [{name: t, dim: 8, features: [a]},"
            " {name: u, dim: 8, features: [a]}]\n",
            "in two tables",
        ),
        ("name: [\n", "invalid YAML"),
    ],
)
def test_errors_name_file_and_key(tmp_path: Path, text: str, msg: str) -> None:
    p = write(tmp_path, text)
    with pytest.raises(ConfigError, match=msg) as e:
        load_config(p)
    assert str(p) in str(e.value)


def test_overrides(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, MIN), ["train.steps=7", "optimizer.sparse.kind=sgd"])
    assert cfg.train.steps == 7 and cfg.optimizer.sparse.kind == SparseOptimKind.SGD
    with pytest.raises(ConfigError, match="train.stepz: unknown key"):
        load_config(write(tmp_path, MIN), ["train.stepz=7"])


def test_missing_file() -> None:
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config("/nonexistent/c.yaml")
