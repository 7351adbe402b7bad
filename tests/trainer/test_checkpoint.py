"""Checkpoints: round trip, atomic and durable replace, no NaN saved, and clear errors for
every kind of damage."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from terarec.config import Config
from terarec.data import build_source
from terarec.data.source import BatchSource
from terarec.trainer.checkpoint import (
    REQUIRED_FILES,
    CheckpointError,
    NonFiniteState,
    load_checkpoint,
    read_manifest,
    save_checkpoint,
)
from terarec.trainer.checkpoint import files as ckpt_mod
from terarec.trainer.loop import Components, build_components


def train_steps(parts: Components, source: BatchSource, n: int) -> None:
    """``n`` plain training steps (what the loop does, minus logging)."""
    loss_fn = nn.BCEWithLogitsLoss()
    parts.model.train()
    for _, batch in zip(range(n), source):
        loss = loss_fn(parts.model(batch.dense, batch.sparse), batch.labels)
        parts.dense_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        parts.dense_optimizer.step()


def snapshot(parts: Components) -> dict[str, Any]:
    return {
        "tables": parts.embedding.tables_state_dict(),
        "model": {k: v.clone() for k, v in parts.model.state_dict().items()},
        "optimizer": parts.dense_optimizer.state_dict(),
    }


def assert_same_tables(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        ka, kb = a[name]["keys"], b[name]["keys"]
        oa, ob = torch.argsort(ka), torch.argsort(kb)
        assert torch.equal(ka[oa], kb[ob]), name
        assert torch.equal(a[name]["rows"][oa], b[name]["rows"][ob]), name
        assert a[name]["optimizer"] == b[name]["optimizer"], name


@pytest.fixture
def trained(
    tiny_config: Callable[..., Config], tmp_path: Path
) -> Iterator[tuple[Config, Components, BatchSource, Path]]:
    """A config, components after 5 steps, their source, and a checkpoint of them."""
    cfg = tiny_config()
    parts = build_components(cfg)
    source = build_source(cfg.data, "train", seed=cfg.seed)
    train_steps(parts, source, 5)
    path = save_checkpoint(tmp_path / "ckpt", parts, source, 5, cfg, samples=5 * 64)
    yield cfg, parts, source, path
    source.close()


@pytest.fixture(scope="module")
def pristine(
    tmp_path_factory: pytest.TempPathFactory, tiny_factory: Callable[..., Config]
) -> tuple[Config, Path]:
    """A config and a checkpoint of it after 5 steps, shared: tests damage copies."""
    root = tmp_path_factory.mktemp("pristine")
    cfg = tiny_factory(root / "runs")
    parts = build_components(cfg)
    source = build_source(cfg.data, "train", seed=cfg.seed)
    train_steps(parts, source, 5)
    source.close()
    return cfg, save_checkpoint(root / "ckpt", parts, source, 5, cfg, samples=5 * 64)


@pytest.fixture
def ckpt_copy(pristine: tuple[Config, Path], tmp_path: Path) -> tuple[Config, Path]:
    cfg, path = pristine
    return cfg, Path(shutil.copytree(path, tmp_path / "ckpt"))


# ------------------------------------------------------------------------ round trip


def test_round_trip(trained: tuple[Config, Components, BatchSource, Path]) -> None:
    cfg, parts, source, path = trained
    manifest = read_manifest(path)
    assert manifest["step"] == 5 and manifest["samples"] == 320 and manifest["format"] == 4
    assert set(manifest["files"]) == {*REQUIRED_FILES, "rows.0.safetensors"}
    assert manifest["config"]["name"] == cfg.name

    rng_at_save = torch.get_rng_state()
    torch.manual_seed(1234)  # load must bring the generator back
    fresh = build_components(cfg)
    fresh_source = build_source(cfg.data, "train", seed=cfg.seed)
    assert load_checkpoint(path, fresh, fresh_source) == 5
    assert torch.equal(torch.get_rng_state(), rng_at_save)

    want, got = snapshot(parts), snapshot(fresh)
    assert_same_tables(want["tables"], got["tables"])
    for k, v in want["model"].items():
        assert torch.equal(v, got["model"][k]), k
    assert fresh_source.state_dict() == source.state_dict()

    # ... and both continue identically: same next batch, same rows after 3 more steps
    train_steps(parts, source, 3)
    train_steps(fresh, fresh_source, 3)
    fresh_source.close()
    assert_same_tables(parts.embedding.tables_state_dict(), fresh.embedding.tables_state_dict())
    for k, v in parts.model.state_dict().items():
        assert torch.equal(v, fresh.model.state_dict()[k]), k


def test_save_replaces_an_older_checkpoint(
    trained: tuple[Config, Components, BatchSource, Path],
) -> None:
    cfg, parts, source, path = trained
    train_steps(parts, source, 2)
    save_checkpoint(path, parts, source, 7, cfg)
    assert read_manifest(path)["step"] == 7
    siblings = sorted(p.name for p in path.parent.iterdir())
    assert siblings == ["ckpt"]  # no .tmp / .old left behind


# --------------------------------------------------------------------------- atomic


def fail_on(monkeypatch: pytest.MonkeyPatch, file_name: str, exc: BaseException) -> None:
    """Makes the checkpoint module's ``torch.save`` raise ``exc`` when writing ``file_name``."""
    real = torch.save

    def save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        path = Path(getattr(f, "name", f))  # a path or the file object it writes
        if path.name == file_name:
            f.write(b"half a file") if hasattr(f, "write") else path.write_bytes(b"half")
            raise exc  # after the partial write a crash leaves
        real(obj, f, *args, **kwargs)

    monkeypatch.setattr(ckpt_mod.torch, "save", save)


@pytest.mark.parametrize(
    "exc, raised",
    [
        (OSError(28, "No space left on device"), CheckpointError),
        (RuntimeError("cannot pickle"), RuntimeError),
        (KeyboardInterrupt(), KeyboardInterrupt),
    ],
    ids=["disk-full", "error", "ctrl-c"],
)
def test_failed_save_leaves_no_partial_dir(
    trained: tuple[Config, Components, BatchSource, Path],
    monkeypatch: pytest.MonkeyPatch,
    exc: BaseException,
    raised: type[BaseException],
) -> None:
    cfg, parts, source, path = trained
    target = path.with_name("new")
    fail_on(monkeypatch, "dense.pt", exc)
    with pytest.raises(raised) as err:
        save_checkpoint(target, parts, source, 9, cfg)
    if raised is CheckpointError:
        assert "No space left on device" in str(err.value) and str(target) in str(err.value)
    assert not target.exists() and not target.with_name("new.tmp").exists()


def test_failed_save_keeps_the_previous_checkpoint(
    trained: tuple[Config, Components, BatchSource, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg, parts, source, path = trained
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    train_steps(parts, source, 2)
    fail_on(monkeypatch, "tables.pt", OSError(28, "No space left on device"))
    with pytest.raises(CheckpointError, match="cannot write checkpoint"):
        save_checkpoint(path, parts, source, 7, cfg)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert read_manifest(path)["step"] == 5
    assert sorted(p.name for p in path.parent.iterdir()) == ["ckpt"]


def test_stale_tmp_dir_is_replaced(trained: tuple[Config, Components, BatchSource, Path]) -> None:
    cfg, parts, source, path = trained
    stale = path.with_name("ckpt.tmp")
    stale.mkdir()
    (stale / "tables.pt").write_bytes(b"junk from a crashed save")
    save_checkpoint(path, parts, source, 6, cfg)
    assert not stale.exists() and read_manifest(path)["step"] == 6


def test_interrupted_swap_points_at_the_old_checkpoint(ckpt_copy: tuple[Config, Path]) -> None:
    _, path = ckpt_copy
    old = path.with_name("ckpt.old")
    path.rename(old)  # a crash between the two renames of a save
    with pytest.raises(CheckpointError, match=r"no manifest\.json.*previous checkpoint is in"):
        read_manifest(path)


# ------------------------------------------------------------------------- corrupted


def flip_byte(f: Path) -> None:
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))


def truncate(f: Path) -> None:
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


ROWS0 = "rows.0.safetensors"  # the table's rows (one chunk)
DAMAGE: dict[str, tuple[Callable[[Path], None], str, str]] = {
    # id: (damage to the checkpoint dir, file named, what the message says)
    "tables-bitflip": (lambda d: flip_byte(d / "tables.pt"), "tables.pt", "sha256 does not match"),
    "rows-bitflip": (lambda d: flip_byte(d / ROWS0), ROWS0, "sha256 does not match"),
    "rows-missing": (lambda d: (d / ROWS0).unlink(), ROWS0, "missing from the checkpoint"),
    "dense-bitflip": (lambda d: flip_byte(d / "dense.pt"), "dense.pt", "sha256 does not match"),
    "data-edited": (
        lambda d: (d / "data.json").write_text((d / "data.json").read_text().replace("5", "6")),
        "data.json",
        "sha256 does not match",
    ),
    "tables-truncated": (lambda d: truncate(d / "tables.pt"), "tables.pt", "truncated"),
    "dense-truncated": (lambda d: truncate(d / "dense.pt"), "dense.pt", "truncated"),
    "dense-empty": (lambda d: (d / "dense.pt").write_bytes(b""), "dense.pt", "truncated"),
    "rng-missing": (lambda d: (d / "rng.pt").unlink(), "rng.pt", "missing from the checkpoint"),
    "tables-missing": (
        lambda d: (d / "tables.pt").unlink(),
        "tables.pt",
        "missing from the checkpoint",
    ),
    "manifest-missing": (
        lambda d: (d / "manifest.json").unlink(),
        "ckpt",
        "not a checkpoint (no manifest.json)",
    ),
    "manifest-binary": (
        lambda d: (d / "manifest.json").write_bytes(bytes(range(256))),
        "manifest.json",
        "corrupted manifest",
    ),
    "manifest-not-json": (
        lambda d: (d / "manifest.json").write_text('{"format": 1, "files": {'),
        "manifest.json",
        "corrupted manifest",
    ),
    "manifest-a-list": (
        lambda d: (d / "manifest.json").write_text("[1, 2, 3]"),
        "manifest.json",
        "corrupted manifest",
    ),
    "manifest-truncated": (lambda d: truncate(d / "manifest.json"), "manifest.json", "corrupted"),
    "manifest-bad-entry": (
        lambda d: edit_manifest(d, lambda m: m["files"].update({"dense.pt": {"bytes": "x"}})),
        "manifest.json",
        "corrupted manifest",
    ),
    "manifest-no-step": (
        lambda d: edit_manifest(d, lambda m: m.pop("step")),
        "manifest.json",
        "corrupted manifest",
    ),
    "manifest-unlists-tables": (
        lambda d: edit_manifest(d, lambda m: m["files"].pop("tables.pt")),
        "manifest.json",
        "does not list ['tables.pt']",
    ),
    "manifest-other-format": (
        lambda d: edit_manifest(d, lambda m: m.update(format=99)),
        "manifest.json",
        "format 99, this terarec reads (1, 2, 3, 4)",
    ),
}


def edit_manifest(d: Path, fn: Callable[[dict[str, Any]], Any]) -> None:
    m = json.loads((d / "manifest.json").read_text())
    fn(m)
    (d / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize("damage", list(DAMAGE), ids=list(DAMAGE))
def test_damaged_checkpoint_names_the_file(ckpt_copy: tuple[Config, Path], damage: str) -> None:
    cfg, path = ckpt_copy
    hurt, file_name, says = DAMAGE[damage]
    hurt(path)
    with pytest.raises(CheckpointError) as err:
        read_manifest(path)
    msg = str(err.value)
    assert says in msg and file_name in msg, msg

    # load_checkpoint refuses before touching anything
    fresh = build_components(cfg)
    before = snapshot(fresh)
    with pytest.raises(CheckpointError, match=file_name.replace(".", r"\.")) as err:
        load_checkpoint(path, fresh)
    # said as it is, not as a checkpoint of another model
    assert says in str(err.value) and "does not fit" not in str(err.value), str(err.value)
    assert_same_tables(before["tables"], fresh.embedding.tables_state_dict())
    for k, v in before["model"].items():
        assert torch.equal(v, fresh.model.state_dict()[k]), k


def test_size_check_without_hashing_still_catches_truncation(
    ckpt_copy: tuple[Config, Path],
) -> None:
    _, path = ckpt_copy
    flip_byte(path / "tables.pt")
    read_manifest(path, verify=False)  # same size: only the hash can tell
    truncate(path / "tables.pt")
    with pytest.raises(CheckpointError, match=r"tables\.pt: size \d+ != \d+ in the manifest"):
        read_manifest(path, verify=False)


def test_a_checkpoint_with_rows_in_tables_pt_still_loads(
    ckpt_copy: tuple[Config, Path]
) -> None:
    """Format 1 (every row in ``tables.pt``, as terarec wrote before the rows were
    streamed into chunk files) loads to the same state."""
    from terarec.trainer.checkpoint import files, rows

    cfg, path = ckpt_copy
    manifest = read_manifest(path)
    want = build_components(cfg)
    load_checkpoint(path, want)
    torch.save(rows.load_states(path, "", manifest), path / "tables.pt")
    (path / ROWS0).unlink()
    names = [n for n in manifest["files"] if n != ROWS0]
    manifest.update(format=1, files=files.describe(path, names))
    (path / "manifest.json").write_text(json.dumps(manifest))
    got = build_components(cfg)
    assert load_checkpoint(path, got) == manifest["step"]
    assert_same_tables(want.embedding.tables_state_dict(), got.embedding.tables_state_dict())


def test_checkpoint_of_another_model_is_refused(
    pristine: tuple[Config, Path], tiny_config: Callable[..., Config]
) -> None:
    _, path = pristine
    other = build_components(
        tiny_config(tables=[{"name": "sparse", "dim": 4}], model={"bottom_mlp": [16, 4]})
    )
    with pytest.raises(CheckpointError, match=r"does not fit this model/config.*dim 4"):
        load_checkpoint(path, other)
    sgd = build_components(tiny_config(optimizer={"dense": {"kind": "sgd"}}))
    with pytest.raises(CheckpointError, match="dense optimizer state is Adam's, this run uses SGD"):
        load_checkpoint(path, sgd)
    adagrad = build_components(tiny_config(optimizer={"sparse": {"kind": "adagrad"}}))
    with pytest.raises(CheckpointError, match=r"expected \[\*, 16\] \(dim 8 \+ optimizer state\)"):
        load_checkpoint(path, adagrad)
    renamed = build_components(tiny_config(tables=[{"name": "other", "dim": 8}]))
    with pytest.raises(CheckpointError, match=r"no rows for tables \['other'\]"):
        load_checkpoint(path, renamed)


def test_copy_of_a_checkpoint_loads(ckpt_copy: tuple[Config, Path]) -> None:
    cfg, path = ckpt_copy  # checkpoints are relocatable: the manifest holds no paths
    assert load_checkpoint(path, build_components(cfg)) == 5


# ---------------------------------------------------------------------------- fsync


def test_files_and_dirs_are_fsynced_around_the_rename(
    trained: tuple[Config, Components, BatchSource, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Files and ``.tmp`` before the rename, the parent after: a power loss cannot leave a
    renamed checkpoint whose files never reached the disk."""
    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc/self/fd to name an fd's file")
    cfg, parts, source, path = trained
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src: Any, dst: Any) -> None:
        events.append(("replace", f"{Path(src).resolve()} -> {Path(dst).resolve()}"))
        real_replace(src, dst)

    monkeypatch.setattr(ckpt_mod.os, "fsync", fsync)
    monkeypatch.setattr(ckpt_mod.os, "replace", replace)
    save_checkpoint(path, parts, source, 6, cfg)

    final, tmp = path.resolve(), path.resolve().with_name("ckpt.tmp")
    swap = events.index(("replace", f"{tmp} -> {final}"))
    synced_before = [p for kind, p in events[:swap] if kind == "fsync"]
    names = {*REQUIRED_FILES, "rows.0.safetensors", "manifest.json"}
    assert {Path(p).name for p in synced_before[:-1]} == names
    assert all(Path(p).parent == tmp for p in synced_before[:-1])
    assert synced_before[-1] == str(tmp)  # the directory, after every file in it
    assert events[swap + 1 :] == [("fsync", str(final.parent))]
    assert read_manifest(path)["step"] == 6


# ------------------------------------------------------------------------ non-finite


@pytest.mark.parametrize("where", ["row", "dense"])
def test_non_finite_state_is_not_saved(
    trained: tuple[Config, Components, BatchSource, Path], where: str
) -> None:
    cfg, parts, source, path = trained
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    if where == "row":
        table = parts.embedding.tables[0]
        table.insert_rows(torch.tensor([12345]), torch.full((1, table.row_width), math.inf))
        says = "table 'sparse' has NaN/Inf rows"
    else:
        name, weight = next(iter(parts.model.named_parameters()))
        with torch.no_grad():
            weight.view(-1)[0] = math.nan
        says = f"dense weight {name!r} has NaN/Inf values"
    with pytest.raises(NonFiniteState, match=re.escape(f"{says}; {path} was not written")):
        save_checkpoint(path, parts, source, 6, cfg)
    assert issubclass(NonFiniteState, CheckpointError)  # terarec exits 1 on it
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["ckpt"]
