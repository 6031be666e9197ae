"""benchmarks/gpu_check.py in its CPU mode: the GPU check's code runs in CI, so it does not
rot between the rare runs on a GPU (tiny sizes, Triton interpreted)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_cpu_mode_writes_every_section(tmp_path):
    out = tmp_path / "check"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--cpu",
                           "--out", str(out)], capture_output=True, text=True, timeout=300,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "gpu_check.json").read_text())
    assert result["passed"] is True
    assert result["environment"]["gpu_figures"] is False
    assert "not GPU figures" in (out / "gpu_check.md").read_text()
    sections = result["sections"]
    assert set(sections) == {"tests", "correctness", "op_speed", "steps", "profile"}
    assert all("error" not in s for s in sections.values()), \
        {k: s.get("error") for k, s in sections.items()}
    cases = sections["correctness"]["cases"]
    assert {c["dtype"] for c in cases} == {"float32", "bfloat16"}
    assert all(c["passed"] for c in cases)
    ops = {r["op"] for r in sections["op_speed"]["rows"] if "ms_fwd_bwd" in r}
    assert {"triton", "eager_reference", "gather_bmm"} <= ops
    assert any(op.startswith("compiled_reference") for op in ops)
    rows = sections["steps"]["rows"]
    assert not [r for r in rows if "error" in r], [r for r in rows if "error" in r]
    methods = {(r["method"], r["precision"]) for r in rows}
    for m in ("mtl", "maml (vmapped)", "maml (per-task loop)", "fomaml", "anil", "r2d2",
              "protonet"):
        assert {(m, "fp32"), (m, "bf16")} <= methods
    assert all(r["flops"] > 0 and r["seconds"] > 0 for r in rows)
    for method in ("mtl", "maml"):
        trace = json.loads((out / f"trace_{method}.json").read_text())
        assert trace["traceEvents"]
