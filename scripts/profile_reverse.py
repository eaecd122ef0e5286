"""Where a reverse step's time goes (torch.profiler, self CPU time by operator), per experiment:
the share of matrix multiplies and convolutions against everything else (elementwise work of the
vmapped backward-over-backward, copies, reductions).

    python scripts/profile_reverse.py [--experiments digits_cnn text_tiny_lm] [--ids 16] [--steps 8]
"""

from __future__ import annotations

import argparse

DENSE = ("mm", "bmm", "addmm", "matmul", "conv", "convolution", "linear", "baddbmm", "mkldnn")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiments", nargs="+", default=["digits_cnn", "text_tiny_lm"])
    parser.add_argument("--ids", type=int, default=16)
    parser.add_argument("--steps", type=int, default=8, help="reverse steps profiled")
    parser.add_argument("--top", type=int, default=10)
    args = parser.parse_args()

    from torch.profiler import ProfilerActivity, profile

    from magic_cli.config import load
    from magic_cli.core.metagrad import output_cotangents, reverse_step
    from magic_cli.determinism import enable_determinism
    from magic_cli.stages.assemble import assemble

    for name in args.experiments:
        config = load([f"experiment={name}"])
        enable_determinism(config.device, config.threads)
        problem = assemble(config)
        state = problem.init_state()
        lam = output_cotangents(problem, state, list(range(args.ids)), config.attribute.output)
        reverse_step(problem, state, 0, lam, need_next=False)  # warm up
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for t in range(args.steps):
                reverse_step(problem, state, t, lam, need_next=False)
        events = [e for e in prof.key_averages() if e.key.startswith("aten::")]
        total = sum(e.self_cpu_time_total for e in events)
        dense = sum(e.self_cpu_time_total for e in events if any(d in e.key[6:] for d in DENSE))
        print(f"\n{name}, J={args.ids}, {args.steps} reverse steps: matmul/conv {100 * dense / total:.0f} % of "
              f"self CPU time, everything else {100 * (total - dense) / total:.0f} %")
        for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:args.top]:
            print(f"  {e.key:<44}{100 * e.self_cpu_time_total / total:6.1f} %{e.count:>8} calls")


if __name__ == "__main__":
    main()
