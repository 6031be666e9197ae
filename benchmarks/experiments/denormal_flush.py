"""Do subnormal weights slow a training step on a CPU, and does flushing them help?

Weight decay drives weights of unused channels towards zero, through the subnormal
floats, where x86 arithmetic is about 10x slower: the README's background-set command with
``--weight-decay 5e-4`` went from 36 s to 292 s an epoch over 30 minutes (its checkpoint
then had 5% of a conv layer's weights subnormal). This times one Conv-4 training step
(forward and backward, 64 images of 32x32) in fresh processes, alternating, at 1 and 2
threads: weights as initialized, or with 5% of each hidden conv layer's weights set to
subnormal values; with ``torch.set_flush_denormal(True)`` called at the start of the
process (as ``fastmtl.cli.main`` does, before torch's thread pool starts) or not.

    python benchmarks/experiments/denormal_flush.py   # -> results/denormal_flush_cpu.json
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: _results
from _results import write_result  # noqa: E402

CHILD = r"""
import sys, time, json, torch
flush, threads, subnormal = sys.argv[1] == "1", int(sys.argv[2]), sys.argv[3] == "1"
if flush:
    torch.set_flush_denormal(True)
torch.set_num_threads(threads)
import fastmtl
torch.manual_seed(0)
net = fastmtl.models.conv4(in_channels=1)
if subnormal:
    g = torch.Generator().manual_seed(1)
    for block in list(net.blocks)[1:]:
        w = block[0].weight.data
        hit = torch.rand(w.shape, generator=g) < 0.05
        w[hit] = 1e-40 * torch.sign(torch.randn(int(hit.sum()), generator=g))
x = torch.randn(64, 1, 32, 32, generator=torch.Generator().manual_seed(2))
def step():
    net.zero_grad(set_to_none=True)
    net(x).square().mean().backward()
for _ in range(3):
    step()
times = []
for _ in range(15):
    t = time.perf_counter(); step(); times.append(time.perf_counter() - t)
print(json.dumps(sorted(times)[len(times) // 2]))
"""


def run(flush: bool, threads: int, subnormal: bool) -> float:
    out = subprocess.run([sys.executable, "-c", CHILD, str(int(flush)), str(threads),
                          str(int(subnormal))], capture_output=True, text=True, check=True)
    return float(json.loads(out.stdout.strip().splitlines()[-1]))


def main() -> None:
    rows = []
    for threads in (1, 2):
        for subnormal in (False, True):
            times: dict[bool, list[float]] = {False: [], True: []}
            for _ in range(3):                    # alternating, fresh processes
                for flush in (False, True):
                    times[flush].append(run(flush, threads, subnormal))
            off, on = (statistics.median(times[f]) for f in (False, True))
            rows.append({"threads": threads, "subnormal_weights": subnormal,
                         "step_ms_no_flush": round(1e3 * off, 2),
                         "step_ms_flush": round(1e3 * on, 2),
                         "no_flush_over_flush": round(off / on, 2)})
            print(rows[-1], flush=True)
    write_result("denormal_flush_cpu", {
        "what": "one Conv-4 training step (64 images, 32x32), median of 15 steps a process, "
                "median of 3 fresh processes a cell, flush and no flush alternating",
        "subnormal": "5% of each hidden conv layer's weights set to +-1e-40",
        "rows": rows})


if __name__ == "__main__":
    main()
