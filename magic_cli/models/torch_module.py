"""Any torch.nn.Module as a pure magic model (contracts.Model), through torch.func.functional_call.

    init(generator) -> (params, buffers)     the module's trainable parameters and its buffers
    apply(params, buffers, x, train)         -> (outputs, new_buffers)

- Initialisation is a pure function of the seed: the module is built by the user's factory
  under a torch RNG seeded from the run's generator (the global RNG is saved and restored), or
  its tensors are loaded from `init_from` (a state dict saved with torch.save, loaded with
  weights_only=True, or a .safetensors file).
- BatchNorm stays pure: every nn.BatchNorm1d/2d/3d is swapped for PureBatchNorm, which computes
  the same normalisation and returns the updated running statistics as new buffers instead of
  writing them in place (an in-place update would break the reverse pass).
- `trainable`: glob patterns of parameter names (default all). Frozen parameters are constants
  held by the model: outside the optimizer state and the adjoint.
- Tied parameters (one nn.Parameter under two names, e.g. input and output embeddings) are one
  tensor under the first name: one gradient summing both uses, one pair of Adam moments.
- Randomness inside the module (dropout with p > 0) is refused with one line: it would draw from
  the global RNG, and the training run would no longer be a function of the data weights.
"""

from __future__ import annotations

import fnmatch
import inspect
from pathlib import Path
from typing import Callable

from magic_cli.errors import ConfigError
from magic_cli.models.layers import normalize
from magic_cli.readers import read_tensors


def _pure_batch_norm_class():
    import torch

    class PureBatchNorm(torch.nn.Module):
        """nn.BatchNorm's computation with the running statistics returned, not written."""

        def __init__(self, bn):
            super().__init__()
            self.eps, self.momentum, self.affine = bn.eps, bn.momentum, bn.affine
            self.track = bn.track_running_stats
            if bn.affine:
                self.weight, self.bias = bn.weight, bn.bias
            if self.track:
                self.register_buffer("running_mean", bn.running_mean)
                self.register_buffer("running_var", bn.running_var)
                self.register_buffer("num_batches_tracked", bn.num_batches_tracked)
            self.sink = None  # dict for the new running statistics, set by ModuleModel.apply

        def forward(self, x):
            # The normalisation written out (as models/layers.batch_norm): F.batch_norm refuses
            # running statistics that require grad, and the reverse pass differentiates them.
            dims = [d for d in range(x.dim()) if d != 1]
            if self.training or not self.track:
                var, mean = torch.var_mean(x, dims, unbiased=False)
                if self.training and self.track:
                    n = x.numel() // x.shape[1]
                    count = self.num_batches_tracked + 1
                    m = self.momentum if self.momentum is not None else 1.0 / count
                    self.sink["running_mean"] = (1 - m) * self.running_mean + m * mean
                    self.sink["running_var"] = (1 - m) * self.running_var + m * var * (n / max(n - 1, 1))
                    self.sink["num_batches_tracked"] = count
            else:
                mean, var = self.running_mean, self.running_var
            weight, bias = (self.weight, self.bias) if self.affine else (None, None)
            return normalize(x, mean, var, weight, bias, self.eps)

    return PureBatchNorm


def _make_pure(module):
    """Swap BatchNorm layers for PureBatchNorm in place; refuse randomness. Returns the BN names."""
    import torch

    pure_bn = _pure_batch_norm_class()
    names = []
    for name, child in list(module.named_modules()):
        if isinstance(child, torch.nn.modules.dropout._DropoutNd) and child.p > 0:
            raise ConfigError(f"the model's {name or 'module'} is {type(child).__name__}(p={child.p}): dropout "
                              "would draw from the global RNG; set p=0")
        if isinstance(child, torch.nn.modules.batchnorm._BatchNorm):
            parent_name, _, attr = name.rpartition(".")
            parent = module.get_submodule(parent_name) if parent_name else module
            setattr(parent, attr, pure_bn(child))
            names.append(name)
    if any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in module.modules()):
        raise ConfigError("a BatchNorm at the model's root cannot be made pure; wrap it in a container")
    return names


def _load_weights(path: str) -> dict:
    if not Path(path).is_file():
        raise ConfigError(f"model.init_from: no such file {path!r}")
    return read_tensors(path, "model.init_from")


class ModuleModel:
    """The pure model of a user's nn.Module (see the module docstring)."""

    def __init__(self, factory: Callable, input_shape: tuple, n_classes: int, options: dict,
                 init_from: str | None, trainable: tuple):
        self.factory, self.input_shape, self.n_classes, self.options = factory, input_shape, n_classes, options
        self.init_from, self.trainable = init_from, tuple(trainable)
        self.module = self._build(seed=0)
        self.bn_names = _make_pure(self.module)
        self._bns = {name: self.module.get_submodule(name) for name in self.bn_names}  # looked up once
        self.module.train(True)  # one mode for every submodule (apply switches the root's, so all follow)
        names = [n for n, _ in self.module.named_parameters()]  # a tied parameter under its first name only
        self.train_names = [n for n in names if any(fnmatch.fnmatchcase(n, pat) for pat in self.trainable)]
        if not self.train_names:
            raise ConfigError(f"model.trainable={list(self.trainable)} matches none of the model's parameters "
                              f"({', '.join(names[:6])}{', ...' if len(names) > 6 else ''})")
        self.frozen: dict = {}  # name -> float64 CPU constant, set by init()
        self._frozen_cast = None  # (device, dtype) the module's frozen parameters hold, set by _hold_frozen

    def _construct(self):
        """The nn.Module, built under the seeded RNG (subclasses build theirs another way)."""
        return self.factory(self.input_shape, self.n_classes, **self.options)

    def _forward(self, tensors: dict, x):
        """The module's logits for x with its tensors replaced by `tensors` (tied ones stay tied)."""
        from torch.func import functional_call

        return functional_call(self.module, tensors, (x,), tie_weights=True, strict=False)

    def _build(self, seed: int):
        import torch

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            module = self._construct()
        if not isinstance(module, torch.nn.Module):
            raise ConfigError(f"the model factory {self.factory.__name__} returned {type(module).__name__}, "
                              "not a torch.nn.Module")
        return module

    def init(self, gen):
        """(params, buffers) float64: the trainable parameters and the buffers (BatchNorm statistics)."""
        import torch

        seed = int(torch.randint(0, 2 ** 62, (1,), generator=gen))
        module = self._build(seed)
        _make_pure(module)
        state = {k: v.detach().clone() for k, v in module.state_dict().items()}
        if self.init_from is not None:
            loaded = _load_weights(self.init_from)
            unknown = sorted(set(loaded) - set(state))
            if unknown:
                raise ConfigError(f"model.init_from: {self.init_from} has tensors the model does not: "
                                  f"{', '.join(unknown[:5])}")
            for k, v in loaded.items():
                if tuple(v.shape) != tuple(state[k].shape):
                    raise ConfigError(f"model.init_from: {k} has shape {tuple(v.shape)} in {self.init_from}, "
                                      f"the model's is {tuple(state[k].shape)}")
                state[k] = v.detach().clone()
        as64 = lambda v: v.to(torch.float64) if v.is_floating_point() else v  # noqa: E731
        unique = [n for n, _ in module.named_parameters()]
        aliases = {n for n, _ in module.named_parameters(remove_duplicate=False)}  # + second names of tied ones
        params = {k: as64(state[k]) for k in self.train_names}
        self.frozen = {k: as64(state[k]) for k in unique if k not in params}
        for name in self.frozen:  # constants: outside autograd (set here, never inside a transform)
            self.module.get_parameter(name).requires_grad_(False)
        self._frozen_cast = None
        buffers = {k: as64(v) for k, v in state.items() if k not in aliases}
        return params, buffers

    def _hold_frozen(self, device, dtype) -> None:
        """Put the frozen constants, cast to the run's device and dtype, into the module's own
        (non-trainable) parameters, once per (device, dtype): functional_call then replaces only
        the trained tensors and the buffers. Held by the module, torch.compile sees them as a
        module's parameters; passed through functional_call from a dict, its compiled
        backward-over-backward could not read them (inductor: "Cannot access data pointer of
        Tensor that doesn't have storage", with LoRA)."""
        import torch

        if self._frozen_cast == (device, dtype):
            return
        with torch.no_grad(), torch._C._DisableFuncTorch():  # the first call may come inside a torch.func transform
            for name, value in self.frozen.items():
                param = self.module.get_parameter(name)
                param.data = value.to(device=device, dtype=dtype)
        self._frozen_cast = (device, dtype)

    def apply(self, params, buffers, x, train: bool, taps=None):
        hooks = _tap_hooks(self.module, params, taps) if taps is not None else []
        try:
            return self._apply(params, buffers, x, train)
        finally:
            for hook in hooks:
                hook.remove()

    def _apply(self, params, buffers, x, train: bool):
        sinks = {}
        for name, bn in self._bns.items():
            bn.sink = sinks.setdefault(name, {})
        self._hold_frozen(x.device, next(iter(params.values())).dtype)
        if self.module.training != train:  # module.train() walks every submodule; all share the root's mode
            self.module.train(train)
        try:
            out = self._forward({**params, **buffers}, x)
        finally:  # no module keeps a reference to this call's tensors: under torch.compile one would be a
            for bn in self._bns.values():  # side effect carrying transformed (vmap, grad) tensors out of the graph
                bn.sink = None
        new_buffers = dict(buffers)
        for name, sink in sinks.items():
            for key, value in sink.items():
                new_buffers[f"{name}.{key}"] = value
        if not hasattr(out, "shape") or out.dim() < 2 or out.shape[0] != x.shape[0] or out.shape[-1] != self.n_classes:
            raise ConfigError(f"the model returned {getattr(out, 'shape', type(out).__name__)}; magic needs logits "
                              f"(B, {self.n_classes}) or (B, L, {self.n_classes}) for a batch of {x.shape[0]}")
        return out, new_buffers


def _conv_padding(name: str, conv):
    """An nn.Conv2d's padding as numbers for F.unfold ('same' and 'valid' resolved)."""
    if conv.padding_mode != "zeros":
        raise ConfigError(f"ekfac and source: the model's {name} pads with {conv.padding_mode!r}; "
                          "K-FAC taps unfold zero-padded convolutions only")
    if conv.padding == "valid":
        return 0
    if conv.padding == "same":
        total = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
        if any(t % 2 for t in total):
            raise ConfigError(f"ekfac and source: the model's {name} pads 'same' unevenly; "
                              "give its padding as numbers")
        return tuple(t // 2 for t in total)
    return conv.padding


def _tap_hooks(module, params: dict, taps) -> list:
    """Forward hooks that tap (models/layers.Taps) every nn.Linear, nn.Conv2d and Hugging Face
    Conv1D whose weight is trained, for K-FAC (core/baselines.py); the caller removes them."""
    import torch

    def first(inputs, kwargs):
        return inputs[0] if inputs else next(iter(kwargs.values()))

    def linear(name, transposed):
        if transposed:
            taps.transposed.add(name)
        return lambda mod, inputs, kwargs, out: taps.tap(name, first(inputs, kwargs), out)

    def conv(name, m):
        if m.groups != 1:
            raise ConfigError(f"ekfac and source: the model's {name} is a grouped convolution ({m.groups} groups), "
                              "which K-FAC taps do not cover; use another method")
        padding = _conv_padding(name, m)
        return lambda mod, inputs, kwargs, out: taps.tap_conv(name, first(inputs, kwargs), out, m.kernel_size,
                                                              padding, m.stride, m.dilation)

    uses: dict = {}  # a tied weight (one Parameter under several names) has several uses: K-FAC covers none
    for _, p in module.named_parameters(remove_duplicate=False):
        uses[id(p)] = uses.get(id(p), 0) + 1
    chosen = []  # every layer checked before any hook is registered: a refusal leaves none behind
    for name, m in module.named_modules():
        if f"{name}.weight" not in params:  # frozen, or the second name of a tied weight
            continue
        if uses.get(id(getattr(m, "weight", None)), 0) > 1:  # the first name of a tied weight
            continue
        if isinstance(m, torch.nn.Linear):
            hook = linear(name, False)
        elif isinstance(m, torch.nn.Conv2d):
            hook = conv(name, m)
        elif type(m).__name__ == "Conv1D" and m.weight.dim() == 2:  # transformers.pytorch_utils.Conv1D
            hook = linear(name, True)
        else:
            continue
        chosen.append((m, hook))
    return [m.register_forward_hook(hook, with_kwargs=True) for m, hook in chosen]


def module_builder(factory: Callable) -> Callable:
    """A model builder (input_shape, n_classes, *, init_from, trainable, **factory options) for
    the registry, with a signature the config validation can read."""

    def build(input_shape, n_classes, *, init_from=None, trainable=("*",), **options):
        if not isinstance(trainable, (list, tuple)) or not all(isinstance(t, str) for t in trainable):
            raise ConfigError(f"model.trainable must be a list of name patterns, got {trainable!r}")
        return ModuleModel(factory, tuple(input_shape), int(n_classes), options, init_from, tuple(trainable))

    own = [p for p in inspect.signature(factory).parameters.values() if p.kind == p.KEYWORD_ONLY]
    head = [inspect.Parameter("input_shape", inspect.Parameter.POSITIONAL_OR_KEYWORD),
            inspect.Parameter("n_classes", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    extra = [inspect.Parameter("init_from", inspect.Parameter.KEYWORD_ONLY, default=None),
             inspect.Parameter("trainable", inspect.Parameter.KEYWORD_ONLY, default=("*",))]
    build.__signature__ = inspect.Signature(head + own + extra)
    build.__name__ = getattr(factory, "__name__", "module")
    return build
