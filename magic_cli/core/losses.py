"""Losses and output functions: what training minimises and what attribution differentiates.

    per_example_loss    cross-entropy of each example (B,); for sequences the mean over its
                        supervised tokens (targets IGNORE = -100 are left out)
    per_example_margin  logit_y - logsumexp(other logits) (B,), the mean over supervised tokens
    per_example_correct the share of an example's supervised targets predicted right (B,)

OUTPUT_FUNCTIONS maps the names of `attribute.output` (magic_cli.names.OUTPUTS) to them. A leaf
of the core: it imports nothing of the package but the names.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from magic_cli.contracts import IGNORE, OutputFunction
from magic_cli.names import LOSS_REDUCTIONS, OUTPUTS


def token_losses(logits, y):
    """Next-token (or class) cross-entropy of every target and the supervision mask, both (B, L)
    (L = 1 for classification); unsupervised targets (IGNORE) count 0."""
    n_classes = logits.shape[-1]
    losses = F.cross_entropy(logits.reshape(-1, n_classes), y.reshape(-1), reduction="none", ignore_index=IGNORE)
    return losses.view(y.shape[0], -1), (y != IGNORE).view(y.shape[0], -1)


def per_example_loss(logits, y):
    """Cross-entropy of each example: (B,). Sequences (B, L, V) give the mean loss over the
    example's supervised tokens (targets IGNORE are left out; an example without any gives 0)."""
    losses, mask = token_losses(logits, y)
    return losses.sum(1) / mask.sum(1).clamp(min=1)


def per_example_margin(logits, y):
    """Correct-class margin logit_y - logsumexp(other logits): (B,), the mean over supervised
    tokens for sequences."""
    n_classes = logits.shape[-1]
    mask = (y != IGNORE).reshape(-1)
    flat, target = logits.reshape(-1, n_classes), y.reshape(-1).clamp(min=0)
    correct = flat.gather(1, target[:, None]).squeeze(1)
    others = flat.scatter(1, target[:, None], float("-inf"))
    margins = torch.where(mask, correct - torch.logsumexp(others, dim=1), 0.0).view(y.shape[0], -1)
    return margins.sum(1) / mask.view(y.shape[0], -1).sum(1).clamp(min=1)


def per_example_correct(logits, y):
    """The share of an example's supervised targets predicted right (argmax): (B,)."""
    mask = (y != IGNORE).reshape(y.shape[0], -1)
    right = (logits.argmax(-1) == y).reshape(y.shape[0], -1) & mask
    return right.sum(1).double() / mask.sum(1).clamp(min=1)


OUTPUT_FUNCTIONS: dict[str, OutputFunction] = {"loss": per_example_loss, "margin": per_example_margin}
assert tuple(OUTPUT_FUNCTIONS) == OUTPUTS
__all__ = ["LOSS_REDUCTIONS", "OUTPUT_FUNCTIONS", "per_example_loss", "per_example_margin",
           "per_example_correct", "token_losses"]
