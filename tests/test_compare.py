"""fastmtl compare: a tiny real comparison, its JSON schema and curves, and bad input."""
from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import torch

from fastmtl.cli import main

METHODS = "mtl,anil,protonet"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    t0 = time.perf_counter()
    code = main(["compare", "--data", "synthetic", "--methods", METHODS, "--budget-minutes",
                 "0.06", "--eval-every", "1.8", "--episodes", "10", "--out", str(out),
                 "--threads", "2", "--sample-images", "256"])
    wall = time.perf_counter() - t0
    return out, code, wall


def test_compare_writes_json_md_png(run):
    out, code, _ = run
    assert code == 0
    payload = json.loads((out / "compare.json").read_text())
    assert (out / "compare.md").stat().st_size > 0 and (out / "compare.png").stat().st_size > 0
    for key in ("command", "machine", "versions", "settings_overrides", "results", "tables",
                "budget_minutes", "eval_every", "shots", "episodes"):
        assert key in payload, key
    assert list(payload["results"]) == METHODS.split(",")
    for method, res in payload["results"].items():
        assert res["flops_per_step"] > 0
        pts = res["points"]
        assert len(pts) >= 2, method
        for key in ("train_seconds", "steps", "images", "flops"):
            values = [p[key] for p in pts]
            assert all(b > a for a, b in zip(values, values[1:])), (method, key, values)
        for p in pts:
            assert p["peak_memory_bytes"] > 0
            for shot in ("1", "5"):
                protocols = p["accuracy"][shot]
                assert ("own" in protocols) == (method != "mtl")
                for r in protocols.values():
                    assert 0.0 <= r["mean"] <= 100.0 and r["ci95"] >= 0.0
        # Training stops at the first step past the budget; evaluation is off the clock.
        assert pts[-1]["train_seconds"] < 60 * 0.06 + 3.0
        assert res["eval_seconds"] > 0
        assert res["wall_seconds"] >= pts[-1]["train_seconds"] + 0.9 * res["eval_seconds"]
    for shot in ("1", "5"):
        rows = payload["tables"][shot]["mtl_vs_baselines"]
        assert {r["baseline"] for r in rows} == {"anil", "protonet"}
        assert {r["protocol"] for r in rows} == {"logistic", "own"}
    md = (out / "compare.md").read_text()
    assert "how much sooner MTL reaches" in md and "how much sooner each baseline" in md


def test_compare_resume_keeps_finished_methods(run):
    out, _, _ = run
    before = json.loads((out / "compare.json").read_text())["results"]
    t0 = time.perf_counter()
    code = main(["compare", "--data", "synthetic", "--methods", METHODS, "--budget-minutes",
                 "0.06", "--eval-every", "1.8", "--episodes", "10", "--out", str(out),
                 "--sample-images", "256", "--resume"])
    assert code == 0 and time.perf_counter() - t0 < 30
    assert json.loads((out / "compare.json").read_text())["results"] == before


@pytest.mark.parametrize("flags, needle", [
    (["--methods", "mtl,nope"], "--methods"),
    (["--budget-minutes", "0"], "--budget-minutes"),
    (["--budget-minutes", "-1"], "--budget-minutes"),
    (["--budget-minutes", "1", "--eval-every", "120"], "--eval-every"),
    (["--eval-every", "0"], "--eval-every"),
    (["--settings", "SETTINGS"], "protonet"),
    (["--settings", "BADFIELD"], "unknown field"),
    (["--ways", "5", "5"], "--ways"),
    (["--ways", "5", "1"], "--ways"),
    (["--ways", "5", "500"], "ways"),           # more ways than the test classes
    (["--eval-split", "train"], "--eval-split"),
    (["--image-size", "0"], "--image-size"),     # was run at 28 px and recorded as 0
    (["--eval-at", "1,nan"], "--eval-at"),
    (["--sample-images", "1"], "--sample-images"),
    (["--sample-images", "0"], "--sample-images"),
])
def test_bad_input_fails_in_one_line_before_training(tmp_path, flags, needle):
    flags = list(flags)
    if "SETTINGS" in flags:      # 500-way ProtoNet tasks on a 240-class training set
        path = tmp_path / "s.json"
        path.write_text(json.dumps({"protonet": {"n_way": 500}}))
        flags[flags.index("SETTINGS")] = str(path)
    if "BADFIELD" in flags:
        path = tmp_path / "b.json"
        path.write_text(json.dumps({"mtl": {"no_such_field": 1}}))
        flags[flags.index("BADFIELD")] = str(path)
    out = tmp_path / "out"
    base = ["compare", "--data", "synthetic", "--methods", "mtl,protonet", "--out", str(out)]
    if "--budget-minutes" not in flags:
        base += ["--budget-minutes", "1"]
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "fastmtl", *base, *flags],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 or lines[-1].startswith("fastmtl compare: error"), proc.stderr
    assert needle in proc.stderr and "Traceback" not in proc.stderr
    assert not (out / "compare.json").exists()
    assert time.perf_counter() - t0 < 60


def test_flop_counter_counts_grouped_convolutions_as_their_groups():
    """The weight gradient of a grouped convolution costs what its groups cost apart (torch
    2.13's formula counts it groups times); MAML's stacked step (one grouped convolution
    over its tasks) then counts the FLOPs of its per-task loop, the same arithmetic."""
    import torch
    import torch.nn.functional as F

    from fastmtl.compare import flop_counter
    from fastmtl.gbml import MAML, MAMLConfig
    from fastmtl.models import conv4

    def count(fn):
        with flop_counter() as c:
            fn()
        return c.get_total_flops()

    x = torch.randn(3, 6, 9, 7, requires_grad=True)
    w = torch.randn(12, 2, 3, 3, requires_grad=True)
    grouped = count(lambda: F.conv2d(x, w, padding=1, groups=3).sum().backward())
    apart = count(lambda: sum(F.conv2d(x[:, 2 * g:2 * g + 2], w[4 * g:4 * g + 4], padding=1)
                              .sum() for g in range(3)).backward())
    assert grouped == apart > 0
    g = torch.Generator().manual_seed(0)
    xs, xq = torch.randn(3, 5, 1, 16, 16, generator=g), torch.randn(3, 10, 1, 16, 16, generator=g)
    ys, yq = torch.arange(5).expand(3, -1), torch.arange(5).repeat_interleave(2).expand(3, -1)
    flops = {}
    for vectorize in (True, False):
        torch.manual_seed(0)
        tr = MAML(conv4(hidden=8), MAMLConfig(tasks_per_step=3, vectorize=vectorize),
                  device="cpu").build((1, 16, 16))
        flops[vectorize] = count(lambda: tr._step(xs, ys, xq, yq))
    assert flops[True] == flops[False] > 0


def _reseeded(payload, seed, shift):
    """A copy of ``payload`` as if run with another seed, every accuracy moved by ``shift``."""
    other = json.loads(json.dumps(payload))
    other["seed"] = seed
    for res in other["results"].values():
        for p in res["points"]:
            p["train_seconds"] += 1.0
            for protocols in p["accuracy"].values():
                for r in protocols.values():
                    r["mean"] += shift
    return other


def test_merge_averages_runs_point_by_point(run, tmp_path):
    out, _, _ = run
    a = json.loads((out / "compare.json").read_text())
    b = _reseeded(a, 1, 2.0)
    b_path = tmp_path / "b.json"
    b_path.write_text(json.dumps(b))
    code = main(["merge", str(out / "compare.json"), str(b_path), "--out", str(tmp_path / "m")])
    assert code == 0
    merged = json.loads((tmp_path / "m" / "compare.json").read_text())
    assert merged["seeds"] == [0, 1] and len(merged["per_seed_tables"]) == 2
    for m, res in merged["results"].items():
        for pm, pa, pb in zip(res["points"], a["results"][m]["points"], b["results"][m]["points"]):
            assert pm["train_seconds"] == pytest.approx(pa["train_seconds"] + 0.5)
            for shot, protocols in pm["accuracy"].items():
                for prot, r in protocols.items():
                    ra, rb = pa["accuracy"][shot][prot], pb["accuracy"][shot][prot]
                    assert r["mean"] == pytest.approx(ra["mean"] + 1.0)
                    assert r["per_seed"] == pytest.approx([ra["mean"], rb["mean"]])
                    both = (ra["ci95"] ** 2 + rb["ci95"] ** 2) ** 0.5 / 2
                    assert r["ci95"] == pytest.approx(both)
    # The tables are those of the mean curves, and each run's own are those compare wrote.
    from fastmtl.compare import speedup_tables
    assert merged["tables"] == json.loads(json.dumps(speedup_tables(merged["results"])))
    assert merged["per_seed_tables"][0] == a["tables"]
    md = (tmp_path / "m" / "compare.md").read_text()
    assert "The mean of 2 runs (seeds 0, 1)" in md and "MTL's speed-up in each run" in md
    assert (tmp_path / "m" / "compare.png").stat().st_size > 0


def test_runs_without_sample_images_were_made_with_4096():
    """compare.json files from before --sample-images froze and centred at 4,096 images:
    their absent key reads so, for --resume and merge."""
    from fastmtl.compare import CENTRE_IMAGES, differences, setting
    assert setting({}, "sample_images") == CENTRE_IMAGES == 4096
    assert differences({"sample_images": 4096}, {}) == []
    assert differences({"sample_images": 64}, {}) == ["sample_images"]


@pytest.mark.parametrize("change, needle", [
    (lambda p: p.update(seed=0), "differ in their seed"),
    (lambda p: p.update(episodes=p["episodes"] + 1), "episodes"),
    (lambda p: p.update(sample_images=4096), "sample_images"),
    (lambda p: p["results"].pop("anil"), "methods"),
    (lambda p: p["results"]["mtl"]["points"].pop(), "evaluation points"),
    (None, "two or more"),
    (lambda p: p.update(results=3), "not a compare run"),   # a traceback before
    (lambda p: p["results"]["mtl"].update(points=[{"accuracy": 1}]), "not a compare run"),
    (lambda p: p["results"]["mtl"]["points"][0].update(accuracy={"1": 3}), "not a compare run"),
    (lambda p: p["results"]["mtl"].pop("flops_per_step"), "not complete"),
])
def test_merge_bad_runs_fail_in_one_line(run, tmp_path, change, needle):
    out, _, _ = run
    first = str(out / "compare.json")
    args = ["merge", first]
    if change is not None:
        other = _reseeded(json.loads((out / "compare.json").read_text()), 1, 0.0)
        change(other)
        (tmp_path / "b.json").write_text(json.dumps(other))
        args.append(str(tmp_path / "b.json"))
    proc = subprocess.run([sys.executable, "-m", "fastmtl", *args, "--out", str(tmp_path / "m")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("fastmtl merge: error: runs")
    assert len(proc.stderr.splitlines()) == 1
    assert needle in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "m" / "compare.json").exists()


def test_progressive_resizing_counts_small_steps_at_their_own_flops():
    """MTL with small_images: the FLOPs axis counts the small steps at a small step's cost
    (a fresh trainer's first step, about (20 / 28)^2 of a full one for the Conv-4) and the
    rest at a full step's."""
    from fastmtl.compare import config_for, run_method
    from fastmtl.data import SyntheticGlyphs
    from fastmtl.models import conv4
    train, test = SyntheticGlyphs(20, 10, seed=0), SyntheticGlyphs(8, 10, seed=1)
    cls, cfg = config_for("mtl", {"small_images": 20 / 28, "small_images_fraction": 0.5,
                                  "batch_size": 32, "projector": 0}, budget_minutes=0.04)
    res = run_method("mtl", cfg, cls, lambda: conv4(hidden=16), train, test,
                     eval_every=[0.2, 2.3], shots=[1], ways=5, queries=5, episodes=5, seed=0)
    small, full = res["flops_per_small_step"], res["flops_per_step"]
    assert 0.4 < small / full < 0.7
    first, last = res["points"][0], res["points"][-1]
    assert first["flops"] == first["steps"] * small        # 0.2 s: all steps small
    assert last["steps"] * small < last["flops"] < last["steps"] * full
    assert (last["flops"] - last["steps"] * small) % (full - small) == 0


def test_several_ways_on_the_validation_classes(tmp_path, monkeypatch):
    """--ways 5 10 --eval-split val: every point holds both settings (the main ways' keys
    unchanged, the others "10w1"), evaluated on the val classes; the tables, Markdown and
    plot cover each; a run of other ways or split is not resumed or merged with it."""
    from fastmtl import registry
    from fastmtl.compare import differences
    splits = []
    load = registry.load_dataset

    def recording(name, root, split, **options):
        splits.append(split)
        return load(name, root, split, **options)

    monkeypatch.setattr(registry, "load_dataset", recording)
    out = tmp_path / "c"
    base = ["compare", "--data", "synthetic", "--methods", "mtl,protonet", "--budget-minutes",
            "0.03", "--eval-every", "1", "--episodes", "4", "--shots", "1", "--out", str(out),
            "--sample-images", "64"]
    assert main([*base, "--ways", "5", "10", "--eval-split", "val"]) == 0
    assert splits == ["train", "val"]
    payload = json.loads((out / "compare.json").read_text())
    assert payload["ways"] == 5 and payload["also_ways"] == [10]
    assert payload["eval_split"] == "val"
    for m, res in payload["results"].items():
        for p in res["points"]:
            assert sorted(p["accuracy"]) == ["1", "10w1"], m
            assert ("own" in p["accuracy"]["10w1"]) == (m == "protonet")
    assert sorted(payload["tables"]) == ["1", "10w1"]
    md = (out / "compare.md").read_text()
    assert "## 10-way 1-shot: how much sooner MTL" in md and "on the val classes" in md
    assert "5-way 1-shot final / best" in md and "10-way 1-shot own final" in md
    old = dict(payload, eval_split="test", also_ways=[])
    assert differences(payload, old) == ["also_ways", "eval_split"]
    legacy = {k: v for k, v in old.items() if k not in ("eval_split", "also_ways")}
    assert differences(old, legacy) == []          # absent keys mean test, no other ways
    proc = subprocess.run([sys.executable, "-m", "fastmtl", *base, "--resume"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "also_ways" in proc.stderr and "eval_split" in proc.stderr


def test_centre_adds_the_centred_protocol_for_every_method(tmp_path, capsys, monkeypatch):
    """--centre: every point of every method holds "centred" beside the logistic protocol
    (and the baselines' own); the tables pair MTL's centred head with each baseline's
    centred and own rows; a run resumed with --centre keeps the finished methods (their
    rows without "centred") and records what ran them."""
    out = tmp_path / "c"
    base = ["compare", "--data", "synthetic", "--methods", "mtl,protonet", "--budget-minutes",
            "0.03", "--eval-every", "1", "--episodes", "4", "--shots", "1", "--out", str(out),
            "--sample-images", "64"]
    from fastmtl.compare import run as compare_run
    drawn, draw = [], compare_run.centre_sample

    def recording(train, seed=0, n=compare_run.CENTRE_IMAGES):
        drawn.append((train.name, n))
        return draw(train, seed, n)

    monkeypatch.setattr(compare_run, "centre_sample", recording)
    assert main([*base, "--centre"]) == 0
    # the centring sample (training images without rotations) and protonet's frozen one
    assert sorted(drawn) == [("synthetic-train", 64)] * 2, drawn
    monkeypatch.undo()
    payload = json.loads((out / "compare.json").read_text())
    assert payload["centre"] is True and payload["sample_images"] == 64
    for m, res in payload["results"].items():
        for p in res["points"]:
            assert sorted(p["accuracy"]["1"]) == (["centred", "logistic"] if m == "mtl"
                                                  else ["centred", "logistic", "own"])
    rows = payload["tables"]["1"]["mtl_vs_baselines"]
    assert [(r["mtl_protocol"], r["protocol"]) for r in rows] == [
        ("logistic", "logistic"), ("logistic", "own"), ("centred", "centred"),
        ("centred", "own")]
    md = (out / "compare.md").read_text()
    assert "protonet *centred* |" in md and "protonet *own* (MTL centred) |" in md
    assert "1-shot centred final" in md and "unless marked *centred* or *own*" in md
    assert payload["results"]["mtl"]["shared_protocol_norm"] == "running statistics"
    assert payload["results"]["protonet"]["shared_protocol_norm"].startswith(
        "statistics of 64 seeded training images")
    assert "In these protocols protonet (batch-statistics BatchNorm) normalize" in md
    # Resuming a run without --centre, from before the frozen statistics: the kept
    # baseline has no centred rows, and its shared rows used per-batch statistics.
    old = dict(payload, centre=False, command="the first command")
    old["results"]["protonet"].pop("shared_protocol_norm")
    for p in old["results"]["protonet"]["points"]:
        p["accuracy"]["1"].pop("centred")
    old["results"].pop("mtl")
    (out / "compare.json").write_text(json.dumps(old))
    capsys.readouterr()
    assert main([*base, "--centre", "--resume"]) == 0
    said = capsys.readouterr()
    assert "the kept protonet ran without it" in said.out + said.err
    assert "their logistic and centred rows used each embedding batch's statistics" in \
        said.out + said.err
    again = json.loads((out / "compare.json").read_text())
    assert again["resumed_from"]["methods"] == ["protonet"]
    assert again["resumed_from"]["command"] == "the first command"
    assert again["results"]["protonet"] == old["results"]["protonet"]
    rows = again["tables"]["1"]["mtl_vs_baselines"]
    assert [(r["mtl_protocol"], r["protocol"]) for r in rows] == [
        ("logistic", "logistic"), ("logistic", "own"), ("centred", "own")]


def test_the_centred_protocol_is_eval_centre_on_the_sample_mean():
    """compare's "centred" accuracy is fastmtl.evaluate(..., centre=the mean feature of the
    seeded training sample), the path of `fastmtl eval --centre`; the sample is seeded,
    drawn from the training images without repeats, all of them where there are fewer."""
    import numpy as np

    from fastmtl.compare import centre_sample, config_for
    from fastmtl.compare.run import _evaluate_point
    from fastmtl.data import SyntheticGlyphs
    from fastmtl.evaluate import evaluate, feature_mean
    from fastmtl.models import conv4
    train, test = SyntheticGlyphs(6, 5, seed=0), SyntheticGlyphs(6, 6, seed=1)
    a, b = centre_sample(train, 3, n=12), centre_sample(train, 3, n=12)
    assert len(a) == 12 and np.array_equal(a.images, b.images)
    assert not np.array_equal(a.images, centre_sample(train, 4, n=12).images)
    rows = {bytes(x) for x in train.images}
    assert len({bytes(x) for x in a.images}) == 12 and {bytes(x) for x in a.images} <= rows
    assert len(centre_sample(train, 0, n=10_000)) == len(train)
    with pytest.raises(ValueError, match="n"):
        centre_sample(train, 0, n=0)
    cls, cfg = config_for("mtl", budget_minutes=0.01)
    torch.manual_seed(0)
    trainer = cls(conv4(hidden=8), cfg)
    acc = _evaluate_point(trainer, test, [1, 2], [5], 3, 6, 0, centre_from=a)
    for k in (1, 2):
        want = evaluate(trainer.backbone, test, n_way=5, k_shot=k, n_query=3, episodes=6,
                        seed=0, centre=feature_mean(trainer.backbone, a), progress=False)
        assert acc[str(k)]["centred"]["mean"] == want["mean"]
        plain = evaluate(trainer.backbone, test, n_way=5, k_shot=k, n_query=3, episodes=6,
                         seed=0, progress=False)
        assert acc[str(k)]["logistic"]["mean"] == plain["mean"]      # as before --centre


def test_batch_stat_baselines_use_training_statistics_in_the_shared_protocols():
    """For a batch-statistics backbone (the GBML baselines) the logistic and centred
    protocols run on fastmtl.gbml.freeze_batch_stats of it with the seeded training sample
    (each embedding batch's own statistics skewed support against query; measured on the
    validation alphabets); MTL keeps its running statistics; the own head is unchanged."""
    from fastmtl.compare import centre_sample, config_for, shared_protocol_stats
    from fastmtl.compare.run import _evaluate_point
    from fastmtl.data import SyntheticGlyphs
    from fastmtl.evaluate import evaluate, feature_mean
    from fastmtl.gbml import freeze_batch_stats
    from fastmtl.models import conv4
    train, test = SyntheticGlyphs(6, 5, seed=0), SyntheticGlyphs(6, 6, seed=1)
    cls, cfg = config_for("protonet", budget_minutes=0.01)
    torch.manual_seed(0)
    trainer = cls(conv4(hidden=8), cfg)
    assert torch.equal(shared_protocol_stats(trainer.backbone, train, 3, n=7),
                       centre_sample(train, 3, n=7).tensor())
    stats = shared_protocol_stats(trainer.backbone, train, 3)
    assert torch.equal(stats, centre_sample(train, 3).tensor())
    mtl_cls, mtl_cfg = config_for("mtl", budget_minutes=0.01)
    assert shared_protocol_stats(mtl_cls(conv4(hidden=8), mtl_cfg).backbone, train, 3) is None
    sample = centre_sample(train, 1, n=12)
    acc = _evaluate_point(trainer, test, [1], [5], 3, 6, 0, sample, stats)
    frozen = freeze_batch_stats(trainer.backbone, stats)
    kw = dict(n_way=5, k_shot=1, n_query=3, episodes=6, seed=0, progress=False)
    assert acc["1"]["logistic"]["mean"] == evaluate(frozen, test, **kw)["mean"]
    assert acc["1"]["centred"]["mean"] == evaluate(
        frozen, test, centre=feature_mean(frozen, sample), **kw)["mean"]
    assert acc["1"]["own"]["mean"] == trainer.evaluate(test, **kw)["mean"]


def test_merge_keeps_the_protocols_every_run_measured():
    """A run without the centred protocol merged with one that has it: the mean curves
    hold only the shared protocols, and each seed's speed-up is matched to the mean
    table's row by baseline and protocols, not by position."""
    from fastmtl.compare import markdown, merge_runs

    def run(seed, centred):
        def pt(t, a):
            acc = {"logistic": {"mean": a, "ci95": 1.0}, "own": {"mean": a + 1, "ci95": 1.0}}
            if centred:
                acc["centred"] = {"mean": a + 0.5, "ci95": 1.0}
            return {"train_seconds": t, "steps": t, "images": t, "flops": t * 1e9,
                    "eval_seconds": 1.0, "peak_memory_bytes": 1, "accuracy": {"1": acc}}
        res = {m: {"points": [pt(10, a0), pt(20, a0 + 6), pt(40, a0 + 8)], "steps": 40,
                   "flops_per_step": 1e9, "images_per_step": 1.0, "train_seconds": 40,
                   "eval_seconds": 3.0}
               for m, a0 in (("mtl", 85.0), ("protonet", 80.0), ("r2d2", 84.0))}
        del res["mtl"]["points"][0]["accuracy"]["1"]["own"]
        for p in res["mtl"]["points"][1:]:
            del p["accuracy"]["1"]["own"]
        return {"seed": seed, "shots": [1], "ways": 5, "eval_every": 10, "data": "synthetic",
                "backbone": "conv4", "budget_minutes": 1, "queries": 15, "episodes": 10,
                "machine": {"cpu": "x", "torch_threads": 1}, "results": res}
    merged = merge_runs([run(0, True), run(1, False)])
    for res in merged["results"].values():
        assert all("centred" not in p["accuracy"]["1"] for p in res["points"])
    assert len(merged["per_seed_tables"][0]["1"]["mtl_vs_baselines"]) == 8
    assert len(merged["tables"]["1"]["mtl_vs_baselines"]) == 4
    md = markdown(merged)
    seeds = md[md.index("MTL's speed-up in each run"):]
    # r2d2's own row is the 4th of the mean table and of seed 1's, the 6th of seed 0's
    assert "| r2d2 *own* | 1.0x (1.0x) | 1.0x (1.0x) | 1.0x (1.0x) | 1.0x |" in seeds
    assert "| protonet *own* | 2.0x (2.0x) | 2.0x (2.0x) | 2.0x (2.0x) | 2.0x |" in seeds
