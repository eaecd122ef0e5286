"""Data augmentation as a pure function of (seed, step, position in the batch), so training,
recomputation in the reverse pass and every retraining see exactly the same images."""

from __future__ import annotations

from functools import partial

from magic_cli.determinism import generator


def _flip_translate(x, example_ids, seed: int, step: int, *, flip: bool, translate: int):
    """x: (B, C, H, W). Random horizontal flip and a shift of up to `translate` pixels (zero fill)."""
    import torch
    import torch.nn.functional as F
    gen = generator(seed, "aug", step)
    B, _, H, W = x.shape
    flips = torch.rand(B, generator=gen) < 0.5  # drawn even when unused: the stream stays the same
    shifts = torch.randint(-translate, translate + 1, (B, 2), generator=gen)
    if flip:
        x = torch.where(flips.to(x.device)[:, None, None, None], x.flip(3), x)
    if translate:
        p = translate
        padded = F.pad(x, (p, p, p, p))
        rows = (torch.arange(H)[None, :] + p - shifts[:, :1]).to(x.device)  # (B, H)
        cols = (torch.arange(W)[None, :] + p - shifts[:, 1:]).to(x.device)  # (B, W)
        b = torch.arange(B, device=x.device)[:, None, None]
        x = padded.permute(0, 2, 3, 1)[b, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    return x


def flip_translate(flip: bool, translate: int):
    """The augmentation of the image datasets, or None when both are off."""
    if not flip and not translate:
        return None
    return partial(_flip_translate, flip=bool(flip), translate=int(translate))
