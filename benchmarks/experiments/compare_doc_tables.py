"""The tables docs/results.md quotes from a merged `fastmtl compare` JSON (issue 32's goals).

Usage: python benchmarks/experiments/compare_doc_tables.py MERGED.json
Prints, as Markdown: MTL's speed-up over each baseline per protocol pair and setting on
the mean curves (time, FLOPs), the smallest seed's 5-way ratios, how many 5-way cells meet
the goal (mean curves and every seed, time and FLOPs), the 20-way 1-shot check, and the
final accuracy (logistic / centred / own) with each seed's MTL-centred margin.
"""
import json
import sys

GOALS = {"maml": 30, "anil": 10, "r2d2": 5, "protonet": 5}
PAIRS = [("logistic", "logistic", "logistic"), ("own", "logistic", "own vs MTL logistic"),
         ("centred", "centred", "centred"), ("own", "centred", "own vs MTL centred")]
SETTINGS = ["1", "5", "20w1", "20w5"]


def _row(tables, setting, base, proto, mtl_proto):
    for r in tables.get(setting, {}).get("mtl_vs_baselines", []):
        if r["baseline"] == base and r["protocol"] == proto and r["mtl_protocol"] == mtl_proto:
            return r
    return None


def _fmt(r):
    if r is None:
        return "n/a"
    if r.get("speedup_time") is None:
        return "not reached"
    return f"{r['speedup_time']:.1f}x ({r['speedup_flops']:.1f}x)"


def _met(r, goal):
    return r is not None and r.get("speedup_time") is not None and \
        r["speedup_time"] >= goal and r["speedup_flops"] >= goal


def speedups(d):
    print("| baseline | protocols | 5-way 1-shot | 5-way 5-shot | 20-way 1-shot | 20-way 5-shot "
          "| smallest seed, 5-way | 5-way goal met (mean curves and both seeds, time and "
          "FLOPs) | 20-way 1-shot >= 3x (mean and both seeds) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for base, goal in GOALS.items():
        for proto, mtl_proto, label in PAIRS:
            cells = [_fmt(_row(d["tables"], s, base, proto, mtl_proto)) for s in SETTINGS]
            smallest, met = [], 0
            for s in ("1", "5"):
                seeds = [_row(t, s, base, proto, mtl_proto) for t in d["per_seed_tables"]]
                times = [r["speedup_time"] for r in seeds if r and r.get("speedup_time")]
                smallest.append(f"{min(times):.1f}x" if len(times) == len(seeds) else "-")
                met += all(_met(r, goal) for r in
                           [_row(d["tables"], s, base, proto, mtl_proto), *seeds])
            w = [_row(d["tables"], "20w1", base, proto, mtl_proto)] + \
                [_row(t, "20w1", base, proto, mtl_proto) for t in d["per_seed_tables"]]
            w20 = "n/a" if w[0] is None else ("yes" if all(_met(r, 3) for r in w) else "no")
            print(f"| {base} | {label} | " + " | ".join(cells) +
                  f" | {' / '.join(smallest)} | {goal}x: {met} of 2 | {w20} |")


def finals(d):
    res = d["results"]
    print("\n| method | steps (mean) | 5-way 1-shot | 5-way 5-shot | 20-way 1-shot | "
          "20-way 5-shot |")
    print("|---|---|---|---|---|---|")
    for m, r in res.items():
        acc = r["points"][-1]["accuracy"]
        cells = []
        for s in SETTINGS:
            a = acc.get(s, {})
            cells.append(" / ".join(f"{a[p]['mean']:.1f}" if p in a else "-"
                                    for p in ("logistic", "centred", "own")))
        print(f"| {m} | {r['steps']:,.0f} | " + " | ".join(cells) + " |")
    print("\nMTL centred final minus the best baseline final (any protocol), per seed:")
    for s in SETTINGS:
        mtl = res["mtl"]["points"][-1]["accuracy"][s]["centred"]["per_seed"]
        out = []
        for i, v in enumerate(mtl):
            best = max((r["points"][-1]["accuracy"][s][p]["per_seed"][i], m, p)
                       for m, r in res.items() if m != "mtl"
                       for p in ("logistic", "centred", "own")
                       if p in r["points"][-1]["accuracy"].get(s, {}))
            out.append(f"seed {i}: {v:.2f} vs {best[1]} {best[2]} {best[0]:.2f} "
                       f"({v - best[0]:+.2f})")
        print(f"- {s}: " + "; ".join(out))


def early(d, seconds=(10, 15, 20, 30, 45, 60)):
    print("\nEarly accuracy, 5-way 1-shot (logistic / centred / own), mean of seeds:")
    for m, r in d["results"].items():
        row = []
        for p in r["points"]:
            if round(p["train_seconds"]) in seconds:
                a = p["accuracy"]["1"]
                row.append(f"{round(p['train_seconds'])} s " + "/".join(
                    f"{a[q]['mean']:.1f}" for q in ("logistic", "centred", "own") if q in a))
        print(f"- {m}: " + "; ".join(row))


if __name__ == "__main__":
    data = json.load(open(sys.argv[1]))
    speedups(data)
    finals(data)
    early(data)
