"""The GPU check: everything fastmtl's GPU path must show, in one command.

    python benchmarks/gpu_check.py --out DIR            # CUDA if present, else CPU mode
    python benchmarks/gpu_check.py --out DIR --cpu      # CPU mode on any machine (CI)

Runs from the source tree on the machine's own PyTorch (nothing is installed). Sections,
each timed and each recorded even when it fails:

0. ``build`` (on CUDA): the C++ extensions built in place; where that fails, the
   fallbacks run and the check goes on.
1. ``tests``: the CUDA tests (``pytest -m cuda``) and the ops/adapt tests on the device.
2. ``correctness``: the Triton multi-head CE against the float64 reference, forward and
   backward, float32 and bfloat16, ragged tasks, over d and n.
3. ``op_speed``: the Triton op against the eager reference, the same reference under
   ``torch.compile`` and the best plain formulation (gather + bmm), at the paper's shapes
   (640-d features, 64 and 351 class rows, 5-way tasks of 40 images a class, 2..16 tasks),
   with peak memory and the distance from the memory floor (features and head rows read
   once, their gradients written once, at the device-to-device copy bandwidth measured
   in the same run).
4. ``steps``: one training step of MTL and of every GBML method (MAML with 5 inner steps,
   FO-MAML, ANIL, R2D2, ProtoNet) on ResNet-12 at 84x84, the same images per step, fp32
   and bf16, seconds, FLOPs (``torch.utils.flop_counter``), peak memory and the ratio to
   MTL; vmapped MAML against its per-task loop.
5. ``profile``: a ``torch.profiler`` trace of a few MTL and MAML steps after warm-up.

Writes ``gpu_check.json`` (every figure, with the device, driver and torch/triton
versions), ``gpu_check.md`` and the traces into ``--out``; exits 1 when a correctness
check (section 1 or 2) fails. Without CUDA (or with ``--cpu``) the same code runs at tiny
sizes on the CPU, Triton under its interpreter and ``torch.compile`` with the ``eager``
backend; its figures are then marked as not GPU figures.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _want_cuda(argv) -> bool:
    import torch
    return torch.cuda.is_available() and "--cpu" not in argv


# Triton picks interpreted or compiled kernels when they are defined: decide first.
if __name__ == "__main__" and not _want_cuda(sys.argv):
    os.environ["TRITON_INTERPRET"] = "1"
# An installed fastmtl (CI) is used as installed; without one (a GPU machine with nothing
# installed) the source tree is imported, its Triton sources mounted as fastmtl.kernels.
import importlib.util

_installed = importlib.util.find_spec("fastmtl") is not None
if not _installed:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

# Sizes of each section: the paper's on a GPU, tiny ones on the CPU.
GPU_SIZES = dict(check_d=(64, 640), check_n=(5, 20, 64), check_tasks=6, check_per_task=(8, 40),
                 speed_d=640, speed_C=(64, 351), speed_tasks=(2, 4, 8, 16), speed_per_class=40,
                 speed_rounds=20, backbone="resnet12", image=84, channels=3,
                 step_images=200, maml_inner_steps=5, step_rounds=5, profile_steps=3,
                 train_classes=64, train_per_class=20)
CPU_SIZES = dict(check_d=(64,), check_n=(5, 20), check_tasks=3, check_per_task=(2, 5),
                 speed_d=64, speed_C=(64,), speed_tasks=(2,), speed_per_class=4,
                 speed_rounds=2, backbone="conv4", image=28, channels=1,
                 step_images=40, maml_inner_steps=2, step_rounds=2, profile_steps=1,
                 train_classes=24, train_per_class=6)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _reset_peak(device):
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _peak(device):
    return torch.cuda.max_memory_allocated() if device.type == "cuda" else None


def _median_seconds(fn, device, rounds, warmup=1):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(rounds):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def environment(device) -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__,
            "platform": platform.platform(), "device": str(device),
            "gpu_figures": device.type == "cuda"}
    try:
        import triton
        info["triton"] = triton.__version__
    except Exception as exc:  # noqa: BLE001
        info["triton"] = f"not importable: {exc}"
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1),
                    cuda=torch.version.cuda)
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version",
                                  "--format=csv,noheader"], capture_output=True, text=True,
                                 timeout=30)
            info["driver"] = out.stdout.strip()
        except Exception as exc:  # noqa: BLE001
            info["driver"] = f"unknown: {exc}"
    else:
        from fastmtl._env import machine_info
        info["cpu"] = machine_info()["cpu"]
        info["note"] = "CPU mode: tiny sizes, Triton interpreted; these are not GPU figures"
    from fastmtl.ops import available_backends
    info["backends"] = list(available_backends())
    return info


# -- 0. the C++ extensions, built in place ---------------------------------------------------
def section_build(timeout) -> dict:
    """``python setup.py build_ext --inplace`` on the machine's own torch and pybind11;
    where it fails the pure-Python/PyTorch fallbacks run (recorded, not a failure)."""
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=ROOT,
                              capture_output=True, text=True, timeout=timeout)
        code, tail = proc.returncode, (proc.stdout + proc.stderr)[-2000:]
    except (subprocess.TimeoutExpired, OSError) as exc:
        code, tail = -1, repr(exc)[:2000]
    probe = subprocess.run([sys.executable, "-c", "import fastmtl.ops as o, fastmtl.sampling as s;"
                            "print(','.join(o.available_backends()), s.backend())"],
                           cwd=ROOT, capture_output=True, text=True, timeout=120)
    return {"exit_code": code, "seconds": round(time.perf_counter() - t0, 1),
            "backends_after": probe.stdout.strip() or probe.stderr[-500:],
            "tail": tail if code else ""}


# -- 1. tests --------------------------------------------------------------------------------
def section_tests(device, timeout) -> dict:
    runs = [["-m", "cuda", "tests"]]
    if device.type == "cuda":           # on a GPU, the op and adapt tests use the device
        runs.append(["tests/test_ops.py", "tests/test_adapt.py"])
    else:                               # CPU mode: the CUDA cases collect and skip
        runs = [["-m", "cuda", "tests/test_ops.py", "tests/test_adapt.py"]]
    out = []
    for args in runs:
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o",
               "addopts=", *args]
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                                  timeout=timeout)
            code, tail = proc.returncode, (proc.stdout + proc.stderr)[-3000:]
        except subprocess.TimeoutExpired as exc:
            code, tail = -1, f"timed out after {timeout} s: {str(exc.stdout)[-2000:]}"
        # pytest exit 5: nothing collected (no case matched), not a failure.
        out.append({"command": " ".join(cmd[2:]), "exit_code": code, "passed": code in (0, 5),
                    "seconds": round(time.perf_counter() - t0, 1),
                    "summary": tail.strip().splitlines()[-1] if tail.strip() else "",
                    "tail": tail if code not in (0, 5) else ""})
    return {"runs": out, "passed": all(r["passed"] for r in out)}


# -- 2. correctness --------------------------------------------------------------------------
def _ragged_case(N_per, d, n, T, C, seed, device):
    g = torch.Generator().manual_seed(seed)
    lo, hi = N_per
    sizes = torch.randint(lo, hi + 1, (T,), generator=g)
    st = torch.repeat_interleave(torch.arange(T), sizes)
    st = st[torch.randperm(st.numel(), generator=g)]
    N = st.numel()
    z = torch.randn(N, d, generator=g, dtype=torch.float64)
    w = torch.randn(C, d, generator=g, dtype=torch.float64) / d ** 0.5
    tc = torch.stack([torch.randperm(C, generator=g)[:n] for _ in range(T)])
    y = torch.randint(0, n, (N,), generator=g)
    return [t.to(device) for t in (z, w, tc, st, y)]


def _loss_and_grads(fn, z, w, tc, st, y, **kw):
    z, w = z.detach().requires_grad_(), w.detach().requires_grad_()
    loss = fn(z, w, tc, st, y, reduction="none", **kw)
    g = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype, device=loss.device)
    loss.backward(g)
    return loss.detach(), z.grad, w.grad


def section_correctness(device, sizes) -> dict:
    from fastmtl.ops import available_backends, multihead_ce, multihead_ce_reference
    if "triton" not in available_backends():
        return {"passed": False, "error": "the triton backend is not available here",
                "cases": []}
    tol = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}
    cases, seed = [], 0
    for dtype in (torch.float32, torch.bfloat16):
        for d in sizes["check_d"]:
            for n in sizes["check_n"]:
                seed += 1
                C = max(2 * n, 64)
                z, w, tc, st, y = _ragged_case(sizes["check_per_task"], d, n,
                                               sizes["check_tasks"], C, seed, device)
                z, w = z.to(dtype), w.to(dtype)
                got = _loss_and_grads(multihead_ce, z, w, tc, st, y, scale=5.0,
                                      backend="triton")
                # The reference on the very values the kernel saw (after rounding).
                want = _loss_and_grads(multihead_ce_reference, z.double().cpu(),
                                       w.double().cpu(), tc.cpu(), st.cpu(), y.cpu(), scale=5.0)
                row = {"dtype": str(dtype).replace("torch.", ""), "d": d, "n": n,
                       "N": int(z.shape[0]), "T": int(tc.shape[0]), "passed": True}
                for name, a, b in zip(("loss", "grad_z", "grad_weight"), got, want):
                    a = a.double().cpu()
                    err = float((a - b).abs().max())
                    row[f"{name}_max_abs_err"] = err
                    try:
                        torch.testing.assert_close(a, b, **tol[dtype])
                    except AssertionError as exc:
                        row["passed"] = False
                        row.setdefault("failure", []).append(f"{name}: {str(exc)[:300]}")
                cases.append(row)
    return {"passed": all(c["passed"] for c in cases), "cases": cases,
            "tolerances": {str(k).replace("torch.", ""): v for k, v in tol.items()}}


# -- 3. op speed and memory ------------------------------------------------------------------
def _copy_bandwidth(device) -> float:
    """Bytes a second of a device-to-device copy (read + write counted)."""
    n = (256 << 20) // 4 if device.type == "cuda" else (8 << 20) // 4
    a = torch.empty(n, device=device)
    b = torch.empty_like(a)
    s = _median_seconds(lambda: b.copy_(a), device, rounds=10, warmup=2)
    return 2 * a.numel() * a.element_size() / s


def _bmm_formulation(z, w, tc, st, y, scale=1.0, reduction="mean"):
    """The best plain formulation for equal tasks: each task's rows gathered, one bmm."""
    T, n = tc.shape
    order = torch.argsort(st, stable=True)
    zt = z[order].view(T, -1, z.shape[1])
    logits = torch.bmm(zt, w[tc].transpose(1, 2)) * scale
    per = F.cross_entropy(logits.flatten(0, 1), y[order], reduction="none").view(T, -1).mean(1)
    return per.mean() if reduction == "mean" else per


def section_op_speed(device, sizes) -> dict:
    from fastmtl.ops import available_backends, multihead_ce, multihead_ce_reference
    bandwidth = _copy_bandwidth(device)
    compile_backend = "inductor" if device.type == "cuda" else "eager"
    compiled = torch.compile(multihead_ce_reference, backend=compile_backend)
    contenders = {
        "triton": lambda *a: multihead_ce(*a, scale=10.0, backend="triton", check=False),
        "eager_reference": lambda *a: multihead_ce_reference(*a, scale=10.0),
        f"compiled_reference ({compile_backend})": lambda *a: compiled(*a, scale=10.0),
        "gather_bmm": lambda *a: _bmm_formulation(*a, scale=10.0),
    }
    if "triton" not in available_backends():
        contenders.pop("triton")
    rows = []
    d, n, k = sizes["speed_d"], 5, sizes["speed_per_class"]
    dtype = torch.float32
    for C in sizes["speed_C"]:
        for T in sizes["speed_tasks"]:
            g = torch.Generator().manual_seed(T * 1000 + C)
            tc = torch.stack([torch.randperm(C, generator=g)[:n] for _ in range(T)]).to(device)
            st = torch.arange(T).repeat_interleave(n * k).to(device)
            y = torch.arange(n).repeat_interleave(k).repeat(T).to(device)
            z0 = torch.randn(T * n * k, d, generator=g).to(device, dtype)
            w0 = (torch.randn(C, d, generator=g) / d ** 0.5).to(device, dtype)
            floor_bytes = 2 * (z0.numel() + w0.numel()) * z0.element_size()
            floor_s = floor_bytes / bandwidth
            for name, fn in contenders.items():
                z = z0.clone().requires_grad_()
                w = w0.clone().requires_grad_()

                def step():
                    z.grad = w.grad = None
                    fn(z, w, tc, st, y).backward()
                try:
                    step()
                    _reset_peak(device)
                    base = torch.cuda.memory_allocated() if device.type == "cuda" else 0
                    s = _median_seconds(step, device, sizes["speed_rounds"])
                    peak = _peak(device)
                    rows.append({"C": C, "T": T, "N": T * n * k, "d": d, "op": name,
                                 "ms_fwd_bwd": 1e3 * s, "floor_ms": 1e3 * floor_s,
                                 "times_floor": s / floor_s,
                                 "peak_extra_mb": None if peak is None else (peak - base) / 2**20})
                except Exception as exc:  # noqa: BLE001 - a contender failing is a figure
                    rows.append({"C": C, "T": T, "op": name, "error": repr(exc)[:500]})
    for r in rows:                      # speed-up of each op over the eager reference
        ref = next((q for q in rows if q["C"] == r["C"] and q["T"] == r["T"]
                    and q["op"] == "eager_reference" and "ms_fwd_bwd" in q), None)
        if ref and "ms_fwd_bwd" in r:
            r["speedup_vs_eager"] = ref["ms_fwd_bwd"] / r["ms_fwd_bwd"]
    return {"copy_bandwidth_gb_s": bandwidth / 1e9, "rows": rows,
            "floor": "features and head rows read once plus their gradients written once, "
                     "at the measured device-to-device copy bandwidth"}


# -- 4. training steps -----------------------------------------------------------------------
def _random_data(sizes):
    import numpy as np
    from fastmtl.data.base import FewShotDataset
    rng = np.random.default_rng(0)
    C, k, s = sizes["train_classes"], sizes["train_per_class"], sizes["image"]
    shape = (C * k, s, s) if sizes["channels"] == 1 else (C * k, s, s, 3)
    images = rng.integers(0, 256, shape, dtype=np.uint8)
    labels = np.repeat(np.arange(C), k)
    return FewShotDataset(images, labels, [f"c{i}" for i in range(C)],
                          mean=(0.5,) * sizes["channels"], std=(0.25,) * sizes["channels"],
                          name="random")


def _step_settings(method, sizes):
    """Each method at the same images per step (MAML/ANIL/FO-MAML: tasks of 5-way 1-shot
    with queries; R2D2/ProtoNet: one 20-way task; MTL: a batch over the whole head table)."""
    images = sizes["step_images"]
    if method == "mtl":
        return dict(batch_size=images, max_minutes=None)
    if method in ("r2d2", "protonet"):
        per_class = images // 20
        return dict(n_way=20, k_shot=1, n_query=per_class - 1, tasks_per_step=1, max_minutes=None)
    tasks = max(1, images // 50) if images >= 50 else 2
    per_class = images // (5 * tasks)
    extra = dict(inner_steps=sizes["maml_inner_steps"]) if method in ("maml", "fomaml") else {}
    return dict(n_way=5, k_shot=1, n_query=per_class - 1, tasks_per_step=tasks, max_minutes=None,
                chunk_size=None, **extra)


def _make_trainer(method, precision, sizes, device, overrides=()):
    from fastmtl.registry import build_backbone
    from fastmtl.compare import config_for
    settings = dict(_step_settings(method, sizes), precision=precision, **dict(overrides))
    cls, cfg = config_for(method, settings)
    torch.manual_seed(0)
    return cls(build_backbone(sizes["backbone"], sizes["channels"]), cfg, device=device)


def _time_step(trainer, data, device, rounds):
    from fastmtl.compare import flop_counter    # grouped convolutions' backward counted right
    batches = iter(trainer.prepare(data))
    pool = [next(batches) for _ in range(2)]
    trainer.train_step(pool[0])             # warm-up (lazy builds, kernel selection)
    counter = flop_counter()
    with counter:
        _, _, images = trainer.train_step(pool[1])
    _reset_peak(device)
    seconds = _median_seconds(lambda: trainer.train_step(pool[0]), device, rounds, warmup=0)
    return {"seconds": seconds, "flops": int(counter.get_total_flops()), "images": images,
            "peak_mb": None if device.type != "cuda" else _peak(device) / 2**20}


def section_steps(device, sizes) -> dict:
    from fastmtl.registry import METHOD_NAMES
    data = _random_data(sizes)
    rows = []
    for precision in ("fp32", "bf16"):
        for method in METHOD_NAMES:
            variants = [("", {})]
            if method == "maml":
                variants = [(" (vmapped)", {"vectorize": True}),
                            (" (per-task loop)", {"vectorize": False})]
            for label, over in variants:
                row = {"method": method + label, "precision": precision}
                try:
                    tr = _make_trainer(method, precision, sizes, device, over)
                    row.update(_time_step(tr, data, device, sizes["step_rounds"]))
                except Exception as exc:  # noqa: BLE001 - recorded, the check goes on
                    row["error"] = repr(exc)[:500]
                rows.append(row)
                del row
            if device.type == "cuda":
                torch.cuda.empty_cache()
    for r in rows:
        mtl = next((q for q in rows if q["method"] == "mtl" and q["precision"] == r["precision"]
                    and "seconds" in q), None)
        if mtl and "seconds" in r:
            r["seconds_vs_mtl"] = r["seconds"] / mtl["seconds"]
            r["flops_vs_mtl"] = r["flops"] / mtl["flops"] if mtl["flops"] else None
    return {"backbone": sizes["backbone"], "image": sizes["image"],
            "images_per_step": sizes["step_images"], "rows": rows}


# -- 5. profiler traces ----------------------------------------------------------------------
def section_profile(device, sizes, out: Path) -> dict:
    from torch.profiler import ProfilerActivity, profile
    data = _random_data(sizes)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda"
                                           else [])
    traces = {}
    for method in ("mtl", "maml"):
        tr = _make_trainer(method, "fp32", sizes, device)
        batches = iter(tr.prepare(data))
        pool = [next(batches) for _ in range(2)]
        for b in pool:                      # warm-up
            tr.train_step(b)
        with profile(activities=activities) as prof:
            for i in range(sizes["profile_steps"]):
                tr.train_step(pool[i % 2])
            _sync(device)
        path = out / f"trace_{method}.json"
        prof.export_chrome_trace(str(path))
        sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
        traces[method] = {"trace": path.name,
                          "top_ops": prof.key_averages().table(sort_by=sort, row_limit=12)}
    return traces


# -- the report ------------------------------------------------------------------------------
def markdown(result: dict) -> str:
    env = result["environment"]
    where = env.get("gpu") or f"CPU ({env.get('cpu')}) - not GPU figures"
    lines = [f"# fastmtl GPU check: {where}", "",
             f"torch {env['torch']}, triton {env.get('triton')}, driver {env.get('driver', '-')}; "
             f"passed: **{result['passed']}**", ""]
    t = result["sections"].get("tests", {})
    for r in t.get("runs", []):
        lines.append(f"- tests `{r['command']}`: {r['summary']} (exit {r['exit_code']})")
    c = result["sections"].get("correctness", {})
    if "cases" in c:
        bad = [x for x in c["cases"] if not x["passed"]]
        lines.append(f"- Triton multi-head CE vs float64: {len(c['cases']) - len(bad)} of "
                     f"{len(c['cases'])} cases within tolerance")
    s = result["sections"].get("op_speed", {})
    if "rows" in s:
        lines += ["", f"## Multi-head CE, forward + backward (copy bandwidth "
                      f"{s['copy_bandwidth_gb_s']:.0f} GB/s)", "",
                  "| C | T | op | ms | x eager | x memory floor | peak extra MB |",
                  "|---|---|---|---|---|---|---|"]
        for r in s["rows"]:
            if "error" in r:
                lines.append(f"| {r['C']} | {r['T']} | {r['op']} | failed | | | |")
                continue
            peak = "-" if r["peak_extra_mb"] is None else f"{r['peak_extra_mb']:.1f}"
            lines.append(f"| {r['C']} | {r['T']} | {r['op']} | {r['ms_fwd_bwd']:.3f} | "
                         f"{r.get('speedup_vs_eager', float('nan')):.2f} | "
                         f"{r['times_floor']:.1f} | {peak} |")
    st = result["sections"].get("steps", {})
    if "rows" in st:
        lines += ["", f"## One training step: {st['backbone']} at {st['image']}x{st['image']}, "
                      f"{st['images_per_step']} images", "",
                  "| method | precision | ms | x MTL (s) | GFLOPs | x MTL (FLOPs) | peak MB |",
                  "|---|---|---|---|---|---|---|"]
        for r in st["rows"]:
            if "error" in r:
                lines.append(f"| {r['method']} | {r['precision']} | failed: "
                             f"{r['error'][:80]} | | | | |")
                continue
            peak = "-" if r["peak_mb"] is None else f"{r['peak_mb']:.0f}"
            fl = r.get("flops_vs_mtl")
            lines.append(f"| {r['method']} | {r['precision']} | {1e3 * r['seconds']:.1f} | "
                         f"{r.get('seconds_vs_mtl', float('nan')):.2f} | {r['flops'] / 1e9:.2f} "
                         f"| {'-' if fl is None else f'{fl:.2f}'} | {peak} |")
    for name, sec in result["sections"].items():
        if isinstance(sec, dict) and "error" in sec and "rows" not in sec:
            lines.append(f"\n- section `{name}` failed: {sec['error'][:300]}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for gpu_check.json/.md and traces")
    p.add_argument("--cpu", action="store_true",
                   help="CPU mode (tiny sizes, Triton interpreted) even if CUDA is present")
    p.add_argument("--sections", nargs="+", default=None,
                   choices=["build", "tests", "correctness", "op_speed", "steps", "profile"],
                   help="what to run (default: everything; build only on CUDA, where the "
                        "source tree has no compiled extensions yet)")
    p.add_argument("--tests-timeout", type=int, default=240,
                   help="seconds allowed to each pytest run")
    args = p.parse_args(argv)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        p.error(f"--out {args.out!r} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    sizes = GPU_SIZES if device.type == "cuda" else CPU_SIZES
    if args.sections is None:
        args.sections = (["build"] if device.type == "cuda" else []) + [
            "tests", "correctness", "op_speed", "steps", "profile"]
    result = {"environment": {}, "sizes": sizes, "sections": {},
              "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])])}
    runners = {"build": lambda: section_build(args.tests_timeout),
               "tests": lambda: section_tests(device, args.tests_timeout),
               "correctness": lambda: section_correctness(device, sizes),
               "op_speed": lambda: section_op_speed(device, sizes),
               "steps": lambda: section_steps(device, sizes),
               "profile": lambda: section_profile(device, sizes, out)}
    for name in args.sections:
        if name != "build" and not result["environment"]:
            # After the build: this process imports the extensions it just built.
            result["environment"] = environment(device)
        t0 = time.perf_counter()
        print(f"gpu_check: {name} ...", flush=True)
        try:
            sec = runners[name]()
        except Exception as exc:  # noqa: BLE001 - one broken section must not hide the rest
            sec = {"error": repr(exc)[:1000], "traceback": traceback.format_exc()[-3000:]}
        sec["seconds"] = round(time.perf_counter() - t0, 1)
        result["sections"][name] = sec
        print(f"gpu_check: {name} done in {sec['seconds']} s", flush=True)
        (out / "gpu_check.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    result["environment"] = result["environment"] or environment(device)
    checks = [result["sections"][n] for n in ("tests", "correctness") if n in result["sections"]]
    result["passed"] = all(c.get("passed", False) for c in checks)
    (out / "gpu_check.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    (out / "gpu_check.md").write_text(markdown(result))
    print((out / "gpu_check.md").read_text())
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
