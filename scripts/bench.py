"""`make bench`: in one run, the attribution-cost table of every shipped experiment that runs
offline (plus the user-model example), the ground-truth throughput on the default, and the
training step against a plain torch loop. Each experiment runs in its own process, so its peak
resident memory is its own.

    python scripts/bench.py [--repeats 1] [--only digits_mlp digits_cnn ...]

Columns (ratios to the experiment's own training seconds, per id where several ids):
  1 id, 16 ids, 64 ids           checkpoint=all
  replay 1 / replay 16            checkpoint=replay k=4
  binomial 1                      checkpoint=binomial at replay k=4's peak memory
  16 compiled / 64 compiled       checkpoint=all with attribute.compile (compilation not counted)
  compile s                       the longest compilation, once per group size (--no-compile: skip)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "digits_resnet"
EXPERIMENTS = {  # name: (overrides, config dir)
    "digits_mlp": (["experiment=digits_mlp"], None),
    "digits_cnn": (["experiment=digits_cnn"], None),
    "text_tiny_lm": (["experiment=text_tiny_lm"], None),
    "breast_cancer_logreg": (["experiment=breast_cancer_logreg"], None),
    "gpt2_tiny_chars": (["experiment=gpt2_tiny_chars"], None),
    "digits_resnet (plugin)": (["experiment=digits_resnet"], EXAMPLE / "conf"),
}
# Needing data or weights from the network: cifar10_small, cifar10_resnet9, gpt2_wikitext.


def attribution_row(name: str, repeats: int, groups: bool, compile: bool) -> dict:
    overrides, config_dir = EXPERIMENTS[name]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "figures.json"
        cmd = [sys.executable, str(ROOT / "scripts" / "bench_attribute.py"), *overrides, "--repeats", str(repeats),
               "--json", str(out)] + (["--config-dir", str(config_dir)] if config_dir else []) + \
              (["--groups"] if groups else []) + (["--compile"] if compile else [])
        subprocess.run(cmd, check=True, cwd=ROOT, stdout=sys.stderr)  # its own printout, for the record
        return json.loads(out.read_text())


def ground_truth_rate(batch: int, workers: int, subsets: int) -> float:
    """Retrainings per minute of `magic retrain-ground-truth` on the default experiment."""
    with tempfile.TemporaryDirectory() as tmp:
        common = [f"out_dir={tmp}/run", "ground_truth.drop_fractions=[0.01]", f"ground_truth.num_subsets={subsets}",
                  f"ground_truth.batch={batch}"]
        magic = [sys.executable, "-m", "magic_cli"]
        subprocess.run(magic + ["train", *common], check=True, cwd=ROOT, capture_output=True)
        start = time.perf_counter()
        subprocess.run(magic + ["retrain-ground-truth", "--workers", str(workers), *common], check=True, cwd=ROOT,
                       capture_output=True)
        return subsets / (time.perf_counter() - start) * 60


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=1, help="measure each figure this many times, keep the best")
    parser.add_argument("--only", nargs="+", default=list(EXPERIMENTS), choices=list(EXPERIMENTS), metavar="NAME",
                        help=f"experiments to measure (default all: {', '.join(EXPERIMENTS)})")
    parser.add_argument("--subsets", type=int, default=96, help="ground-truth retrainings per measurement")
    parser.add_argument("--workers", type=int, default=2, help="ground-truth worker processes")
    parser.add_argument("--no-compile", action="store_true", help="skip the attribute.compile columns")
    args = parser.parse_args()

    table = []
    for name in args.only:
        f = attribution_row(name, args.repeats, groups=name == "digits_mlp", compile=not args.no_compile)
        by = {(r["label"].split(" memory")[0], r["ids"] if r["ids"] <= 16 else "many"): r for r in f["rows"]}
        ratio = lambda key: by[key]["seconds"] / by[key]["ids"] / f["train_s"] if key in by else float("nan")  # noqa: E731
        table.append((name, f["train_s"], ratio(("all", 1)), ratio(("all", 16)), ratio(("all", "many")),
                      ratio(("replay k=4", 1)), ratio(("replay k=4", 16)), ratio(("binomial", 1)),
                      ratio(("all, compiled", 16)), ratio(("all, compiled", "many")),
                      max(f["compile_s"].values(), default=float("nan")), f["peak_rss_mb"]))
        print(f"measured {name}", file=sys.stderr, flush=True)

    print("\nattribution, x the experiment's training time (per id where several), checkpoint=all unless named:")
    print("(compiled: attribute.compile, not counting compilation, whose longest is the 'compile s' column)")
    head = ("experiment", "train s", "1 id", "16 ids", "64 ids", "replay 1", "replay 16", "binomial 1",
            "16 compiled", "64 compiled", "compile s", "peak MB")
    print(f"{head[0]:<24}" + "".join(f"{h:>12}" for h in head[1:]))
    for row in table:
        print(f"{row[0]:<24}{row[1]:>12.2f}" + "".join(f"{v:>12.3f}" for v in row[2:-2])
              + f"{row[-2]:>12.1f}{row[-1]:>12.0f}")

    print(f"\nground truth on the default ({args.subsets} retrainings, {args.workers} workers):")
    for batch in (1, 16):
        print(f"  ground_truth.batch={batch:<3} {ground_truth_rate(batch, args.workers, args.subsets):8.0f} per minute",
              flush=True)

    print("\ntraining step vs a plain nn.Module + torch.optim loop:", flush=True)
    subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_train_overhead.py"), "--repeats", "3"], check=True,
                   cwd=ROOT)


if __name__ == "__main__":
    main()
