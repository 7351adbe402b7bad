"""The HTTP service as a real process on 127.0.0.1, driven by a real client."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from serve_helpers import server

from terarec.serve.export import export_bundle
from terarec.serve.scorer import Request, Scorer

DOCS = Path(__file__).resolve().parents[2] / "docs" / "serving-openapi.json"


def request(rng: np.random.Generator, n: int) -> dict[str, Any]:
    """A request of the tiny split model (C1, C3 + dense user-side; C2, C4 per ad)."""
    ids = rng.integers(0, 200, size=(3, n)).tolist()
    return {"user": {"C1": int(ids[0][0]), "C3": [int(ids[1][0]), 7]},
            "dense": rng.standard_normal(4).round(3).tolist(),
            "candidates": {"C2": ids[1], "C4": [[a, b] for a, b in zip(ids[2], ids[0])]},
            "ids": [f"ad{i}" for i in range(n)]}


@pytest.fixture(scope="module")
def bundle(split_run: tuple[Any, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    _, run = split_run
    out = tmp_path_factory.mktemp("bundle") / "b"
    export_bundle(run / "checkpoint", out)
    return out


@pytest.fixture(scope="module")
def url(bundle: Path) -> Iterator[str]:
    with server(bundle, "--max-candidates", "2000", "--max-body-mb", "1") as u:
        yield u


def test_scores_match_the_python_scorer(bundle: Path, url: str) -> None:
    rng = np.random.default_rng(0)
    scorer = Scorer.from_bundle(bundle)
    try:
        with httpx.Client(base_url=url, timeout=30) as c:
            for n in (1, 7, 1000):
                body = request(rng, n)
                r = c.post("/score", json=body)
                assert r.status_code == 200, r.text
                got = r.json()
                want = scorer.score(Request(**body))
                assert got["step"] == want.step
                assert np.allclose(got["scores"], want.scores.numpy(), rtol=0, atol=1e-6)
                assert got["ranking"] == want.order.tolist()
                assert got["ids"] == want.ids
    finally:
        scorer.close()


def test_bad_requests_get_4xx_and_the_service_stays_up(url: str) -> None:
    rng = np.random.default_rng(1)
    ok = request(rng, 3)
    bad: list[tuple[bytes | str, int, str]] = [
        (json.dumps({**ok, "candidates": {"C2": "x"}}), 422, "candidates"),
        (json.dumps({**ok, "candidates": {"C2": [1.5, 2.5, 3.5]}}), 422, "C2"),
        (json.dumps({**ok, "candidates": {"C9": [1, 2, 3]}}), 422, "C9"),
        (json.dumps({**ok, "user": {"C1": {"a": 1}}}), 422, "C1"),
        (json.dumps({**ok, "dense": [1, 2]}), 422, "dense"),
        (json.dumps({**ok, "extra": 1}), 422, "extra"),
        (json.dumps({**ok, "ids": ["a"]}), 422, "candidates"),
        (json.dumps({**ok, "candidates": {"C2": list(range(2001))}}), 413, "2001"),
        ("[" * 100_000, 400, "JSON"),
        (b"\xff\xfe{}", 400, "UTF-8"),
        ("{not json", 400, "JSON"),
        ("[1, 2]", 422, "object"),
    ]
    with httpx.Client(base_url=url, timeout=30) as c:
        for body, status, word in bad:
            r = c.post("/score", content=body, headers={"content-type": "application/json"})
            assert r.status_code == status, (body[:80], r.status_code, r.text)
            assert word in r.json()["detail"], r.text
        huge = b'{"candidates": {"C2": [' + b"1," * 1_000_000 + b"1]}}"  # 10^6 candidates
        r = c.post("/score", content=huge, headers={"content-type": "application/json"})
        assert r.status_code == 413
        assert c.get("/healthz").json()["status"] == "ok"
        assert c.post("/score", json=ok).status_code == 200


def test_bounded_load_has_no_errors(url: str) -> None:
    clients, per_client, deadline = 32, 8, time.monotonic() + 120
    bodies = [request(np.random.default_rng(i), 100) for i in range(clients)]
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()

    def run(i: int) -> None:
        with httpx.Client(base_url=url, timeout=30) as c:
            for _ in range(per_client):
                if time.monotonic() > deadline:
                    return
                t0 = time.perf_counter()
                r = c.post("/score", json=bodies[i])
                dt = time.perf_counter() - t0
                with lock:
                    latencies.append(dt)
                    if r.status_code != 200:
                        errors.append(r.text)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    assert not errors, errors[:3]
    assert len(latencies) == clients * per_client
    print(f"load: {len(latencies) / wall:.0f} requests/s, p99 "
          f"{np.percentile(latencies, 99) * 1e3:.1f} ms over {clients} clients")
    metrics = httpx.get(f"{url}/metrics").text
    assert 'terarec_requests_total{code="200"}' in metrics
    assert "terarec_request_seconds_bucket" in metrics
    assert 'terarec_cache_hit_rate{table="sparse"}' in metrics
    batches = next(int(float(line.split()[1])) for line in metrics.splitlines()
                   if line.startswith("terarec_score_batches_total"))
    assert batches < len(latencies) + 50  # concurrent requests were scored together


def test_openapi_spec_is_saved_in_docs(url: str) -> None:
    spec = httpx.get(f"{url}/openapi.json").json()
    assert "/score" in spec["paths"]
    assert json.loads(DOCS.read_text()) == spec, (
        f"{DOCS} is out of date: save GET /openapi.json there")
