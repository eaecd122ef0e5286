"""Calibration of `magic smoothness`: for recipes from smooth to chaotic, the metasmoothness S
against the LDS that MAGIC actually reaches, and their Spearman correlation.

    python scripts/calibrate_smoothness.py [--workdir runs/calibration] [--only NAME ...]

Each configuration runs the whole protocol through the CLI: `magic smoothness` (4 directions),
train, attribute 20 test ids, 50 retrainings at 1 %, score. Prints one row per configuration
(S over outputs and parameters, LDS at 1 %, accuracy) and Spearman(S outputs, LDS) over the
configurations that have an LDS (where attribution itself is refused, e.g. a NaN adjoint with
eps_root 0, the row says so). Runs are resumable: rerunning reuses every finished file.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

CONFIGS = {  # name: overrides (each names a recipe; all run with the defaults below)
    "mlp (default)": ["experiment=digits_mlp"],
    "mlp lr 1e-2": ["experiment=digits_mlp", "optimizer.lr=0.01"],
    "mlp lr 2e-2": ["experiment=digits_mlp", "optimizer.lr=0.02"],
    "mlp lr 3e-2": ["experiment=digits_mlp", "optimizer.lr=0.03"],
    "mlp lr 1e-2, eps_root 0": ["experiment=digits_mlp", "optimizer.lr=0.01", "optimizer.eps_root=0"],
    "mlp sgd lr 0.1": ["experiment=digits_mlp", "optimizer=sgd", "optimizer.lr=0.1"],
    "logreg (convex)": ["experiment=breast_cancer_logreg"],
    "cnn lr 3e-3": ["experiment=digits_cnn"],
    "cnn lr 1e-2": ["experiment=digits_cnn", "optimizer.lr=0.01"],
    "cnn lr 1e-2, head 0.1": ["experiment=digits_cnn", "optimizer.lr=0.01", "model.head_scale=0.1"],
    "cnn lr 1e-2, eps_root 0": ["experiment=digits_cnn", "optimizer.lr=0.01", "optimizer.eps_root=0"],
    "cnn lr 5e-3, eps_root 1e-4": ["experiment=digits_cnn", "optimizer.lr=0.005", "optimizer.eps_root=0.0001"],
    "cnn lr 1e-2, eps_root 1e-2, 80 ep": ["experiment=digits_cnn", "optimizer.lr=0.01", "optimizer.eps_root=0.01",
                                          "train.epochs=80"],
    "cnn bs 128, lr 2e-2, eps_root 1e-2, 80 ep": ["experiment=digits_cnn", "train.batch_size=128", "optimizer.lr=0.02",
                                                  "optimizer.eps_root=0.01", "train.epochs=80"],
}
PROTOCOL = ["ground_truth.drop_fractions=[0.01]", "ground_truth.num_subsets=50"]


def magic(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "magic_cli", *args], check=True, stdout=subprocess.DEVNULL)


def measure(name: str, workdir: Path, workers: int) -> dict:
    out = workdir / "".join(c if c.isalnum() else "_" for c in name)
    args = [*CONFIGS[name], *PROTOCOL, f"out_dir={out}"]
    magic("smoothness", "--workers", str(workers), *args)
    magic("train", *args)
    s = json.loads((out / "smoothness" / "summary.json").read_text())
    try:
        magic("attribute", "--test-ids", "0:20", *args)
    except subprocess.CalledProcessError:  # e.g. the adjoint became NaN (Adam with eps_root 0): no LDS at all
        lds = {"mean": float("nan"), "slope": float("nan")}
    else:
        magic("retrain-ground-truth", "--workers", str(workers), *args)
        magic("score", *args)
        lds = json.loads((out / "report" / "summary.json").read_text())["lds"]["magic"]["0.01"]
    return {"name": name, "S_outputs": s["S_outputs"]["mean"], "S_outputs_std": s["S_outputs"]["std"],
            "S_params": s["S_params"]["mean"], "lds": lds["mean"], "slope": lds["slope"],
            "accuracy": s["test_accuracy"], "verdict": s["verdict"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="runs/calibration", help="where the runs go")
    parser.add_argument("--only", nargs="+", default=list(CONFIGS), choices=list(CONFIGS), metavar="NAME")
    parser.add_argument("--workers", type=int, default=2, help="processes for smoothness and ground truth")
    args = parser.parse_args()

    from scipy.stats import spearmanr

    rows = []
    print(f"{'configuration':<28}{'S outputs':>10}{'±':>7}{'S params':>10}{'LDS 1%':>9}{'slope':>7}{'acc':>8}  verdict",
          flush=True)
    for name in args.only:
        r = measure(name, Path(args.workdir), args.workers)
        rows.append(r)
        print(f"{name:<28}{r['S_outputs']:>10.3f}{r['S_outputs_std']:>7.3f}{r['S_params']:>10.3f}{r['lds']:>9.3f}"
              f"{r['slope']:>7.2f}{r['accuracy']:>8.4f}  {r['verdict']}", flush=True)
    scored = [r for r in rows if r["lds"] == r["lds"]]  # attribution refused (NaN adjoint): no LDS to compare
    if len(scored) >= 3:
        rho_out = spearmanr([r["S_outputs"] for r in scored], [r["lds"] for r in scored]).statistic
        rho_par = spearmanr([r["S_params"] for r in scored], [r["lds"] for r in scored]).statistic
        print(f"\nSpearman(S outputs, LDS) = {rho_out:.3f}   Spearman(S params, LDS) = {rho_par:.3f}   "
              f"over {len(scored)} configurations with an LDS (target >= 0.8)")


if __name__ == "__main__":
    main()
