"""User code enters magic here and nowhere else: the plugins a config names explicitly.

    plugins: [my_project/magic_plugin.py]      # a Python file, or
    plugins: [my_package.magic_plugin]         # an importable module of an installed package

A plugin registers models and datasets under names, like the built-ins:

    from magic_cli.plugins import register_dataset, register_model, register_module

    @register_module("my_resnet")                  # a torch.nn.Module factory, made pure for magic
    def my_resnet(input_shape, n_classes, *, width: int = 16):
        return MyResNet(input_shape[0], n_classes, width)

    @register_model("my_pure_model")               # the pure contract itself (contracts.Model)
    def my_pure_model(input_shape, n_classes, *, hidden: int = 32): ...
    @register_dataset("my_data")                   # (seed, **options) -> magic_cli.data.Dataset
    def my_data(seed, *, path: str): ...

Options after `*` are the keys the YAML may set (`model.width=32`); anything else is refused.
The source of every plugin enters the training fingerprint (sha256), so a run trained with an
older version of a plugin is refused. Nothing is discovered implicitly (no entry points): only
what `plugins:` names is imported. Nothing is ever imported from a run directory.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import sys
from pathlib import Path
from typing import Callable

from magic_cli.data import DATASETS
from magic_cli.errors import ConfigError
from magic_cli.models import MODEL_INPUTS, MODELS
from magic_cli.models.torch_module import module_builder

_LOADED: dict[str, str] = {}  # plugin spec -> sha256 of its source, as imported in this process
_REGISTERED: dict[str, list] = {}  # plugin spec -> [(registry, name, builder)] it registered
_BUILTIN_MODELS: set[str] = set()
_BUILTIN_DATASETS: set[str] = set()
_CURRENT: list[str] = []  # the plugin being imported (for error messages)


def _source_of(spec: str) -> tuple[Path, bool]:
    """(source file, is a path) of a plugin spec."""
    if spec.endswith(".py") or "/" in spec or "\\" in spec:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise ConfigError(f"plugins: no such file {spec!r}")
        return path.resolve(), True
    try:
        found = importlib.util.find_spec(spec) if spec.replace(".", "").replace("_", "").isalnum() else None
    except (ImportError, ValueError):
        found = None
    if found is None or found.origin is None or not Path(found.origin).is_file():
        raise ConfigError(f"plugins: no module {spec!r} (name a .py file or an importable module)")
    return Path(found.origin), False


def plugin_digest(spec: str) -> str:
    path, _ = _source_of(spec)
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def load_plugins(specs) -> dict[str, str]:
    """Import each named plugin (once per content) so that it registers its names; return
    {spec: sha256 of its source} for the fingerprint."""
    if not isinstance(specs, (list, tuple)) or not all(isinstance(s, str) and s for s in specs):
        raise ConfigError(f"plugins must be a list of .py files or module names, got {specs!r}")
    digests, owner = {}, {}
    for spec in specs:
        path, is_file = _source_of(spec)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
        if _LOADED.get(spec) != digest:
            _REGISTERED[spec] = []
            _import(spec, path, is_file, digest)
            _LOADED[spec] = digest
        for registry, name, fn in _REGISTERED[spec]:  # this config's plugins own their names
            if owner.get(id(registry), {}).get(name, spec) != spec:
                raise ConfigError(f"plugins: {name!r} is registered by both {owner[id(registry)][name]} and {spec}")
            owner.setdefault(id(registry), {})[name] = spec
            registry[name] = fn
        digests[spec] = digest
    return digests


def _import(spec: str, path: Path, is_file: bool, digest: str) -> None:
    _CURRENT.append(spec)
    try:
        if is_file:
            name = f"magic_plugin_{digest}"
            module_spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[name] = module
            module_spec.loader.exec_module(module)
        elif spec in sys.modules:
            importlib.reload(sys.modules[spec])
        else:
            importlib.import_module(spec)
    except ConfigError:
        raise
    except SystemExit as e:  # sys.exit() in the plugin's top level: not a reason for magic to exit silently
        raise ConfigError(f"plugins: {spec} called sys.exit({e.code!r}) while being imported; a plugin must only "
                          "define and register its models and datasets") from None
    except Exception as e:  # the user's code failed: one line naming the plugin
        where = f" (line {e.lineno})" if isinstance(e, SyntaxError) else ""
        tb = e.__traceback__
        while tb is not None:
            if Path(tb.tb_frame.f_code.co_filename).resolve() == path:
                where = f" (line {tb.tb_lineno})"
            tb = tb.tb_next
        raise ConfigError(f"plugins: {spec} failed to import{where}: {type(e).__name__}: {e}") from None
    finally:
        _CURRENT.pop()


def _check_factory(kind: str, name: str, fn: Callable, positional: tuple[str, ...]) -> None:
    """A factory takes `positional` first, then keyword-only options (the YAML keys)."""
    where = f" in {_CURRENT[-1]}" if _CURRENT else ""
    if not callable(fn):
        raise ConfigError(f"{kind} {name!r}{where} is not a function")
    params = list(inspect.signature(fn).parameters.values())
    heads = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    others = [p for p in params if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if len(heads) != len(positional) or others:
        raise ConfigError(f"{kind} {name!r}{where} must be def {name}({', '.join(positional)}, *, option=default, "
                          f"...), got {name}{inspect.signature(fn)}")


def _register(registry: dict, builtins: set, kind: str, name: str, fn: Callable) -> None:
    if not isinstance(name, str) or not name.replace("_", "").replace("-", "").isalnum():
        raise ConfigError(f"{kind} name {name!r} must be a word of letters, digits, _ and -")
    if not builtins:
        builtins.update(k for k in registry)
    if name in builtins:
        raise ConfigError(f"{kind} {name!r} is built in; register yours under another name")
    registry[name] = fn
    if _CURRENT:
        _REGISTERED.setdefault(_CURRENT[-1], []).append((registry, name, fn))


def register_model(name: str):
    """Register a pure model builder (input_shape, n_classes, *, options) -> contracts.Model."""

    def decorate(fn):
        _check_factory("model", name, fn, ("input_shape", "n_classes"))
        _register(MODELS, _BUILTIN_MODELS, "model", name, fn)
        MODEL_INPUTS[name] = ("features", "images", "tokens")  # the builder checks its own inputs
        return fn

    return decorate


def register_module(name: str):
    """Register a torch.nn.Module factory (input_shape, n_classes, *, options) -> nn.Module; magic
    makes it pure (models/torch_module.py) and adds the options init_from and trainable."""

    def decorate(factory):
        _check_factory("model", name, factory, ("input_shape", "n_classes"))
        register_model(name)(module_builder(factory))
        return factory

    return decorate


def register_dataset(name: str):
    """Register a dataset builder (seed, *, options) -> magic_cli.data.Dataset."""

    def decorate(fn):
        _check_factory("dataset", name, fn, ("seed",))
        _register(DATASETS, _BUILTIN_DATASETS, "dataset", name, fn)
        return fn

    return decorate
