"""The table of MTL's recipe variants for the documented background-set command.

Reads what ``recipe_omniglot_background.sh`` left under OUT (one folder a variant:
``train.json``, ``val5way.json``, ``val20way.json``) and writes OUT_FILE.json (every
variant's flags, steps, machine and validation accuracies) and OUT_FILE.md (the table).
Variants are listed in the order they ran; each row's difference is against the first
variant named ``*default*`` trained with the same seed, and "at once" counts the variants whose
training overlapped its own (itself included: they shared the 2 cores).

Usage:
    python benchmarks/experiments/tuning/recipe_tables.py runs/recipe \
        --out benchmarks/results/recipe_omniglot_background
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Any

SETTINGS = ["5-way 1-shot", "5-way 5-shot", "20-way 1-shot", "20-way 5-shot"]


def variant(folder: str) -> dict[str, Any] | None:
    """One variant's row, or None while it has not finished."""
    files = [os.path.join(folder, f) for f in ("train.json", "val5way.json", "val20way.json")]
    if not all(os.path.exists(f) for f in files):
        return None
    train, five, twenty = (json.load(open(f)) for f in files)
    after_out = train["command"].split(" --out ", 1)[1].split(None, 1)   # [path, flags...]
    acc = {f"{r['n_way']}-way {r['k_shot']}-shot": (round(r["mean"], 2), round(r["ci95"], 2))
           for r in five["results"] + twenty["results"]}
    flags = after_out[1] if len(after_out) > 1 else ""
    probe = os.path.join(folder, "probe.txt")      # a conv4_variant.py run: what it patched
    if os.path.exists(probe):
        flags = f"{flags}; {open(probe).read().strip()} (conv4_variant.py)".lstrip("; ")
    return {"name": os.path.basename(folder), "minutes": train["config"]["max_minutes"],
            "flags": flags,
            "steps": sum(h["steps"] for h in train["history"]),
            "best_epoch": train["best_epoch"], "epochs": len(train["history"]),
            "seed": train["config"]["seed"],
            "trained": [os.path.getmtime(files[0]) - train["train_seconds"],
                        os.path.getmtime(files[0])],
            "val_accuracy": acc, "val_accuracy_centre": _centred(folder),
            "episodes": five["results"][0]["episodes"], "machine": train["machine"]}


def _centred(folder: str) -> dict[str, float] | None:
    """The same evaluations with ``--centre`` (features centred on the training mean),
    where they were run."""
    files = [os.path.join(folder, f"val{w}way_centre.json") for w in (5, 20)]
    if not all(os.path.exists(f) for f in files):
        return None
    rows = [r for f in files for r in json.load(open(f))["results"]]
    return {f"{r['n_way']}-way {r['k_shot']}-shot": round(r["mean"], 2) for r in rows}


def at_once(rows: list[dict[str, Any]]) -> None:
    """Each row's count of variants trained at the same time as it (itself included)."""
    for r in rows:
        a, b = r["trained"]
        r["at_once"] = sum(o["trained"][0] < b and a < o["trained"][1] for o in rows)


def markdown(rows: list[dict[str, Any]]) -> str:
    head = ("| variant | flags | at once | steps | " + " | ".join(SETTINGS)
            + " |\n|---|---|---|---|" + "---|" * len(SETTINGS))
    refs: dict[int, dict[str, Any]] = {}
    for r in rows:                     # the first default run of each seed
        if "default" in r["name"]:
            refs.setdefault(r["seed"], r["val_accuracy"])
    lines = [head]
    for r in rows:
        ref = refs.get(r["seed"], r["val_accuracy"])
        cells = [f"{r['val_accuracy'][s][0]:.2f} ({r['val_accuracy'][s][0] - ref[s][0]:+.2f})"
                 for s in SETTINGS]
        lines.append(f"| {r['name']} | `{r['flags'] or '(default)'}` | {r['at_once']} | "
                     f"{r['steps']:,} | " + " | ".join(cells) + " |")
    m = rows[0]["machine"]
    centred = [f"| {r['name']} | `{r['flags'] or '(default)'}` | "
               + " | ".join(f"{r['val_accuracy_centre'][s]:.2f}" for s in SETTINGS) + " |"
               for r in rows if r.get("val_accuracy_centre")]
    if centred:
        lines += ["", "The same checkpoints evaluated with `fastmtl eval --centre` (features "
                  "centred on the training images' mean), where that was run:", "",
                  "| variant | flags | " + " | ".join(SETTINGS) + " |",
                  "|---|---|" + "---|" * len(SETTINGS), *centred]
    return (f"# MTL recipe variants, whole Omniglot background set (validation alphabets)\n\n"
            f"Each variant: `fastmtl train --rotations --max-minutes {rows[0]['minutes']:g}` "
            f"on one torch thread ({m['cpu']}, 2 cores, two or three variants at once), then "
            f"`fastmtl eval` "
            f"of its final.pt on the 163 validation characters, {rows[0]['episodes']} "
            f"episodes a setting (the same episodes for every variant). Accuracy in %, "
            f"in brackets the difference to the first default-recipe run of the same "
            f"seed.\n\n"
            + "\n".join(lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", help="the OUT folder of recipe_omniglot_background.sh")
    p.add_argument("--out", required=True, help="output path without .json / .md")
    args = p.parse_args()
    folders = [os.path.join(args.runs, d) for d in os.listdir(args.runs)
               if os.path.isdir(os.path.join(args.runs, d))]
    # In the order they trained (a folder's own time moves when a variant is re-evaluated).
    rows = sorted((r for r in map(variant, folders) if r is not None),
                  key=lambda r: r["trained"][0])
    at_once(rows)
    with open(args.out + ".json", "w") as f:
        json.dump({"name": os.path.basename(args.out), "variants": rows}, f, indent=1)
    with open(args.out + ".md", "w") as f:
        f.write(markdown(rows))
    print(markdown(rows))


if __name__ == "__main__":
    main()
