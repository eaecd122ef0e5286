"""Hugging Face causal language models as pure magic models (`model=hf_causal_lm`).

Needs the optional extra `magic-cli[hf]` (transformers; peft for LoRA). The model is either

- `path`: a folder written by `save_pretrained` (config.json and the weights), or on a machine
  with a network a hub name, which transformers' own cache resolves to such a folder; or
- `config`: an architecture config in the YAML (`model_type: gpt2`, n_layer, n_embd, ...), the
  weights initialised by transformers under a torch RNG seeded from the run's seed.

What makes it differentiable twice and deterministic: eager attention (fused SDPA kernels have
no double backward), `use_cache=False`, and every dropout probability of the config set to 0
(dropout would draw from the global RNG). The module runs through ModuleModel (torch_module.py):
tied input/output embeddings are one tensor, frozen parameters (`trainable` patterns) are
constants, and with `lora` (through peft) only the adapters are trained and differentiated.

The logits (B, L, vocab) meet the dataset's next-token targets (B, L) in train.py's loss
functions, where targets -100 (padding, prompt tokens) are left out. Sequences are right-padded
(data/files.py), so with causal attention a padded example's supervised tokens see exactly what
they would see unpadded; no attention mask is needed.
"""

from __future__ import annotations

import functools
from pathlib import Path

from magic_cli.errors import ConfigError
from magic_cli.models.torch_module import ModuleModel
from magic_cli.readers import check_safetensors, read_tensors

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ConfigError("model=hf_causal_lm needs transformers: pip install 'magic-cli[hf]'") from None
    transformers.logging.set_verbosity_error()  # its advice (e.g. on generation settings) is not ours to print
    transformers.logging.disable_progress_bar()  # "Loading weights" bars: magic draws its own
    return transformers


@functools.lru_cache(maxsize=None)
def resolve_path(path: str, weights: bool = True) -> Path:
    """The local folder of `model.path` (weights=True) or `dataset.tokenizer`: the folder itself,
    or a hub name's snapshot in the Hugging Face cache (downloaded there first where there is a
    network). One line otherwise."""
    key = "model.path" if weights else "dataset.tokenizer"
    p = Path(path).expanduser()
    if p.exists() or path.startswith((".", "/", "~")):
        if not p.is_dir():
            raise ConfigError(f"{key}: no such folder {path!r} (a folder written by save_pretrained)")
        if weights and not (p / "config.json").is_file():
            raise ConfigError(f"{key}: {path} has no config.json (not a save_pretrained folder)")
        if weights and not any((p / f).is_file() for f in WEIGHT_FILES):
            raise ConfigError(f"{key}: {path} has no weights ({' or '.join(WEIGHT_FILES[::2])})")
        return p
    _transformers()
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.bin", "*.txt", "*.model"]
    try:
        return Path(snapshot_download(path, allow_patterns=patterns, local_files_only=True))
    except Exception:  # not in the cache: fetch it where there is a network
        pass
    try:
        return Path(snapshot_download(path, allow_patterns=patterns))
    except Exception as e:
        raise ConfigError(f"{key}={path!r} is not a local folder and could not be fetched from the Hugging "
                          f"Face hub ({type(e).__name__}); give a folder written by save_pretrained") from None


def check_weight_files(folder: Path) -> None:
    """The weight files of a save_pretrained folder, read as magic reads any weights file (one
    line naming a damaged file; pickled objects refused) before transformers touches them."""
    for f in sorted(folder.glob("*.safetensors")):
        check_safetensors(f, "model.path")
    for f in sorted(folder.glob("pytorch_model*.bin")):
        read_tensors(f, "model.path")


def check_lora_targets(model, targets) -> None:
    """Each model.lora target must name modules of the model (peft matches a module whose dotted
    name is the target or ends in '.' + target); one line listing the candidates otherwise."""
    import torch

    names = [n for n, _ in model.named_modules() if n]
    for target in targets:
        if not any(n == target or n.endswith("." + target) for n in names):
            leaves = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                             if n and not list(m.children()) and any(True for _ in m.parameters(recurse=False))
                             and not isinstance(m, torch.nn.modules.normalization.LayerNorm)})
            raise ConfigError(f"model.lora.targets: {target!r} matches no module of the model; modules that can be "
                              f"targets: {', '.join(leaves)}")


def _no_dropout(hf_config) -> None:
    """Every dropout probability of the config to 0 (attention, residual, embedding, classifier)."""
    for key, value in list(vars(hf_config).items()):
        if ("dropout" in key or "pdrop" in key) and isinstance(value, float):
            setattr(hf_config, key, 0.0)


class HFCausalLM(ModuleModel):
    """A transformers causal LM: logits (B, L, vocab) for token ids (B, L)."""

    def __init__(self, input_shape: tuple, n_classes: int, path, arch, trainable, lora):
        self.path, self.arch, self.lora = path, arch, lora
        self.hf_config = self._config(n_classes)
        vocab = int(self.hf_config.vocab_size)
        if n_classes > vocab:
            raise ConfigError(f"the dataset's token ids reach {n_classes - 1} but the model's vocabulary has {vocab} "
                              "ids: the tokenizer of the data is not the model's")
        n_pos = getattr(self.hf_config, "n_positions", None) or getattr(self.hf_config, "max_position_embeddings", None)
        if n_pos is not None and input_shape[0] > n_pos:
            raise ConfigError(f"the dataset's sequences have {input_shape[0]} tokens but the model has {n_pos} "
                              "positions; cut them shorter")
        if trainable is None:
            trainable = ("*lora_A*", "*lora_B*") if lora else ("*",)
        super().__init__(None, tuple(input_shape), vocab, {}, None, tuple(trainable))
        self._check_causal(min(int(input_shape[0]), 8))

    def _check_causal(self, length: int) -> None:
        """Refuse a model whose logits at a position depend on later tokens (e.g. BERT, which
        transformers also offers as a causal LM): its next-token loss would see the answer."""
        import torch

        if length < 2:
            return
        gen = torch.Generator().manual_seed(0)
        x = torch.randint(0, self.n_classes, (1, length), generator=gen)
        y = x.clone()
        y[0, -1] = (x[0, -1] + 1) % self.n_classes
        self.module.eval()
        with torch.no_grad():
            a, b = (self.module(input_ids=v, use_cache=False).logits for v in (x, y))
        if not torch.allclose(a[0, :-1], b[0, :-1], rtol=1e-4, atol=1e-5):
            raise ConfigError(f"model: {self.hf_config.model_type} is not a causal language model (its logits "
                              "at a position depend on later tokens)")

    def _config(self, n_classes: int):
        transformers = _transformers()
        try:
            if self.path is not None:
                cfg = transformers.AutoConfig.from_pretrained(str(resolve_path(self.path)))
            else:
                arch = dict(self.arch)
                model_type = arch.pop("model_type", "gpt2")
                arch.setdefault("vocab_size", n_classes)
                if "vocab_size" in arch:  # special tokens of a big vocabulary would not fit a small one
                    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
                        arch.setdefault(key, None)
                cfg = transformers.AutoConfig.for_model(model_type, **arch)
        except ConfigError:
            raise
        except (ValueError, KeyError, TypeError, OSError) as e:
            where = f"model.path={self.path}" if self.path is not None else "model.config"
            raise ConfigError(f"{where}: not a transformers config ({' '.join(str(e).split())[:200]})") from None
        if getattr(cfg, "is_encoder_decoder", False):
            raise ConfigError(f"model: {cfg.model_type} is an encoder-decoder model, not a causal LM")
        _no_dropout(cfg)
        cfg.use_cache = False
        return cfg

    def _construct(self):
        import warnings

        transformers = _transformers()
        if self.path is not None:
            folder = resolve_path(self.path)
            check_weight_files(folder)
            try:
                model = transformers.AutoModelForCausalLM.from_pretrained(
                    str(folder), config=self.hf_config, attn_implementation="eager")
            except ValueError as e:  # "Unrecognized configuration class ... for AutoModelForCausalLM"
                raise ConfigError(f"model: {self.hf_config.model_type} is not a causal language model "
                                  f"({' '.join(str(e).split())[:160]})") from None
            except Exception as e:  # weights the checks above let through but transformers cannot use
                raise ConfigError(f"model.path: cannot load the weights in {folder} ({type(e).__name__}: "
                                  f"{' '.join(str(e).split())[:160]})") from None
        else:
            try:
                model = transformers.AutoModelForCausalLM.from_config(self.hf_config, attn_implementation="eager")
            except ValueError as e:
                raise ConfigError(f"model: {self.hf_config.model_type} is not a causal language model "
                                  f"({' '.join(str(e).split())[:160]})") from None
        if self.lora:
            check_lora_targets(model, self.lora["target_modules"])
            try:
                from peft import LoraConfig, get_peft_model
            except ImportError:
                raise ConfigError("model.lora needs peft: pip install 'magic-cli[hf]'") from None
            with warnings.catch_warnings():  # e.g. GPT-2's Conv1D: peft sets fan_in_fan_out itself and says so
                warnings.simplefilter("ignore")
                model = get_peft_model(model, LoraConfig(**self.lora))
        return model

    def _forward(self, tensors: dict, x):
        from torch.func import functional_call

        out = functional_call(self.module, tensors, (), {"input_ids": x, "use_cache": False},
                              tie_weights=True, strict=False)
        return out.logits


LORA_KEYS = {"r": int, "alpha": (int, float), "targets": list, "dropout": (int, float)}


def _lora_config(lora) -> dict | None:
    """model.lora {r, alpha, targets, dropout} -> peft.LoraConfig keyword arguments."""
    if lora is None:
        return None
    if not isinstance(lora, dict):
        raise ConfigError(f"model.lora must be a mapping with r, alpha, targets, got {lora!r}")
    unknown = sorted(set(lora) - set(LORA_KEYS))
    if unknown:
        raise ConfigError(f"unknown key model.lora.{unknown[0]}; valid keys: {', '.join(LORA_KEYS)}")
    for key in ("r", "alpha", "targets"):
        if key not in lora:
            raise ConfigError(f"missing key model.lora.{key}")
    for key, kind in LORA_KEYS.items():
        if key in lora and (not isinstance(lora[key], kind) or isinstance(lora[key], bool)):
            raise ConfigError(f"model.lora.{key} has the wrong type: {lora[key]!r}")
    if lora["r"] < 1 or not lora["targets"] or not all(isinstance(t, str) for t in lora["targets"]):
        raise ConfigError("model.lora needs r >= 1 and targets: a non-empty list of module names")
    if lora.get("dropout", 0):
        raise ConfigError(f"model.lora.dropout={lora['dropout']}: dropout would draw from the global RNG, which "
                          "training as a function of the data weights cannot; set 0")
    return {"r": lora["r"], "lora_alpha": lora["alpha"], "target_modules": list(lora["targets"]),
            "lora_dropout": 0.0, "bias": "none"}


def hf_causal_lm(input_shape: tuple, n_classes: int, *, path: str = None, config: dict = None,
                 trainable: list = None, lora: dict = None):
    """A transformers causal LM from a folder / hub name (`path`) or an architecture `config`."""
    if len(input_shape) != 1:
        raise ConfigError(f"model=hf_causal_lm needs token sequences (L,), got inputs of shape {input_shape}")
    if (path is None) == (config is None):
        raise ConfigError("model=hf_causal_lm needs model.path (a save_pretrained folder or hub name) or "
                          "model.config (an architecture config), not both")
    if config is not None and not isinstance(config, dict):
        raise ConfigError(f"model.config must be a mapping of transformers config keys, got {config!r}")
    if trainable is not None and (not isinstance(trainable, (list, tuple)) or
                                  not all(isinstance(t, str) for t in trainable)):
        raise ConfigError(f"model.trainable must be a list of name patterns, got {trainable!r}")
    return HFCausalLM(tuple(input_shape), int(n_classes), path, config, trainable, _lora_config(lora))
