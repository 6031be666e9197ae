"""`fastmtl train --profile DIR`: a torch.profiler trace with every trainer's named phases."""
from __future__ import annotations

import json

import pytest

from fastmtl.cli import main

PHASES = {"mtl": {"data", "backbone", "heads", "backward", "optimizer"},
          "maml": {"data", "inner_loop", "outer_loss", "outer_backward", "optimizer"},
          "anil": {"data", "backbone", "inner_loop", "outer_loss", "outer_backward", "optimizer"},
          "protonet": {"data", "backbone", "outer_backward", "optimizer"}}


@pytest.mark.parametrize("method", list(PHASES))
def test_profile_trace_holds_the_named_phases(tmp_path, method):
    flags = ["train", "--method", method, "--data", "synthetic", "--epochs", "1",
             "--no-val", "--eval-episodes", "0", "--profile", str(tmp_path / "prof"),
             "--profile-warmup", "1", "--profile-steps", "1"]
    if method == "mtl":
        flags += ["--recipe", "paper", "--augment", "--tasks-per-epoch", "6",
                  "--tasks-per-step", "2", "--images-per-class", "4"]
    else:
        flags += ["--tasks-per-epoch", "6", "--tasks-per-step", "2", "--n-way", "5"]
    assert main(flags) == 0
    trace = json.loads((tmp_path / "prof" / "trace.json").read_text())
    names = {e.get("name") for e in trace["traceEvents"]}
    assert PHASES[method] <= names, PHASES[method] - names
    top = (tmp_path / "prof" / "top_ops.txt").read_text()
    assert "Self CPU" in top
