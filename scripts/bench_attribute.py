"""Attribution cost relative to training on one experiment, measured in one run (the machine is
shared and noisy, so each figure is the best of --repeats and only ratios measured together are
compared). `make bench` runs it for every experiment (scripts/bench.py).

    python scripts/bench_attribute.py [OVERRIDES...] [--config-dir DIR] [--repeats 3] [--groups] [--compile]

Prints train seconds; attribute seconds (checkpoint=all) for 1 id, 16 ids and --many ids;
replay (k=4) for 1 and 16 ids; binomial at replay's peak memory for 1 id; each as a ratio to
training (per id where several); peak states and recomputed steps; with --groups, --many ids in
groups of 16 with one replay per group vs one replay shared by all; with --compile, 16 and --many
ids with attribute.compile (torch.compile of the batched step; compiling is timed apart, once per
group size, and not counted in the row). --json FILE also writes the figures (and the process's
peak resident memory) as JSON.
"""

from __future__ import annotations

import argparse
import json
import resource
import time


def best_of(repeats: int, fn):
    results = [fn() for _ in range(repeats)]
    return min(results, key=lambda r: r[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides (default: the default experiment)")
    parser.add_argument("--config-dir", default=None, help="a folder of your own configs, as magic's --config-dir")
    parser.add_argument("--repeats", type=int, default=3, help="measure each figure this many times, keep the best")
    parser.add_argument("--many", type=int, default=64, help="test ids in the largest batched measurement")
    parser.add_argument("--groups", action="store_true", help="also: shared replay vs one replay per group of 16")
    parser.add_argument("--compile", action="store_true", help="also: 16 and --many ids with attribute.compile")
    parser.add_argument("--json", default=None, help="write the figures to this JSON file")
    args = parser.parse_args()

    from magic_cli.config import load
    from magic_cli.core.metagrad import compiled_vjp, reverse_pass, reverse_step
    from magic_cli.core.replay import ReverseStates, root_boundaries
    from magic_cli.determinism import enable_determinism
    from magic_cli.stages.assemble import assemble

    config = load(args.overrides, args.config_dir)
    enable_determinism(config.device, config.threads)
    problem = assemble(config)
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
    n_test = problem.dataset.x_test.shape[0]
    ids = lambda n: list(range(min(n, n_test)))  # noqa: E731

    def attribute(strategy, param, groups, batched_vjp=None):
        stored = {t: s for t, s in kept.items() if t in keep[(strategy, param)]}

        def once():
            start = time.perf_counter()
            _, stats = reverse_pass(problem, final, stored, strategy, param, groups, config.attribute.output,
                                    batched_vjp=batched_vjp)
            return time.perf_counter() - start, stats.peak_states, stats.forward_steps

        return best_of(args.repeats, once)

    rows = []  # (label, strategy, ids, seconds, peak states, recomputed steps)
    for label, strategy, param, n in [("all", "all", 0, 1), ("all", "all", 0, 16), ("all", "all", 0, args.many),
                                      ("replay k=4", "replay", 4, 1), ("replay k=4", "replay", 4, 16),
                                      (f"binomial memory={memory}", "binomial", memory, 1)]:
        group = ids(n)
        rows.append((label, strategy, len(group), *attribute(strategy, param, [group])))
    compile_s = {}
    if args.compile:
        from magic_cli.core.metagrad import output_cotangents
        from magic_cli.errors import ConfigError

        batched_vjp = compiled_vjp(problem)
        for n in (16, args.many):
            group = ids(n)
            start = time.perf_counter()  # the first call compiles for this group size
            try:
                reverse_step(problem, final, 0, output_cotangents(problem, final, group, config.attribute.output),
                             need_next=False, batched_vjp=batched_vjp)
            except ConfigError as e:  # a model that does not compile: no compiled rows
                print(f"no compiled rows: {e}")
                break
            compile_s[len(group)] = time.perf_counter() - start
            rows.append(("all, compiled", "all", len(group), *attribute("all", 0, [group], batched_vjp)))
    figures = {"experiment": config.name, "steps": T, "n_train": problem.dataset.n_train, "threads": config.threads,
               "train_s": train_s, "memory": memory, "compile_s": compile_s,
               "rows": [dict(zip(("label", "strategy", "ids", "seconds", "peak_states", "recomputed"), r))
                        for r in rows]}

    print(f"config: {config.name} ({config.dataset['name']}, {config.model['name']}, {config.optimizer.name}), "
          f"T={T} steps, N={problem.dataset.n_train}, threads={config.threads}, best of {args.repeats}")
    print(f"{'train seconds':<30}{train_s:8.3f}")
    print(f"{'checkpoint':<24}{'ids':>5}{'seconds':>10}{'x train/id':>12}{'peak states':>13}{'recomputed':>12}")
    for label, _, n, s, peak, fwd in rows:
        print(f"{label:<24}{n:>5}{s:>10.3f}{s / n / train_s:>12.3f}{peak:>13}{fwd:>12}")
    for n, seconds in compile_s.items():
        print(f"{f'compiling for {n} ids (once per group size)':<52}{seconds:8.1f}")
    one_replay, one_binomial = rows[3], rows[5]
    print(f"{'binomial / replay recomputed steps at equal memory':<52}{one_binomial[5] / one_replay[5]:8.3f}")

    if args.groups:
        many = ids(args.many)
        groups = [many[i:i + 16] for i in range(0, len(many), 16)]
        shared_s, _, shared_fwd = attribute("replay", 4, groups)
        separate = [attribute("replay", 4, [g]) for g in groups]
        separate_s, separate_fwd = sum(r[0] for r in separate), sum(r[2] for r in separate)
        print(f"replay k=4, {len(many)} ids in {len(groups)} groups of 16:")
        print(f"{'  one replay per group: seconds, recomputed':<52}{separate_s:8.3f}{separate_fwd:>8}")
        print(f"{'  one replay shared by all: seconds, recomputed':<52}{shared_s:8.3f}{shared_fwd:>8}")
        print(f"{'  ratio shared / per group seconds':<52}{shared_s / separate_s:8.3f}")
        figures["groups"] = {"separate_s": separate_s, "shared_s": shared_s}

    figures["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{'peak resident memory MB':<30}{figures['peak_rss_mb']:8.0f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=1)


if __name__ == "__main__":
    main()
