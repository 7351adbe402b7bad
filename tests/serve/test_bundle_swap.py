"""A new full export replaces the served bundle in a running service."""

from __future__ import annotations

import os
import time
from pathlib import Path

import httpx
import numpy as np
from serve_helpers import SPLIT, server, trained, under_load, wait_health
from test_service import request

from terarec.serve.export import export_bundle
from terarec.serve.scorer import Request, Scorer


def switch(link: Path, target: Path) -> None:
    """Points ``link`` at ``target`` atomically (a new symlink renamed over it)."""
    tmp = link.with_name(link.name + ".new")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target)
    os.replace(tmp, link)


def expected(bundle: Path, body: dict) -> np.ndarray:
    scorer = Scorer.from_bundle(bundle)
    try:
        return scorer.score(Request(**body)).scores.numpy()
    finally:
        scorer.close()


def test_new_export_replaces_the_bundle_under_load(tmp_path: Path) -> None:
    """The served path is a symlink; switched to a newer export during a bounded load
    (8 clients), the service swaps store, overlay and programs between two passes: no
    request fails, later answers are the new bundle's, a broken export is refused and
    counted while the served one stays."""
    _, run = trained(tmp_path, model=SPLIT, train={"steps": 40, "checkpoint_every": 20,
                                                    "keep_checkpoints": 2})
    export_bundle(run / "checkpoints" / "step20", tmp_path / "b20")
    export_bundle(run / "checkpoint", tmp_path / "b40")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "manifest.json").write_text("{}")
    link = tmp_path / "current"
    link.symlink_to(tmp_path / "b20")
    bodies = [request(np.random.default_rng(i), 50) for i in range(8)]

    with server(link, "--watch-bundle", "--follow-every", "0.2") as url:
        assert httpx.get(f"{url}/healthz").json()["step"] == 20
        first = httpx.post(f"{url}/score", json=bodies[0]).json()
        with under_load(url, bodies, max_each=400) as load:
            time.sleep(0.5)
            switch(link, tmp_path / "b40")
            wait_health(url, "step", 40, "the new export was not served")
            time.sleep(0.5)
        after = httpx.post(f"{url}/score", json=bodies[0]).json()
        switch(link, tmp_path / "broken")
        wait_health(url, "bundle_errors", 1, "the broken export was not noticed")
        health = httpx.get(f"{url}/healthz").json()
        still = httpx.post(f"{url}/score", json=bodies[0]).json()
        metrics = httpx.get(f"{url}/metrics").text
    assert not load.errors, load.errors[:3]
    assert sum(load.counts) > 16
    assert health["step"] == 40 and health["bundles"] == 2
    assert "terarec_bundles_loaded 2" in metrics and "terarec_bundle_errors 1" in metrics
    assert first["step"] == 20 and after["step"] == still["step"] == 40
    for got, bundle in ((first, "b20"), (after, "b40"), (still, "b40")):
        assert np.allclose(got["scores"], expected(tmp_path / bundle, bodies[0]),
                           rtol=0, atol=1e-6)
    assert not np.allclose(first["scores"], after["scores"], rtol=0, atol=1e-6)
