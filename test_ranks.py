"""Tests of one job in several processes (issue #12, ranks.py): `torchrun --nproc_per_node 2` on the
CPU (gloo) runs the phase loop on tiny data as one process would, every process holds the same
memory, only the first writes, and a process that dies or hangs ends the job with an error line.
Each run is a subprocess of a small driver (WORKER below: tiny_train_cfg, spies, a planted failure).
Run: python -m pytest -q test_ranks.py"""
import json
import os
import re
import subprocess
import sys
import time

import pytest
import torch

import data as D
import ranks
from test_exmask import tiny_train_cfg

torch.set_num_threads(2)

HERE = os.path.dirname(os.path.abspath(__file__))

# The driver each process runs: train(tiny_train_cfg(...)) with spies that write, per process, a hash
# of the whole memory after every phase and every file written; rank 0 also keeps the summed gradient
# of every step. FAIL ("exit" or "hang") makes rank 1 exit or hang when phase 2 is measured.
WORKER = """
import hashlib, json, os, sys, time
sys.path.insert(0, sys.argv[1])
from pathlib import Path
import torch
import data as D
import ranks
import train as T
from memory import Memory
from test_exmask import tiny_train_cfg

out, fail, kw = sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
rank = os.environ.get("RANK", "0")
os.makedirs(out, exist_ok=True)

def log(name, line):
    with open(os.path.join(out, f"{name}-rank{rank}.txt"), "a") as f:
        f.write(line + "\\n")

real_add, real_write, real_reduce, real_eval = Memory.add, D.write_atomic, ranks.all_reduce_grads, T.evaluate
grads = []

def add(self, cands):
    real_add(self, cands)
    h = hashlib.sha256()
    for k, v in sorted(self.state_dict().items()):
        h.update(k.encode() + (v.numpy().tobytes() if torch.is_tensor(v) else repr(v).encode()))
    log("memory", h.hexdigest())

def write_atomic(path, write):
    log("writes", os.path.relpath(path, out))
    real_write(path, write)

def all_reduce_grads(params):
    real_reduce(params)
    grads.append([None if p.grad is None else p.grad.clone() for p in params])

def evaluate(model, data, phase_cls, t, *a, **k):
    if t == 1 and rank == "1" and fail == "exit":
        os._exit(3)
    if t == 1 and rank == "1" and fail == "hang":
        time.sleep(600)
    return real_eval(model, data, phase_cls, t, *a, **k)

Memory.add, D.write_atomic, ranks.all_reduce_grads, T.evaluate = add, write_atomic, all_reduce_grads, evaluate
kw["synth"] = D.SynthConfig(**kw["synth"])
T.train(tiny_train_cfg(Path(out), **kw))
if rank == "0":
    torch.save(grads, os.path.join(out, "grads.pt"))
"""

# exmask with everything that runs in a step (new samples, new samples masked, mixup replay) and an
# odd batch, so that the processes' shares of a step differ (4 and 3 rows)
SETTINGS = {"methods": "exmask", "phases": 2, "epochs": 2, "batch_size": 7, "mask_new": 0.5, "recombine": 0.5,
            "token_mixup": 0.5, "keep_text": 0.8, "synth": {"n_classes": 4, "train_per_class": 8, "test_per_class": 4}}


def torchrun(tmp, out: str, fail: str = "", **kw) -> tuple[subprocess.CompletedProcess, float]:
    """The driver under `torchrun --standalone --nproc_per_node 2` (a free port: runs never collide)."""
    os.makedirs(tmp, exist_ok=True)
    (tmp / "worker.py").write_text(WORKER)
    args = dict(SETTINGS, cache_dir=str(tmp / "cache"), **kw)
    t0 = time.time()
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(tmp / "worker.py"), HERE, out, fail, json.dumps(args)],
                       env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=240,
                       check=False)
    return p, time.time() - t0


@pytest.fixture(scope="module")
def two(tmp_path_factory) -> dict:
    """One uninterrupted 2-process run; the first process pretrains the towers into the cache (the
    other waits, then reads them)."""
    tmp = tmp_path_factory.mktemp("ranks")
    out = str(tmp / "two")
    p, _ = torchrun(tmp, out)
    assert p.returncode == 0, p.stderr[-3000:]
    return {"tmp": tmp, "out": out, "results": read_json(os.path.join(out, "run", "results.json"))}


def read_json(path: str):
    with open(path) as f:
        return json.load(f)


def lines(path: str) -> list[str]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return f.read().split()


def test_two_processes_train_as_one_process_with_the_same_global_batch(two, monkeypatch):
    """The 2-process run against a 1-process run of the same settings (batch 7 = the global batch).
    Measured: the summed gradient of every step of phase 1 (before the weights drift apart) agrees
    with one process's to 1e-5 of each tensor's largest entry: the same sum in another order (two
    partial sums), float32 rounding, measured at 1e-6 or less. The weights then drift: Adam divides
    each gradient by its running size, so a rounding-level gradient can move a weight by up to lr a
    step, and a test prediction within that of a tie may flip. So each accuracy entry may differ by at
    most one test sample (here they are equal)."""
    import train as T
    steps = []

    def spy(params):
        steps.append([None if p.grad is None else p.grad.clone() for p in params])

    monkeypatch.setattr(ranks, "all_reduce_grads", spy)
    cfg = tiny_train_cfg(two["tmp"], **dict(SETTINGS, synth=D.SynthConfig(**SETTINGS["synth"])),
                         cache_dir=str(two["tmp"] / "cache"), out=str(two["tmp"] / "one"))
    one, got = T.train(cfg)[0], two["results"]
    assert (one["world_size"], got["world_size"]) == (1, 2) and one["global_batch_size"] == got["global_batch_size"] == 7
    theirs = torch.load(os.path.join(two["out"], "grads.pt"), weights_only=True)
    assert len(theirs) == len(steps) == 2 * 3 + 2 * 3               # per phase: 2 epochs of 16 new samples by 7
    for mine, other in zip(steps[:6], theirs[:6]):
        for a, b in zip(mine, other):
            assert (a is None) == (b is None)
            if a is not None:
                assert (a - b).abs().max() <= 1e-5 * a.abs().max()
    for j, (r1, r2) in enumerate(zip(one["accuracy_matrix"], got["accuracy_matrix"])):
        sizes = [SETTINGS["synth"]["test_per_class"] * 2] * len(r1)          # 2 classes a phase
        assert all(abs(a - b) <= 100 / n + 1e-9 for a, b, n in zip(r1, r2, sizes)), (j, r1, r2)


def test_every_process_holds_the_same_memory_and_only_the_first_writes(two):
    first, second = (lines(os.path.join(two["out"], f"memory-rank{r}.txt")) for r in (0, 1))
    assert len(first) == SETTINGS["phases"] and first == second              # byte for byte, every phase
    writes = lines(os.path.join(two["out"], "writes-rank0.txt"))
    assert not lines(os.path.join(two["out"], "writes-rank1.txt"))
    assert {"run/results.json", "run/exmask/checkpoint.pt", "run/exmask/model.pt", "run/accuracy.png"} <= set(writes)


def test_a_process_that_dies_ends_the_job_and_resume_finishes_it(two):
    """Rank 1 exits while phase 2 is measured: torchrun ends the job at once and names it; --resume
    (every process reads the checkpoint the first one wrote after phase 1) finishes the same run."""
    out = str(two["tmp"] / "died")
    p, secs = torchrun(two["tmp"], out, "exit")
    assert p.returncode != 0 and secs < 300
    assert re.search(r"rank\s*: 1\b", p.stderr) and re.search(r"exitcode\s*: 3\b", p.stderr), p.stderr[-3000:]
    assert len(torch.load(os.path.join(out, "run", "exmask", "checkpoint.pt"), weights_only=True)["R"]) == 1
    p, _ = torchrun(two["tmp"], out, resume=True)
    assert p.returncode == 0, p.stderr[-3000:]
    got = read_json(os.path.join(out, "run", "results.json"))
    assert got["accuracy_matrix"] == two["results"]["accuracy_matrix"] and got["memory"] == two["results"]["memory"]


def test_a_process_that_hangs_ends_the_job_within_the_timeout(two):
    """Rank 1 hangs while phase 2 is measured: rank 0 gives up after --dist-timeout (10 s) with one
    error line, instead of waiting for ever; torchrun then stops rank 1."""
    p, secs = torchrun(two["tmp"], str(two["tmp"] / "hung"), "hang", dist_timeout=10)
    assert p.returncode != 0 and secs < 300
    err = [ln for ln in p.stderr.splitlines() if ln.startswith("error: ")]
    assert len(err) == 1 and "process 0 of 2" in err[0] and "stopped answering" in err[0], p.stderr[-3000:]


def test_one_process_needs_no_process_group(monkeypatch):
    """Without torchrun's variables: one process, every helper hands back its input."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert not ranks.launched() and ranks.setup("cpu", 5) == "cpu" and ranks.world_size() == 1 and ranks.is_main()
    x = torch.arange(5)
    assert ranks.shard(x) is x and ranks.sum_ints([3, 4]) == [3, 4] and ranks.broadcast({"a": x})["a"] is x
    monkeypatch.setenv("WORLD_SIZE", "1")                                   # torchrun --nproc_per_node 1
    assert not ranks.launched()


def test_dist_timeout_option(monkeypatch):
    import train as T
    with pytest.raises(ValueError, match="dist_timeout"):
        T.Config(dist_timeout=0)
    seen = []
    monkeypatch.setattr(T, "train", seen.append)
    T.main(["--dist-timeout", "7"])
    assert seen[0].dist_timeout == 7
