"""magic's training step (a pure model, autograd on detached leaves, a functional optimizer) against
a plain torch loop (nn.Module, loss.backward(), torch.optim.AdamW) on the same model, the same
initial weights and the same batches, measured in one run (best of --repeats).

    python scripts/bench_train_overhead.py [--repeats 3] [--experiments digits_cnn text_tiny_lm]

The plain models are written with torch.nn's own layers (Conv2d, BatchNorm2d, LayerNorm, Linear,
Embedding); their first-step loss is checked against magic's before any timing, so both loops
train the same function. Prints seconds per loop and the ratio functional / plain (target <= 1.2).
"""

from __future__ import annotations

import argparse
import math
import time


def plain_module(model):
    """An nn.Module computing what magic's pure model `model` computes (SmallCNN or Transformer)."""
    import torch
    from torch import nn

    from magic_cli.models.cnn import SmallCNN
    from magic_cli.models.transformer import Transformer

    act = {"gelu": nn.GELU, "relu": nn.ReLU, "tanh": nn.Tanh, "silu": nn.SiLU, "softplus": nn.Softplus}[model.act]

    if isinstance(model, SmallCNN):
        class CNN(nn.Module):
            def __init__(self):
                super().__init__()
                c_in = model.in_channels
                for i, c in enumerate(model.channels):
                    block = nn.Module()
                    block.conv = nn.Conv2d(c_in, c, 3, padding=1, bias=False)
                    block.pool = nn.AvgPool2d(2) if i > 0 else nn.Identity()
                    block.bn = nn.BatchNorm2d(c)
                    block.act = act()
                    self.add_module(f"block{i}", block)
                    c_in = c
                self.head = nn.Linear(c_in, model.n_classes)

            def forward(self, x):
                for i in range(len(model.channels)):
                    b = getattr(self, f"block{i}")
                    x = b.act(b.bn(b.pool(b.conv(x))))
                assert model.pool == "avg", "the plain CNN pools by average"
                return self.head(x.mean((2, 3)))

        return CNN()

    if isinstance(model, Transformer):
        class Block(nn.Module):
            def __init__(self):
                super().__init__()
                d = model.dim
                self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
                self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
                self.fc, self.out, self.act = nn.Linear(d, 4 * d), nn.Linear(4 * d, d), act()

            def forward(self, h, mask):
                B, L, d = h.shape
                nh, hd = model.n_heads, d // model.n_heads
                q, k, v = self.qkv(self.ln1(h)).split(d, dim=-1)
                q, k, v = (t.view(B, L, nh, hd).transpose(1, 2) for t in (q, k, v))
                att = torch.softmax(((q @ k.transpose(-2, -1)) / math.sqrt(hd)).masked_fill(~mask, float("-inf")), -1)
                h = h + self.proj((att @ v).transpose(1, 2).reshape(B, L, d))
                return h + self.out(self.act(self.fc(self.ln2(h))))

        class LM(nn.Module):
            def __init__(self):
                super().__init__()
                self.tok = nn.Embedding(model.vocab, model.dim)
                self.pos = nn.Embedding(model.context, model.dim)
                for i in range(model.n_layers):
                    self.add_module(f"h{i}", Block())
                self.lnf, self.head = nn.LayerNorm(model.dim), nn.Linear(model.dim, model.vocab)

            def forward(self, x):
                L = x.shape[1]
                h = self.tok(x) + self.pos.weight[:L]
                mask = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()
                for i in range(model.n_layers):
                    h = getattr(self, f"h{i}")(h, mask)
                return self.head(self.lnf(h))

        return LM()
    raise SystemExit(f"no plain counterpart for {type(model).__name__}")


def measure(name: str, repeats: int) -> tuple[float, float]:
    import torch

    from magic_cli.config import load
    from magic_cli.core.losses import per_example_loss
    from magic_cli.determinism import enable_determinism
    from magic_cli.stages.assemble import assemble

    config = load([f"experiment={name}"])
    enable_determinism(config.device, config.threads)
    problem = assemble(config)
    init = problem.init_state()
    batches = [problem.batch(t) for t in range(problem.total_steps)]  # both loops get these

    def fresh():
        module = plain_module(problem.model).to(problem.dtype)
        missing, unexpected = module.load_state_dict({**init.params, **init.buffers}, strict=False)
        left = [k for k in missing if not k.endswith("num_batches_tracked")]
        assert not left and not unexpected, (left, unexpected)
        opt = config.optimizer
        return module, torch.optim.AdamW(module.parameters(), lr=opt.lr, betas=tuple(opt.betas),
                                         weight_decay=opt.weight_decay)

    module, _ = fresh()
    with torch.no_grad():
        x, y = batches[0].x, batches[0].y
        mine = per_example_loss(problem.model.apply(init.params, init.buffers, x, train=True)[0], y).mean()
        theirs = per_example_loss(module.train()(x), y).mean()
    assert torch.allclose(mine, theirs, rtol=1e-5), (float(mine), float(theirs))

    def functional():
        state = problem.init_state()
        start = time.perf_counter()
        with torch.no_grad():
            for b in batches:
                state = problem.eager_step(state, b, problem.weights[problem.schedule[b.t]])
        return time.perf_counter() - start

    def plain():
        module, optimizer = fresh()
        module.train()
        start = time.perf_counter()
        for b in batches:
            optimizer.zero_grad(set_to_none=True)
            per_example_loss(module(b.x), b.y).mean().backward()
            optimizer.step()
        return time.perf_counter() - start

    f = min(functional() for _ in range(repeats))
    p = min(plain() for _ in range(repeats))
    return f, p


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="measure each loop this many times, keep the best")
    parser.add_argument("--experiments", nargs="+", default=["digits_cnn", "text_tiny_lm"])
    args = parser.parse_args()
    print(f"{'experiment':<16}{'functional s':>14}{'plain s':>10}{'ratio':>8}   target <= 1.2")
    for name in args.experiments:
        f, p = measure(name, args.repeats)
        print(f"{name:<16}{f:>14.3f}{p:>10.3f}{f / p:>8.3f}", flush=True)


if __name__ == "__main__":
    main()
