"""Groups of test ids sized to a memory budget (`attribute.memory`).

The reverse pass's working memory grows linearly with the number J of test ids in a group: the
J cotangents of the state, the J rows of scores, and the vmapped backward-over-backward of each
step, whose temporaries are J times activation-sized. How much, depends on the model, the batch
and the dtype, so it is measured rather than guessed: one reverse step is run at s_0 under a
dispatch mode that adds up the bytes of every tensor storage created inside it while it is alive
(`PeakBytes`). That count is deterministic (the same ops on the same shapes every time), so the
group size chosen from it is a function of the config and the device type, like the scores, and a
rerun forms the same groups and resumes them.

What it counts is tensor bytes, not the process's resident memory: the allocator's slack, the
framework's own tensors and the stored training states (`checkpoint.memory`) come on top.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from magic_cli.core.metagrad import reverse_step
from magic_cli.core.problem import TrainState, state_size
from magic_cli.errors import ConfigError


def peak_tensor_bytes(fn) -> int:
    """The most bytes of tensor storage created by fn() alive at once while it runs."""

    class PeakBytes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.live, self.peak, self.seen = 0, 0, set()

        def _free(self, key, n):
            self.seen.discard(key)
            self.live -= n

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    storage = t.untyped_storage()
                    key, n = storage.data_ptr(), storage.nbytes()
                    if n and key not in self.seen:  # views and in-place results share a storage
                        self.seen.add(key)
                        self.live += n
                        self.peak = max(self.peak, self.live)
                        weakref.finalize(storage, self._free, key, n)
            return out

    mode = PeakBytes()
    with mode:
        fn()
    return mode.peak


def reverse_step_bytes(problem, state, J: int) -> int:
    """Peak tensor bytes of one reverse step at `state` (step 0's batch) for J test ids, counting
    the J cotangents it takes and returns."""
    def run():
        zeros = lambda d: {k: zeros(v) if isinstance(v, dict) else  # noqa: E731
                           torch.zeros((J, *v.shape), dtype=v.dtype, device=v.device) for k, v in d.items()}
        lam = TrainState(zeros(state.params), zeros(state.buffers), zeros(state.opt))
        reverse_step(problem, state, 0, lam, need_next=False)

    return peak_tensor_bytes(run)


@dataclass
class MemoryPlan:
    batch_size: int  # test ids per group
    groups_per_pass: int  # groups sharing one replay of training (0: no limit from memory)
    step_bytes: int  # measured peak of one reverse step for batch_size ids
    held_bytes: int  # what each further group held in a shared pass costs (cotangents + scores)
    total_bytes: int  # the estimate for one pass as planned

    def as_dict(self) -> dict:
        return dict(vars(self))


def plan_groups(problem, state, budget: int, cap: int, share_cap: int, n_ids: int, shared: bool) -> MemoryPlan:
    """The largest group size <= cap whose reverse pass fits in `budget` bytes, and how many such
    groups one shared replay can hold (each further group keeps its cotangents and scores).
    Refuses in one line (ConfigError) when not even one test id fits."""
    row = problem.dataset.n_train * torch.finfo(problem.dtype).bits // 8  # one id's scores
    cost = lambda J, step: step + J * row  # noqa: E731  (one group: its step peak + its scores)
    measured: dict[int, int] = {}

    def step(J):
        if J not in measured:
            measured[J] = reverse_step_bytes(problem, state, J)
        return measured[J]

    cap = max(1, min(cap, n_ids))
    if cap == 1 or cost(2, step(2)) > budget:
        J = 1 if cost(1, step(1)) <= budget else 0
    else:  # linear in J (the cotangents and every vmapped temporary): fit on 2 and 4, then check
        slope = max(1, (cost(4, step(4)) - cost(2, step(2))) // 2)
        J = max(2, min(cap, 2 + (budget - cost(2, step(2))) // slope))
        while J > 2 and cost(J, step(J)) > budget:  # the fit was optimistic: shrink until it fits
            J = max(2, J * budget // cost(J, step(J)))
    if J == 0:
        raise ConfigError(f"attribute.memory={budget:,} bytes is less than one test id's reverse pass needs "
                          f"({cost(1, step(1)):,} bytes); raise it")
    total = cost(J, step(J))
    held = J * (state_size(state) + row)
    groups = 1
    if shared:
        most = -(-n_ids // J)  # the groups there are
        groups = max(1, min(share_cap or most, most, 1 + (budget - total) // held))
        total += (groups - 1) * held
    return MemoryPlan(J, groups, step(J), held, total)
