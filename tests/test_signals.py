"""Ctrl-C (SIGINT) during `fastmtl train`: stop after the step, say how to go on, resume exactly."""
from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time

FLAGS = ["train", "--recipe", "paper", "--data", "synthetic", "--n-way", "5",
         "--images-per-class", "4", "--tasks-per-step", "2", "--tasks-per-epoch", "80",
         "--epochs", "4", "--no-val", "--eval-episodes", "0", "--augment"]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("PYTHONPATH", None)
    return env


def test_sigint_saves_says_how_to_resume_and_the_resumed_run_ends_as_an_uninterrupted_one(
        tmp_path):
    ck = tmp_path / "ck"
    proc = subprocess.Popen([sys.executable, "-m", "fastmtl", *FLAGS, "--checkpoint-dir",
                             str(ck)], cwd=tmp_path, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (ck / "history.json").exists() and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)                      # into epoch 2
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    line = [ln for ln in err.strip().splitlines() if "interrupted" in ln]
    assert len(line) == 1, err
    assert "interrupted by SIGINT in epoch" in line[0] and "last.pt holds epoch" in line[0]
    saved = json.loads((ck / "history.json").read_text())[-1]["epoch"]
    assert f"holds epoch {saved}" in line[0] and saved < 4
    command = line[0].split("continue with: ", 1)[1]
    argv = shlex.split(command)
    assert argv[0] == "fastmtl" and argv[-2] == "--resume"
    resumed = subprocess.run([sys.executable, "-m", "fastmtl", *argv[1:]], cwd=tmp_path,
                             env=_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    full = subprocess.run([sys.executable, "-m", "fastmtl", *FLAGS, "--checkpoint-dir",
                           str(tmp_path / "full")], cwd=tmp_path, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert full.returncode == 0, full.stderr[-2000:]
    a = json.loads((ck / "history.json").read_text())
    b = json.loads((tmp_path / "full" / "history.json").read_text())
    assert [r["epoch"] for r in a] == [r["epoch"] for r in b] == [1, 2, 3, 4]
    assert [r["train_loss"] for r in a] == [r["train_loss"] for r in b]
