"""The HTTP scoring service (``terarec serve``): FastAPI on uvicorn over a :class:`Scorer`.

Endpoints:

* ``POST /score``: one request as JSON (:class:`ScoreRequest`) → :class:`ScoreResponse`
  (scores in request order, the ranking, ids in ranked order, the model step).
* ``GET /healthz``: ``{"status": "ok", "step": ...}`` once the bundle is loaded.
* ``GET /metrics``: Prometheus text: requests and errors by status, candidates, a
  latency histogram, the row caches' hit rate, rows and bytes, the model step.
* ``GET /openapi.json``: the OpenAPI description (also saved in ``docs/``).

Input checks, all answered with a 4xx and a message naming the field, the service
staying up: a body over ``max_body_bytes`` (413, checked before it is read whole), not
UTF-8, not JSON or nested past the parser's recursion limit (400), more than
``max_candidates`` candidates (413), unknown features, wrong types or shapes (422).

Concurrent requests are scored together (micro-batching): one scoring thread takes
every request that queued while it was busy and scores them in one pass
(:meth:`Scorer.score_many`), so a lone request waits for nothing and a burst shares the
row lookups and program calls.

Live deltas (``--follow RUN_DIR``): a thread watches the training run's ``deltas/`` and
applies each new delta that follows the model served (``serve/overlay.py``): read and
checked beside the serving, committed between two scoring passes. ``/healthz`` and
``/metrics`` report the step served, the deltas applied and refused, the overlay's rows.

New exports (``--watch-bundle``, or with ``--follow``): the same thread watches the
``--bundle`` path; when it names another export (a symlink switched to it, or a
directory replaced by rename), that bundle is opened and checked beside the serving and
swapped in between two passes, replacing store, overlay and caches; deltas then follow
from it.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from pathlib import Path
from queue import Empty, SimpleQueue
from typing import Any, Optional, Union

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse, Response
from pydantic import BaseModel, Field

from terarec.serve.scorer import Ranking, RequestError, Scorer
from terarec.serve.scorer import Request as ScoreInput

BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)

Value = Union[int, str]
log = logging.getLogger(__name__)


class ScoreRequest(BaseModel):
    """A ranking request (the OpenAPI schema of ``POST /score``)."""

    user: dict[str, Union[Value, list[Value]]] = Field(
        default_factory=dict, description="user/context-side feature -> id, string, "
        "or a list of them (multi-valued; [] = missing)")
    candidates: dict[str, list[Union[Value, list[Value]]]] = Field(
        default_factory=dict, description="candidate-side feature -> one entry per "
        "candidate (an id, a string, or a list of them; for a semantic-id feature, the "
        "candidate's token sequence, level 1 first)")
    dense: Optional[list[float]] = Field(
        None, description="the dense features, when they are user-side")
    candidate_dense: Optional[list[list[float]]] = Field(
        None, description="[N][num_dense], when the dense features are candidate-side")
    ids: Optional[list[Value]] = Field(
        None, description="candidate ids, returned in ranked order")


class ScoreResponse(BaseModel):
    scores: list[float] = Field(description="click probability per candidate, in "
                                "request order")
    ranking: list[int] = Field(description="candidate positions, best first")
    ids: Optional[list[Value]] = Field(None, description="the request's ids, best first")
    step: int = Field(description="training step of the model that scored")
    tasks: Optional[dict[str, list[float]]] = Field(
        None, description="a multi-task model: each task's probability per candidate, "
        "in request order, by task name (scores and ranking follow the first task)")


class _Metrics:
    """Counters and a latency histogram in Prometheus text format."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.by_status: dict[int, int] = {}
        self.buckets = [0] * len(BUCKETS)
        self.count, self.total = 0, 0.0
        self.batches = 0

    def observe(self, status: int, seconds: float) -> None:
        with self.lock:
            self.by_status[status] = self.by_status.get(status, 0) + 1
            if status == 200:
                self.count += 1
                self.total += seconds
                for i, le in enumerate(BUCKETS):
                    if seconds <= le:
                        self.buckets[i] += 1

    def text(self, scorer: Scorer, extra: dict[str, float]) -> str:
        s = scorer.stats()
        lines = ["# TYPE terarec_requests_total counter"]
        with self.lock:
            for code, n in sorted(self.by_status.items()):
                lines.append(f'terarec_requests_total{{code="{code}"}} {n}')
            lines.append("# TYPE terarec_request_seconds histogram")
            for le, n in zip(BUCKETS, self.buckets):
                lines.append(f'terarec_request_seconds_bucket{{le="{le}"}} {n}')
            lines += [f'terarec_request_seconds_bucket{{le="+Inf"}} {self.count}',
                      f"terarec_request_seconds_sum {self.total:.6f}",
                      f"terarec_request_seconds_count {self.count}",
                      "# TYPE terarec_score_batches_total counter",
                      f"terarec_score_batches_total {self.batches}"]
        lines += ["# TYPE terarec_candidates_total counter",
                  f"terarec_candidates_total {s['candidates']}",
                  "# TYPE terarec_model_step gauge", f"terarec_model_step {s['step']}"]
        for key in ("hit_rate", "rows", "bytes"):
            lines.append(f"# TYPE terarec_cache_{key} gauge")
            for table, t in s["tables"].items():
                lines.append(f'terarec_cache_{key}{{table="{table}"}} {t[key]:g}')
        for key, v in extra.items():
            lines += [f"# TYPE terarec_{key} gauge", f"terarec_{key} {v:g}"]
        return "\n".join(lines) + "\n"


class _Batcher:
    """One scoring thread; requests that queue while it works are scored together."""

    def __init__(self, service: Service, max_batch: int) -> None:
        self.service, self.max_batch = service, max_batch
        self.queue: SimpleQueue[tuple[ScoreInput, Future[Ranking]]] = SimpleQueue()
        self.thread = threading.Thread(target=self._run, name="terarec-score", daemon=True)
        self.thread.start()

    def submit(self, req: ScoreInput) -> Future[Ranking]:
        fut: Future[Ranking] = Future()
        self.queue.put((req, fut))
        return fut

    def _run(self) -> None:
        while True:
            batch = [self.queue.get()]
            while len(batch) < self.max_batch:
                try:
                    batch.append(self.queue.get_nowait())
                except Empty:
                    break
            self.service.score_batch(batch)


class Service:
    """The service state: the scorer it serves and what it counts.

    Args:
        scorer: the scorer of the bundle to serve.
        max_candidates: most candidates one request may carry.
        max_body_bytes: largest request body accepted.
        max_batch: most requests scored in one pass.
    """

    def __init__(self, scorer: Scorer, max_candidates: int = 10_000,
                 max_body_bytes: int = 8 << 20, max_batch: int = 64,
                 bundle: Optional[Path] = None,
                 opener: Optional[Callable[[Path], Scorer]] = None) -> None:
        self.scorer = scorer
        # bundle: the path served (e.g. a symlink a deployment switches to each new
        # export); watched by reload_once, which opens a changed one with opener
        self.bundle = Path(bundle) if bundle is not None else None
        self.opener = opener
        self.served = _bundle_id(scorer.root) if self.bundle is not None else None
        self.bundles = 1  # bundles served so far
        self.bundle_errors = 0
        self.max_candidates = max_candidates
        self.max_body_bytes = max_body_bytes
        self.metrics = _Metrics()
        self.swap_lock = threading.Lock()  # the scorer changes between batches only
        self.batcher = _Batcher(self, max_batch)
        self.delta_errors = 0
        self.last_error = ""

    def apply_delta(self, path: Path) -> None:
        """Reads ``path`` beside the serving, then commits it between two passes."""
        pending = self.scorer.prepare_delta(path)
        with self.swap_lock:
            self.scorer.commit_delta(pending)
        log.info("serving step %d (delta %s, %d overlay rows)", self.scorer.step, path,
                 self.scorer.overlay.rows)

    def follow(self, run_dir: Optional[Path], every_s: float = 5.0) -> threading.Thread:
        """Starts the thread that, every ``every_s`` seconds, replaces the bundle when
        its path points at a new export (:meth:`reload_once`) and applies ``run_dir``'s
        new deltas in order (:meth:`follow_once`; None: bundles only)."""
        def run() -> None:
            while True:
                self.reload_once()
                if run_dir is not None:
                    self.follow_once(run_dir)
                time.sleep(every_s)
        t = threading.Thread(target=run, name="terarec-follow", daemon=True)
        t.start()
        return t

    def reload_once(self) -> bool:
        """Serves the bundle now at the watched path if it is another export than the
        one served (its manifest differs): opened and checked beside the serving, then
        swapped in between two scoring passes; store, overlay and caches are the new
        bundle's. A bundle that fails to open is counted and logged, the served one
        kept. Returns whether it swapped."""
        if self.bundle is None or self.opener is None:
            return False
        target = self.bundle.resolve()
        ident = _bundle_id(target)
        if ident is None or ident == self.served:
            return False
        try:
            new = self.opener(target)
        except Exception as e:  # noqa: BLE001 - counted, logged, served bundle kept
            self.bundle_errors += 1
            self.last_error = f"{target}: {e}"
            log.warning("bundle not loaded: %s", self.last_error)
            self.served = ident  # not retried until it changes again
            return False
        with self.swap_lock:
            old, self.scorer = self.scorer, new
            self.served = ident
            self.bundles += 1
        old.close()  # no pass uses it: passes hold the lock
        log.info("serving %s (step %d)", target, new.step)
        return True

    def follow_once(self, run_dir: Path) -> int:
        """Applies the deltas of ``run_dir`` newer than the model served whose chain
        starts at it; returns how many. A failure is counted and logged (the model
        served stays as it was)."""
        applied = 0
        found = []
        for p in (Path(run_dir) / "deltas").glob("step*"):
            if p.name[4:].isdigit() and (p / "manifest.json").is_file():
                found.append((int(p.name[4:]), p))
        for step, path in sorted(found):
            if step <= self.scorer.step:
                continue
            try:
                self.apply_delta(path)
                applied += 1
            except Exception as e:  # noqa: BLE001 - counted, logged, served model kept
                self.delta_errors += 1
                self.last_error = f"{path}: {e}"
                log.warning("not applied: %s", self.last_error)
                break
        return applied

    def score_batch(self, batch: Sequence[tuple[ScoreInput, Future[Ranking]]]) -> None:
        with self.swap_lock:
            scorer = self.scorer
            self.metrics.batches += 1
            try:
                results = scorer.score_many([r for r, _ in batch])
            except RequestError:  # one bad request: score each alone, to blame it only
                results = None
            except Exception as e:  # noqa: BLE001 - reported to every waiting request
                for _, fut in batch:
                    fut.set_exception(e)
                return
            if results is None:
                for r, fut in batch:
                    try:
                        fut.set_result(scorer.score(r))
                    except Exception as e:  # noqa: BLE001
                        fut.set_exception(e)
                return
        for (_, fut), res in zip(batch, results):
            fut.set_result(res)

    def parse(self, body: bytes) -> ScoreInput:
        """The scorer's request from a JSON body (raises :class:`RequestError`)."""
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as e:
            raise _BadRequest(400, f"body: not UTF-8 ({e.reason} at byte {e.start})") from None
        try:
            data = orjson.loads(text)
        except (ValueError, RecursionError) as e:
            raise _BadRequest(400, f"body: not JSON ({e})") from None
        if not isinstance(data, dict):
            raise RequestError("body: must be a JSON object")
        unknown = set(data) - set(ScoreRequest.model_fields)
        if unknown:
            raise RequestError(f"body: unknown fields {sorted(unknown)} (known: "
                               f"{sorted(ScoreRequest.model_fields)})")
        user, cands = data.get("user", {}), data.get("candidates", {})
        if not isinstance(user, dict):
            raise RequestError("user: must be an object of feature -> value(s)")
        if not isinstance(cands, dict) or not all(isinstance(v, list) for v in cands.values()):
            raise RequestError("candidates: must be an object of feature -> list of entries")
        n = max((len(v) for v in cands.values()), default=0)
        if n > self.max_candidates:
            raise _BadRequest(413, f"candidates: {n} candidates, at most "
                              f"{self.max_candidates} per request")
        ids = data.get("ids")
        if ids is not None and (not isinstance(ids, list) or len(ids) > self.max_candidates):
            raise RequestError("ids: must be a list, one id per candidate")
        return ScoreInput(user=user, candidates=cands, dense=data.get("dense"),
                          candidate_dense=data.get("candidate_dense"), ids=ids)


class _BadRequest(RequestError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def build_app(service: Service) -> FastAPI:
    """The FastAPI application of ``service``."""
    app = FastAPI(title="terarec scoring service", version="1",
                  description="Request-centric CTR scoring of ad candidates.")

    @app.post("/score", response_model=ScoreResponse, openapi_extra={
        "requestBody": {"required": True, "content": {
            "application/json": {"schema": ScoreRequest.model_json_schema()}}}},
        responses={400: {"description": "not UTF-8, not JSON, or nested too deep"},
                   413: {"description": "body or candidate count over the limit"},
                   422: {"description": "a field of the wrong type, shape or name"}})
    async def score(request: Request) -> Any:
        t0 = time.perf_counter()
        status, payload = 200, None
        try:
            body = await _read_limited(request, service.max_body_bytes)
            fut = service.batcher.submit(service.parse(body))
            res = await asyncio.wrap_future(fut)
            payload = {"scores": res.scores.numpy(), "ranking": res.order.numpy(), "ids": res.ids,
                       "step": res.step}
            if res.tasks is not None:
                payload["tasks"] = {k: v.numpy() for k, v in res.tasks.items()}
        except _BadRequest as e:
            status, payload = e.status, {"detail": str(e)}
        except RequestError as e:
            status, payload = 422, {"detail": str(e)}
        service.metrics.observe(status, time.perf_counter() - t0)
        return Response(orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY),
                        status_code=status, media_type="application/json")

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "step": service.scorer.step,
                "deltas": service.scorer.deltas, "delta_errors": service.delta_errors,
                "bundles": service.bundles, "bundle_errors": service.bundle_errors}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> str:
        sc = service.scorer
        return service.metrics.text(sc, {
            "deltas_applied": sc.deltas, "delta_errors": service.delta_errors,
            "bundles_loaded": service.bundles, "bundle_errors": service.bundle_errors,
            "overlay_rows": sc.overlay.rows, "overlay_max_rows": sc.overlay.max_rows})

    return app


def _bundle_id(path: Path) -> Optional[str]:
    """The sha256 of a bundle's manifest (None while there is none: mid-replacement)."""
    try:
        return hashlib.sha256((Path(path) / "manifest.json").read_bytes()).hexdigest()
    except OSError:
        return None


async def _read_limited(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _BadRequest(413, f"body: {declared} bytes, at most {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _BadRequest(413, f"body: over {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def openapi_spec() -> dict[str, Any]:
    """The service's OpenAPI description (what ``GET /openapi.json`` serves; saved as
    ``docs/serving-openapi.json``)."""
    return build_app(None).openapi()  # type: ignore[arg-type]  # handlers unused here
