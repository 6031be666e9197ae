"""The command line: --help everywhere, train -> checkpoint -> eval, JSON, clear errors."""
import json
import shutil
import subprocess
import sys

import pytest
from conftest import omniglot_root

from fastmtl.cli import main


@pytest.mark.parametrize("sub", [[], ["demo"], ["train"], ["eval"]])
def test_help(sub):
    out = subprocess.run([sys.executable, "-m", "fastmtl", *sub, "--help"], capture_output=True,
                         text=True, check=True).stdout
    assert "usage: fastmtl" in out
    if sub == ["train"]:
        assert "--tasks-per-step" in out and "--normalize-features" in out


def test_console_script_is_installed():
    exe = shutil.which("fastmtl")
    if exe is None:
        pytest.skip("the fastmtl console script is not on PATH (package not pip-installed)")
    assert "demo" in subprocess.run([exe, "--help"], capture_output=True, text=True).stdout


def test_train_then_eval_writes_json(tmp_path, capsys):
    out, ck = tmp_path / "train.json", tmp_path / "ck"
    rc = main(["train", "--recipe", "paper", "--data", "synthetic", "--epochs", "2",
               "--tasks-per-epoch", "8",
               "--tasks-per-step", "4", "--images-per-class", "5", "--val-episodes", "10",
               "--eval-episodes", "20", "--checkpoint-dir", str(ck), "--out", str(out),
               "--plot", str(tmp_path / "curve.png")])
    assert rc == 0
    res = json.loads(out.read_text())
    assert len(res["history"]) == 2 and {r["k_shot"] for r in res["results"]} == {1, 5}
    assert (tmp_path / "curve.png").stat().st_size > 1000
    assert "| 5-way 1-shot |" in capsys.readouterr().out
    ev = tmp_path / "eval.json"
    assert main(["eval", "--checkpoint", str(ck / "final.pt"), "--episodes", "20",
                 "--shots", "1", "--out", str(ev)]) == 0
    assert json.loads(ev.read_text())["results"][0]["episodes"] == 20
    # --C reaches the protocol and is recorded; a bad one is a one-line error, exit 2
    assert main(["eval", "--checkpoint", str(ck / "final.pt"), "--episodes", "20",
                 "--shots", "1", "--C", "0.01", "--out", str(ev)]) == 0
    low = json.loads(ev.read_text())["results"][0]
    assert low["C"] == 0.01
    # --centre: the features centred on the training images' mean (SimpleShot's CL2N), the
    # same as the API's evaluate with that centre; recorded in the result
    assert main(["eval", "--checkpoint", str(ck / "final.pt"), "--episodes", "20",
                 "--shots", "1", "--centre", "--out", str(ev)]) == 0
    centred = json.loads(ev.read_text())
    assert centred["features"].startswith("CL2N")
    assert _api_centred(ck / "final.pt", 20) == centred["results"][0]["mean"]
    # --views (with --centre): the API's evaluate with views=True, recorded in the result
    assert main(["eval", "--checkpoint", str(ck / "final.pt"), "--episodes", "20",
                 "--shots", "1", "--centre", "--views", "--out", str(ev)]) == 0
    viewed = json.loads(ev.read_text())
    assert viewed["features"].startswith("CL2N") and "9 views" in viewed["features"]
    assert _api_centred(ck / "final.pt", 20, views=True) == viewed["results"][0]["mean"]
    capsys.readouterr()
    for bad in ("0", "-1", "nan", "x"):
        with pytest.raises(SystemExit) as exc:           # argparse's own one-line error
            main(["eval", "--checkpoint", str(ck / "final.pt"), "--C", bad])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert "--C" in err and len(err.strip().splitlines()) == 1


def _api_centred(checkpoint, episodes, views=False):
    """The 5-way 1-shot test accuracy of the synthetic checkpoint through the API, centred
    on its training images' mean feature."""
    from fastmtl import evaluate, registry
    from fastmtl.checkpoint import load
    from fastmtl.classifier import backbone_from_checkpoint
    from fastmtl.evaluate import feature_mean
    state = load(str(checkpoint), what="checkpoint")
    run = state["run"]
    backbone = backbone_from_checkpoint(state, str(checkpoint))
    train, test = (registry.load_dataset("synthetic", None, split, image_size=run["image_size"],
                                         seed=run["data_seed"], channels=run["channels"])
                   for split in ("train", "test"))
    return evaluate(backbone, test, k_shot=1, episodes=episodes, progress=False,
                    centre=feature_mean(backbone, train), views=views)["mean"]


def test_demo_runs_short(tmp_path):
    out = tmp_path / "demo.json"
    assert main(["demo", "--minutes", "0.01", "--episodes", "20", "--out", str(out),
                 "--plot", str(tmp_path / "demo.png")]) == 0
    res = json.loads(out.read_text())
    assert [r["k_shot"] for r in res["results"]] == [1, 5]
    assert (tmp_path / "demo.png").exists()


def test_errors_are_clear(tmp_path, capsys):
    assert main(["train", "--data", "omniglot", "--root", str(tmp_path / "missing"),
                 "--epochs", "1"]) == 2
    assert "root" in capsys.readouterr().err
    assert main(["train", "--data", "omniglot", "--epochs", "1"]) == 2
    assert "--root" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(tmp_path / "none.pt")]) == 2
    assert "checkpoint" in capsys.readouterr().err


def test_train_on_real_omniglot_cli(tmp_path):
    root = omniglot_root()
    out = tmp_path / "o.json"
    assert main(["train", "--recipe", "paper", "--data", "omniglot", "--root", root,
                 "--epochs", "1",
                 "--tasks-per-epoch", "16", "--tasks-per-step", "8", "--val-episodes", "10",
                 "--eval-episodes", "20", "--shots", "1", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["results"][0]["mean"] > 20


def test_train_fast_recipe_is_the_default(tmp_path):
    out = tmp_path / "fast.json"
    assert main(["train", "--data", "synthetic", "--epochs", "1", "--batch-size", "200",
                 "--val-episodes", "10", "--eval-episodes", "20", "--shots", "1",
                 "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["config"]["task_sampling"] == "all_classes" and res["config"]["head"] == "cosine"
    assert res["history"][0]["steps"] == 240 * 20 // 200
    assert res["results"][0]["mean"] > 20


def test_commands_run_with_subnormals_flushed_and_the_flag_is_given_back(monkeypatch):
    """Subnormal weights (weight decay) made steps 20x slower (denormal_flush_cpu.json):
    main() flushes them while a command runs, and leaves the caller's setting after."""
    import torch

    import fastmtl.cli.eval as eval_cli
    seen = []

    def spy(args):
        seen.append(torch.tensor([1e-40]).item())
        return 0
    monkeypatch.setattr(eval_cli, "cmd_eval", spy)
    assert main(["eval", "--checkpoint", "any.pt"]) == 0
    assert seen == [0.0]
    assert torch.tensor([1e-40]).item() != 0.0


@pytest.mark.parametrize("argv, module, name", [
    (["demo"], "demo", "cmd_demo"), (["train"], "train", "cmd_train"),
    (["eval", "--checkpoint", "any.pt"], "eval", "cmd_eval"),
    (["adapt", "--checkpoint", "any.pt", "--support", "s", "--query", "q"], "adapt", "cmd_adapt"),
    (["compare"], "compare", "cmd_compare"),
    (["merge", "a.json", "b.json"], "compare", "cmd_merge"),
])
def test_every_command_runs_with_freed_memory_kept(monkeypatch, argv, module, name):
    """glibc's raised heap thresholds are set before any command's work: a 100-episode
    `eval --centre --views` spent 11-15 s of its 20-22 s in the kernel without them
    (malloc_eval_cpu.json)."""
    import importlib

    import fastmtl.cli as cli
    calls = []
    monkeypatch.setattr(cli, "keep_freed_memory", lambda **kw: calls.append(kw) or True)

    def spy(args):
        calls.append(name)
        return 0
    monkeypatch.setattr(importlib.import_module(f"fastmtl.cli.{module}"), name, spy)
    assert main(argv) == 0
    assert calls == [{"mmap_threshold": 1 << 30}, name]
