"""Attribution cost relative to training, measured in one run (the machine is shared and noisy,
so each figure is the best of --repeats and only ratios measured together are compared).

    python scripts/bench_attribute.py [OVERRIDES...] [--repeats 3]

Prints: train seconds; attribute seconds for 1 id and for 64 ids (checkpoint=all); the ratios
(attribute 1 id / train) and (attribute 64 ids / 64 / train); checkpoint=all vs replay (k=4)
vs binomial (at replay's peak memory): seconds, peak states and recomputed steps for 1 id and
64 ids; and 64 ids in groups of 16 with one replay per group vs one replay shared by all.
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
    from magic_cli.replay import ReverseStates, root_boundaries
    from magic_cli.train import Problem

    config = load(args.overrides)
    enable_determinism(config.device, config.threads)
    problem = Problem.build(config)
    T = problem.total_steps
    keep = {("all", 0): set(root_boundaries("all", T)), ("replay", 4): set(root_boundaries("replay", T, 4))}
    probe = ReverseStates(lambda s, t: s, {t: t for t in keep[("replay", 4)]}, T, "replay", 4)
    list(probe)
    memory = probe.peak_states  # replay k=4's peak: binomial gets the same memory
    keep[("binomial", memory)] = set(root_boundaries("binomial", T, memory))

    def train():
        final, kept, seconds = problem.run(keep=set().union(*keep.values()))
        return seconds, final, kept

    train_s, final, kept = best_of(args.repeats, train)
    many = list(range(args.many))

    def attribute(strategy, param, groups):
        stored = {t: s for t, s in kept.items() if t in keep[(strategy, param)]}

        def once():
            start = time.perf_counter()
            _, stats = reverse_pass(problem, final, stored, strategy, param, groups, config.attribute.output)
            return time.perf_counter() - start, stats.peak_states, stats.forward_steps

        return best_of(args.repeats, once)

    one_s, one_peak, _ = attribute("all", 0, [[0]])
    many_s, many_peak, _ = attribute("all", 0, [many])
    rep1_s, rep1_peak, rep1_fwd = attribute("replay", 4, [[0]])
    repm_s, repm_peak, repm_fwd = attribute("replay", 4, [many])
    bin1_s, bin1_peak, bin1_fwd = attribute("binomial", memory, [[0]])
    groups = [many[i:i + 16] for i in range(0, len(many), 16)]
    shared_s, _, shared_fwd = attribute("replay", 4, groups)
    separate = [attribute("replay", 4, [g]) for g in groups]
    separate_s, separate_fwd = sum(r[0] for r in separate), sum(r[2] for r in separate)

    print(f"config: {config.name} ({config.dataset['name']}, {config.model}, {config.optimizer.name}), "
          f"T={T} steps, N={problem.dataset.n_train}, threads={config.threads}, best of {args.repeats}")
    print(f"{'train seconds':<44}{train_s:8.3f}")
    print(f"{'attribute 1 id seconds (all)':<44}{one_s:8.3f}")
    print(f"{f'attribute {args.many} ids seconds (all)':<44}{many_s:8.3f}")
    print(f"{'ratio attribute 1 id / train':<44}{one_s / train_s:8.3f}   target <= 2")
    print(f"{f'ratio attribute {args.many} ids / {args.many} / train':<44}{many_s / args.many / train_s:8.3f}"
          f"   target <= 0.1")
    print()
    print(f"{'checkpoint':<22}{'ids':>5}{'seconds':>10}{'x train':>10}{'peak states':>13}{'recomputed':>12}")
    for name, ids, s, peak, fwd in [("all", 1, one_s, one_peak, 0), ("replay k=4", 1, rep1_s, rep1_peak, rep1_fwd),
                                    (f"binomial memory={memory}", 1, bin1_s, bin1_peak, bin1_fwd),
                                    ("all", args.many, many_s, many_peak, 0),
                                    ("replay k=4", args.many, repm_s, repm_peak, repm_fwd)]:
        print(f"{name:<22}{ids:>5}{s:>10.3f}{s / train_s:>10.3f}{peak:>13}{fwd:>12}")
    print(f"{'ratio binomial / replay recomputed steps':<44}{bin1_fwd / rep1_fwd:8.3f}   at equal memory")
    print()
    print(f"replay k=4, {args.many} ids in {len(groups)} groups of 16:")
    print(f"{'  one replay per group: seconds, recomputed':<44}{separate_s:8.3f}{separate_fwd:>8}")
    print(f"{'  one replay shared by all: seconds, recomputed':<44}{shared_s:8.3f}{shared_fwd:>8}")
    print(f"{'  ratio shared / per group seconds':<44}{shared_s / separate_s:8.3f}")


if __name__ == "__main__":
    main()
