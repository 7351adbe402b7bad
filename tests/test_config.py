from pathlib import Path

import pytest

from terarec.config import (
    ConfigError,
    SparseOptimKind,
    SSDCompression,
    SSDConfig,
    config_to_dict,
    load_config,
)

REPO = Path(__file__).resolve().parents[1]

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
        (
            "name: x\ntables: [{name: t, dim: 8}, {name: u, dim: 8, features: [a],"
            " device_rows: 64, host_rows: 128}]\n",
            r"tables\[1\].host_rows: table 'u' bounds its host tier.*set ssd.path",
        ),
        (MIN + "ssd: {bogus: 1}\n", "ssd.bogus: unknown key"),
        (MIN + "ssd: {path: ''}\n", "ssd.path: must be a directory"),
        (MIN + "ssd: {compression: brotli}\n", "ssd.compression: must be one of"),
        (MIN + "ssd: {num_threads: 0}\n", "ssd.num_threads: must be >= 1"),
        (MIN + "ssd: {max_write_buffers: 1}\n", "ssd.max_write_buffers: must be >= 2"),
        (MIN + "ssd: {block_cache_mb: -1}\n", "ssd.block_cache_mb: must be >= 0"),
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


def test_overrides_of_list_items(tmp_path: Path) -> None:
    two = "name: x\ntables: [{name: t, dim: 8, features: [a]}, {name: u, dim: 8}]\n"
    cfg = load_config(write(tmp_path, two), ["tables[1].device_rows=64", "tables[0].dim=4"])
    assert cfg.tables[1].device_rows == 64 and cfg.tables[0].dim == 4
    cfg = load_config(write(tmp_path, two), ["tables[0]={name: v, dim: 2, features: [b]}"])
    assert cfg.tables[0].name == "v"
    with pytest.raises(ConfigError, match=r"tables\[2\].dim: tables has no item 2 \(it has 2\)"):
        load_config(write(tmp_path, two), ["tables[2].dim=4"])
    with pytest.raises(ConfigError, match="--set train.steps.x: steps is not a mapping"):
        load_config(write(tmp_path, MIN), ["train.steps=3", "train.steps.x=1"])


def test_missing_file() -> None:
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config("/nonexistent/c.yaml")


def test_ssd_section(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, MIN))
    assert cfg.ssd.path is None  # no SSD tier by default
    tiered = (
        "name: x\ntables: [{name: t, dim: 8, device_rows: 64, host_rows: 128}]\n"
        "ssd: {path: /nvme/x, compression: LZ4, known_keys: 1.0e+6}\n"
    )
    cfg = load_config(write(tmp_path, tiered))
    assert cfg.ssd.path == "/nvme/x" and cfg.ssd.compression == SSDCompression.LZ4
    assert cfg.ssd.known_keys == 1_000_000
    assert config_to_dict(cfg)["ssd"]["compression"] == "lz4"
    assert SSDConfig(compression="zstd").compression == SSDCompression.ZSTD  # type: ignore[arg-type]


def test_ssd_tier_config_is_the_ssd_section() -> None:
    from terarec.ps.tiers.ssd import SSDTierConfig

    c = SSDTierConfig(path="/x", num_threads=4)
    assert isinstance(c, SSDConfig) and c.num_threads == 4
    with pytest.raises(ValueError, match="path: required"):
        SSDTierConfig()


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_shipped_configs_load(name: str) -> None:
    load_config(REPO / "configs" / name)


def test_yaml_exponent_numbers_without_a_dot(tmp_path) -> None:
    """``1e-3`` is a number (YAML 1.2; PyYAML's YAML 1.1 reads it as a string, which was
    refused as "expected a number"); in --set too. Hex-looking ids stay strings."""
    p = tmp_path / "c.yaml"
    p.write_text("name: e\ntables: [{name: t, dim: 4}]\noptimizer:\n  dense: {lr: 1e-3}\n"
                 "  sparse: {lr: 5E-2}\ntrain: {steps: 1e3}\n")
    cfg = load_config(p, ["optimizer.dense.weight_decay=1e-5"])
    assert cfg.optimizer.dense.lr == 0.001 and cfg.optimizer.sparse.lr == 0.05
    assert cfg.train.steps == 1000 and cfg.optimizer.dense.weight_decay == 1e-5
    cfg = load_config(p, ["name=0a1e5"])
    assert cfg.name == "0a1e5"


def test_data_paths_in_a_file_are_relative_to_it(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A config's relative data paths resolve against its directory (it works from any
    working directory); --set paths are the user's, from the current directory (both made
absolute, so a saved run config reads the same files anywhere); absolute ones and URLs
are kept."""
    d = tmp_path / "configs"
    d.mkdir()
    cfg = d / "c.yaml"
    cfg.write_text(
        "name: c\ndata: {kind: criteo, path: [../data/a.tsv, /abs/b.tsv, 'file:///c.tsv'], "
        "eval_path: ../data/e.tsv}\ntables: [{name: t, dim: 4}]\n")
    monkeypatch.chdir(tmp_path / "configs")
    c = load_config("c.yaml")
    assert c.data.path == [str(tmp_path / "data" / "a.tsv"), "/abs/b.tsv", "file:///c.tsv"]
    assert c.data.eval_path == [str(tmp_path / "data" / "e.tsv")]
    c = load_config(cfg, ["data.path=x.tsv"])  # the user's: from the current directory,
    assert c.data.path == [str(tmp_path / "configs" / "x.tsv")]  # recorded absolute
    c = load_config(cfg, ["data.eval_path=[../e.tsv, 's3://b/e.tsv']"])
    assert c.data.eval_path == [str(tmp_path / "e.tsv"), "s3://b/e.tsv"]
