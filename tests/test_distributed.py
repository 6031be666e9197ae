"""Data-parallel training with gloo on the CPU: 2 ranks equal one process, and a dead rank
is reported, not waited for. Each test spawns its own processes on a loopback port and
reaps them, whatever happens."""
from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import socket
import time
import traceback

import pytest
import torch
import torch.multiprocessing as mp

import fastmtl
from fastmtl import distributed as fdist
from fastmtl.data import SyntheticGlyphs
from fastmtl.gbml import MAML, MAMLConfig
from fastmtl.models import conv4

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(),
                                reason="torch.distributed is not available")

# Small enough for a few seconds a run on a 2-core machine, big enough to mean something:
# 12 training classes, 4 tasks a step (2 per rank), BatchNorm in the backbone.
MTL_CFG = fastmtl.MTLConfig(n_way=3, images_per_class=4, tasks_per_step=4, tasks_per_epoch=8,
                            epochs=3, head="cosine", scale=10.0, augment=True, chunking="task",
                            val_ways=3, val_episodes=12, val_queries=3, seed=3)
MAML_CFG = MAMLConfig(n_way=3, k_shot=1, n_query=2, tasks_per_step=4, chunk_size=1,
                      tasks_per_epoch=8, epochs=2, inner_steps=1, inner_lr=0.4,
                      first_order=True, val_protocol="own", val_ways=3, val_episodes=10,
                      val_queries=2, seed=5)


def _data():
    full = SyntheticGlyphs(20, 8, seed=1)
    return (full.subset(range(0, 12), name="train"), full.subset(range(12, 16), name="val"),
            full.subset(range(16, 20), name="test"))


def _backbone(dtype=torch.float32):
    torch.manual_seed(0)
    return conv4(1, 8, 8).to(dtype)


def _train(kind: str, checkpoint_dir=None, resume=None, epochs=None, seed=None):
    """Train ``kind`` ("mtl" or "fomaml") in this process, distributed or not."""
    fdist.init_from_env()         # under torchrun: join the group (trainers never do)
    train, val, test = _data()
    if kind == "mtl":
        cfg = dataclasses.replace(MTL_CFG, checkpoint_dir=checkpoint_dir,
                                  epochs=epochs or MTL_CFG.epochs,
                                  seed=MTL_CFG.seed if seed is None else seed)
        # float64, as for MAML below: float32 rounding (channels-last convolutions) grows
        # past the tolerance through Adam in a few steps.
        trainer = fastmtl.MTLTrainer(_backbone(torch.float64), cfg, device="cpu")
        # One test resumes a checkpoint of another seed on purpose (only a real resume
        # ends where its run ends): that is a changed setting, allowed explicitly.
        trainer.fit(train, val, resume=resume, progress=False, allow_changed_settings=True)
        params = dict(trainer.backbone.named_parameters(), head=trainer.head)
        buffers = dict(trainer.backbone.named_buffers())
    else:
        cfg = dataclasses.replace(MAML_CFG, checkpoint_dir=checkpoint_dir,
                                  epochs=epochs or MAML_CFG.epochs)
        # float64: Adam divides each gradient entry by its own running size, so float32
        # summation-order noise in near-zero entries (one process sums the 4 tasks' chunks,
        # two ranks 2 + 2 then all-reduce) grows to ~1e-5 after a few steps; float64
        # shows the two computations are the same math.
        trainer = MAML(_backbone(torch.float64), cfg, device="cpu")
        trainer.fit(train, val, resume=resume, progress=False)
        params = dict(trainer.model.named_parameters())
        buffers = {}
    result = fastmtl.evaluate(trainer.backbone, test, n_way=3, k_shot=1, n_query=3,
                              episodes=25, chunk=4, seed=7, progress=False)
    return ({k: v.detach().clone() for k, v in params.items()},
            {k: v.clone() for k, v in buffers.items()}, trainer.history, result)


def _worker(rank, world, port, kind, out_dir, kill_at_step, checkpoint_dir, resume):
    # What torchrun sets; the trainer joins the group from these by itself.
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      FASTMTL_DIST_TIMEOUT="20")
    torch.set_num_threads(1)
    if kill_at_step is not None and rank == 1:
        opt_cls = torch.optim.RAdam if kind == "mtl" else torch.optim.Adam
        original, calls = opt_cls.step, [0]

        def step(self, *args, **kwargs):
            calls[0] += 1
            if calls[0] == kill_at_step:
                os.kill(os.getpid(), signal.SIGKILL)
            return original(self, *args, **kwargs)
        opt_cls.step = step
    try:
        out = _train(kind, checkpoint_dir, resume=resume)
        assert torch.distributed.is_initialized() and fdist.world_size() == world
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    except BaseException as exc:
        with open(os.path.join(out_dir, f"error{rank}.txt"), "w") as f:
            f.write(f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
        raise
    else:
        fdist.shutdown()
    finally:
        fdist.shutdown(sync=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(world, kind, out_dir, kill_at_step=None, checkpoint_dir=None, resume=None,
            timeout=45.0):
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, kind, str(out_dir), kill_at_step,
                                               checkpoint_dir, resume), daemon=True)
             for r in range(world)]
    t0 = time.monotonic()
    try:
        for p in procs:
            p.start()
        for p in procs:
            p.join(max(0.1, timeout - (time.monotonic() - t0)))
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        return [p.exitcode for p in procs], hung, time.monotonic() - t0
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join(5)


def _assert_same(a: dict, b: dict, what: str):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-5,
                                   msg=lambda m: f"{what} {k}: {m}")


def _assert_history_same(h1, h2):
    assert [r["epoch"] for r in h1] == [r["epoch"] for r in h2]
    for r1, r2 in zip(h1, h2):
        for key in ("train_loss", "train_acc", "val_acc", "val_ci95"):
            assert r1[key] == pytest.approx(r2[key], rel=1e-5, abs=1e-5), (key, r1, r2)


@pytest.mark.parametrize("kind", ["mtl", "fomaml"])
def test_two_ranks_equal_one_process(kind, tmp_path):
    codes, hung, seconds = _launch(2, kind, tmp_path)
    errors = {p.name: p.read_text() for p in tmp_path.glob("error*.txt")}
    assert not hung and codes == [0, 0], (codes, hung, errors)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    single = _train(kind)
    for params, buffers, history, result in ranks:
        # Both ranks hold the single-process parameters (and BatchNorm running statistics).
        _assert_same(params, single[0], "parameter")
        _assert_same(buffers, single[1], "buffer")
        _assert_history_same(history, single[2])
        # Evaluation split across the ranks gathers into the single-process episodes.
        assert result["accuracies"] == pytest.approx(single[3]["accuracies"])
        assert result["mean"] == pytest.approx(single[3]["mean"])
        assert result["ci95"] == pytest.approx(single[3]["ci95"])
    # The training really moved the weights (the comparison is not between two inits).
    torch.manual_seed(0)
    init = dict(conv4(1, 8, 8).named_parameters())
    prefix = "" if kind == "mtl" else "backbone."
    moved = max((single[0][prefix + k].float() - v).abs().max().item() for k, v in init.items())
    assert moved > 1e-3
    assert seconds < 60


def test_killed_rank_fails_fast_and_run_resumes(tmp_path):
    ck = tmp_path / "ck"
    steps_per_epoch = MTL_CFG.tasks_per_epoch // MTL_CFG.tasks_per_step
    # Rank 1 is killed (SIGKILL) at its first optimizer step of epoch 3, after rank 0 has
    # written the checkpoint of epoch 2.
    codes, hung, seconds = _launch(2, "mtl", tmp_path, kill_at_step=2 * steps_per_epoch + 1,
                                   checkpoint_dir=str(ck))
    assert not hung, f"ranks {hung} still running after the timeout"
    assert codes[1] == -signal.SIGKILL
    assert codes[0] not in (0, None)
    message = (tmp_path / "error0.txt").read_text()
    first = message.splitlines()[0]
    assert re.match(r"DistributedError: fastmtl rank 0 of 2: .* in mtl training \(epoch 3\) "
                    r"failed: another rank has died", first), first
    assert f"Resume from {ck / 'last.pt'}" in first
    assert not (tmp_path / "rank0.pt").exists()
    history = json.loads((ck / "history.json").read_text())
    assert [r["epoch"] for r in history] == [1, 2]
    # Resume the interrupted run in one process: it continues from epoch 3 and ends where an
    # uninterrupted run ends.
    resumed = _train("mtl", checkpoint_dir=str(ck), resume=str(ck / "last.pt"))
    assert [r["epoch"] for r in resumed[2]] == [1, 2, 3]
    single = _train("mtl")
    _assert_same(resumed[0], single[0], "parameter")
    _assert_same(resumed[1], single[1], "buffer")
    assert seconds < 60


def test_single_process_checkpoint_resumes_on_two_ranks(tmp_path):
    """Checkpoints do not depend on the world size: one process trains epoch 1 (with another
    seed, so that only a real resume can end where this run ends), two ranks resume from its
    last.pt and end exactly where a one-process resume of the same checkpoint ends."""
    ck = tmp_path / "ck"
    first = _train("mtl", checkpoint_dir=str(ck), epochs=1, seed=MTL_CFG.seed + 1)
    codes, hung, seconds = _launch(2, "mtl", tmp_path, resume=str(ck / "last.pt"))
    errors = {p.name: p.read_text() for p in tmp_path.glob("error*.txt")}
    assert not hung and codes == [0, 0], (codes, hung, errors)
    single = _train("mtl", resume=str(ck / "last.pt"))
    assert single[2][0] == first[2][0]  # epoch 1 comes from the checkpoint
    for r in range(2):
        params, buffers, history, _ = torch.load(tmp_path / f"rank{r}.pt", weights_only=True)
        assert [h["epoch"] for h in history] == [1, 2, 3]
        _assert_same(params, single[0], "parameter")
        _assert_same(buffers, single[1], "buffer")
        _assert_history_same(history, single[2])
    # A run that ignored the checkpoint would end elsewhere.
    fresh = _train("mtl")
    assert max((fresh[0][k] - single[0][k]).abs().max().item() for k in fresh[0]) > 1e-3
    assert seconds < 60


def test_world_size_must_divide_the_tasks(monkeypatch):
    monkeypatch.setattr(fdist, "world_size", lambda: 3)
    with pytest.raises(ValueError, match="tasks_per_step=4 must be divisible"):
        fdist.shard(4, "tasks_per_step")
    monkeypatch.setattr(fdist, "rank", lambda: 2)
    assert fdist.shard(6, "tasks_per_step") == (4, 2)


def test_chunks_cover_every_item_once(monkeypatch):
    for world in (1, 2, 3, 5):
        seen = []
        for r in range(world):
            monkeypatch.setattr(fdist, "world_size", lambda w=world: w)
            monkeypatch.setattr(fdist, "rank", lambda r=r: r)
            seen += [i for lo, n in fdist.chunks(23, 4) for i in range(lo, lo + n)]
        assert seen == list(range(23))


def test_no_launch_means_single_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert fdist.init_from_env() is False
    assert (fdist.rank(), fdist.world_size(), fdist.is_main()) == (0, 1, True)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ValueError, match="MASTER_ADDR is not set"):
        fdist.init_from_env()


def test_torchrun_cli_matches_one_process(tmp_path):
    """`torchrun --nproc_per_node=2 -m fastmtl train ...` = `fastmtl train ...`, end to end."""
    import subprocess
    import sys
    flags = ["train", "--recipe", "paper", "--data", "synthetic", "--n-way", "5",
             "--images-per-class", "4",
             "--tasks-per-step", "4", "--tasks-per-epoch", "8", "--epochs", "2",
             "--val-episodes", "10", "--eval-episodes", "30", "--shots", "1"]
    env = dict(os.environ, OMP_NUM_THREADS="1", FASTMTL_DIST_TIMEOUT="30")
    env.pop("PYTHONPATH", None)
    run = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}", "-m", "fastmtl"]
    two = subprocess.run(run + flags + ["--out", str(tmp_path / "two.json"),
                                        "--checkpoint-dir", str(tmp_path / "ck")],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=50)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("| 5-way 1-shot |") == 1        # rank 0 alone prints
    one = subprocess.run([sys.executable, "-m", "fastmtl"] + flags +
                         ["--out", str(tmp_path / "one.json")],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=50)
    assert one.returncode == 0, one.stderr[-3000:]
    a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("two", "one"))
    assert (a["world_size"], b["world_size"]) == (2, 1)
    _assert_history_same(a["history"], b["history"])
    assert a["results"][0]["mean"] == pytest.approx(b["results"][0]["mean"])
    assert a["results"][0]["ci95"] == pytest.approx(b["results"][0]["ci95"])
    assert (tmp_path / "ck" / "final.pt").exists() and (tmp_path / "ck" / "last.pt").exists()
