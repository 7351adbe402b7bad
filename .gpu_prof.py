"""Stage timing of Scorer.score on the device (diagnostic, not committed)."""
import sys, time, statistics, json
from pathlib import Path
import numpy as np, torch
sys.path.insert(0, "benchmarks")
from serve_bench import requests
from terarec.config import load_config
from terarec.serve.scorer import Request, Scorer

dev = sys.argv[2] if len(sys.argv) > 2 else "cuda"
bundle = Path(sys.argv[1])
cfg = load_config(Path("configs/quickstart.yaml"), [])
torch.set_num_threads(2)
sc = Scorer.from_bundle(bundle, device=dev)
reqs = requests(cfg, 1000, 200, seed=3)
sync = torch.cuda.synchronize if dev.startswith("cuda") else (lambda: None)
for r in reqs:
    sc.score(Request(**r))
sync()
st = {k: [] for k in ["request", "keys", "dense", "lookup", "user", "cand", "cpu", "rank", "total"]}
for r in reqs:
    t0 = time.perf_counter()
    q = Request(**r); t1 = time.perf_counter()
    n = len(r["ids"])
    keys = sc.fast.keys(q.user, q.candidates, n); t2 = time.perf_counter()
    du, dc = sc._dense([q], [n]); t3 = time.perf_counter()
    with torch.no_grad():
        rows = sc.rows[sc.fast.table].lookup(keys); sync(); t4 = time.perf_counter()
        fu = len(sc.fast.user)
        state, partial = sc.run["user"](du.to(dev), rows[:fu].unsqueeze(0)); sync(); t5 = time.perf_counter()
        cands = rows[fu:].view(n, len(sc.fast.cand), rows.shape[1])
        lg = sc.run["candidate"](state, partial, dc.to(dev), cands); sync(); t6 = time.perf_counter()
        s = torch.sigmoid(lg).cpu(); t7 = time.perf_counter()
        if s.dim() == 2:
            s = s[:, 0].contiguous()
        order = torch.argsort(s, descending=True, stable=True); ids = [r["ids"][i] for i in order.tolist()]; t8 = time.perf_counter()
    for k, v in zip(st, [t1-t0, t2-t1, t3-t2, t4-t3, t5-t4, t6-t5, t7-t6, t8-t7, t8-t0]):
        st[k].append(v * 1e3)
print("stages ms (p50/p99):", json.dumps({k: [round(float(np.percentile(v, 50)), 3), round(float(np.percentile(v, 99)), 3)] for k, v in st.items()}))
tt = []
for r in reqs:
    t0 = time.perf_counter(); sc.score(Request(**r)); sync(); tt.append((time.perf_counter()-t0)*1e3)
print("score() p50/p99 ms:", np.percentile(tt, 50), np.percentile(tt, 99))
from torch.profiler import profile, ProfilerActivity
acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.startswith("cuda") else [])
with profile(activities=acts) as prof:
    for r in reqs[:50]:
        sc.score(Request(**r))
    sync()
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
if dev.startswith("cuda"):
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=15))
