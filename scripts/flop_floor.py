"""FLOPs of one reverse step against one training step (torch.utils.flop_counter), per
experiment and number of test ids J: the floor under the ratios `make bench` measures, if every
FLOP ran at the speed of training's.

    python scripts/flop_floor.py [--experiments digits_mlp digits_cnn text_tiny_lm] [--ids 1 16 64]

A reverse step recomputes the training step's forward and gradient (the gradient's VJP needs
them) and applies a backward-over-backward per id; so at J = 1 it costs about 3x a training step
whatever the implementation, and at large J the per-id part alone is about 2x.
"""

from __future__ import annotations

import argparse


def flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiments", nargs="+", default=["digits_mlp", "digits_cnn", "text_tiny_lm"])
    parser.add_argument("--ids", nargs="+", type=int, default=[1, 16, 64])
    args = parser.parse_args()

    import torch

    from magic_cli.config import load
    from magic_cli.core.metagrad import output_cotangents, reverse_step
    from magic_cli.determinism import enable_determinism
    from magic_cli.stages.assemble import assemble

    print(f"{'experiment':<16}{'train step GFLOP':>18}" + "".join(f"{f'J={j} x/id':>12}" for j in args.ids))
    for name in args.experiments:
        config = load([f"experiment={name}"])
        enable_determinism(config.device, config.threads)
        problem = assemble(config)
        state = problem.init_state()
        t = 0
        with torch.no_grad():
            train = flops(lambda: problem.step(state, t))
        ratios = []
        for J in args.ids:
            lam = output_cotangents(problem, state, list(range(J)), config.attribute.output)
            ratios.append(flops(lambda: reverse_step(problem, state, t, lam, need_next=False)) / J / train)
        print(f"{name:<16}{train / 1e9:>18.4f}" + "".join(f"{r:>12.2f}" for r in ratios), flush=True)


if __name__ == "__main__":
    main()
