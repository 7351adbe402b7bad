"""Diagnostic: the scorer's programs replayed as CUDA graphs (padded to size buckets)."""
import sys, time
from pathlib import Path
import numpy as np, torch
sys.path.insert(0, "benchmarks")
from serve_bench import requests
from terarec.config import load_config
from terarec.serve.scorer import Request, Scorer


def bucket(n):
    b = 64
    while b < n:
        b *= 2
    return b


class Graphed:
    def __init__(self, prog, batch_args):
        self.prog, self.batch_args, self.graphs = prog, batch_args, {}

    def __call__(self, *args):
        n = args[self.batch_args[0]].shape[0] if self.batch_args else 1
        b = bucket(n) if self.batch_args else 1
        g = self.graphs.get(b)
        if g is None:
            g = self.graphs[b] = self._capture(b, args)
        ins, out, graph = g
        for i, (s, a) in enumerate(zip(ins, args)):
            if i in self.batch_args:
                s[:n].copy_(a, non_blocking=True)
            else:
                s.copy_(a, non_blocking=True)
        graph.replay()
        if isinstance(out, (tuple, list)):
            return out
        return out[:n]

    def _capture(self, b, args):
        ins = []
        for i, a in enumerate(args):
            if i in self.batch_args:
                t = torch.zeros((b, *a.shape[1:]), dtype=a.dtype, device=a.device)
                t[: a.shape[0]].copy_(a)
            else:
                t = a.clone()
            ins.append(t)
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                self.prog(*ins)
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = self.prog(*ins)
        return ins, out, graph


bundle = Path(sys.argv[1])
cfg = load_config(Path("configs/quickstart.yaml"), [])
torch.set_num_threads(2)
plain = Scorer.from_bundle(bundle, device="cuda")
sc = Scorer.from_bundle(bundle, device="cuda")
sc.programs["user"] = Graphed(sc.programs["user"], [])
sc.programs["candidate"] = Graphed(sc.programs["candidate"], [2, 3])
for n in (100, 1000):
    reqs = requests(cfg, n, 200, seed=n)
    with torch.no_grad():
        diff = max(float((plain.score(Request(**r)).scores - sc.score(Request(**r)).scores).abs().max()) for r in reqs)
        res = {}
        for name, s in (("eager", plain), ("graphs", sc), ("eager2", plain), ("graphs2", sc)):
            tt = []
            for r in reqs:
                t0 = time.perf_counter(); s.score(Request(**r)); torch.cuda.synchronize(); tt.append((time.perf_counter() - t0) * 1e3)
            res[name] = (round(float(np.percentile(tt, 50)), 3), round(float(np.percentile(tt, 99)), 3))
    print(f"N={n} max|dp|={diff:.2e}", res)
