"""Hugging Face causal LMs (model=hf_causal_lm): a tiny GPT-2 built offline, saved with
save_pretrained and loaded through model.path.

Exactness (unrolled autograd, finite differences) for tied and untied embeddings, frozen
layers and LoRA; AdamW semantics against torch.optim.AdamW step for step; padding against
an independent unpadded computation; the LM schedules against transformers' own; bad input as
one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_eager_step_bit_equal, assert_taps_give_per_example_gradients, problem_for, unrolled_scores

VOCAB, LENGTH = 20, 9


def _gpt2(folder, tied: bool = True, n_positions: int = 16, vocab: int = VOCAB):
    """A 1-layer GPT-2 (dropout left at transformers' defaults: magic must switch it off)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=n_positions, vocab_size=vocab,
                        tie_word_embeddings=tied, bos_token_id=None, eos_token_id=None)
    GPT2LMHeadModel(config).save_pretrained(folder)
    return folder


def _args(tmp_path, tied=True, rows=None, **gpt2):
    """Overrides for a float64 run of the tiny GPT-2 on 40 random token sequences."""
    folder = tmp_path / ("gpt2_tied" if tied else "gpt2_untied")
    if not folder.exists():
        _gpt2(folder, tied, **gpt2)
    if rows is None:
        rows = np.random.default_rng(0).integers(0, VOCAB, size=(40, LENGTH))
    np.save(tmp_path / "tokens.npy", rows)
    return ["dataset=token_ids", f"dataset.path={tmp_path / 'tokens.npy'}", "model=hf_causal_lm",
            f"model.path={folder}", "train.epochs=2", "train.batch_size=8", "dtype=float64", "optimizer.lr=0.01",
            "optimizer.weight_decay=0.01", "optimizer.no_decay=[*bias,*ln_*]"]


def _attribute(cli, args, out, ids="0,2", extra=()):
    code, _, err = cli("train", *args, f"out_dir={out}")
    assert code == 0, err
    code, _, err = cli("attribute", "--test-ids", ids, *args, *extra, f"out_dir={out}")
    assert code == 0, err
    return np.load(out / "attribute" / "magic" / "scores.npy")  # (N, J)


def _exact(problem, scores, ids=(0, 2), fd_examples=2):
    """scores (N, J) equal autograd through the unrolled run and central finite differences."""
    want = unrolled_scores(problem, list(ids)).numpy().T
    assert np.abs(want).max() > 0
    assert np.abs(scores - want).max() <= 1e-10 * np.abs(want).max()
    h = 1e-5
    for i in np.random.default_rng(1).choice(problem.dataset.n_train, size=fd_examples, replace=False):
        e = torch.zeros(problem.dataset.n_train, dtype=problem.dtype)
        e[i] = h
        plus = problem.outputs(problem.run(weights=problem.weights + e)[0])["loss"]
        minus = problem.outputs(problem.run(weights=problem.weights - e)[0])["loss"]
        np.testing.assert_allclose(scores[i], (plus - minus)[list(ids)] / (2 * h), rtol=1e-5,
                                   atol=1e-6 * np.abs(scores).max())


@pytest.mark.parametrize("tied", [True, False])
def test_gpt2_scores_are_exact_bit_identical_on_rerun_and_across_strategies(cli, tmp_path, tied):
    args = _args(tmp_path, tied)
    scores = _attribute(cli, args, tmp_path / "a")
    problem = problem_for(args)
    names = set(problem.init_state().params)
    assert ("lm_head.weight" in names) != tied and "transformer.wte.weight" in names
    _exact(problem, scores)
    again = _attribute(cli, args, tmp_path / "b")
    for f in ("final.pt", "checkpoints_all/state_000003.pt", "outputs_loss.npy"):
        assert (tmp_path / "a" / "train" / f).read_bytes() == (tmp_path / "b" / "train" / f).read_bytes()
    assert again.tobytes() == scores.tobytes()
    code, _, err = cli("attribute", "--test-ids", "0,2", *args, "checkpoint=replay", "checkpoint.k=2",
                       "--overwrite", f"out_dir={tmp_path / 'b'}")
    assert code == 0, err
    assert np.load(tmp_path / "b" / "attribute" / "magic" / "scores.npy").tobytes() == scores.tobytes()


def test_eager_step_of_gpt2_is_bit_equal_to_the_transformable_step(tmp_path):
    assert_eager_step_bit_equal(problem_for(_args(tmp_path, tied=True)))


def test_the_folder_enters_the_fingerprint(tmp_path):
    from transformers import GPT2LMHeadModel

    from magic_cli.config import load

    args = _args(tmp_path)
    before = load(args).fingerprint()
    model = GPT2LMHeadModel.from_pretrained(tmp_path / "gpt2_tied")
    with torch.no_grad():
        model.transformer.ln_f.bias.add_(1.0)
    model.save_pretrained(tmp_path / "gpt2_tied")
    assert load(args).fingerprint() != before


def test_dropout_of_the_folder_is_switched_off(tmp_path):
    from transformers import GPT2Config

    problem = problem_for(_args(tmp_path))
    cfg = problem.model.module.config
    assert GPT2Config.from_pretrained(tmp_path / "gpt2_tied").resid_pdrop == 0.1  # transformers' default
    assert (cfg.resid_pdrop, cfg.embd_pdrop, cfg.attn_pdrop) == (0.0, 0.0, 0.0)
    assert all(m.p == 0 for m in problem.model.module.modules() if isinstance(m, torch.nn.Dropout))
    assert cfg._attn_implementation == "eager" and cfg.use_cache is False


def test_tied_embeddings_follow_torch_adamw_step_for_step(tmp_path):
    """One tensor, one gradient summing both uses, one pair of moments: the run equals
    torch.optim.AdamW (decay groups by name pattern, transformers' linear warm-up schedule)."""
    import fnmatch

    from transformers import GPT2LMHeadModel, get_linear_schedule_with_warmup

    from magic_cli.core.losses import per_example_loss

    args = _args(tmp_path, tied=True) + ["optimizer.eps_root=0", "optimizer.weight_decay=0.1",
                                         "optimizer.betas=[0.9,0.95]", "optimizer.schedule.name=warmup_linear",
                                         "optimizer.schedule.warmup=0.25"]
    problem = problem_for(args)
    state = problem.init_state()
    assert set(state.opt["mu"]) == set(state.params) and "lm_head.weight" not in state.params
    model = GPT2LMHeadModel.from_pretrained(tmp_path / "gpt2_tied", attn_implementation="eager", resid_pdrop=0.0,
                                            embd_pdrop=0.0, attn_pdrop=0.0).double().train()
    assert model.lm_head.weight is model.transformer.wte.weight
    no_decay = lambda n: any(fnmatch.fnmatchcase(n, p) for p in ("*bias", "*ln_*"))  # noqa: E731
    groups = [{"params": [p for n, p in model.named_parameters() if not no_decay(n)], "weight_decay": 0.1},
              {"params": [p for n, p in model.named_parameters() if no_decay(n)], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=0.01, betas=(0.9, 0.95), eps=1e-8)
    T = problem.total_steps
    schedule = get_linear_schedule_with_warmup(opt, round(0.25 * T), T)
    for t in range(T):
        batch = problem.batch(t)
        opt.zero_grad()
        per_example_loss(model(input_ids=batch.x, use_cache=False).logits, batch.y).mean().backward()
        opt.step()
        schedule.step()
        state = problem.step(state, t)
        for name, p in model.named_parameters():
            assert torch.allclose(state.params[name], p.detach(), rtol=1e-10, atol=1e-13), (t, name)
    wte = "transformer.wte.weight"
    assert not torch.equal(state.params[wte], problem.init_state().params[wte])


def test_frozen_layers_are_constants_without_an_adjoint(cli, tmp_path):
    from magic_cli.core.metagrad import output_cotangents, reverse_step

    args = _args(tmp_path) + ["model.trainable=[transformer.h.0.mlp.*,transformer.ln_f.*]"]
    scores = _attribute(cli, args, tmp_path / "run")
    problem = problem_for(args)
    trainable = {f"transformer.{m}.{p}" for m in ("h.0.mlp.c_fc", "h.0.mlp.c_proj", "ln_f") for p in ("weight", "bias")}
    final, kept, _ = problem.run(keep={problem.total_steps - 1})
    assert set(final.params) == set(final.opt["mu"]) == trainable
    full = problem_for(_args(tmp_path))
    for name, value in problem.model.frozen.items():  # the folder's weights, untouched by training
        assert torch.equal(value, full.init_state().params[name]), name
    wte = "transformer.wte.weight"
    assert not torch.equal(full.run()[0].params[wte], problem.model.frozen[wte])
    lam = output_cotangents(problem, final, [0, 2], "loss")
    assert set(lam.params) == trainable
    _, lam, _ = reverse_step(problem, kept[problem.total_steps - 1], problem.total_steps - 1, lam)
    assert set(lam.params) == trainable  # no adjoint of a frozen tensor is ever formed
    _exact(problem, scores)


def test_lora_trains_and_differentiates_only_the_adapters(cli, tmp_path):
    args = _args(tmp_path) + ["model.lora={r: 2, alpha: 4, targets: [c_attn]}"]
    scores = _attribute(cli, args, tmp_path / "run")
    problem = problem_for(args)
    final = problem.run()[0]
    assert sorted(final.params) == ["base_model.model.transformer.h.0.attn.c_attn.lora_A.default.weight",
                                    "base_model.model.transformer.h.0.attn.c_attn.lora_B.default.weight"]
    assert set(final.opt["mu"]) == set(final.params)
    full = problem_for(_args(tmp_path)).init_state().params
    assert torch.equal(problem.model.frozen["base_model.model.transformer.h.0.attn.c_attn.base_layer.weight"],
                       full["transformer.h.0.attn.c_attn.weight"])  # the base weights are the folder's, frozen
    assert not torch.equal(final.params["base_model.model.transformer.h.0.attn.c_attn.lora_B.default.weight"],
                           problem.init_state().params["base_model.model.transformer.h.0.attn.c_attn.lora_B.default.weight"])
    _exact(problem, scores)


@pytest.mark.parametrize("case", ["tied", "untied", "lora"])
def test_kfac_taps_cover_conv1d_and_lora_layers(tmp_path, case):
    """EK-FAC on GPT-2: its Conv1D layers (weights stored (in, out)), the untied head and LoRA's
    adapters are tapped per token; the tied head (the embedding's second name) and frozen base
    weights are not."""
    args = _args(tmp_path, tied=case != "untied") + (["model.lora={r: 2, alpha: 4, targets: [c_attn]}"]
                                                    if case == "lora" else [])
    problem = problem_for(args)
    layers = assert_taps_give_per_example_gradients(problem, problem.run()[0])
    if case == "lora":
        assert sorted(layers) == [f"base_model.model.transformer.h.0.attn.c_attn.lora_{x}.default" for x in "AB"]
        assert not any(layers.values())
        return
    conv1d = {f"transformer.h.0.{m}" for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    assert {n for n, t in layers.items() if t} == conv1d
    assert set(layers) == conv1d | ({"lm_head"} if case == "untied" else set())


def _ragged_rows(seed=0, n=40):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, VOCAB, size=int(rng.integers(4, LENGTH + 1))).tolist() for _ in range(n)]


def _unpadded_unrolled(problem, train_rows, test_rows, ids, reduction):
    """d f_j / d w by autograd through the unrolled run, every example run alone and unpadded."""
    w = problem.weights.clone().requires_grad_()
    state = problem.init_state()
    params = {k: v.requires_grad_() for k, v in state.params.items()}
    state = state._replace(params=params)
    B = problem.config.train.batch_size
    with torch.enable_grad():
        for t in range(problem.total_steps):
            total, tokens = 0.0, 0
            for i in problem.schedule[t].tolist():
                seq = torch.tensor(train_rows[i])
                logits, _ = problem.model.apply(state.params, state.buffers, seq[None, :-1], train=True)
                ce = F.cross_entropy(logits[0], seq[1:], reduction="sum")
                total = total + w[i] * (ce / (len(seq) - 1) if reduction == "mean" else ce)
                tokens += len(seq) - 1
            loss = total / (B if reduction == "mean" else tokens)
            names = list(state.params)
            grads = torch.autograd.grad(loss, [state.params[k] for k in names], create_graph=True)
            new_params, new_opt = problem.optimizer.update(dict(zip(names, grads)), state.opt, state.params, t)
            state = state._replace(params=new_params, opt=new_opt)
        rows = []
        for j in ids:
            seq = torch.tensor(test_rows[j])
            logits, _ = problem.model.apply(state.params, state.buffers, seq[None, :-1], train=False)
            f = F.cross_entropy(logits[0], seq[1:])
            rows.append(torch.autograd.grad(f, w, retain_graph=True)[0])
    return torch.stack(rows).detach().numpy().T  # (N, J)


@pytest.mark.parametrize("reduction", ["mean", "token_mean"])
def test_padding_gives_the_scores_of_the_unpadded_examples(cli, tmp_path, reduction):
    """Ragged rows (right-padded by the loader) and the same rows padded further with another pad
    id and labels -100 give the scores of every example run alone, unpadded."""
    train_rows, test_rows = _ragged_rows(0, 32), _ragged_rows(1, 8)
    base = _args(tmp_path)[2:] + [f"train.loss_reduction={reduction}", "dataset.vocab_size=20"]

    def write(name, rows, pad_to=None):
        with open(tmp_path / name, "w") as f:
            for r in rows:
                if pad_to is None:
                    f.write(json.dumps({"input_ids": r}) + "\n")
                else:
                    pad = pad_to - len(r)
                    f.write(json.dumps({"input_ids": r + [3] * pad, "labels": r + [-100] * pad}) + "\n")
        return str(tmp_path / name)

    ragged = ["dataset=token_ids", f"dataset.train_path={write('tr.jsonl', train_rows)}",
              f"dataset.test_path={write('te.jsonl', test_rows)}"] + base
    padded = ["dataset=token_ids", f"dataset.train_path={write('tr_pad.jsonl', train_rows, 14)}",
              f"dataset.test_path={write('te_pad.jsonl', test_rows, 12)}"] + base
    a = _attribute(cli, ragged, tmp_path / "ragged", "0:8")
    b = _attribute(cli, padded, tmp_path / "padded", "0:8")
    problem = problem_for(ragged)
    assert problem.dataset.x_train.shape == (32, LENGTH - 1) and problem_for(padded).dataset.x_train.shape == (32, 13)
    want = _unpadded_unrolled(problem, train_rows, test_rows, range(8), reduction)
    scale = np.abs(want).max()
    assert scale > 0
    assert np.abs(a - want).max() <= 1e-10 * scale and np.abs(b - want).max() <= 1e-10 * scale


def test_loss_reductions_scale_as_documented():
    """mean: (1/B) Σ w ℓ; sum: Σ w ℓ; token_mean: Σ_b w_b Σ_t ℓ_bt / tokens (zero weights counted)."""
    from magic_cli.core.problem import make_grad_fn

    class Linear:  # logits (B, L, V) = one table lookup: the loss is then easy to write by hand
        def apply(self, params, buffers, x, train):
            return params["table"][x], buffers

    torch.manual_seed(0)
    params = {"table": torch.randn(5, 5, dtype=torch.float64)}
    x = torch.tensor([[0, 1, 2], [3, 4, 0]])
    y = torch.tensor([[1, 2, -100], [4, 0, 1]])
    w = torch.tensor([0.0, 2.0], dtype=torch.float64)
    ce = F.cross_entropy(params["table"][x].reshape(-1, 5), y.reshape(-1), reduction="none",
                         ignore_index=-100).view(2, 3)
    per_example = ce.sum(1) / torch.tensor([2.0, 3.0])
    want = {"mean": (w * per_example).sum() / 2, "sum": (w * per_example).sum(),
            "token_mean": (w * ce.sum(1)).sum() / 5}
    for reduction, value in want.items():
        table = params["table"].clone().requires_grad_()
        expected = torch.autograd.grad(_recompute(reduction, table, x, y, w), table)[0]
        got, _ = make_grad_fn(Linear(), 2, reduction)(params, {}, x, y, w)
        assert torch.allclose(got["table"], expected, rtol=1e-12, atol=0)
        assert torch.allclose(_recompute(reduction, params["table"], x, y, w), value)


def _recompute(reduction, table, x, y, w):
    ce = F.cross_entropy(table[x].reshape(-1, 5), y.reshape(-1), reduction="none", ignore_index=-100).view(2, 3)
    n = (y != -100).sum(1)
    if reduction == "token_mean":
        return (w * ce.sum(1)).sum() / n.sum()
    per_example = ce.sum(1) / n
    return (w * per_example).sum() / (2 if reduction == "mean" else 1)


@pytest.mark.parametrize("name, reference", [("warmup_linear", "get_linear_schedule_with_warmup"),
                                             ("warmup_constant", "get_constant_schedule_with_warmup")])
def test_lm_schedules_are_transformers_own(name, reference):
    import transformers

    from magic_cli.config import ScheduleConfig
    from magic_cli.core.optim import lr_factor

    T, warmup = 40, 0.25
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    args = (opt, round(warmup * T), T) if name == "warmup_linear" else (opt, round(warmup * T))
    sched = getattr(transformers, reference)(*args)
    theirs = []
    for _ in range(T):
        theirs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    ours = [lr_factor(ScheduleConfig(name=name, warmup=warmup), t, T) for t in range(T)]
    np.testing.assert_allclose(ours, theirs, rtol=1e-12, atol=1e-15)


def test_onecycle_has_start_peak_and_end(tmp_path):
    from magic_cli.config import ScheduleConfig
    from magic_cli.core.optim import lr_factor

    s = ScheduleConfig(name="onecycle", warmup=0.25, start_factor=0.1, end_factor=0.05)
    f = [lr_factor(s, t, 41) for t in range(41)]
    assert f[0] == pytest.approx(0.1) and max(f) == f[10] == 1.0 and f[40] == pytest.approx(0.05)


def test_tokenizer_text_file_gives_the_tokenizers_ids(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from magic_cli.config import load

    text = "the cat sat on the mat and the dog sat on the log " * 40
    (tmp_path / "book.txt").write_text(text)
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([text], trainers.WordLevelTrainer(special_tokens=["[UNK]"]))
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(tmp_path / "tok")
    args = ["dataset=text_file", f"dataset.path={tmp_path / 'book.txt'}", "dataset.context=8",
            f"dataset.tokenizer={tmp_path / 'tok'}", "model=hf_causal_lm",
            "+model.config={n_layer: 1, n_embd: 8, n_head: 2, n_positions: 8}"]
    problem = problem_for(args)
    ids = PreTrainedTokenizerFast.from_pretrained(tmp_path / "tok")(text)["input_ids"]
    chunks = np.array(ids[: len(ids) // 9 * 9]).reshape(-1, 9)
    got = np.concatenate([problem.dataset.x_train.numpy(), problem.dataset.x_test.numpy()])
    assert sorted(map(tuple, got)) == sorted(map(tuple, chunks[:, :-1]))
    assert problem.dataset.n_classes == len(PreTrainedTokenizerFast.from_pretrained(tmp_path / "tok"))
    before = load(args).fingerprint()
    spec = json.loads((tmp_path / "tok" / "tokenizer.json").read_text())
    spec["model"]["vocab"]["zebra"] = len(spec["model"]["vocab"])
    (tmp_path / "tok" / "tokenizer.json").write_text(json.dumps(spec))
    assert load(args).fingerprint() != before  # the tokenizer's files are part of the training run


def test_gpt2_experiments_compose_and_validate():
    from magic_cli.config import load

    tiny = load(["experiment=gpt2_tiny_chars"])
    assert tiny.model["config"]["model_type"] == "gpt2" and tiny.model["config"]["tie_word_embeddings"] is True
    paper = load(["experiment=gpt2_wikitext"])
    assert paper.model["path"] == "gpt2" and paper.dataset["context"] == 512 and paper.train.epochs == 4
    assert paper.optimizer.betas == (0.95, 0.975) and paper.optimizer.eps_root == 1e-8 and paper.optimizer.lr == 8e-4
    assert paper.train.loss_reduction == "sum" and paper.device == "cuda"


def test_gpt2_tiny_chars_trains_offline(cli, tmp_path):
    code, out, err = cli("train", "experiment=gpt2_tiny_chars", "train.epochs=1", "dataset.n_train=128",
                         "dataset.n_test=16", f"out_dir={tmp_path / 'run'}")
    assert code == 0, err
    metrics = json.loads((tmp_path / "run" / "train" / "metrics.json").read_text())
    assert metrics["test_loss"] < np.log(96)  # learnt something about characters in 4 steps
    problem = problem_for(["experiment=gpt2_tiny_chars", "train.epochs=1", "dataset.n_train=128", "dataset.n_test=16"])
    assert "lm_head.weight" not in problem.init_state().params  # tied


def _bad(tmp_path, case):
    args = _args(tmp_path)
    if case == "no_folder":
        return args + [f"model.path={tmp_path / 'nope'}"]
    if case == "no_config":
        (tmp_path / "half").mkdir()
        weights = (tmp_path / "gpt2_tied" / "model.safetensors").read_bytes()
        (tmp_path / "half" / "model.safetensors").write_bytes(weights)
        return args + [f"model.path={tmp_path / 'half'}"]
    if case == "no_weights":
        (tmp_path / "cfg").mkdir()
        (tmp_path / "cfg" / "config.json").write_text((tmp_path / "gpt2_tied" / "config.json").read_text())
        return args + [f"model.path={tmp_path / 'cfg'}"]
    if case == "not_causal":
        return [a for a in args if not a.startswith("model.path")] + ["+model.config={model_type: vit}"]
    if case == "bidirectional":  # transformers offers BERT as a causal LM too
        return [a for a in args if not a.startswith("model.path")] + [
            "+model.config={model_type: bert, num_hidden_layers: 1, hidden_size: 16, num_attention_heads: 2, "
            "intermediate_size: 32, max_position_embeddings: 16}"]
    if case == "path_and_config":
        return args + ["+model.config={n_layer: 1}"]
    if case == "ids_over_vocab":
        np.save(tmp_path / "big.npy", np.random.default_rng(0).integers(0, 30, size=(40, LENGTH)))
        return args + [f"dataset.path={tmp_path / 'big.npy'}"]
    if case == "too_long":
        np.save(tmp_path / "long.npy", np.random.default_rng(0).integers(0, VOCAB, size=(40, 20)))
        return args + [f"dataset.path={tmp_path / 'long.npy'}"]
    if case == "half":
        return args + ["dtype=float16"]
    if case == "lora_dropout":
        return args + ["model.lora={r: 2, alpha: 4, targets: [c_attn], dropout: 0.1}"]
    if case == "lora_no_targets":
        return args + ["model.lora={r: 2, alpha: 4}"]
    raise AssertionError(case)


@pytest.mark.parametrize("case, fragment", [
    ("no_folder", "no such folder"),
    ("no_config", "has no config.json"),
    ("no_weights", "has no weights"),
    ("not_causal", "not a causal language model"),
    ("bidirectional", "depend on later tokens"),
    ("path_and_config", "not both"),
    ("ids_over_vocab", "the model's vocabulary has 20"),
    ("too_long", "the model has 16 positions"),
    ("half", "dtype='float16' is not valid"),
    ("lora_dropout", "model.lora.dropout=0.1"),
    ("lora_no_targets", "missing key model.lora.targets"),
])
def test_bad_hugging_face_input_is_one_line(cli, tmp_path, case, fragment):
    args = _bad(tmp_path, case)
    code, _, err = cli("train", *args, f"out_dir={tmp_path / 'run'}")
    assert code == 2 and fragment in err and err.count("magic: error") == 1 and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()


def test_a_hub_name_resolves_through_the_hugging_face_cache(cli, tmp_path, monkeypatch):
    """model.path=org/name: the snapshot in the Hugging Face cache (here a cache built by hand,
    in the hub's own layout; on a machine with a network it is downloaded there first)."""
    import shutil

    import huggingface_hub.constants

    from magic_cli.models.hf import resolve_path

    args = _args(tmp_path)
    commit = "0" * 40
    repo = tmp_path / "hub" / "models--someone--tiny-gpt2"
    shutil.copytree(tmp_path / "gpt2_tied", repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no waiting on a network here
    resolve_path.cache_clear()
    hub = [a for a in args if not a.startswith("model.path")] + ["model.path=someone/tiny-gpt2"]
    try:
        assert resolve_path("someone/tiny-gpt2") == repo / "snapshots" / commit
        a = _attribute(cli, args, tmp_path / "folder", "0")
        b = _attribute(cli, hub, tmp_path / "hub_run", "0")
        assert a.tobytes() == b.tobytes()
        code, _, err = cli("train", *[x for x in args if not x.startswith("model.path")], "model.path=nobody/none",
                           f"out_dir={tmp_path / 'none'}")
        assert code == 2 and "could not be fetched" in err and err.count("magic: error") == 1, err
    finally:
        resolve_path.cache_clear()
