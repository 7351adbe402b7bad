"""The training loop: data -> embeddings -> model -> loss -> fused sparse + dense updates.

``train(cfg)`` runs a whole job and returns its summary; ``evaluate`` runs one pass over
an eval source. Everything a person looks at lands in ``runs/<name>/``: ``metrics.jsonl``,
``summary.json``, ``curves.png``, ``config.yaml``, ``checkpoint/`` (saved at the end and,
with ``train.checkpoint_every``, every N steps) and, for tables with a host budget, the
SSD tier (``ssd/`` by default; see ``trainer/tiers.py``).
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn
from tqdm import tqdm

from terarec.config import Config, ConfigError, DataKind, config_to_dict
from terarec.data import build_source, dense_feature_names, sparse_feature_names
from terarec.data.batch import Batch
from terarec.models import build_model
from terarec.optim.dense import build_dense_optimizer
from terarec.ps.cache_tier import TierFullError
from terarec.ps.embedding import HierarchicalEmbeddingBagCollection
from terarec.ps.ssd_tier import SSDStore
from terarec.trainer.checkpoint import (
    NonFiniteState,
    load_checkpoint,
    read_manifest,
    save_checkpoint,
)
from terarec.trainer.metrics import CTRMetrics
from terarec.trainer.pipeline import PipelineMeter, PipelineStats, TrainPipeline
from terarec.trainer.report import RunReporter, atomic_write_text, read_jsonl
from terarec.trainer.tiers import (
    TierCounters,
    close_store,
    current_rank,
    describe_tiers,
    open_ssd_store,
    ssd_root,
    uses_ssd,
)

log = logging.getLogger("terarec.trainer")


class TrainingDiverged(RuntimeError):
    """The loss became NaN or Inf; the rows of that step were not updated."""


@dataclass
class Components:
    """What a run is made of (built by :func:`build_components`)."""

    embedding: HierarchicalEmbeddingBagCollection
    model: nn.Module
    dense_optimizer: torch.optim.Optimizer
    device: torch.device


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"train.device is {name!r} but CUDA is not available here")
    return torch.device(name)


def build_components(cfg: Config, ssd_store: Optional[SSDStore] = None) -> Components:
    """Embedding collection, model and dense optimizer for ``cfg``.

    Args:
        cfg: the run's config.
        ssd_store: the rank's SSD store (see :func:`open_ssd_store`); required when a
            table has ``host_rows``, unused otherwise. The caller closes it.

    Raises:
        ConfigError: the tables do not fit the data's features, or the model does not
            fit the tables (e.g. a DLRM bottom MLP not ending in the embedding dim);
            each section validates alone, so these are only found here.
    """
    device = resolve_device(cfg.train.device)
    torch.manual_seed(cfg.seed)
    features = sparse_feature_names(cfg.data)
    try:
        embedding = HierarchicalEmbeddingBagCollection(
            cfg.tables,
            features,
            cfg.optimizer.sparse,
            device=device,
            seed=cfg.seed,
            ssd_store=ssd_store,
        )
    except ValueError as e:
        raise ConfigError(f"tables: {e}") from None
    dims = [embedding.feature_dims[f] for f in embedding.out_features]
    try:
        model = build_model(
            cfg.model, embedding, embedding.out_features, dims, len(dense_feature_names(cfg.data))
        ).to(device)
    except ValueError as e:
        raise ConfigError(f"model: {e}") from None
    dense_opt = build_dense_optimizer(cfg.optimizer.dense, model.parameters())
    return Components(embedding, model, dense_opt, device)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[Batch],
    device: torch.device,
    max_batches: Optional[int] = None,
) -> dict[str, float]:
    """One pass of ``model`` over ``batches``: AUC, NE, logloss, calibration, CTR.

    When batches carry the synthetic teacher's probabilities, the same metrics of the
    teacher (the Bayes-optimal scorer) are added as ``oracle_auc`` / ``oracle_logloss``.
    """
    was_training = model.training
    model.eval()
    metrics, oracle = CTRMetrics(), CTRMetrics()
    has_oracle = False
    for i, batch in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        batch = batch.to(device, non_blocking=True)
        probs = torch.sigmoid(model(batch.dense, batch.sparse))
        metrics.update(probs, batch.labels)
        if batch.teacher_prob is not None:
            has_oracle = True
            oracle.update(batch.teacher_prob.to(device), batch.labels)
    model.train(was_training)
    out = metrics.compute()
    if has_oracle:
        o = oracle.compute()
        out["oracle_auc"] = o["auc"]
        out["oracle_logloss"] = o["logloss"]
    return out


def _stop_reason(cfg: Config, step: int, start: float) -> Optional[str]:
    if cfg.train.steps is not None and step >= cfg.train.steps:
        return "steps"
    if (
        cfg.train.max_minutes is not None
        and time.perf_counter() - start > 60 * cfg.train.max_minutes
    ):
        return "max_minutes"
    return None


def _diverged(what: str, cfg: Config, last_ckpt: Optional[tuple[Path, int]]) -> TrainingDiverged:
    """The error for a run that went NaN/Inf: what happened, what to lower, where to resume.

    Args:
        what: the first sentence (which value went non-finite at which step).
        cfg: the run's config (its learning rates and name).
        last_ckpt: ``(directory, step)`` of the last checkpoint known good, if any.
    """
    msg = (
        f"{what} Lower optimizer.sparse.lr ({cfg.optimizer.sparse.lr}) or optimizer.dense.lr "
        f"({cfg.optimizer.dense.lr}), or check the data for extreme dense values "
        "(criteo needs data.dense_transform: log1p)."
    )
    if last_ckpt is not None:
        path, at = last_ckpt
        msg += (
            f" The last good checkpoint is {path} (step {at}); continue from it with lower "
            f"rates, e.g. terarec train --config <config> --name {cfg.name} --resume {path} "
            f"--set optimizer.sparse.lr={cfg.optimizer.sparse.lr / 2:g} "
            f"--set optimizer.dense.lr={cfg.optimizer.dense.lr / 2:g}"
        )
    elif cfg.train.checkpoint_every:
        msg += (
            " No checkpoint of this run was saved before the failure "
            f"(train.checkpoint_every: {cfg.train.checkpoint_every}); start it again with "
            "lower rates."
        )
    else:
        msg += (
            " No checkpoint of this run was saved before the failure; set "
            "train.checkpoint_every to save one every N steps and resume from the last."
        )
    return TrainingDiverged(msg)


def _check_finite(
    loss: torch.Tensor, step: int, cfg: Config, last_ckpt: Optional[tuple[Path, int]] = None
) -> None:
    """Raises :class:`TrainingDiverged` if ``loss`` (of step ``step``, 1-based) is NaN/Inf."""
    if not torch.isfinite(loss):
        raise _diverged(
            f"loss is {loss.item()} at step {step}; training stopped and the step's updates "
            "were not applied.",
            cfg,
            last_ckpt,
        )


def _save(
    path: Path,
    parts: Components,
    source: Any,
    step: int,
    cfg: Config,
    samples: int,
    last_ckpt: Optional[tuple[Path, int]],
) -> Path:
    """:func:`save_checkpoint`, turning NaN/Inf state into :class:`TrainingDiverged`."""
    try:
        return save_checkpoint(path, parts, source, step, cfg, samples=samples)
    except NonFiniteState as e:
        # A finite loss does not prove finite rows: an overflowing update to a row that
        # no later batch has read yet shows up only here.
        raise _diverged(
            f"the state after step {step} is not finite although its loss was: {e} and "
            "training stopped.",
            cfg,
            last_ckpt,
        ) from None


def uses_prefetch(cfg: Config) -> bool:
    """``train.prefetch``; null (the default): on when a table has tiers. Without tiers
    the pipeline only reads the next batch ahead, which the data source already does."""
    if cfg.train.prefetch is not None:
        return cfg.train.prefetch
    return any(t.device_rows is not None for t in cfg.tables)


class _TrainedPosition:
    """The data position after the last batch *trained*, for checkpoints.

    The pipeline reads the next batch while one trains, so the source's own position
    is a batch ahead; a resumed run must start with the batch after the last one
    trained. Before any step it is the source's starting position.
    """

    def __init__(self, source: Any) -> None:
        self._source = source
        self._state: Optional[dict[str, Any]] = None
        if hasattr(source, "state_dict"):
            self._state = dict(source.state_dict())

    def advance(self, batch: Batch) -> None:
        if batch.position is not None:
            self._state = dict(batch.position)

    def state_dict(self) -> dict[str, Any]:
        return {} if self._state is None else dict(self._state)


def _warn_skipped(cfg: Config, skipped: dict[str, int], warned: set[str]) -> None:
    """Warns once per table (``warned``: those done) whose next batch did not fit in
    the device tier beside the one training."""
    for i, t in enumerate(cfg.tables):
        if t.name in skipped and t.name not in warned:
            warned.add(t.name)
            log.warning(
                "tables[%d].device_rows: table %s: the next batch did not fit in the device "
                "tier (%s rows) beside the one training, so its rows were brought in by its "
                "own step instead of in the background (%d times so far); give the device "
                "tier room for two batches' unique keys to hide those reads",
                i, t.name, t.device_rows, skipped[t.name],
            )


def _drop_records_after(path: Path, step: int) -> None:
    """Cuts ``metrics.jsonl`` back to ``step``, the step a resumed run starts from.

    A run that died after its last checkpoint logged lines that the resumed run logs
    again (and maybe a torn last line); kept, they would be in the log twice.
    """
    if not path.exists():
        return
    records = read_jsonl(path)
    keep = [r for r in records if r.get("step", 0) <= step]
    lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if len(keep) < len(lines):
        log.info("%s: dropping %d lines logged after step %d", path, len(lines) - len(keep), step)
        atomic_write_text(path, "".join(json.dumps(r, allow_nan=False) + "\n" for r in keep))


def train(cfg: Config, resume: Optional[Path] = None) -> dict[str, Any]:
    """Runs a training job end to end and returns the summary written to summary.json.

    Args:
        cfg: the validated config.
        resume: a checkpoint directory to continue from (rows, dense weights, optimizer
            states, data position, step and sample count), the one at the end of a run
            or a periodic one (``train.checkpoint_every``) of a run that died. A resumed
            run that reaches ``train.steps`` ends with the same rows, weights and metrics
            as one that ran straight through; ``metrics.jsonl`` lines logged after the
            checkpoint's step are dropped, the resumed run logs them again.

    Raises:
        TrainingDiverged: the loss became NaN or Inf (nothing of that step is applied,
            no summary or checkpoint is written), or the rows or weights did by the time
            of a checkpoint (which is then not written). The message names the last
            good checkpoint.
        CheckpointError: ``resume`` is missing, corrupted or of another model.
        ConfigError: the tables or the model do not fit the data, or a batch has more
            unique keys than a table's ``device_rows``.
        SSDTierError: the SSD tier's directory cannot be written or is in use.
    """
    endless = cfg.data.kind == DataKind.SYNTHETIC  # epochs do not apply to it
    if endless and cfg.train.steps is None and cfg.train.max_minutes is None:
        raise ConfigError(
            "train.steps: required for synthetic data, an endless stream "
            "(train.epochs counts passes over data files)"
        )
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    run_dir = Path(cfg.train.runs_dir) / cfg.name
    # The outermost directory this call creates: a bad config must leave none behind.
    new_dir = next((p for p in reversed([run_dir, *run_dir.parents]) if not p.exists()), None)
    store: Optional[SSDStore] = None
    try:
        root = ssd_root(cfg, run_dir)
        if uses_ssd(cfg):
            assert root is not None
            store = open_ssd_store(cfg, root, current_rank())
        elif root is not None:
            log.warning("ssd.path is set but no table has host_rows: no SSD tier is used")
        parts = build_components(cfg, ssd_store=store)
    except BaseException:
        close_store(store, quiet=True)
        if new_dir is not None:
            shutil.rmtree(new_dir, ignore_errors=True)
        raise
    try:
        summary = _train(cfg, resume, parts, run_dir)
    except BaseException:
        close_store(store, quiet=True)  # the error in flight is the one to see
        raise
    close_store(store)  # flushes: a full disk here is an error of the run
    return summary


def _train(
    cfg: Config, resume: Optional[Path], parts: Components, run_dir: Path
) -> dict[str, Any]:
    """:func:`train` once its components (and SSD store) are built."""
    model, device = parts.model, parts.device
    source = build_source(cfg.data, "train", seed=cfg.seed, epochs=cfg.train.epochs)
    reporter = RunReporter(run_dir)
    ckpt_dir = run_dir / "checkpoint"
    step = samples = 0
    last_ckpt: Optional[tuple[Path, int]] = None  # (dir, step) known good, for errors
    if resume is not None:
        step = load_checkpoint(resume, parts, source)
        samples = int(read_manifest(resume, verify=False).get("samples", 0))
        last_ckpt = (Path(resume), step)
        _drop_records_after(reporter.metrics_path, step)
        # The optimizer's saved param_groups carry the old lr; the config wins, as it
        # does for the sparse optimizer (resuming with a lower lr after a divergence).
        for group in parts.dense_optimizer.param_groups:
            group["lr"] = cfg.optimizer.dense.lr
            group["weight_decay"] = cfg.optimizer.dense.weight_decay
        log.info("resumed from %s at step %d", resume, step)
    elif reporter.metrics_path.exists():
        # A new run under an old name replaces that run; one log must not mix the two.
        log.warning("%s: replacing the metrics of an earlier run", run_dir)
        reporter.metrics_path.unlink()
    reporter.save_config(config_to_dict(cfg))

    tiers = TierCounters(parts.embedding)  # after a resume's load: its rows are not moves
    trained = _TrainedPosition(source)  # the source reads ahead of the batches trained
    window = CTRMetrics()
    start = time.perf_counter()
    start_samples = samples
    losses: list[float] = []
    last_eval: Optional[tuple[int, dict[str, float]]] = None
    paused_seconds = 0.0  # periodic evals and saves, kept out of the throughput numbers
    last_log_t, last_log_samples = start, samples
    bar = tqdm(
        total=cfg.train.steps,
        initial=step,
        disable=not cfg.train.progress,
        unit="step",
        dynamic_ncols=True,
    )
    # A run resumed at (or past) its step target must not take, and consume data for,
    # one more step before the check at the end of the step stops it.
    stop = "steps" if cfg.train.steps is not None and step >= cfg.train.steps else None
    model.train()
    prefetch = uses_prefetch(cfg)
    pipeline = TrainPipeline(
        model,
        parts.dense_optimizer,
        parts.embedding,
        device,
        nn.BCEWithLogitsLoss(),
        overlap=prefetch,
        check_loss=lambda loss: _check_finite(loss, step + 1, cfg, last_ckpt),
    )
    meter = PipelineMeter(pipeline.stats)
    warned: set[str] = set()
    try:
        # The pipeline reads one batch ahead: never past the step target.
        remaining = None if cfg.train.steps is None else cfg.train.steps - step
        batches = iter(()) if stop else itertools.islice(iter(source), remaining)
        while not stop:
            try:
                out = pipeline.progress(batches)
            except StopIteration:
                break
            batch = out.batch
            trained.advance(batch)
            step += 1
            samples += batch.batch_size
            losses.append(out.loss.item())
            window.update(torch.sigmoid(out.logits), batch.labels)
            bar.update(1)
            if step % cfg.train.log_every == 0:
                now = time.perf_counter()
                seconds = max(now - last_log_t, 1e-9)
                rate = (samples - last_log_samples) / seconds
                last_log_t, last_log_samples = now, samples
                m = window.compute()
                window.reset()
                rows = sum(parts.embedding.num_rows().values())
                rec = {
                    "loss": sum(losses) / len(losses),
                    "auc": m["auc"],
                    "samples_per_s": rate,
                    "rows": rows,
                    "samples": samples,
                }
                losses.clear()
                postfix = {
                    "loss": f"{rec['loss']:.4f}",
                    "auc": f"{m['auc']:.4f}",
                    "sps": f"{rate:,.0f}",
                    "rows": f"{rows:,}",
                }
                if tiers:
                    rec["tiers"] = tiers.interval(seconds)
                    postfix.update(tiers.postfix())
                if prefetch:
                    rec["pipeline"] = meter.interval()
                    _warn_skipped(cfg, pipeline.stats.skipped, warned)
                reporter.log(step, "train", rec)
                bar.set_postfix(postfix)
            if cfg.train.eval_every and step % cfg.train.eval_every == 0:
                t0 = time.perf_counter()
                with tiers.excluding():
                    ev = _run_eval(cfg, parts)
                dt = time.perf_counter() - t0
                paused_seconds += dt
                last_log_t += dt
                reporter.log(step, "eval", ev)
                last_eval = (step, ev)
                bar.write(_fmt_eval(step, ev))
            stop = _stop_reason(cfg, step, start)
            if stop:
                break  # the final checkpoint below is this step's
            if cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0:
                # After the eval of this step: a resumed run starts past it.
                t0 = time.perf_counter()
                _save(ckpt_dir, parts, trained, step, cfg, samples, last_ckpt)
                last_ckpt = (ckpt_dir, step)
                dt = time.perf_counter() - t0
                paused_seconds += dt
                last_log_t += dt
                log.info("step %d: checkpoint saved to %s (%.1fs)", step, ckpt_dir, dt)
    except TierFullError as e:
        # A budget that one batch does not fit: the config's to fix. Nothing is saved
        # after it (the failed step may have left its rows half moved between tiers);
        # the last checkpoint stays the one to resume from.
        msg = str(e)
        where = next(
            (
                f"tables[{i}].device_rows"
                for i, t in enumerate(cfg.tables)
                if msg.startswith(f"table {t.name}:")
            ),
            "tables",
        )
        raise ConfigError(f"{where}: {msg}") from None
    finally:
        pipeline.close()
        bar.close()
        if hasattr(source, "close"):
            source.close()
    elapsed = time.perf_counter() - start - paused_seconds
    if last_eval is not None and last_eval[0] == step:
        final = last_eval[1]  # eval_every just evaluated this very model
    else:
        with tiers.excluding():
            final = _run_eval(cfg, parts)
        reporter.log(step, "eval", final)
    summary: dict[str, Any] = {
        "name": cfg.name,
        "steps": step,
        "samples": samples,
        "train_seconds": elapsed,
        "samples_per_s": (samples - start_samples) / max(elapsed, 1e-9),
        "stopped_by": stop or "end_of_data",
        "final_eval": final,
        "auc": final["auc"],
        "oracle_auc": final.get("oracle_auc"),
        "rows": parts.embedding.num_rows(),
        "data": source.stats() if hasattr(source, "stats") else {},
    }
    if tiers:
        summary["tiers"] = tiers.totals()
    if prefetch:
        summary["pipeline"] = PipelineMeter.figures(pipeline.stats, PipelineStats())
    if cfg.train.save_checkpoint:
        summary["checkpoint"] = str(_save(ckpt_dir, parts, trained, step, cfg, samples, last_ckpt))
    reporter.write_summary(summary)
    try:
        reporter.plot()
    except Exception as e:  # a plot must never lose a finished run
        log.warning("could not draw curves.png: %s", e)
    return summary


def _run_eval(cfg: Config, parts: Components) -> dict[str, float]:
    src = build_source(cfg.data, "eval", seed=cfg.seed)
    try:
        return evaluate(parts.model, src, parts.device, cfg.train.eval_batches)
    finally:
        if hasattr(src, "close"):
            src.close()


def _fmt_eval(step: int, ev: dict[str, float]) -> str:
    s = f"[eval step {step}] auc {ev['auc']:.4f} logloss {ev['logloss']:.4f}"
    if "oracle_auc" in ev:
        s += f" (oracle auc {ev['oracle_auc']:.4f})"
    return s


def describe_final(summary: dict[str, Any], cfg: Config) -> str:
    """The closing lines printed after a run."""
    ev = summary["final_eval"]
    lines = [
        f"run {summary['name']}: {summary['steps']} steps, {summary['samples']:,} samples in "
        f"{summary['train_seconds']:.1f}s ({summary['samples_per_s']:,.0f} samples/s)",
        f"final eval: AUC {ev['auc']:.4f}  logloss {ev['logloss']:.4f}  "
        f"NE {ev.get('ne', math.nan):.4f}  calibration {ev.get('calibration', math.nan):.3f}",
    ]
    if summary.get("oracle_auc") is not None:
        gap = summary["oracle_auc"] - ev["auc"]
        lines.append(f"teacher oracle AUC {summary['oracle_auc']:.4f}  (gap {gap:+.4f})")
    if cfg.data.kind != DataKind.SYNTHETIC and summary.get("data"):
        lines.append(f"data: {summary['data']}")
    lines.append(f"rows: {summary['rows']}")
    lines += describe_tiers(summary.get("tiers", {}))
    return "\n".join(lines)
