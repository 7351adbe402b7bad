"""The training loop: data -> embeddings -> model -> loss -> fused sparse + dense updates.

``train(cfg)`` runs a whole job and returns its summary. Everything a person looks at
lands in ``runs/<name>/``: ``metrics.jsonl``, ``summary.json``, ``curves.png``,
``config.yaml``, ``checkpoint/`` (at the end and every ``train.checkpoint_every`` steps)
and the SSD tier of tables with a host budget (``ssd/`` by default, ``trainer/tiers.py``).
Built by ``trainer/components.py``; eval ``evaluate.py``; checkpoints ``checkpoint/``.

``train(cfg, dist=ctx)`` is one rank of a multi-rank job (``ctx``: the launch layer's
``DistContext``): the tables sharded over the fast group (``ps/``), the dense model in
DDP on it, replicas across fast groups kept in step by a ``ReplicaSync``
(``trainer/sync.py``), each rank reading its shard of the data, global metrics; rank 0
alone writes the logs and summary, every rank its shard of the checkpoint.
"""

from __future__ import annotations

import itertools
import logging
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Optional

import torch

from terarec.config import Config, ConfigError, DataKind, config_to_dict
from terarec.data import DataError, build_source, check_eval_data
from terarec.data.batch import Batch
from terarec.ps.tiers.protocol import TierFullError
from terarec.ps.tiers.ssd import SSDStore
from terarec.runtime import DistHandles
from terarec.trainer.best import BestKeeper, check_selection
from terarec.trainer.checkpoint import history, load_checkpoint, read_manifest
from terarec.trainer.checkpoint.files import manifest_sha256
from terarec.trainer.checkpoint.writer import BackgroundWriter
from terarec.trainer.components import Components, build_components, uses_prefetch
from terarec.trainer.divergence import LossGuard, TrainingDiverged, save_or_diverge
from terarec.trainer.evaluate import evaluate, fmt_eval, run_eval
from terarec.trainer.metrics import CTRMetrics, first_task
from terarec.trainer.pipeline import (
    PipelineMeter,
    PipelineStats,
    TrainedPosition,
    TrainPipeline,
    loss_for,
)
from terarec.trainer.progress import make_progress
from terarec.trainer.ranks import AgreedEnd, StepTally, any_rank, is_rank0
from terarec.trainer.report import RunReporter, drop_records_after
from terarec.trainer.rundir import changed_on_resume, check_resume, owned
from terarec.trainer.schedule import LRSchedule
from terarec.trainer.signals import StopSignals
from terarec.trainer.summary import describe_final, global_rows
from terarec.trainer.sync import sync_figures
from terarec.trainer.tiers import (
    TierCounters,
    close_store,
    open_ssd_store,
    ssd_root,
    uses_ssd,
)

# what callers import from here (built elsewhere: components, evaluate)
__all__ = ["Components", "TrainingDiverged", "build_components", "describe_final",
           "evaluate", "train"]

log = logging.getLogger("terarec.trainer")


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
    check_resume(resume, run_dir)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
    with owned(run_dir, hold=rank == 0):  # one run at a time in run_dir
        return _train_owned(cfg, resume, dist, run_dir, rank, new_dir)


def _train_owned(cfg: Config, resume: Optional[Path], dist: Optional[DistHandles],
                 run_dir: Path, rank: int, new_dir: Optional[Path]) -> dict[str, Any]:
    """:func:`train` once this process owns ``run_dir``."""
    store: Optional[SSDStore] = None
    try:
        check_eval_data(cfg.data, cfg.seed)  # a wrong eval file fails now, not at the end
        check_selection(cfg)
        LRSchedule(cfg)  # a schedule that cannot run fails now
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
        summary = _Run(cfg, parts, run_dir, resume).run()
    except BaseException:
        close_store(store, quiet=True)  # the error in flight is the one to see
        raise
    close_store(store)  # flushes: a full disk here is an error of the run
    return summary


class _Run:
    """One call of :func:`train` once its components (and SSD store) are built: the
    loop over steps, the periodic log lines, evals and checkpoints, and the summary."""

    def __init__(
        self, cfg: Config, parts: Components, run_dir: Path, resume: Optional[Path]
    ) -> None:
        self.cfg, self.parts = cfg, parts
        d = parts.dist
        self.multi = d is not None and d.world_size > 1
        self.rank, self.world = (d.rank, d.world_size) if d is not None else (0, 1)
        self.main = is_rank0(d)
        self.source = build_source(
            cfg.data, "train", seed=cfg.seed, epochs=cfg.train.epochs, rank=self.rank,
            world_size=self.world, device=parts.device,
        )
        self.reporter = RunReporter(run_dir, write=self.main,
                                    tensorboard=cfg.train.tensorboard)
        self.run_dir = run_dir
        if cfg.train.delta_every:  # deltas hold the pairs changed since the last save
            parts.embedding.track_changes(True)
        self.step = 0
        samples = 0
        self.last_ckpt: Optional[tuple[Path, int]] = None  # (dir, step) known good
        if resume is not None:
            self.step = load_checkpoint(resume, parts, self.source)
            saved = read_manifest(resume, verify=False)
            samples = int(saved.get("samples", 0))
            for change in changed_on_resume(saved.get("config", {}), config_to_dict(cfg)):
                log.warning("resuming with other settings than %s's: %s", resume, change)
            self.last_ckpt = (Path(resume), self.step)
            if self.multi:  # every rank has read its checkpoint before any goes
                torch.distributed.barrier(group=d.world)
            if self.main:  # the future this run writes again: checkpoints, then metrics
                history.drop_after(run_dir, self.step)
                drop_records_after(self.reporter.metrics_path, self.step)
                self.reporter.resume_at(self.step)  # and the TensorBoard events
            # The optimizer's saved param_groups carry the old lr; the config wins, as it
            # does for the sparse optimizer (resuming with a lower lr after a divergence).
            for group in parts.dense_optimizer.param_groups:
                group["lr"] = cfg.optimizer.dense.lr
                group["weight_decay"] = cfg.optimizer.dense.weight_decay
            log.info("resumed from %s at step %d", resume, self.step)
        # a new run under an old name replaces its log at its first line (never if no step)
        self.replace_metrics = (resume is None and self.main
                                and self.reporter.metrics_path.exists())
        # ... and its checkpoints (and best.json) at its first save
        self.replace_history = resume is None and self.main
        self.reporter.save_config(config_to_dict(cfg))
        self.tiers = TierCounters(parts.embedding)  # after a resume's load: not moves
        self.trained = TrainedPosition(self.source)  # the source reads ahead
        # on the device: its updates never sync
        self.window = CTRMetrics(distributed=self.multi, device=parts.device)
        self.start = time.perf_counter()
        self.tally = StepTally(samples)
        self.start_samples = samples
        self.last_eval: Optional[tuple[int, dict[str, float]]] = None
        self.paused = 0.0  # periodic evals and saves, kept out of the throughput numbers
        self.last_log_t, self.last_log_samples = self.start, samples
        self.last_save_t = self.start
        self.prefetch = uses_prefetch(cfg)
        # train.async_checkpoint: periodic checkpoints written on a background thread,
        # whose collectives (several ranks) run over a process group of their own
        self.writer = BackgroundWriter() if cfg.train.async_checkpoint else None
        self.write_group = (torch.distributed.new_group(backend="gloo")
                            if self.writer is not None and self.multi else None)
        self.warned: set[str] = set()
        # a run resumed at (or past) its step target takes no step (and reads no data)
        steps = cfg.train.steps
        self.stop = "steps" if steps is not None and self.step >= steps else None
        self.signals = StopSignals()  # SIGTERM / SIGINT: stop, save, exit 128 + signal
        self.guard = LossGuard(cfg, parts.device, lambda: self.last_ckpt)
        self.resumed = resume is not None
        self.best = BestKeeper(cfg, run_dir, self.main, self.step if self.resumed else None)
        self.schedule = LRSchedule(cfg)
        self.lr = cfg.optimizer.dense.lr  # the dense lr of the last step (logged)

    def run(self) -> dict[str, Any]:
        with self.signals:  # through the final save: a late signal is recorded too
            return self._run()

    def _run(self) -> dict[str, Any]:
        cfg, parts = self.cfg, self.parts
        bar = make_progress(cfg.train.progress, self.main, cfg.train.steps, self.step)
        parts.model.train()
        pipeline = TrainPipeline(
            parts.train_model,  # type: ignore[arg-type]
            parts.dense_optimizer,
            parts.embedding,
            parts.device,
            loss_for(cfg.model.task_weights),
            overlap=self.prefetch,
            check_loss=None if self.guard.deferred else (
                lambda loss: self.guard.before_update(loss, self.step + 1)),
            sync=parts.sync,
            start_step=self.step,
        )
        meter = PipelineMeter(pipeline.stats)
        try:
            batches = self._batches()
            while not self.stop:
                if self.schedule.active:  # this step's learning rates
                    self.lr = self.schedule.apply(self.step, parts.dense_optimizer,
                                                  parts.embedding)
                try:
                    out = pipeline.progress(batches)
                except StopIteration:
                    break
                self.trained.advance(out.batch)
                self.step += 1
                self.guard.after_step(out.loss, self.step)  # deferred: reads the last one
                self.tally.add(out.loss, out.batch.batch_size)  # on the device: no sync
                self.window.update(*first_task(torch.sigmoid(out.logits), out.batch.labels))
                bar.update(1)
                if self.step % cfg.train.log_every == 0:
                    self._log_interval(bar, pipeline, meter)
                if cfg.train.eval_every and self.step % cfg.train.eval_every == 0:
                    self._periodic_eval(bar)
                if self.writer is not None and self.writer.done:
                    self._collect_write()  # a failed write stops the run here
                self.stop = self._stop_now()
                if self.stop:
                    break  # the final checkpoint below is this step's
                due = self._checkpoint_due()
                saved = self.last_ckpt is not None and self.last_ckpt[1] == self.step
                if due is not None and not saved:  # (the best's, written this step)
                    self._periodic_checkpoint(due)
                self._flush_ahead()
        except TierFullError as e:
            # A budget that one batch does not fit: the config's to fix. Nothing is saved
            # after it (the failed step may have left its rows half moved between tiers);
            # the last checkpoint stays the one to resume from.
            where = next((f"tables[{i}].{e.tier}_rows" for i, t in enumerate(cfg.tables)
                          if t.name == e.table), "tables")
            raise ConfigError(f"{where}: {e}") from None
        except BaseException:
            if self.writer is not None and self.writer.busy and not self.multi:
                # the checkpoint being written is a good one: let it land (several
                # ranks: not waited for, its peers may be gone; the write is atomic)
                try:
                    self.writer.wait()
                except Exception as e:
                    log.warning("the checkpoint being written failed too: %s", e)
            raise
        finally:
            pipeline.close()
            bar.close()
            if hasattr(self.source, "close"):
                self.source.close()
        self.guard.flush()
        if self.step == 0 and not self.resumed and self.stop is None:  # the data ended
            raise self._no_data()
        return self._finish(pipeline)

    def _no_data(self) -> DataError:
        """The error of a run whose train stream ended before its first batch."""
        st = self.source.stats() if hasattr(self.source, "stats") else {}
        n = st.get("rows_skipped_total", 0)
        what = f"all {n} rows read were malformed ({st.get('rows_skipped')})" if n else \
            "the input holds no rows"
        return DataError(f"no training data: the train stream ended before its first batch: "
                         f"{what}; nothing of run {self.cfg.name!r} was written or replaced")

    def _record(self, step: int, split: str, rec: dict[str, Any]) -> None:
        """A ``metrics.jsonl`` line; the first of a new run replaces an earlier run's."""
        if self.replace_metrics:
            log.warning("%s: replacing the metrics of an earlier run", self.run_dir)
            self.reporter.reset()
            self.replace_metrics = False
        self.reporter.log(step, split, rec)

    def _batches(self) -> Iterator[Batch]:
        """The train stream: never past the step target (the pipeline reads ahead)."""
        if self.stop:
            return iter(())
        steps = self.cfg.train.steps
        remaining = None if steps is None else steps - self.step
        batches: Iterator[Batch] = itertools.islice(iter(self.source), remaining)
        if self.multi and _finite_source(self.cfg):
            # Shards may end at different steps: all ranks stop at the first end.
            batches = AgreedEnd(batches, torch.distributed.new_group(backend="gloo"))
        return batches

    def _stop_now(self) -> Optional[str]:
        stop = _stop_reason(self.cfg, self.step, self.start)
        if self.multi and self.cfg.train.max_minutes is not None and stop != "steps":
            # Clocks differ: the ranks stop together, at the first one's limit.
            stop = "max_minutes" if any_rank(stop is not None, self.parts.dist) else None
        if stop is None and self.best.exhausted:
            return "early_stopping"
        signalled = self.signals.signum is not None
        if self.multi and self.step % self.cfg.train.log_every == 0:
            # the ranks agree at log steps (no collective on the others)
            signalled = any_rank(signalled, self.parts.dist)
        elif self.multi:
            signalled = False
        return stop or ("signal" if signalled else None)

    def _log_interval(self, bar: Any, pipeline: TrainPipeline, meter: PipelineMeter) -> None:
        """The metrics line of the interval that ends at this step."""
        self.guard.flush()
        d = self.parts.dist
        now = time.perf_counter()
        seconds = max(now - self.last_log_t, 1e-9)
        local_rows = self.parts.embedding.num_rows()
        loss, (rows,) = self.tally.flush(d, [float(sum(local_rows.values()))])
        if self.multi:
            assert d is not None
            rows /= d.num_nodes  # every fast group holds one replica
        samples = self.tally.samples
        rate = (samples - self.last_log_samples) / seconds
        self.last_log_t, self.last_log_samples = now, samples
        m = self.window.compute()
        self.window.reset()
        rec = {"loss": loss, "auc": m["auc"], "samples_per_s": rate, "rows": int(rows),
               "samples": samples, **({"lr": self.lr} if self.schedule.active else {})}
        postfix = {"loss": f"{loss:.4f}", "auc": f"{m['auc']:.4f}", "sps": f"{rate:,.0f}",
                   "rows": f"{int(rows):,}"}
        if self.tiers:  # this rank's tiers (rank 0's in the log)
            rec["tiers"] = self.tiers.interval(seconds)
            postfix.update(self.tiers.postfix())
        if self.prefetch:
            rec["pipeline"] = meter.interval()
            _warn_skipped(self.cfg, pipeline.stats.skipped, self.warned)
        traffic = sync_figures(self.parts.sync, samples // self.world)  # k-step: cross-node
        if traffic is not None:
            rec["sync"] = traffic
        self._record(self.step, "train", rec)
        bar.set_postfix(postfix)

    def _pause(self, t0: float) -> None:
        """Time since ``t0`` (an eval, a save) is not training time."""
        dt = time.perf_counter() - t0
        self.paused += dt
        self.last_log_t += dt

    def _periodic_eval(self, bar: Any) -> None:
        """The eval of the validation split if there is one (model selection:
        ``trainer/best.py``), else of the test split."""
        self.guard.flush()
        t0 = time.perf_counter()
        split = "valid" if self.best.validates else "eval"
        with self.tiers.excluding():
            ev = run_eval(self.cfg, self.parts, split)
        self._pause(t0)
        self._record(self.step, split, ev)
        if split == "eval":
            self.last_eval = (self.step, ev)
        if self.main:
            bar.write(fmt_eval(self.step, ev, split))
        if self.best.improved(self.step, ev):  # its checkpoint, now (a full one)
            self._collect_write()
            path, _ = self._save()
            sha = manifest_sha256(path) if self.main else None  # rank 0 writes best.json
            self.best.record(self.step, ev[self.best.metric], sha)

    def _checkpoint_due(self) -> Optional[str]:
        """``"full"`` every ``checkpoint_every`` steps, and once ``checkpoint_every_minutes``
        passed since the last save (on a merge step with k-step merging; the ranks agree:
        one tiny all-reduce a step, only with minutes set); else ``"delta"`` every
        ``delta_every`` steps; else None."""
        train = self.cfg.train
        if train.checkpoint_every and self.step % train.checkpoint_every == 0:
            return "full"
        if train.checkpoint_every_minutes is not None and self.step % self.cfg.sync.k == 0:
            due = time.perf_counter() - self.last_save_t >= 60 * train.checkpoint_every_minutes
            if any_rank(due, self.parts.dist) if self.multi else due:
                return "full"
        if train.delta_every and self.step % train.delta_every == 0:
            return "delta"
        return None

    def _periodic_checkpoint(self, kind: str) -> None:
        """After the eval of this step: a resumed run starts past it."""
        self.guard.flush()
        t0 = time.perf_counter()
        self.tally.flush(self.parts.dist, [])  # the checkpoint's sample count is the job's
        self._collect_write()  # the previous one first (one write at a time)
        if self.writer is None:
            path, kind = self._save(delta=kind == "delta")
        else:  # taken now, written while training goes on
            write, kind = self._prepare(delta=kind == "delta")
            self.writer.start(write, {"step": self.step, "kind": kind,
                                      "pause_s": time.perf_counter() - t0})
        self.last_save_t = time.perf_counter()
        self._pause(t0)
        pause = time.perf_counter() - t0
        if self.writer is None:  # the training loop's pause: the whole save
            self._record(self.step, "checkpoint", {"kind": kind, "pause_s": pause})
            log.info("step %d: checkpoint saved to %s (%.1fs)", self.step, path, pause)

    def _flush_ahead(self) -> None:
        """One step before a full checkpoint by steps (or the run's last step), the SSD
        store starts flushing its memtables in the background: the save's own flush (its
        pause) then has one step's writes left."""
        store, train = self.parts.embedding.ssd_store, self.cfg.train
        if store is None or not train.save_checkpoint:
            return
        nxt = self.step + 1
        if (train.checkpoint_every and nxt % train.checkpoint_every == 0) or nxt == train.steps:
            store.flush_soon()

    def _collect_write(self) -> None:
        """Waits for the checkpoint being written in the background, if any; logs it
        (the pause it cost and the write's own time) or raises what failed it."""
        if self.writer is None or not self.writer.busy:
            return
        info = self.writer.info
        path = save_or_diverge(self.writer.wait, info["step"], self.cfg, self.last_ckpt)
        self.last_ckpt = (path, info["step"])
        self._record(info["step"], "checkpoint", {
            "kind": info["kind"], "pause_s": info["pause_s"], "write_s": info["write_s"],
            "async": True})
        log.info("step %d: checkpoint saved to %s (training paused %.2fs, written in "
                 "%.1fs)", info["step"], path, info["pause_s"], info["write_s"])

    def _prepare(self, delta: bool = False) -> tuple[Callable[[], Path], str]:
        """Takes a full checkpoint, or a delta after the last one when it is this
        run's; returns the call that writes it (``history.prepare``) and which it is."""
        if self.replace_history:  # an earlier run's checkpoints must not outrank ours
            self.replace_history = False
            history.drop_after(self.run_dir, -1)
        parent = None
        if delta and self.last_ckpt is not None:
            prev = self.last_ckpt[0]
            if history.run_dir_of(prev).resolve() == self.run_dir.resolve():
                parent = prev  # else (none yet, or another run's): a full one
        write = history.prepare(self.run_dir, self.parts, self.trained, self.step, self.cfg,
                                self.tally.samples, parent, group=self.write_group)
        return write, "full" if parent is None else "delta"

    def _save(self, delta: bool = False) -> tuple[Path, str]:
        """Takes and writes a checkpoint now (:meth:`_prepare`): where, and which."""
        write, kind = self._prepare(delta)
        path = save_or_diverge(write, self.step, self.cfg, self.last_ckpt)
        self.last_ckpt = (path, self.step)
        return path, kind

    def _finish(self, pipeline: TrainPipeline) -> dict[str, Any]:
        """The end of the run: k-step's last merge, the final eval, checkpoint, summary."""
        cfg, parts, d, step = self.cfg, self.parts, self.parts.dist, self.step
        finish = getattr(parts.sync, "finish", None)
        if finish is not None:  # k-step: merge the last steps, every replica the same model
            finish()
        elapsed = time.perf_counter() - self.start - self.paused
        self.tally.flush(d, [])
        samples = self.tally.samples
        if self.stop == "signal":  # preempted: no time for an eval, only the save
            final: dict[str, Any] = {}
        elif self.last_eval is not None and self.last_eval[0] == step:
            final = self.last_eval[1]  # eval_every just evaluated this very model
        else:
            with self.tiers.excluding():
                final = run_eval(cfg, parts)
            self._record(step, "eval", final)
        summary: dict[str, Any] = {
            "name": cfg.name,
            "steps": step,
            "samples": samples,
            "train_seconds": elapsed,
            "samples_per_s": (samples - self.start_samples) / max(elapsed, 1e-9),
            "stopped_by": self.stop or "end_of_data",
            "final_eval": final,
            "auc": final.get("auc"),
            "oracle_auc": final.get("oracle_auc"),
            "rows": global_rows(parts),
            "data": self.source.stats() if hasattr(self.source, "stats") else {},
        }
        if self.multi:
            assert d is not None
            summary["world_size"] = self.world
            summary["fast_groups"] = d.num_nodes
        if self.tiers:
            summary["tiers"] = self.tiers.totals()  # this rank's (rank 0's in summary.json)
            if self.multi:
                by_rank: list[Any] = [None] * self.world
                torch.distributed.all_gather_object(by_rank, summary["tiers"])
                summary["tiers_by_rank"] = by_rank
        if self.prefetch:
            summary["pipeline"] = PipelineMeter.figures(pipeline.stats, PipelineStats())
        traffic = sync_figures(parts.sync, samples // self.world)
        if traffic is not None:
            summary["sync"] = traffic
        if cfg.train.save_checkpoint:
            self._collect_write()
            with self.signals.deadline(cfg.train.grace_seconds):
                summary["checkpoint"] = str(self._save()[0])
        if self.best.best is not None and self.stop != "signal":
            summary["best"] = self._best_on_test(final)
        if self.stop == "signal" or self.signals.signum is not None:  # (another rank's:
            summary["signal"] = self.signals.name or "SIGTERM"  # stopped as by SIGTERM)
        self.reporter.write_summary(summary)
        if self.main:
            try:
                self.reporter.plot()
            except Exception as e:  # a plot must never lose a finished run
                log.warning("could not draw curves.png: %s", e)
        return summary

    def _best_on_test(self, final: dict[str, Any]) -> dict[str, Any]:
        """The best checkpoint restored and scored on the test split (the last step's
        model scored there already: ``final``); the run's model is the best's after."""
        best = dict(self.best.best or {})
        if best["step"] == self.step:  # the final checkpoint, just written
            best["checkpoint"], best["test"] = str(self.run_dir / history.FULL), final
            return best
        path = history.retired_path(self.run_dir, best["step"])  # kept: never pruned
        best["checkpoint"] = str(path)
        load_checkpoint(path, self.parts, self.source)
        with self.tiers.excluding():
            best["test"] = run_eval(self.cfg, self.parts)
        self._record(best["step"], "best_test", best["test"])
        return best


def _stop_reason(cfg: Config, step: int, start: float) -> Optional[str]:
    if cfg.train.steps is not None and step >= cfg.train.steps:
        return "steps"
    if (
        cfg.train.max_minutes is not None
        and time.perf_counter() - start > 60 * cfg.train.max_minutes
    ):
        return "max_minutes"
    return None


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


def _finite_source(cfg: Config) -> bool:
    """Whether the train stream ends (file data with ``train.epochs``)."""
    return cfg.data.kind != DataKind.SYNTHETIC and cfg.train.epochs is not None
