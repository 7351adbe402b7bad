"""The ``terarec`` command in-process (``cli.main(argv)``) and as the installed script."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from terarec import cli
from terarec.data.criteo_writer import write_criteo

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "configs" / "quickstart.yaml"
# configs/quickstart.yaml shrunk to a sub-second run on one thread.
SHRINK = [
    "data.batch_size=64",
    "data.eval_batch_size=1024",
    "data.synthetic.num_dense=4",
    "data.synthetic.num_sparse=4",
    "data.synthetic.vocab_size=200",
    "data.synthetic.eval_samples=2048",
    "model.bottom_mlp=[16,16]",
    "model.top_mlp=[16]",
    "train.steps=30",
    "train.eval_every=0",
    "train.log_every=10",
    "train.device=cpu",
    "train.threads=1",
    "train.progress=false",
]


@pytest.fixture(autouse=True)
def _restore_torch_threads() -> Iterator[None]:
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def train_argv(runs: Path, *extra: str, name: str = "cli_run") -> list[str]:
    argv = ["train", "--config", str(QUICKSTART), "--name", name]
    for item in [*SHRINK, f"train.runs_dir={runs}"]:
        argv += ["--set", item]
    return argv + list(extra)


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One ``terarec train`` run shared by the eval tests: its run directory."""
    runs = tmp_path_factory.mktemp("cli") / "runs"
    n = torch.get_num_threads()
    assert cli.main(train_argv(runs)) == 0
    torch.set_num_threads(n)
    return runs / "cli_run"


# --------------------------------------------------------------------------- train


def test_train_writes_the_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    runs = tmp_path / "runs"
    code, out, err = run(
        train_argv(runs, "--set", "optimizer.sparse.lr=0.05", name="renamed"), capsys
    )
    assert code == 0, err
    run_dir = runs / "renamed"  # --name wins over the config's name
    assert {p.name for p in run_dir.iterdir()} == {
        "metrics.jsonl",
        "summary.json",
        "curves.png",
        "config.yaml",
        "checkpoint",
        "tensorboard",
    }
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["name"] == "renamed" and summary["steps"] == 30
    assert "final eval: AUC" in out and "teacher oracle AUC" in out
    assert f"wrote {run_dir}/" in out and "checkpoint/" in out
    saved = (run_dir / "config.yaml").read_text()
    assert "lr: 0.05" in saved and "vocab_size: 200" in saved  # --set values were used


def test_progress_bar_fields_on_a_terminal(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    argv = train_argv(
        tmp_path / "runs", "--set", "train.progress=true", "--set", "train.save_checkpoint=false"
    )
    code, out, err = run(argv, capsys)
    assert code == 0
    assert "30/30" in err
    for field in ("loss=", "auc=", "sps=", "rows="):
        assert field in err, err
    assert "checkpoint/" not in out


@pytest.mark.parametrize("progress", ["true", "false"])
def test_plain_progress_lines_off_a_terminal(tmp_path: Path, progress: str,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """In a log file (stderr not a TTY), or with progress off, one line per log interval
    and no carriage-return redraws."""
    argv = train_argv(tmp_path / "runs", "--set", f"train.progress={progress}",
                      "--set", "train.save_checkpoint=false")
    code, out, err = run(argv, capsys)
    assert code == 0
    lines = [x for x in out.splitlines() if x.startswith("step ")]
    assert lines and lines[-1].startswith("step 30/30 (100%): loss "), out
    assert all(f in lines[-1] for f in ("auc ", "sps ", "rows ")), lines[-1]
    assert "\r" not in out + err


def test_resume_continues_the_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    runs = tmp_path / "runs"
    assert run(train_argv(runs), capsys)[0] == 0
    # --resume takes the run directory as well as its checkpoint/ directory
    code, _, err = run(
        train_argv(runs, "--set", "train.steps=40", "--resume", str(runs / "cli_run")), capsys
    )
    assert code == 0, err
    summary = json.loads((runs / "cli_run" / "summary.json").read_text())
    assert summary["steps"] == 40 and summary["samples"] == 40 * 64
    # without --name, --resume runs/cli_run continues that run (not the config's name)
    argv = [a for a in train_argv(runs, "--set", "train.steps=50", "--resume",
                                  str(runs / "cli_run")) if a not in ("--name", "cli_run")]
    code, out, err = run(argv, capsys)
    assert code == 0, err
    summary = json.loads((runs / "cli_run" / "summary.json").read_text())
    assert summary["steps"] == 50 and sorted(p.name for p in runs.iterdir()) == ["cli_run"]
    # a save interrupted mid-swap leaves only checkpoint.old: --resume runs/<name> finds it
    (runs / "cli_run" / "checkpoint").rename(runs / "cli_run" / "checkpoint.old")
    code, out, err = run(train_argv(runs, "--set", "train.steps=60", "--resume",
                                    str(runs / "cli_run")), capsys)
    assert code == 0, err
    summary = json.loads((runs / "cli_run" / "summary.json").read_text())
    assert summary["steps"] == 60 and summary["samples"] == 60 * 64


# 64 samples x 4 features: at most 256 unique keys a batch; vocab 4 x 200 = 800 keys.
TIERED = [
    "tables=[{name: sparse, dim: 16, device_rows: 256, host_rows: 320}]",
    "ssd.path=ssd",
    "ssd.block_cache_mb=8",
    "ssd.write_buffer_mb=4",
]


def with_sets(argv: list[str], sets: list[str]) -> list[str]:
    for item in sets:
        argv += ["--set", item]
    return argv


@pytest.mark.numerics
def test_tiered_train_and_eval(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    runs = tmp_path / "runs"
    argv = with_sets(train_argv(runs, name="tiered"), [*TIERED, "train.progress=true"])
    code, out, err = run(argv, capsys)
    assert code == 0, err
    assert "hit dev " in out  # the tiers' hit rates in the progress lines (not a terminal)
    assert "tiers sparse: device hit " in out and "ssd hit " in out
    run_dir = runs / "tiered"
    assert (run_dir / "ssd" / "rank0" / "CURRENT").is_file()  # relative ssd.path: in the run
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["tiers"]["sparse"]["ssd_rows_in"] > 0
    # eval rebuilds the tiers on a scratch DB of its own, removed afterwards
    code, out, err = run(["eval", "--run", str(run_dir)], capsys)
    assert code == 0, err
    # the same rows (read back from the SSD tier) through the same kernels: the same AUC
    assert eval_json(out)["auc"] == summary["final_eval"]["auc"]
    # the run's DB and its checkpoint's snapshot beside it; eval's scratch DB is gone
    assert sorted(p.name for p in (run_dir / "ssd").iterdir()) == ["rank0", "rank0.checkpoints"]


def test_a_batch_over_the_device_budget_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    small = "tables=[{name: sparse, dim: 16, device_rows: 100, host_rows: 320}]"
    code, _, err = run(with_sets(train_argv(tmp_path / "runs"), [*TIERED, small]), capsys)
    assert code == 2
    assert f"terarec: config error: {QUICKSTART}: tables[0].device_rows: table sparse: " in err
    assert "unique keys but the device tier holds 100 rows; give it at least" in err


@pytest.mark.parametrize(
    "sets, says",
    [
        (
            ["tables=[{name: sparse, dim: 16, device_rows: 64, host_rows: 128}]"],
            "tables[0].host_rows: table 'sparse' bounds its host tier",
        ),
        (["ssd.cache_mb=8"], "ssd.cache_mb: unknown key"),
        # the SSD store is opened before the model is built: still no directory left
        ([*TIERED, "model.bottom_mlp=[16,8]"], "model: bottom_mlp: the last size (8) must"),
        (["train.stepz=5"], "train.stepz: unknown key"),
        (["optimizer.sparse.lrr=0.1"], "optimizer.sparse.lrr: unknown key"),
        (["train.steps=abc"], "train.steps: expected an integer, got 'abc'"),
        (["train.progress=maybe"], "train.progress: expected true/false, got 'maybe'"),
        (["data.batch_size=[64]"], "data.batch_size: expected an integer, got [64]"),
        (["optimizer.dense.lr=-1"], "optimizer.dense.lr: must be > 0"),
        (["optimizer.sparse.kind=adamw"], "optimizer.sparse.kind: must be one of"),
        (["train.steps"], "--set 'train.steps': expected key=value"),
        (["model.bottom_mlp=[16,8]"], "model: bottom_mlp: the last size (8) must equal"),
        (["train.checkpoint_every=-10"], "train.checkpoint_every: must be >= 0, got -10"),
        (["train.checkpoint_every=ten"], "train.checkpoint_every: expected an integer, got 'ten'"),
    ],
)
def test_bad_config_exits_2_naming_key_and_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], sets: list[str], says: str
) -> None:
    argv = train_argv(tmp_path / "runs")
    for item in sets:
        argv += ["--set", item]
    code, out, err = run(argv, capsys)
    assert code == 2
    assert not (tmp_path / "runs").exists()
    assert err.startswith("terarec: config error: ")
    assert says in err, err
    if not says.startswith("--set"):
        assert str(QUICKSTART) in err, err


def test_bad_key_in_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        QUICKSTART.read_text().replace("  eval_every: 1000\n", "  eval_every: 1000\n  epoch: 2\n")
    )
    code, _, err = run(["train", "--config", str(bad)], capsys)
    assert code == 2
    assert f"{bad}: train.epoch: unknown key (allowed: " in err


@pytest.mark.parametrize(
    "argv_tail, says",
    [
        (["--name", "a/b"], "--name 'a/b': must be non-empty and contain no '/'"),
        (["--config", "nowhere.yaml"], "nowhere.yaml: cannot read config"),
    ],
)
def test_bad_arguments(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv_tail: list[str], says: str
) -> None:
    code, _, err = run(train_argv(tmp_path / "runs", *argv_tail), capsys)
    assert code == 2 and says in err, err


def test_resume_from_a_missing_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(train_argv(tmp_path / "runs", "--resume", str(tmp_path / "nope")), capsys)
    assert code == 1
    assert "CheckpointError" in err and "not a checkpoint (no manifest.json)" in err


def test_diverged_run_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(
        train_argv(tmp_path / "runs", "--set", "optimizer.dense={kind: sgd, lr: 1.0e+30}"), capsys
    )
    assert code == 1
    assert "TrainingDiverged: loss is" in err and "optimizer.dense.lr (1e+30)" in err
    assert "No checkpoint of this run was saved before the failure" in err


# ---------------------------------------------------------------------------- eval


def eval_json(out: str) -> dict[str, Any]:
    return json.loads(out)


@pytest.mark.numerics
@pytest.mark.parametrize("where", ["run", "checkpoint"])
def test_eval_prints_the_metrics(
    trained_run: Path, capsys: pytest.CaptureFixture[str], where: str
) -> None:
    target = trained_run if where == "run" else trained_run / "checkpoint"
    code, out, err = run(["eval", "--run", str(target)], capsys)
    assert code == 0, err
    metrics = eval_json(out)
    summary = json.loads((trained_run / "summary.json").read_text())
    assert metrics["step"] == 30
    assert {"auc", "ne", "logloss", "calibration", "ctr", "samples", "oracle_auc"} <= set(metrics)
    # the checkpoint is the model that was evaluated at the end of training: the same
    # weights, batches and kernels give the same metrics, bit for bit
    for key in ("auc", "logloss", "ne", "oracle_auc"):
        assert metrics[key] == summary["final_eval"][key], key


def test_eval_of_a_corrupted_checkpoint(
    trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    copy = Path(shutil.copytree(trained_run / "checkpoint", tmp_path / "ckpt"))
    data = bytearray((copy / "dense.pt").read_bytes())
    data[100] ^= 0xFF
    (copy / "dense.pt").write_bytes(bytes(data))
    code, out, err = run(["eval", "--run", str(copy)], capsys)
    assert code == 1 and out == ""
    assert f"{copy / 'dense.pt'}: sha256 does not match the manifest" in err


def test_eval_errors(tmp_path: Path, trained_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(["eval", "--run", str(tmp_path / "missing")], capsys)
    assert code == 1 and "not a checkpoint (no manifest.json)" in err
    code, _, err = run(["eval", "--run", str(trained_run), "--data", "x.tsv"], capsys)
    assert code == 2 and "--data: the run trained on synthetic data" in err


# ------------------------------------------------------------------ console script


def test_console_script_help() -> None:
    script = Path(sys.executable).parent / "terarec"
    if not script.exists():
        pytest.skip(f"{script} is not installed (pip install -e .)")
    res = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "usage: terarec" in res.stdout and "train" in res.stdout and "eval" in res.stdout
    res = subprocess.run(
        [str(script), "train", "--help"], capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0 and "--resume" in res.stdout and "--set KEY=VALUE" in res.stdout
    res = subprocess.run([str(script)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "required" in res.stderr


def test_resume_auto(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--resume auto``: the run's newest checkpoint that verifies, else a fresh start."""
    runs = tmp_path / "runs"
    code, out, err = run(train_argv(runs, "--resume", "auto"), capsys)  # nothing yet
    assert code == 0, err
    assert "starting fresh" in out
    code, out, err = run(train_argv(runs, "--set", "train.steps=40", "--resume", "auto"), capsys)
    assert code == 0, err
    assert str(runs / "cli_run" / "checkpoint") in out
    summary = json.loads((runs / "cli_run" / "summary.json").read_text())
    assert summary["steps"] == 40 and summary["samples"] == 40 * 64  # continued, not redone
    dense = runs / "cli_run" / "checkpoint" / "dense.pt"
    data = bytearray(dense.read_bytes())
    data[len(data) // 2] ^= 0xFF
    dense.write_bytes(bytes(data))  # one byte flipped: skipped
    code, out, err = run(train_argv(runs, "--set", "train.steps=10", "--resume", "auto"), capsys)
    assert code == 0, err
    assert "starting fresh" in out  # the damaged checkpoint was not taken
    assert json.loads((runs / "cli_run" / "summary.json").read_text())["steps"] == 10


def test_resume_auto_takes_a_delta_and_eval_reads_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A run whose newest checkpoint is a delta: ``--resume auto`` and ``--resume runs/x``
    continue from it, ``terarec eval`` reads it (its chain) like any checkpoint."""
    runs = tmp_path / "runs"
    deltas = ["--set", "train.delta_every=4", "--set", "train.keep_checkpoints=2"]
    code, _, err = run(train_argv(runs, "--set", "train.steps=9", *deltas), capsys)
    assert code == 0, err
    run_dir = runs / "cli_run"
    shutil.rmtree(run_dir / "checkpoint")  # as if killed after the delta of step 8
    code, out, err = run(["eval", "--run", str(run_dir)], capsys)
    assert code == 0, err
    code, out, err = run(train_argv(runs, "--set", "train.steps=12", "--resume", "auto",
                                    *deltas), capsys)
    assert code == 0, err
    assert str(run_dir / "deltas" / "step8") in out
    assert json.loads((run_dir / "summary.json").read_text())["samples"] == 12 * 64


@pytest.mark.parametrize("module, prog", [("terarec.cli", "terarec"),
                                          ("terarec.launch.cli", "terarec-launch"),
                                          ("terarec.topology.cli", "terarec-topo")])
def test_version(module: str, prog: str) -> None:
    import terarec

    out = subprocess.run([sys.executable, "-m", module, "--version"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == f"{prog} {terarec.__version__}"


def test_no_third_party_warning_noise(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "terarec.cli", "train", "--config",
                          "configs/quickstart.yaml", "--set", "train.steps=2",
                          "--set", f"train.runs_dir={tmp_path}", "--set", "train.progress=false",
                          "--set", "data.synthetic.eval_samples=512"],
                         capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr[-2000:]
    assert "is_fx_tracing" not in out.stderr and "Warning" not in out.stderr, out.stderr


def test_readme_commands_from_another_directory(tmp_path: Path) -> None:
    """The README's train / export / score chain run from outside the repository with
    the paths given from there: the run lands under the current directory (no stray
    paths into the repository), no warnings, and a relative ``--set data.path`` is
    recorded absolute so the run evaluates from anywhere."""
    base = [sys.executable, "-m", "terarec.cli"]
    small = ["data.batch_size=64", "data.synthetic.vocab_size=200",
             "data.synthetic.eval_samples=512", "train.steps=5", "train.eval_every=0",
             "train.threads=1", "train.progress=false"]  # the quickstart's features kept
    shrink = [a for item in small for a in ("--set", item)]
    env_cwd = tmp_path / "work"
    env_cwd.mkdir()

    def sh(*args: str, cwd: Path = env_cwd) -> str:
        out = subprocess.run([*base, *args], capture_output=True, text=True, timeout=300,
                             cwd=cwd)
        assert out.returncode == 0, out.stderr[-2000:]
        assert "Warning" not in out.stderr and "is_fx_tracing" not in out.stderr, out.stderr
        return out.stdout

    sh("train", "--config", str(QUICKSTART), *shrink)
    run_dir = env_cwd / "runs" / "quickstart"
    assert (run_dir / "summary.json").exists()
    sh("export", "--run", "runs/quickstart", "--out", "runs/quickstart/bundle")
    out = sh("score", "--bundle", "runs/quickstart/bundle", "--request",
             str(REPO / "examples" / "quickstart_request.json"))
    assert "scored 10 candidates" in out
    # a data file given relative to the current directory is recorded absolute
    tsv = write_criteo(env_cwd / "d.tsv", 600, seed=0)
    sh("train", "--config", str(REPO / "configs" / "criteo.yaml"), "--set", "data.path=d.tsv",
       "--set", "train.steps=2", "--set", "train.progress=false", "--set", "name=c",
       "--set", "train.eval_every=0")
    saved = (env_cwd / "runs" / "c" / "config.yaml").read_text()
    assert str(tsv) in saved
    sh("eval", "--run", str(env_cwd / "runs" / "c"), cwd=tmp_path)
