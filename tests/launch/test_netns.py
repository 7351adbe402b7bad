"""A real two-host job: two network namespaces joined by a veth pair, one torchrun node
in each, gloo over the veth addresses only.

The test makes the namespaces itself (unique names, a private /30 of its own), runs
``torchrun --nnodes 2 --node-rank N --master-addr <node 0's veth address>`` inside each
with ``GLOO_SOCKET_IFNAME`` set to its veth, checks that the run trains the same loss
curve, rows and dense weights as one process on the same global batch, and deletes the
namespaces (and with them the veth pair) whatever happens. Where namespaces cannot be
made (not root, no ``ip``, no CAP_NET_ADMIN) it is skipped, saying why.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from launch_helpers import PY, Ranks, base_env, free_port
from train_helpers import (
    assert_same_run,
    equivalence_config,
    run_dir,
    write_config,
)

from terarec.config import config_from_dict
from terarec.trainer.loop import train


def _ip(*args: str) -> None:
    res = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if res.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {res.stderr.strip()}")


class TwoHosts:
    """Namespaces ``a`` and ``b`` joined by a veth pair with addresses ``addr[0]`` (in
    ``a``) and ``addr[1]`` (in ``b``) on a random private /30."""

    def __init__(self) -> None:
        tag = f"{os.getpid() % 100000}{random.randrange(100):02d}"
        self.ns = (f"trrec{tag}a", f"trrec{tag}b")
        self.dev = (f"trv{tag}a", f"trv{tag}b")  # <= 15 characters
        net = random.Random().randrange(0, 1 << 14) * 4  # one of 2^14 /30s in 10.211/16
        base = f"10.211.{net >> 8}"
        self.addr = (f"{base}.{(net & 255) + 1}", f"{base}.{(net & 255) + 2}")
        self._made: list[str] = []

    def create(self) -> None:
        for ns in self.ns:
            _ip("netns", "add", ns)
            self._made.append(ns)
        _ip("link", "add", self.dev[0], "type", "veth", "peer", "name", self.dev[1])
        for ns, dev, addr in zip(self.ns, self.dev, self.addr):
            _ip("link", "set", dev, "netns", ns)
            _ip("-n", ns, "addr", "add", f"{addr}/30", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")

    def delete(self) -> None:
        for ns in self._made:  # deleting a namespace deletes the veth end inside it
            subprocess.run(["ip", "netns", "delete", ns], capture_output=True, timeout=30)
        if shutil.which("ip"):  # a veth left in the root namespace by a failed move
            subprocess.run(["ip", "link", "delete", self.dev[0]], capture_output=True,
                           timeout=30)

    def exec(self, i: int) -> list[str]:
        return ["ip", "netns", "exec", self.ns[i]]


@pytest.fixture
def hosts() -> Iterator[TwoHosts]:
    if shutil.which("ip") is None:
        pytest.skip("no `ip` (iproute2) here: cannot make network namespaces")
    if os.geteuid() != 0:
        pytest.skip("not root: cannot make network namespaces (ip netns add)")
    h = TwoHosts()
    try:
        try:
            h.create()
        except RuntimeError as e:
            pytest.skip(f"cannot make network namespaces here (CAP_NET_ADMIN?): {e}")
        yield h
    finally:
        h.delete()
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(ns in left for ns in h.ns), left


def start_nodes(ranks: Ranks, hosts: TwoHosts, config: Path, port: int) -> None:
    """One torchrun node in each namespace, gloo over its veth end only."""
    for node in range(2):
        env = base_env()
        env["GLOO_SOCKET_IFNAME"] = hosts.dev[node]
        ranks.start([*hosts.exec(node), PY, "-m", "torch.distributed.run",
                     "--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(node),
                     "--master-addr", hosts.addr[0], "--master-port", str(port),
                     "-m", "terarec.cli", "train", "--config", str(config)], env)


def _one_process(cfg: dict[str, Any]) -> None:
    import torch

    threads = torch.get_num_threads()
    try:
        train(config_from_dict(cfg, "<test>"))
    finally:
        torch.set_num_threads(threads)


@pytest.mark.numerics
def test_two_hosts_over_veth_train_the_one_process_run(hosts: TwoHosts, tmp_path: Path) -> None:
    ref = equivalence_config(tmp_path, 1, "one")
    _one_process(ref)
    cfg = equivalence_config(tmp_path, 2, "two-hosts")
    config = write_config(tmp_path, cfg)
    port = free_port()  # free here; the namespaces have no listeners at all
    with Ranks(tmp_path) as ranks:
        start_nodes(ranks, hosts, config, port)
        codes = ranks.wait(150)
        outs = [ranks.output(i) for i in range(2)]
    assert codes == [0, 0], "\n".join(o[-3000:] for o in outs)
    assert_same_run(cfg, ref)
    summary = (run_dir(cfg) / "summary.json").read_text()
    assert '"world_size": 2' in summary and '"fast_groups": 2' in summary  # two hosts


def test_a_link_that_goes_down_fails_the_job_within_its_timeout(hosts: TwoHosts,
                                                                 tmp_path: Path) -> None:
    """Two hosts training over the veth pair; the link goes down mid-run (``ip link set
    ... down``): both nodes stop with an error naming the unreachable peer within the
    configured timeout (``dist.timeout_s``: 20 s) and a margin, never hanging."""
    import time

    cfg = equivalence_config(tmp_path, 2, "link-down", steps=2000, tiers=False)
    cfg["dist"] = {"timeout_s": 20}
    config = write_config(tmp_path, cfg)
    metrics = run_dir(cfg) / "metrics.jsonl"
    port = free_port()
    with Ranks(tmp_path) as ranks:
        start_nodes(ranks, hosts, config, port)
        ranks.wait_for_lines(metrics, 3, timeout=150)
        _ip("-n", hosts.ns[1], "link", "set", hosts.dev[1], "down")
        t0 = time.monotonic()
        codes = ranks.wait(20 + 130)  # the timeout, and a margin for the exits
        took = time.monotonic() - t0
        outs = [ranks.output(i) for i in range(2)]
    assert all(c != 0 for c in codes), codes
    assert took < 20 + 100, took  # the timeout, diagnosis and leaving, each bounded
    assert any("PeerFailure" in o or "timed out" in o.lower() or "timeout" in o.lower()
               for o in outs), "\n".join(o[-2000:] for o in outs)
    assert not (run_dir(cfg) / "summary.json").exists()
