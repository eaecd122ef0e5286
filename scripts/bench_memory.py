"""How well `attribute.memory`'s count of tensor bytes predicts what a reverse step really takes.

    python scripts/bench_memory.py [--experiments digits_cnn text_tiny_lm] [--ids 2 8 32]

For each experiment and number of test ids J, in a fresh process each: the tensor bytes that
magic_cli.core.memory counts for one reverse step (what plans the groups), and the growth of the
process's peak resident memory over one reverse step (VmHWM, reset just before it, on Linux).
Prints both and their ratio; RSS includes the allocator's slack, so a ratio a little above 1 is
expected, one far above 1 means the budget is not a safe bound.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, sys
from magic_cli.config import load
from magic_cli.determinism import enable_determinism
from magic_cli.core.memory import reverse_step_bytes
from magic_cli.core.metagrad import reverse_step
from magic_cli.core.problem import TrainState
from magic_cli.stages.assemble import assemble
import torch

experiment, J, what = sys.argv[1], int(sys.argv[2]), sys.argv[3]
config = load([f"experiment={experiment}"])
enable_determinism(config.device, config.threads)
problem = assemble(config)
state = problem.init_state()
reverse_step_bytes(problem, state, 1)  # warm up: one-off allocations are not the step's
if what == "counted":
    print(json.dumps(reverse_step_bytes(problem, state, J)))
else:
    def vm(key):
        return int(next(line for line in open("/proc/self/status") if line.startswith(key)).split()[1]) * 1024
    zeros = lambda d: {k: zeros(v) if isinstance(v, dict) else torch.zeros((J, *v.shape), dtype=v.dtype)
                       for k, v in d.items()}
    open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS
    before = vm("VmRSS:")
    lam = TrainState(zeros(state.params), zeros(state.buffers), zeros(state.opt))
    reverse_step(problem, state, 0, lam, need_next=False)
    print(json.dumps(vm("VmHWM:") - before))
"""


def child(experiment: str, J: int, what: str) -> int:
    out = subprocess.run([sys.executable, "-c", CHILD, experiment, str(J), what], capture_output=True, text=True)
    if out.returncode:
        sys.exit(out.stderr.strip().splitlines()[-1])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiments", nargs="+", default=["digits_mlp", "digits_cnn", "text_tiny_lm"])
    parser.add_argument("--ids", nargs="+", type=int, default=[2, 8, 32])
    args = parser.parse_args()
    print(f"{'experiment':<14} {'ids':>4} {'counted MB':>11} {'RSS growth MB':>14} {'ratio':>6}")
    for experiment in args.experiments:
        for J in args.ids:
            counted, measured = child(experiment, J, "counted"), child(experiment, J, "rss")
            print(f"{experiment:<14} {J:>4} {counted / 1e6:>11.1f} {measured / 1e6:>14.1f} "
                  f"{measured / counted:>6.2f}", flush=True)


if __name__ == "__main__":
    main()
