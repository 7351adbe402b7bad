"""The training loop: data -> embeddings -> model -> loss -> fused sparse + dense updates.

``train(cfg)`` runs a whole job and returns its summary; ``evaluate`` runs one pass over
an eval source. Everything a person looks at lands in ``runs/<name>/``: ``metrics.jsonl``,
``summary.json``, ``curves.png``, ``config.yaml``, ``checkpoint/`` (saved at the end and,
with ``train.checkpoint_every``, every N steps) and, for tables with a host budget, the
SSD tier (``ssd/`` by default; see ``trainer/tiers.py``).

``train(cfg, dist=ctx)`` is one rank of a multi-rank job (``ctx``: the launch layer's
``DistContext``): the tables sharded over the fast group (``ps/``), the dense model in
DDP on it, replicas across fast groups kept in step by a ``ReplicaSync``
(``trainer/sync.py``), each rank reading its shard of the data, global metrics; rank 0
alone writes the logs and summary, every rank its shard of the checkpoint.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import shutil
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
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
from terarec.ps.embedding import HierarchicalEmbeddingBagCollection
from terarec.ps.tiers.protocol import TierFullError
from terarec.ps.tiers.ssd import SSDStore
from terarec.trainer.checkpoint import (
    NonFiniteState,
    load_checkpoint,
    read_manifest,
    save_checkpoint,
)
from terarec.trainer.metrics import CTRMetrics
from terarec.trainer.pipeline import PipelineMeter, PipelineStats, TrainPipeline
from terarec.trainer.ranks import (
    AgreedEnd,
    DistHandles,
    StepTally,
    all_sum,
    any_rank,
    broadcast_dense,
    dummy_batch,
    eval_batches,
    fast_group_twin,
    is_rank0,
    wrap_ddp,
)
from terarec.trainer.report import RunReporter, atomic_write_text, read_jsonl
from terarec.trainer.sync import NoSync, ReplicaSync, build_replica_sync, sync_figures
from terarec.trainer.tiers import (
    TierCounters,
    close_store,
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
    """What a run is made of (built by :func:`build_components`).

    Attributes:
        embedding: the embedding collection (sharded over the fast group on several
            ranks).
        model: the dense model (holding ``embedding``); what is saved and evaluated.
        dense_optimizer: over ``model``'s parameters.
        device: where this rank trains.
        train_model: what the training step calls: ``model`` in DDP on the fast group
            when it has several ranks, else ``model`` itself.
        sync: keeps the replicas of several fast groups in step (``trainer/sync.py``).
        dist: the job's group handles; None for one process.
    """

    embedding: HierarchicalEmbeddingBagCollection
    model: nn.Module
    dense_optimizer: torch.optim.Optimizer
    device: torch.device
    train_model: Optional[nn.Module] = None
    sync: ReplicaSync = field(default_factory=NoSync)
    dist: Optional[DistHandles] = None

    def __post_init__(self) -> None:
        if self.train_model is None:
            self.train_model = self.model


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"train.device is {name!r} but CUDA is not available here")
    return torch.device(name)


def build_components(
    cfg: Config, ssd_store: Optional[SSDStore] = None, dist: Optional[DistHandles] = None
) -> Components:
    """Embedding collection, model and dense optimizer for ``cfg``.

    Args:
        cfg: the run's config.
        ssd_store: the rank's SSD store (see :func:`open_ssd_store`); required when a
            table has ``host_rows``, unused otherwise. The caller closes it.
        dist: the job's group handles (several ranks): the tables are sharded over the
            fast group (and their gradients combined over the cross group), the dense
            weights start as global rank 0's on every rank, the model is wrapped in DDP
            on the fast group and replicas are kept in step across fast groups.

    Raises:
        ConfigError: the tables do not fit the data's features, or the model does not
            fit the tables (e.g. a DLRM bottom MLP not ending in the embedding dim);
            each section validates alone, so these are only found here.
    """
    multi = dist is not None and dist.world_size > 1
    device = dist.device if dist is not None else resolve_device(cfg.train.device)
    torch.manual_seed(cfg.seed)
    features = sparse_feature_names(cfg.data)
    groups: dict[str, Any] = {}
    if multi:
        assert dist is not None
        # A fast group of one rank still goes through the exchange: its replicas (the
        # same rank on the other nodes) combine their row gradients there.
        groups = {
            "process_group": dist.fast_group,
            "replica_group": dist.cross_group if dist.num_nodes > 1 else None,
            # the pipeline's background prefetch talks on a group of its own
            "prefetch_group": fast_group_twin(dist) if uses_prefetch(cfg) else None,
        }
    try:
        embedding = HierarchicalEmbeddingBagCollection(
            cfg.tables,
            features,
            cfg.optimizer.sparse,
            device=device,
            seed=cfg.seed,
            ssd_store=ssd_store,
            **groups,
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
    if not multi:
        return Components(embedding, model, dense_opt, device)
    assert dist is not None
    broadcast_dense(model, dist)
    sync = build_replica_sync(
        model, dist.cross_group, len(dist.cross_ranks), cfg.sync, dense_opt, embedding
    )
    return Components(embedding, model, dense_opt, device, wrap_ddp(model, dist), sync, dist)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[Batch],
    device: torch.device,
    max_batches: Optional[int] = None,
    dist: Optional[DistHandles] = None,
    dummy: Optional[Batch] = None,
) -> dict[str, float]:
    """One pass of ``model`` over ``batches``: AUC, NE, logloss, calibration, CTR.

    When batches carry the synthetic teacher's probabilities, the same metrics of the
    teacher (the Bayes-optimal scorer) are added as ``oracle_auc`` / ``oracle_logloss``.

    Args:
        model: the model (not its DDP wrapper).
        batches: this rank's eval batches.
        device: where the model runs.
        max_batches: cap on this rank's batches.
        dist: several ranks: ``batches`` is this rank's shard, every rank calls this and
            gets the metrics over all shards (a rank that runs out first keeps taking
            part in the forwards' exchange with ``dummy``, whose predictions are dropped).
        dummy: the padding batch for ``dist`` (:func:`terarec.trainer.ranks.dummy_batch`).
    """
    multi = dist is not None and dist.world_size > 1
    was_training = model.training
    model.eval()
    metrics = CTRMetrics(distributed=multi, device=device if multi else "cpu")
    oracle = CTRMetrics(distributed=multi, device=device if multi else "cpu")
    has_oracle = False
    for batch, real in eval_batches(batches, dist if multi else None, dummy, max_batches):
        batch = batch.to(device, non_blocking=True)
        probs = torch.sigmoid(model(batch.dense, batch.sparse))
        if not real:
            continue
        metrics.update(probs, batch.labels)
        if batch.teacher_prob is not None:
            has_oracle = True
            oracle.update(batch.teacher_prob.to(device), batch.labels)
    model.train(was_training)
    out = metrics.compute()
    if multi:  # every rank must take part in the oracle's compute, or none
        has_oracle = any_rank(has_oracle, dist)
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


def train(
    cfg: Config, resume: Optional[Path] = None, dist: Optional[DistHandles] = None
) -> dict[str, Any]:
    """Runs a training job end to end and returns the summary written to summary.json.

    Args:
        cfg: the validated config.
        resume: a checkpoint directory to continue from (rows, dense weights, optimizer
            states, data position, step and sample count), the one at the end of a run
            or a periodic one (``train.checkpoint_every``) of a run that died. A resumed
            run that reaches ``train.steps`` ends with the same rows, weights and metrics
            as one that ran straight through; ``metrics.jsonl`` lines logged after the
            checkpoint's step are dropped, the resumed run logs them again.
        dist: this rank's place in a multi-rank job (``terarec.launch.DistContext``);
            every rank calls ``train`` with the same config (and ``resume``). None: one
            process. The returned summary is the same on every rank; rank 0 writes it.

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
    rank = 0 if dist is None else dist.rank
    run_dir = Path(cfg.train.runs_dir) / cfg.name
    # The outermost directory this call creates: a bad config must leave none behind
    # (rank 0's to remove: on a shared file system the others see the same one).
    new_dir = next((p for p in reversed([run_dir, *run_dir.parents]) if not p.exists()), None)
    if rank != 0:
        new_dir = None
    store: Optional[SSDStore] = None
    try:
        root = ssd_root(cfg, run_dir)
        if uses_ssd(cfg):
            assert root is not None
            store = open_ssd_store(cfg, root, rank)
        elif root is not None and rank == 0:
            log.warning("ssd.path is set but no table has host_rows: no SSD tier is used")
        parts = build_components(cfg, ssd_store=store, dist=dist)
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


def _finite_source(cfg: Config) -> bool:
    """Whether the train stream ends (file data with ``train.epochs``)."""
    return cfg.data.kind != DataKind.SYNTHETIC and cfg.train.epochs is not None


def _global_rows(parts: Components) -> dict[str, int]:
    """Rows per table over the whole job: the fast group's shards summed (one replica;
    every fast group holds the same rows)."""
    local = parts.embedding.num_rows()
    d = parts.dist
    if d is None or d.world_size == 1:
        return local
    total = all_sum(list(local.values()), d)
    return {n: int(round(v / d.num_nodes)) for n, v in zip(local, total)}


def _train(
    cfg: Config, resume: Optional[Path], parts: Components, run_dir: Path
) -> dict[str, Any]:
    """:func:`train` once its components (and SSD store) are built."""
    device, d = parts.device, parts.dist
    multi = d is not None and d.world_size > 1
    rank, world = (d.rank, d.world_size) if d is not None else (0, 1)
    main = is_rank0(d)
    source = build_source(
        cfg.data, "train", seed=cfg.seed, epochs=cfg.train.epochs, rank=rank, world_size=world,
        device=device,
    )
    reporter = RunReporter(run_dir, write=main)
    ckpt_dir = run_dir / "checkpoint"
    step = samples = 0
    last_ckpt: Optional[tuple[Path, int]] = None  # (dir, step) known good, for errors
    if resume is not None:
        step = load_checkpoint(resume, parts, source)
        samples = int(read_manifest(resume, verify=False).get("samples", 0))
        last_ckpt = (Path(resume), step)
        if main:
            _drop_records_after(reporter.metrics_path, step)
        # The optimizer's saved param_groups carry the old lr; the config wins, as it
        # does for the sparse optimizer (resuming with a lower lr after a divergence).
        for group in parts.dense_optimizer.param_groups:
            group["lr"] = cfg.optimizer.dense.lr
            group["weight_decay"] = cfg.optimizer.dense.weight_decay
        log.info("resumed from %s at step %d", resume, step)
    elif main and reporter.metrics_path.exists():
        # A new run under an old name replaces that run; one log must not mix the two.
        log.warning("%s: replacing the metrics of an earlier run", run_dir)
        reporter.metrics_path.unlink()
    reporter.save_config(config_to_dict(cfg))

    tiers = TierCounters(parts.embedding)  # after a resume's load: its rows are not moves
    trained = _TrainedPosition(source)  # the source reads ahead of the batches trained
    window = CTRMetrics(distributed=multi, device=device)  # on the device: updates never sync
    start = time.perf_counter()
    tally = StepTally(samples)
    start_samples = samples
    last_eval: Optional[tuple[int, dict[str, float]]] = None
    paused_seconds = 0.0  # periodic evals and saves, kept out of the throughput numbers
    last_log_t, last_log_samples = start, samples
    bar = tqdm(
        total=cfg.train.steps,
        initial=step,
        disable=not (cfg.train.progress and main),
        unit="step",
        dynamic_ncols=True,
    )
    # A run resumed at (or past) its step target must not take, and consume data for,
    # one more step before the check at the end of the step stops it.
    stop = "steps" if cfg.train.steps is not None and step >= cfg.train.steps else None
    parts.model.train()
    prefetch = uses_prefetch(cfg)
    pipeline = TrainPipeline(
        parts.train_model,  # type: ignore[arg-type]
        parts.dense_optimizer,
        parts.embedding,
        device,
        nn.BCEWithLogitsLoss(),
        overlap=prefetch,
        check_loss=lambda loss: _check_finite(loss, step + 1, cfg, last_ckpt),
        sync=parts.sync,
        start_step=step,
    )
    meter = PipelineMeter(pipeline.stats)
    warned: set[str] = set()
    try:
        # The pipeline reads one batch ahead: never past the step target.
        remaining = None if cfg.train.steps is None else cfg.train.steps - step
        batches: Iterator[Batch] = (
            iter(()) if stop else itertools.islice(iter(source), remaining)
        )
        if multi and _finite_source(cfg) and not stop:
            # Shards may end at different steps: all ranks stop at the first end.
            batches = AgreedEnd(batches, torch.distributed.new_group(backend="gloo"))
        while not stop:
            try:
                out = pipeline.progress(batches)
            except StopIteration:
                break
            batch = out.batch
            trained.advance(batch)
            step += 1
            tally.add(out.loss, batch.batch_size)  # on the device: no host sync per step
            window.update(torch.sigmoid(out.logits), batch.labels)
            bar.update(1)
            if step % cfg.train.log_every == 0:
                now = time.perf_counter()
                seconds = max(now - last_log_t, 1e-9)
                local_rows = parts.embedding.num_rows()
                loss, (rows,) = tally.flush(d, [float(sum(local_rows.values()))])
                if multi:
                    assert d is not None
                    rows /= d.num_nodes  # every fast group holds one replica
                samples = tally.samples
                rate = (samples - last_log_samples) / seconds
                last_log_t, last_log_samples = now, samples
                m = window.compute()
                window.reset()
                rec = {
                    "loss": loss,
                    "auc": m["auc"],
                    "samples_per_s": rate,
                    "rows": int(rows),
                    "samples": samples,
                }
                postfix = {
                    "loss": f"{rec['loss']:.4f}",
                    "auc": f"{m['auc']:.4f}",
                    "sps": f"{rate:,.0f}",
                    "rows": f"{int(rows):,}",
                }
                if tiers:  # this rank's tiers (rank 0's in the log)
                    rec["tiers"] = tiers.interval(seconds)
                    postfix.update(tiers.postfix())
                if prefetch:
                    rec["pipeline"] = meter.interval()
                    _warn_skipped(cfg, pipeline.stats.skipped, warned)
                traffic = sync_figures(parts.sync, samples // world)  # k-step: cross-node bytes
                if traffic is not None:
                    rec["sync"] = traffic
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
                if main:
                    bar.write(_fmt_eval(step, ev))
            stop = _stop_reason(cfg, step, start)
            if multi and cfg.train.max_minutes is not None and stop != "steps":
                # Clocks differ: the ranks stop together, at the first one's limit.
                stop = "max_minutes" if any_rank(stop is not None, d) else None
            if stop:
                break  # the final checkpoint below is this step's
            if cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0:
                # After the eval of this step: a resumed run starts past it.
                t0 = time.perf_counter()
                tally.flush(d, [])  # the checkpoint's sample count is the job's
                _save(ckpt_dir, parts, trained, step, cfg, tally.samples, last_ckpt)
                last_ckpt = (ckpt_dir, step)
                dt = time.perf_counter() - t0
                paused_seconds += dt
                last_log_t += dt
                log.info("step %d: checkpoint saved to %s (%.1fs)", step, ckpt_dir, dt)
    except TierFullError as e:
        # A budget that one batch does not fit: the config's to fix. Nothing is saved
        # after it (the failed step may have left its rows half moved between tiers);
        # the last checkpoint stays the one to resume from.
        where = next(
            (f"tables[{i}].{e.tier}_rows" for i, t in enumerate(cfg.tables) if t.name == e.table),
            "tables",
        )
        raise ConfigError(f"{where}: {e}") from None
    finally:
        pipeline.close()
        bar.close()
        if hasattr(source, "close"):
            source.close()
    finish = getattr(parts.sync, "finish", None)
    if finish is not None:  # k-step: merge the last steps, every replica the same model
        finish()
    elapsed = time.perf_counter() - start - paused_seconds
    tally.flush(d, [])
    samples = tally.samples
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
        "rows": _global_rows(parts),
        "data": source.stats() if hasattr(source, "stats") else {},
    }
    if multi:
        assert d is not None
        summary["world_size"] = world
        summary["fast_groups"] = d.num_nodes
    if tiers:
        summary["tiers"] = tiers.totals()  # this rank's (rank 0's in summary.json)
        if multi:
            by_rank: list[Any] = [None] * world
            torch.distributed.all_gather_object(by_rank, summary["tiers"])
            summary["tiers_by_rank"] = by_rank
    if prefetch:
        summary["pipeline"] = PipelineMeter.figures(pipeline.stats, PipelineStats())
    traffic = sync_figures(parts.sync, samples // world)
    if traffic is not None:
        summary["sync"] = traffic
    if cfg.train.save_checkpoint:
        summary["checkpoint"] = str(_save(ckpt_dir, parts, trained, step, cfg, samples, last_ckpt))
    reporter.write_summary(summary)
    if main:
        try:
            reporter.plot()
        except Exception as e:  # a plot must never lose a finished run
            log.warning("could not draw curves.png: %s", e)
    return summary


def _run_eval(cfg: Config, parts: Components) -> dict[str, float]:
    d = parts.dist
    rank, world = (d.rank, d.world_size) if d is not None else (0, 1)
    src = build_source(cfg.data, "eval", seed=cfg.seed, rank=rank, world_size=world,
                       device=parts.device)
    dummy = dummy_batch(sparse_feature_names(cfg.data), len(dense_feature_names(cfg.data)))
    try:
        return evaluate(
            parts.model, src, parts.device, cfg.train.eval_batches, dist=d, dummy=dummy
        )
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
