"""Attribution cost relative to training, measured in one run (the machine is shared and noisy,
so each figure is the best of --repeats and only ratios measured together are compared).

    python scripts/bench_attribute.py [OVERRIDES...] [--repeats 3]

Prints: train seconds; attribute seconds for 1 id and for 64 ids (checkpoint=all); the ratios
(attribute 1 id / train) and (attribute 64 ids / 64 / train); and checkpoint=all vs
replay (k=4): seconds and peak states for 1 id and 64 ids.
Targets on the default experiment: 1 id <= 2x train; 64 ids <= 0.1x train per id.
"""

from __future__ import annotations

import argparse
import time


def best_of(repeats: int, fn):
    results = [fn() for _ in range(repeats)]
    return min(results, key=lambda r: r[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides (default: the default experiment)")
    parser.add_argument("--repeats", type=int, default=3, help="measure each figure this many times, keep the best")
    parser.add_argument("--many", type=int, default=64, help="test ids in the batched measurement")
    args = parser.parse_args()

    from magic_cli.config import load
    from magic_cli.determinism import enable_determinism
    from magic_cli.metagrad import reverse_pass
    from magic_cli.replay import root_boundaries
    from magic_cli.train import Problem

    config = load(args.overrides)
    enable_determinism(config.device, config.threads)
    problem = Problem.build(config)
    T = problem.total_steps
    keep_all = set(root_boundaries("all", T))
    keep_replay = set(root_boundaries("replay", T, 4))

    def train():
        final, kept, seconds = problem.run(keep=keep_all | keep_replay)
        return seconds, final, kept

    train_s, final, kept = best_of(args.repeats, train)
    many = list(range(args.many))

    def attribute(strategy, ids):
        stored = {t: s for t, s in kept.items() if t in (keep_all if strategy == "all" else keep_replay)}

        def once():
            start = time.perf_counter()
            _, stats = reverse_pass(problem, final, stored, strategy, 4, ids, config.attribute.output)
            return time.perf_counter() - start, stats.peak_states

        return best_of(args.repeats, once)

    one_s, one_peak = attribute("all", [0])
    many_s, many_peak = attribute("all", many)
    rep1_s, rep1_peak = attribute("replay", [0])
    repm_s, repm_peak = attribute("replay", many)

    print(f"config: {config.name} ({config.dataset['name']}, {config.model}, {config.optimizer.name}), "
          f"T={T} steps, N={problem.dataset.n_train}, threads={config.threads}, best of {args.repeats}")
    print(f"{'train seconds':<44}{train_s:8.3f}")
    print(f"{'attribute 1 id seconds (all)':<44}{one_s:8.3f}")
    print(f"{f'attribute {args.many} ids seconds (all)':<44}{many_s:8.3f}")
    print(f"{'ratio attribute 1 id / train':<44}{one_s / train_s:8.3f}   target <= 2")
    print(f"{f'ratio attribute {args.many} ids / {args.many} / train':<44}{many_s / args.many / train_s:8.3f}"
          f"   target <= 0.1")
    print()
    print(f"{'checkpoint':<12}{'ids':>5}{'seconds':>10}{'x train':>10}{'peak states':>13}")
    for name, ids, s, peak in [("all", 1, one_s, one_peak), ("replay k=4", 1, rep1_s, rep1_peak),
                               ("all", args.many, many_s, many_peak),
                               ("replay k=4", args.many, repm_s, repm_peak)]:
        print(f"{name:<12}{ids:>5}{s:>10.3f}{s / train_s:>10.3f}{peak:>13}")


if __name__ == "__main__":
    main()
