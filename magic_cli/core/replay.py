"""Reverse-order training states without storing them all: checkpoint strategies.

The reverse pass needs s_{T-1}, ..., s_0 in that order. All three strategies are one lazy
tree over the states 0..T (Engstrom et al. 2025, "REPLAY"):

    expand(lo, hi, s_lo):   # yield s_{hi-1} ... s_lo
        boundaries lo = b_0 < b_1 < ... < b_m = hi
        run forward from s_lo, keeping s_{b_1} ... s_{b_{m-1}}
        for each child [b_c, b_{c+1}) from last to first: expand it, then drop s_{b_c}

The root's boundaries are the checkpoints `train` stores; the strategies differ only in how
a segment is split:

    all       root = every state                  -> no recomputation, T+1 states
    sqrt      root = ~sqrt(T) states, then every step of one segment at a time  -> ~2 sqrt(T)
    replay    root = k+1 states, then k-ary below -> <= k * ceil(log_k T) states, ~T log_k T steps
    binomial  at most M states (checkpoint.memory): Revolve (Griewank & Walther 2000), two
              children split where the binomial rule puts them, which needs the fewest
              recomputed steps any schedule can with M states (tests check it against a DP)

Recomputation is exactly the training step, so every state is bit-identical to training's.

The strategy's parameter `k` is replay's branching factor and binomial's memory M (in states).
"""

from __future__ import annotations

import math
from math import comb
from typing import Callable, Iterator

from magic_cli.names import STRATEGIES


def _beta(s: int, r: int) -> int:
    """beta(s, r) = C(s + r, s): the most steps s checkpoints reverse with each step run <= r times."""
    return comb(s + r, s) if r >= 0 else 0


def binomial_split(free: int, length: int) -> int:
    """Revolve's first checkpoint offset for reversing `length` >= 2 steps from a held state with
    `free` >= 1 more states to keep: the start of Griewank's optimal range (s = free + 1 counts the
    held state; r is the fewest repetitions with beta(s, r) >= length)."""
    s, r = free + 1, 0
    while _beta(s, r) < length:
        r += 1
    return max(1, _beta(s, r - 2), length - _beta(s - 1, r))


def binomial_cost(free: int, length: int) -> int:
    """The fewest forward steps to reverse `length` steps from a held state with `free` more
    states: r * length - beta(s, r - 1) with s = free + 1 (Griewank & Walther 2000)."""
    if length <= 1:
        return 0
    s, r = free + 1, 0
    while _beta(s, r) < length:
        r += 1
    return r * length - comb(s + r, r - 1)


def binomial_root(total_steps: int, memory: int) -> list[int]:
    """The states the first forward sweep of the binomial schedule keeps (`train` stores them)."""
    bounds, lo, held = [0], 0, 1
    while total_steps - lo >= 2 and memory - held - 2 >= 1:
        lo += binomial_split(memory - held - 2, total_steps - lo)
        bounds.append(lo)
        held += 1
    return bounds + [total_steps]


def kary_split(lo: int, hi: int, k: int) -> list[int]:
    """Boundaries splitting [lo, hi] into at most k near-equal children (deduplicated)."""
    n = hi - lo
    return sorted({lo + (c * n) // k for c in range(k + 1)})


def root_boundaries(strategy: str, total_steps: int, k: int = 4) -> list[int]:
    """The steps whose states `train` stores for a strategy (always includes 0 and T)."""
    T = total_steps
    if strategy == "all":
        return list(range(T + 1))
    if strategy == "sqrt":
        return kary_split(0, T, max(1, math.ceil(math.sqrt(T))))
    if strategy == "replay":
        return kary_split(0, T, k)
    if strategy == "binomial":
        return binomial_root(T, k)
    raise ValueError(f"checkpoint.name={strategy!r} is not valid; choose one of: {', '.join(STRATEGIES)}")


class ReverseStates:
    """Iterate (t, s_t) for t = T-1 ... 0 from the root checkpoints, recomputing the rest.

    forward(state, t) -> state at t+1 (the training step). `stored` maps root boundaries
    (as from root_boundaries) to states, or to zero-argument loaders for lazy loading.
    Counts `forward_steps` and `peak_states`: the most states held at once (stored states
    held, boundaries kept, and the state being recomputed).
    """

    def __init__(self, forward: Callable, stored: dict, total_steps: int, strategy: str, k: int = 4):
        self.forward = forward
        self.stored = stored
        self.T = total_steps
        self.strategy = strategy
        self.k = k
        self.forward_steps = 0
        self.held = 0
        self.peak_states = 0

    def _hold(self, n: int = 1) -> None:
        self.held += n
        self.peak_states = max(self.peak_states, self.held)

    def _split(self, lo: int, hi: int) -> list[int]:
        if self.strategy == "sqrt":
            return list(range(lo, hi + 1))
        if self.strategy == "replay":
            return kary_split(lo, hi, self.k)
        if self.strategy == "binomial":  # free: what M allows besides the held states and a sweep's two
            free = self.k - self.held - 2
            return [lo, lo + binomial_split(free, hi - lo), hi] if free >= 1 else []
        raise AssertionError("strategy 'all' stores every state and never splits below the root")

    def __iter__(self) -> Iterator[tuple[int, object]]:
        bounds = sorted(t for t in self.stored if t < self.T)
        if bounds[0] != 0 or max(self.stored) != self.T:
            raise ValueError("stored checkpoints must include steps 0 and T")
        self._hold(len(bounds))  # the root checkpoints (s_T is the caller's)
        ends = bounds[1:] + [self.T]
        for lo, hi in reversed(list(zip(bounds, ends))):
            state = self.stored[lo]
            yield from self._expand(lo, hi, state() if callable(state) else state)

    def _expand(self, lo: int, hi: int, s_lo) -> Iterator[tuple[int, object]]:
        """Yield s_{hi-1} ... s_lo; owns s_lo and releases it when done."""
        if hi - lo == 1:
            yield lo, s_lo
            self.held -= 1
            return
        bounds = self._split(lo, hi)
        if not bounds:  # no state to spare: recompute each state from s_lo (binomial's last resort)
            yield from self._recompute_each(lo, hi, s_lo)
            return
        kept = {lo: s_lo}
        state, state_is_transient = s_lo, False
        for t in range(lo, bounds[-2]):
            state_next = self.forward(state, t)
            self.forward_steps += 1
            # alive now: the held states, the new one, and its input if that is not kept
            self.peak_states = max(self.peak_states, self.held + 1 + state_is_transient)
            state = state_next
            state_is_transient = t + 1 not in bounds
            if not state_is_transient:
                kept[t + 1] = state
                self.held += 1
        for a, b in reversed(list(zip(bounds[:-1], bounds[1:]))):
            yield from self._expand(a, b, kept.pop(a))

    def _recompute_each(self, lo: int, hi: int, s_lo) -> Iterator[tuple[int, object]]:
        """Yield s_{hi-1} ... s_lo, each recomputed from s_lo, holding no state but s_lo."""
        for target in range(hi - 1, lo, -1):
            state = s_lo
            for t in range(lo, target):
                state = self.forward(state, t)
                self.forward_steps += 1
                self.peak_states = max(self.peak_states, self.held + 1 + (t > lo))
            yield target, state
        yield lo, s_lo
        self.held -= 1
