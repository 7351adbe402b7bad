"""train() end to end on tiny synthetic data: run files, AUC, NaN stop, periodic
checkpoints, exact resume (after a clean stop and after a crash)."""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from torch import nn

from terarec.config import Config, ConfigError, config_from_dict, config_to_dict
from terarec.data import DataError
from terarec.trainer import components, divergence, loop
from terarec.trainer.checkpoint import history, read_manifest, read_tables
from terarec.trainer.loop import Components, TrainingDiverged, train
from terarec.trainer.report import read_jsonl, to_jsonable

EVAL_KEYS = {"auc", "ne", "logloss", "calibration", "ctr", "samples"}
ORACLE_KEYS = {"oracle_auc", "oracle_logloss"}
TRAIN_KEYS = {"loss", "auc", "samples_per_s", "rows", "samples"}
SUMMARY_KEYS = {
    "name",
    "steps",
    "samples",
    "train_seconds",
    "samples_per_s",
    "stopped_by",
    "final_eval",
    "auc",
    "oracle_auc",
    "rows",
    "data",
    "checkpoint",
}


# --------------------------------------------------------------------- one full run


@pytest.fixture(scope="module")
def finished(
    tmp_path_factory: pytest.TempPathFactory, tiny_factory: Callable[..., Config]
) -> tuple[Config, dict[str, Any], Path]:
    """One 120-step run with an eval every 60 steps: (config, returned summary, run dir)."""
    n = torch.get_num_threads()
    cfg = tiny_factory(
        tmp_path_factory.mktemp("e2e") / "runs",
        name="e2e",
        data={"batch_size": 128},
        train={"steps": 120, "eval_every": 60, "log_every": 20},
    )
    summary = train(cfg)
    torch.set_num_threads(n)
    return cfg, summary, Path(cfg.train.runs_dir) / "e2e"


def test_run_dir_layout(finished: tuple[Config, dict[str, Any], Path]) -> None:
    _, _, run = finished
    names = {p.name for p in run.iterdir()}
    assert names == {"metrics.jsonl", "summary.json", "curves.png", "config.yaml", "checkpoint",
                     "tensorboard"}
    assert {p.name for p in (run / "checkpoint").iterdir()} == {
        "manifest.json",
        "tables.pt",
        "rows.0.safetensors",  # the table's rows (one chunk)
        "dense.pt",
        "data.json",
        "rng.pt",
    }


def test_metrics_jsonl(finished: tuple[Config, dict[str, Any], Path]) -> None:
    cfg, _, run = finished
    lines = (run / "metrics.jsonl").read_text().splitlines()
    recs = [json.loads(line) for line in lines]  # strict JSON, one object per line
    assert all({"step", "split", "time"} <= r.keys() for r in recs)
    train_recs = [r for r in recs if r["split"] == "train"]
    eval_recs = [r for r in recs if r["split"] == "eval"]
    assert len(train_recs) + len(eval_recs) == len(recs)

    assert [r["step"] for r in train_recs] == list(range(20, 121, 20))
    for r in train_recs:
        assert set(r) == {"step", "split", "time", *TRAIN_KEYS}
        assert r["samples"] == r["step"] * cfg.data.batch_size
        assert 0 < r["loss"] < 1.5 and 0 <= r["auc"] <= 1 and r["samples_per_s"] > 0
    rows = [r["rows"] for r in train_recs]
    assert rows == sorted(rows) and 0 < rows[-1] <= 4 * 200  # 4 features x vocab 200
    assert train_recs[-1]["loss"] < train_recs[0]["loss"]

    # eval_every=60 evaluates at 60 and 120; the final eval reuses step 120's (no repeat)
    assert [r["step"] for r in eval_recs] == [60, 120]
    for r in eval_recs:
        assert set(r) == {"step", "split", "time", *EVAL_KEYS, *ORACLE_KEYS}
        assert r["samples"] == cfg.data.synthetic.eval_samples


def test_summary_json(finished: tuple[Config, dict[str, Any], Path]) -> None:
    cfg, returned, run = finished
    summary = json.loads((run / "summary.json").read_text())
    assert summary == to_jsonable(returned)
    assert set(summary) == SUMMARY_KEYS
    assert summary["name"] == "e2e" and summary["steps"] == 120
    assert summary["samples"] == 120 * cfg.data.batch_size
    assert summary["stopped_by"] == "steps"
    assert summary["train_seconds"] > 0 and summary["samples_per_s"] > 0
    last_eval = read_jsonl(run / "metrics.jsonl")[-1]
    assert summary["final_eval"] == {k: last_eval[k] for k in EVAL_KEYS | ORACLE_KEYS}
    assert summary["auc"] == summary["final_eval"]["auc"]
    assert summary["rows"] == {"sparse": last_train_rows(run)}
    assert summary["data"]["batches"] == 120 and summary["data"]["rows_skipped_total"] == 0
    assert Path(summary["checkpoint"]) == run / "checkpoint"
    manifest = read_manifest(run / "checkpoint")
    assert manifest["step"] == 120 and manifest["samples"] == summary["samples"]


def last_train_rows(run: Path) -> int:
    return [r for r in read_jsonl(run / "metrics.jsonl") if r["split"] == "train"][-1]["rows"]


def test_learns_towards_the_oracle(finished: tuple[Config, dict[str, Any], Path]) -> None:
    _, summary, _ = finished
    oracle, auc = summary["oracle_auc"], summary["auc"]
    assert 0.75 < oracle < 0.95  # the planted teacher is learnable, not trivial
    assert auc > 0.7, f"AUC {auc:.4f} after 120 steps (oracle {oracle:.4f})"
    assert auc < oracle + 0.01  # no scorer beats the Bayes-optimal teacher (up to noise)
    assert summary["final_eval"]["logloss"] > summary["final_eval"]["oracle_logloss"] - 0.01


def test_config_yaml_and_curves(finished: tuple[Config, dict[str, Any], Path]) -> None:
    cfg, _, run = finished
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved == config_to_dict(cfg)
    assert config_from_dict(saved) == cfg  # a run's config.yaml is a valid config again
    png = (run / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_max_minutes_stops_after_a_step(tiny_config: Callable[..., Config]) -> None:
    cfg = tiny_config(train={"steps": 10_000, "max_minutes": 1e-9, "save_checkpoint": False})
    summary = train(cfg)
    assert summary["stopped_by"] == "max_minutes" and summary["steps"] == 1
    assert "checkpoint" not in summary
    assert not (Path(cfg.train.runs_dir) / cfg.name / "checkpoint").exists()


# ------------------------------------------------------------------------- NaN / Inf


class PoisonAt(nn.Module):
    """Wraps a model; its ``at``-th forward returns ``value`` logits and snapshots the
    rows and weights as they are just before that step's (refused) update."""

    def __init__(self, inner: nn.Module, at: int, value: float) -> None:
        super().__init__()
        self.inner, self.at, self.value = inner, at, value
        self.calls = 0
        self.snapshot: dict[str, Any] = {}

    def forward(self, dense: torch.Tensor, sparse: Any) -> torch.Tensor:
        out = self.inner(dense, sparse)
        self.calls += 1
        if self.calls != self.at:
            return out
        self.snapshot = {
            "tables": self.inner.embedding.tables_state_dict(),
            "dense": {k: v.clone() for k, v in self.inner.state_dict().items()},
        }
        return out * 0 + self.value  # still connected to the graph


@pytest.mark.parametrize("value, shown", [(math.nan, "nan"), (3e38, "inf")])
def test_non_finite_loss_stops_with_a_clear_error(
    tiny_config: Callable[..., Config],
    monkeypatch: pytest.MonkeyPatch,
    value: float,
    shown: str,
) -> None:
    made: list[PoisonAt] = []
    real = components.build_model

    def poisoned(*args: Any, **kwargs: Any) -> nn.Module:
        made.append(PoisonAt(real(*args, **kwargs), at=3, value=value))
        return made[-1]

    monkeypatch.setattr(components, "build_model", poisoned)
    cfg = tiny_config(train={"log_every": 1})
    with pytest.raises(TrainingDiverged) as err:
        train(cfg)
    msg = str(err.value)
    assert f"loss is {shown} at step 3" in msg
    assert "updates were not applied" in msg
    assert "optimizer.sparse.lr (0.05)" in msg and "optimizer.dense.lr (0.01)" in msg
    assert "No checkpoint of this run was saved" in msg and "train.checkpoint_every" in msg

    # nothing of step 3 reached the rows or the dense weights
    model = made[0]
    now = model.inner.embedding.tables_state_dict()["sparse"]
    before = model.snapshot["tables"]["sparse"]
    assert torch.equal(now["keys"], before["keys"]) and torch.equal(now["rows"], before["rows"])
    assert now["optimizer"] == before["optimizer"]
    for k, v in model.inner.state_dict().items():
        assert torch.equal(v, model.snapshot["dense"][k]), k

    run = Path(cfg.train.runs_dir) / cfg.name
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl")] == [1, 2]
    assert not (run / "summary.json").exists() and not (run / "checkpoint").exists()


@pytest.mark.parametrize("at, steps", [(5, 20), (6, 6)])
def test_deferred_loss_check_stops_a_step_late_and_saves_nothing_after(
    tiny_config: Callable[..., Config], monkeypatch: pytest.MonkeyPatch, at: int, steps: int
) -> None:
    """``train.loss_check: deferred`` (the default on CUDA) reads step t's check after
    step t+1 trained, and before every log line, eval and checkpoint: a NaN at step 5
    stops the run at step 6 naming step 5; one at the last step stops before the final
    checkpoint. The checkpoint of step 3 stays the last one, and it is named."""
    real = components.build_model
    monkeypatch.setattr(components, "build_model",
                        lambda *a, **k: PoisonAt(real(*a, **k), at=at, value=math.nan))
    cfg = tiny_config(train={"steps": steps, "log_every": 100, "checkpoint_every": 3,
                             "loss_check": "deferred"})
    with pytest.raises(TrainingDiverged) as err:
        train(cfg)
    msg = str(err.value)
    assert f"loss is nan at step {at}" in msg and "train.loss_check: deferred" in msg
    run = Path(cfg.train.runs_dir) / cfg.name
    assert "(step 3)" in msg and str(run / "checkpoint") in msg
    assert read_manifest(run / "checkpoint")["step"] == 3
    assert not (run / "summary.json").exists()


def test_huge_learning_rate_diverges(tiny_config: Callable[..., Config]) -> None:
    cfg = tiny_config(optimizer={"dense": {"kind": "sgd", "lr": 1e30}})
    with pytest.raises(TrainingDiverged, match=r"loss is (nan|inf) at step \d+; training stopped"):
        train(cfg)


# ---------------------------------------------------------------------------- resume


def assert_same(a: Any, b: Any, where: str = "") -> None:
    """Recursive bitwise equality of nested dicts / lists / tensors / numbers."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype, where
        assert torch.equal(a, b), f"{where}: max diff {(a - b).abs().max().item()}"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def tables_by_key(ckpt: Path) -> dict[str, Any]:
    """The checkpoint's rows per table, sorted by key (slot order is an implementation detail)."""
    out = {}
    for name, t in read_tables(ckpt).items():  # rows of SSD tier snapshots too
        order = torch.argsort(t["keys"])
        out[name] = {"keys": t["keys"][order], "rows": t["rows"][order], "opt": t["optimizer"]}
    return out


def comparable(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """metrics.jsonl records without the wall-clock fields (the pipeline's are seconds)
    and without the saves' (a run with periodic checkpoints logs them, one without not)."""
    wall = ("time", "samples_per_s", "pipeline")
    return [{k: v for k, v in r.items() if k not in wall} for r in records
            if r["split"] != "checkpoint"]


@pytest.mark.numerics
@pytest.mark.parametrize(
    "sparse, dense", [("adam", "adam"), ("rowwise_adagrad", "sgd")], ids=["adam", "adagrad-sgd"]
)
def test_resume_is_exact(tiny_config: Callable[..., Config], sparse: str, dense: str) -> None:
    over: dict[str, Any] = {
        "optimizer": {"sparse": {"kind": sparse}, "dense": {"kind": dense}},
        "train": {"eval_every": 20},
    }
    straight = train(tiny_config(name="straight", **over))  # 40 steps in one go

    half = tiny_config(name="resumed", **over)
    half.train.steps = 20
    train(half)
    runs = Path(half.train.runs_dir)
    ckpt = runs / "resumed" / "checkpoint"
    assert read_manifest(ckpt)["step"] == 20
    resumed = train(tiny_config(name="resumed", **over), resume=ckpt)
    assert_same_run(runs / "straight", straight, runs / "resumed", resumed)


def assert_same_run(
    run_a: Path, summary_a: dict[str, Any], run_b: Path, summary_b: dict[str, Any]
) -> None:
    """Two finished 40-step runs ended bit for bit alike (all but the wall clock)."""
    for key in ("steps", "samples", "final_eval", "auc", "oracle_auc", "rows", "stopped_by"):
        assert_same(summary_a[key], summary_b[key], key)
    a, b = run_a / "checkpoint", run_b / "checkpoint"
    assert_same(tables_by_key(a), tables_by_key(b), "tables")
    dense_a = torch.load(a / "dense.pt", weights_only=True)
    dense_b = torch.load(b / "dense.pt", weights_only=True)
    assert_same(dense_a, dense_b, "dense")
    assert json.loads((a / "data.json").read_text()) == json.loads((b / "data.json").read_text())
    assert read_manifest(a)["samples"] == read_manifest(b)["samples"] == 40 * 64
    # one metrics.jsonl across both sessions, line for line the straight run's
    assert comparable(read_jsonl(run_a / "metrics.jsonl")) == comparable(
        read_jsonl(run_b / "metrics.jsonl")
    )


def test_resume_at_the_target_takes_no_step(tiny_config: Callable[..., Config]) -> None:
    cfg = tiny_config(train={"steps": 20})
    train(cfg)
    ckpt = Path(cfg.train.runs_dir) / cfg.name / "checkpoint"
    before_tables = tables_by_key(ckpt)
    before_data = (ckpt / "data.json").read_text()

    summary = train(cfg, resume=ckpt)
    assert summary["steps"] == 20 and summary["stopped_by"] == "steps"
    assert summary["samples"] == 20 * 64
    assert_same(tables_by_key(ckpt), before_tables, "tables")
    assert (ckpt / "data.json").read_text() == before_data


def test_synthetic_data_needs_a_step_count(tiny_config: Callable[..., Config]) -> None:
    cfg = tiny_config(train={"steps": None, "epochs": 1})
    with pytest.raises(ConfigError, match="train.steps: required for synthetic data"):
        train(cfg)  # would otherwise never stop
    assert not Path(cfg.train.runs_dir).exists()


def test_throughput_excludes_periodic_evals(
    tiny_config: Callable[..., Config], monkeypatch: pytest.MonkeyPatch
) -> None:
    real = loop.run_eval

    def slow_eval(*args: Any) -> dict[str, float]:
        time.sleep(0.5)
        return real(*args)

    monkeypatch.setattr(loop, "run_eval", slow_eval)
    cfg = tiny_config(train={"steps": 20, "eval_every": 10, "save_checkpoint": False})
    summary = train(cfg)  # two evals, 1 s of sleep, 20 tiny steps
    assert summary["train_seconds"] < 0.5, summary["train_seconds"]
    lines = read_jsonl(Path(cfg.train.runs_dir) / cfg.name / "metrics.jsonl")
    step20 = next(r for r in lines if r["split"] == "train" and r["step"] == 20)
    assert step20["samples_per_s"] > 10 * 64 / 0.5  # the eval at step 10 is not counted


def test_new_run_under_an_old_name_replaces_its_log(tiny_config: Callable[..., Config]) -> None:
    cfg = tiny_config(train={"steps": 20, "save_checkpoint": False})
    train(cfg)
    train(cfg)
    lines = read_jsonl(Path(cfg.train.runs_dir) / cfg.name / "metrics.jsonl")
    assert [(r["step"], r["split"]) for r in lines] == [(10, "train"), (20, "train"), (20, "eval")]


def test_resume_takes_the_learning_rates_of_the_config(
    tiny_config: Callable[..., Config],
) -> None:
    first = tiny_config(train={"steps": 20})
    train(first)
    ckpt = Path(first.train.runs_dir) / first.name / "checkpoint"
    lower = tiny_config(
        optimizer={"sparse": {"lr": 0.001}, "dense": {"lr": 0.0001, "weight_decay": 0.1}}
    )
    train(lower, resume=ckpt)
    groups = torch.load(ckpt / "dense.pt", weights_only=True)["optimizer"]["param_groups"]
    assert all(g["lr"] == 0.0001 and g["weight_decay"] == 0.1 for g in groups)


# ------------------------------------------------------------- periodic checkpoints


class Killed(Exception):
    """Stands in for the process dying (power cut, OOM kill) in the middle of a run."""


def kill_in_step(monkeypatch: pytest.MonkeyPatch, step: int) -> None:
    """The next run raises :class:`Killed` in step ``step`` (at its loss check):
    ``step - 1`` steps done, nothing of step ``step`` applied."""
    real = divergence.check_finite

    def dies(loss: torch.Tensor, at: int, *args: Any) -> None:
        if at == step:
            raise Killed
        real(loss, at, *args)

    monkeypatch.setattr(divergence, "check_finite", dies)


def nan_row_after(monkeypatch: pytest.MonkeyPatch, step: int) -> None:
    """In the next run, after step ``step`` a row of a key the data never produces goes
    NaN (the first table's): the loss stays finite, only a save can find it."""
    built: list[Components] = []
    real_build, real_stop = loop.build_components, loop._stop_reason

    def build(cfg: Config, ssd_store: Any = None, **kw: Any) -> Components:
        built.append(real_build(cfg, ssd_store=ssd_store, **kw))
        return built[-1]

    def stop_reason(cfg: Config, at: int, start: float) -> Any:
        if at == step:
            table = built[0].embedding.tables[0]
            table.insert_rows(torch.tensor([2**62 + 7]), torch.full((1, table.row_width), math.nan))
        return real_stop(cfg, at, start)

    monkeypatch.setattr(loop, "build_components", build)
    monkeypatch.setattr(loop, "_stop_reason", stop_reason)


def saved_steps(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Records the step of every checkpoint the loop saves from now on."""
    steps: list[int] = []
    real = history.prepare

    def prepare(run_dir: Path, parts: Components, source: Any, step: int, *args: Any,
                **kw: Any) -> Any:
        steps.append(step)
        return real(run_dir, parts, source, step, *args, **kw)

    monkeypatch.setattr(history, "prepare", prepare)
    return steps


def test_checkpoint_every_minutes_saves_by_the_clock(
    tiny_config: Callable[..., Config], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A save once the minutes passed since the last one (0.1 s here, steps slowed to
    0.06 s), besides the steps' ones and the final one; none while they have not."""
    got = saved_steps(monkeypatch)
    real = loop._stop_reason

    def slow(cfg: Config, step: int, start: float) -> Any:
        time.sleep(0.06)
        return real(cfg, step, start)

    monkeypatch.setattr(loop, "_stop_reason", slow)
    cfg = tiny_config(train={"steps": 12, "checkpoint_every": 5,
                             "checkpoint_every_minutes": 0.1 / 60})
    train(cfg)
    assert 5 in got and 10 in got and got[-1] == 12  # by steps, and the final one
    assert [s for s in got[:-1] if s % 5], got  # saves between the steps' ones
    got.clear()
    train(tiny_config(name="slow-clock", train={"steps": 12, "checkpoint_every": 5,
                                                "checkpoint_every_minutes": 10}))
    assert got == [5, 10, 12]  # ten minutes never passed: the steps' saves only
    with pytest.raises(ConfigError, match="checkpoint_every_minutes: must be > 0"):
        tiny_config(train={"checkpoint_every_minutes": 0})


@pytest.mark.parametrize("steps, saved", [(40, [10, 20, 30, 40]), (25, [10, 20, 25])])
def test_checkpoint_every_saves_periodically(
    tiny_config: Callable[..., Config],
    monkeypatch: pytest.MonkeyPatch,
    steps: int,
    saved: list[int],
) -> None:
    got = saved_steps(monkeypatch)
    cfg = tiny_config(train={"steps": steps, "checkpoint_every": 10})
    summary = train(cfg)
    assert got == saved  # the last step's checkpoint is the final one, written once
    ckpt = Path(summary["checkpoint"])
    assert read_manifest(ckpt)["step"] == steps
    assert sorted(p.name for p in ckpt.parent.iterdir()) == [
        "checkpoint",
        "config.yaml",
        "curves.png",
        "metrics.jsonl",
        "summary.json",
        "tensorboard",
    ]


def test_killed_run_resumes_exactly_from_its_periodic_checkpoint(
    tiny_config: Callable[..., Config], monkeypatch: pytest.MonkeyPatch
) -> None:
    # log_every 5 puts a metrics line (step 25) past the last checkpoint (step 20).
    over: dict[str, Any] = {"train": {"eval_every": 20, "log_every": 5}}
    straight = train(tiny_config(name="straight", **over))  # no periodic checkpoints at all

    periodic = merge_train(over, checkpoint_every=10)
    kill_in_step(monkeypatch, 26)  # 25 steps done, nothing of step 26 applied
    with pytest.raises(Killed):
        train(tiny_config(name="killed", **periodic))
    monkeypatch.undo()

    runs = Path(tiny_config().train.runs_dir)
    ckpt = runs / "killed" / "checkpoint"
    manifest = read_manifest(ckpt)
    assert manifest["step"] == 20 and manifest["samples"] == 20 * 64
    assert not (runs / "killed" / "summary.json").exists()
    assert {p.name for p in (runs / "killed").iterdir()} == {
        "checkpoint",
        "config.yaml",
        "metrics.jsonl",
        "tensorboard",
    }  # no checkpoint.tmp / checkpoint.old
    logged = [r["step"] for r in read_jsonl(runs / "killed" / "metrics.jsonl")]
    assert logged[-1] == 25

    resumed = train(tiny_config(name="killed", **periodic), resume=ckpt)
    assert read_manifest(ckpt)["step"] == 40
    assert_same_run(runs / "straight", straight, runs / "killed", resumed)


def merge_train(over: dict[str, Any], **train_keys: Any) -> dict[str, Any]:
    return {**over, "train": {**over.get("train", {}), **train_keys}}


def test_divergence_names_the_last_periodic_checkpoint(
    tiny_config: Callable[..., Config], monkeypatch: pytest.MonkeyPatch
) -> None:
    real = divergence.check_finite

    def nan_at_23(loss: torch.Tensor, step: int, *args: Any) -> None:
        real(torch.tensor(math.nan) if step == 23 else loss, step, *args)

    monkeypatch.setattr(divergence, "check_finite", nan_at_23)
    cfg = tiny_config(train={"checkpoint_every": 10})
    with pytest.raises(TrainingDiverged) as err:
        train(cfg)
    monkeypatch.undo()
    ckpt = Path(cfg.train.runs_dir) / cfg.name / "checkpoint"
    msg = str(err.value)
    assert "loss is nan at step 23" in msg and "optimizer.sparse.lr (0.05)" in msg
    assert f"The last good checkpoint is {ckpt} (step 20)" in msg
    assert f"--name tiny --resume {ckpt}" in msg
    assert "--set optimizer.sparse.lr=0.025 --set optimizer.dense.lr=0.005" in msg
    assert read_manifest(ckpt)["step"] == 20

    # ... and the advice works: resumed with lower rates, the run finishes
    lower = tiny_config(
        optimizer={"sparse": {"lr": 0.025}, "dense": {"lr": 0.005}}, train={"checkpoint_every": 10}
    )
    summary = train(lower, resume=ckpt)
    assert summary["steps"] == 40 and read_manifest(ckpt)["step"] == 40


def test_non_finite_rows_are_not_checkpointed(
    tiny_config: Callable[..., Config], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A NaN row no batch reads again keeps the loss finite; the save must catch it."""
    nan_row_after(monkeypatch, 15)
    cfg = tiny_config(train={"checkpoint_every": 10})
    ckpt = Path(cfg.train.runs_dir) / cfg.name / "checkpoint"
    with pytest.raises(TrainingDiverged) as err:
        train(cfg)
    msg = str(err.value)
    assert "table 'sparse' has NaN/Inf rows" in msg and "after step 20" in msg
    assert f"The last good checkpoint is {ckpt} (step 10)" in msg
    assert read_manifest(ckpt)["step"] == 10  # the good one was not replaced
    assert sorted(p.name for p in ckpt.parent.iterdir()) == [
        "checkpoint",
        "config.yaml",
        "metrics.jsonl",
        "tensorboard",
    ]


@pytest.mark.parametrize(
    "train_over, says",
    [
        ({"checkpoint_every": -1}, "train.checkpoint_every: must be >= 0, got -1"),
        ({"checkpoint_every": 1.5}, "train.checkpoint_every: expected an integer, got 1.5"),
        (
            {"checkpoint_every": 10, "save_checkpoint": False},
            "train.checkpoint_every: needs save_checkpoint: true",
        ),
    ],
)
def test_checkpoint_every_is_validated(
    tiny_config: Callable[..., Config], train_over: dict[str, Any], says: str
) -> None:
    with pytest.raises(ConfigError, match=re.escape(f"<tiny>: {says}")):
        tiny_config(train=train_over)
    assert tiny_config().train.checkpoint_every == 0  # default: only at the end


@pytest.mark.parametrize("content, epochs, said", [
    ("garbage\n1\t2\n" * 3, 1.0, "no training data: .*all 6 rows read were malformed"),
    ("", 1.0, "no training data: .*the input holds no rows"),
    ("garbage\n", None, "a whole pass over 1 file.s. gave no rows"),
])
def test_a_run_without_a_single_batch_fails_and_replaces_nothing(
    tiny_config: Callable[..., Config], tmp_path: Path, content: str,
    epochs: float | None, said: str
) -> None:
    """Input that is all malformed (or empty) used to train 0 steps, exit 0 and replace
    the earlier run of that name (or, cycling forever, fail after replacing its
    metrics): now a DataError, and the earlier run stays whole."""
    cfg = tiny_config(train={"steps": 10, "log_every": 5})
    train(cfg)
    run = Path(cfg.train.runs_dir) / cfg.name
    before = (run / "metrics.jsonl").read_text()
    bad = tmp_path / "bad.tsv"
    bad.write_text(content)
    again = tiny_config(data={"kind": "criteo", "path": [str(bad)],
                              "dense_transform": "log1p"},
                        train={"steps": None, "epochs": epochs} if epochs else {})
    with pytest.raises(DataError, match=said):
        train(again)
    assert read_manifest(run / "checkpoint")["step"] == 10
    assert (run / "metrics.jsonl").read_text() == before
