"""``fastmtl adapt``: fit a head on a few labelled images, classify new ones."""
from __future__ import annotations

import argparse
import csv
import io
import os
from pathlib import Path
from typing import TypeAlias

import numpy as np

from .. import checks
from ..checkpoint import atomic_savefig, atomic_write_json, atomic_write_text
from ..classifier import FewShotClassifier
from ..data import class_folders, image_files
from ._common import HelpFormatter, Parser, parser_defaults, refuse_inert_flags, say

# (class name, its image files) of each support class, as class_folders lists them
_Support: TypeAlias = list[tuple[str, list[Path]]]


def _inputs(args: argparse.Namespace) -> tuple[_Support, list[str], list[str] | None]:
    """Support classes, query files (and their labels, if a labelled folder) after every check."""
    if args.shots is not None and args.shots < 1:
        raise ValueError(f"--shots must be >= 1, got {args.shots}")
    refuse_inert_flags(args, parser_defaults(args.parser),
                       [("seed", args.shots is not None, "no --shots (it seeds their choice)")])
    if not os.path.isdir(args.support):
        raise ValueError(f"--support {args.support!r} is not a folder")
    support = class_folders(args.support)
    if len(support) < 2:
        raise ValueError(f"--support {args.support!r} must hold one folder per class, at least "
                         f"2; found {len(support)}")
    empty = [n for n, files in support if not files]
    if empty:
        raise ValueError(f"--support: class folder(s) with no images: {empty[:5]}")
    if args.shots is not None:
        small = [(n, len(f)) for n, f in support if len(f) < args.shots]
        if small:
            raise ValueError(f"--shots {args.shots} is larger than class(es) "
                             + ", ".join(f"{n!r} ({k} images)" for n, k in small[:5]))
    query, truth = [], None
    for q in args.query:
        if os.path.isdir(q):
            labelled = class_folders(q)
            if labelled and any(f for _, f in labelled):
                truth = truth or []
                for name, files in labelled:
                    query += [str(f) for f in files]
                    truth += [name] * len(files)
            else:
                query += [str(f) for f in image_files(q)]
        elif os.path.isfile(q):
            query.append(q)
        else:
            raise ValueError(f"--query {q!r} is neither a file nor a folder")
    if not query:
        raise ValueError(f"--query {' '.join(args.query)!r} holds no images")
    if truth is not None and len(truth) != len(query):
        raise ValueError("--query: give one labelled folder, or unlabelled images only")
    if args.plot and truth is None:
        raise ValueError("--plot has no effect with an unlabelled --query (the confusion "
                         "matrix needs a folder of class folders)")
    out_ext = os.path.splitext(args.out)[1].lower()
    if out_ext not in (".csv", ".json"):
        raise ValueError(f"--out must end in .csv or .json, got {args.out!r}")
    checks.writable_file("--out", args.out)
    if args.plot:
        checks.writable_file("--plot", args.plot)
    return support, query, truth


def cmd_adapt(args: argparse.Namespace) -> int:
    support, query, truth = _inputs(args)
    clf = FewShotClassifier.from_checkpoint(args.checkpoint, head=args.head)
    rng = np.random.default_rng(args.seed)
    images, labels = [], []
    for name, files in support:
        pick = files if args.shots is None else [files[i] for i in sorted(
            rng.choice(len(files), args.shots, replace=False))]
        images += [str(f) for f in pick]
        labels += [name] * len(pick)
    clf.fit(images, labels)
    fitted = clf.classes_
    assert fitted is not None  # set by fit
    proba = clf.predict_proba(query)
    pred = fitted[proba.argmax(1)]
    classes = [str(c) for c in fitted]
    # pred and proba hold one entry per query, each proba row one probability per class,
    # and truth (if given) one label per query (checked in _inputs): every zip below pairs
    # equal lengths.
    rows = [{"path": q, "predicted": str(p),
             **{f"p_{c}": float(v) for c, v in zip(classes, pr, strict=True)}}
            for q, p, pr in zip(query, pred, proba, strict=True)]
    if truth is not None:
        for r, t in zip(rows, truth, strict=True):
            r["true"] = t
    if args.out.lower().endswith(".json"):
        atomic_write_json(args.out, {"classes": classes, "support": args.support,
                                     "checkpoint": args.checkpoint, "rows": rows})
    else:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(args.out, buf.getvalue())
    say(f"{len(rows)} predictions over {len(classes)} classes "
         f"({len(images)} support images) -> {args.out}")
    if truth is not None:
        unknown = sorted(set(truth) - set(classes))
        acc = float(np.mean([str(p) == t for p, t in zip(pred, truth, strict=True)])) * 100
        say(f"accuracy {acc:.2f}% on {len(truth)} labelled query images"
             + (f" ({len(unknown)} query classes not in the support: {unknown[:3]})"
                if unknown else ""))
        index = {c: i for i, c in enumerate(classes)}
        cm = np.zeros((len(classes), len(classes)), dtype=int)
        for p, t in zip(pred, truth, strict=True):
            if t in index:
                cm[index[t], index[str(p)]] += 1
        say("confusion (rows: true, columns: predicted):\n" + "\n".join(
            f"{c[:16]:>16s} " + " ".join(f"{v:4d}" for v in row)
            for c, row in zip(classes, cm, strict=True)))
        if args.plot:
            _confusion_plot(args.plot, cm, classes, acc)
    return 0


def _confusion_plot(path: str, cm: np.ndarray, classes: list[str], acc: float) -> None:
    from matplotlib.figure import Figure
    n = len(classes)
    fig = Figure(figsize=(1.5 + 0.45 * n, 1.2 + 0.45 * n))
    ax = fig.subplots()
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(n), classes, rotation=90)
    ax.set_yticks(range(n), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"accuracy {acc:.1f}%")
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=110)
    say(f"wrote {path}")


def add_parser(sub: argparse._SubParsersAction[Parser]) -> None:
    p = sub.add_parser("adapt", help="fit a head on a few labelled images, classify new ones",
                       description="Load a trained checkpoint, fit the paper's test-time head "
                                   "(logistic regression, C=3) on --support (one folder per "
                                   "new class), and classify --query images; writes one row "
                                   "per query (path, predicted class, probability of each "
                                   "class) as CSV or JSON. With a labelled --query folder "
                                   "(one folder per class) it also prints the accuracy and "
                                   "a confusion matrix (--plot PNG).",
                       formatter_class=HelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a fastmtl final.pt / best.pt / last.pt")
    p.add_argument("--support", required=True, help="folder with one sub-folder per class")
    p.add_argument("--query", required=True, nargs="+",
                   help="image files, a folder of images, or a labelled folder of class folders")
    p.add_argument("--out", default="predictions.csv", help="predictions, .csv or .json")
    p.add_argument("--shots", type=int, default=None,
                   help="use this many support images a class (seeded choice; default all)")
    p.add_argument("--head", choices=("logistic", "prototype"), default="logistic",
                   help="the new head: the paper's logistic regression or nearest prototype")
    p.add_argument("--plot", default=None, help="confusion-matrix PNG (labelled --query)")
    p.add_argument("--seed", type=int, default=0, help="seed of the --shots choice")
    p.set_defaults(func=cmd_adapt, parser=p)


