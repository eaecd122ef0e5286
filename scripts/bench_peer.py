"""magic against bergson (EleutherAI's MAGIC implementation) on one tiny untied GPT-2, both tools in
one run: the same initial weights, chunks, order, optimizer, loss and queries.

    make install-peer                       # .venv-peer: magic, bergson 2.5.1 and what it imports
    .venv-peer/bin/python scripts/bench_peer.py [--queries 1 8 64] [--n-train 500] [--epochs 2] [--subsets 50]

The setting both tools share (each the way bergson does it):
- a 2-layer GPT-2 with untied embeddings (bergson gives each use of a tied weight its own Adam
  moments), magic's initial weights loaded into bergson's copy of the module, float32;
- --n-train character chunks of gpt2_tiny_chars (each context + 1 tokens; bergson's input_ids
  are the whole chunk, magic's x and y its first and last `context` tokens: the same predictions);
- bergson's order: epoch e is numpy.random.default_rng(seed + e).permutation(n), which magic
  reads as train.order_file; the batch size divides n (no padding rows);
- torchopt's AdamW (decoupled weight decay on every parameter, sqrt(v_hat + eps_root) + eps) with
  magic's one-cycle schedule as its learning-rate function; magic: optimizer.no_decay=[];
- bergson's `mean` loss (the batch's supervised tokens in the denominator, weights not
  renormalised) is magic's train.loss_reduction=token_mean;
- a query is one test chunk's own token-mean loss (magic's attribute.output=loss).

It prints: training and per-query seconds of both at each --queries count (magic: one batched
reverse pass per attribute.batch_size queries; bergson: one backward per query, as its per-query
mode runs), score agreement (max |difference| / max |score|, Pearson, top-10 overlap), each tool's
distance to magic's float64 scores, and the LDS of both on the same retrained subsets (magic's
ground truth of this config). --json FILE writes the figures.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np


def overrides(args, order_file: Path, out: Path, dtype: str) -> list[str]:
    return ["experiment=gpt2_tiny_chars", f"dataset.n_train={args.n_train}", f"dataset.n_test={args.n_test}",
            "model.config.tie_word_embeddings=false", f"model.config.n_positions={args.context + 1}",
            f"dataset.context={args.context}", "optimizer.no_decay=[]", "train.loss_reduction=token_mean",
            f"train.batch_size={args.batch}", f"train.order_file={order_file}", f"seed={args.seed}",
            f"dtype={dtype}", f"attribute.batch_size={max(args.queries)}", f"out_dir={out}",
            f"ground_truth.num_subsets={max(args.subsets, 2)}", f"ground_truth.drop_fractions=[{args.drop}]"]


def bergson_order(n: int, epochs: int, seed: int, batch: int) -> np.ndarray:
    """(T, B): the rows of bergson's shuffled_epochs (Dataset.shuffle(seed=seed + e) for each epoch)."""
    rows = np.concatenate([np.random.default_rng(seed + e).permutation(n) for e in range(epochs)])
    return rows.reshape(-1, batch)


def run_magic(cfg, ids):
    """magic: train, then attribute each query count afresh; seconds and scores (N, J) of the largest."""
    import magic_cli

    trained = magic_cli.train(cfg, overwrite=True)
    seconds = {}
    for n in ids:
        result = magic_cli.attribute(cfg, test_ids=list(range(n)), overwrite=True)
        seconds[n] = (result.seconds - result.compile_seconds, result.compile_seconds)
    run = magic_cli.load_run(cfg.out_dir)
    return trained.train_seconds, seconds, run.scores("magic").values


def run_bergson(problem, order: np.ndarray, queries: int, seed: int, epochs: int):
    """bergson: train with its Trainer (checkpoints as its per-query mode keeps them), then one
    backward per query; (train seconds, [seconds per query], scores (N, queries))."""
    import torch
    import torchopt
    from bergson.magic import BackwardState, DataStream, Trainer
    from bergson.magic.cli import attach_doc_ids_if_missing, compute_query_gradients, shuffled_epochs
    from bergson.utils.math import weighted_causal_lm_ce
    from datasets import Dataset
    from torchopt.pytree import tree_iter

    from magic_cli.core.optim import lr_factor

    ds, cfg = problem.dataset, problem.config
    rows = lambda x, y: torch.cat([x[:, :1], y], 1).tolist()  # noqa: E731  (the whole chunk)
    train = attach_doc_ids_if_missing(Dataset.from_dict({"input_ids": rows(ds.x_train, ds.y_train)}))
    train = shuffled_epochs(train, seed, epochs)
    got = np.asarray([r[0] for r in train["doc_ids"]]).reshape(order.shape)
    if not np.array_equal(got, order):
        raise SystemExit("bergson's shuffled order is not numpy's default_rng(seed + e).permutation(n)")
    stream = DataStream(train, order.shape[1], weight_shape=(ds.n_train,))

    model = copy.deepcopy(problem.model.module).float()
    state = problem.init_state()
    model.load_state_dict({k: v.float() for k, v in {**state.params, **state.buffers}.items()}, strict=False)
    model.loss_function = weighted_causal_lm_ce
    model.requires_grad_(True)
    model.eval()  # dropout is 0 in both (magic switches it off)
    oc, steps = cfg.optimizer, order.shape[0]
    schedule = lambda count: oc.lr * lr_factor(oc.schedule, int(count), steps)  # noqa: E731
    optimizer = torchopt.adamw(schedule, betas=tuple(oc.betas), eps=oc.eps, eps_root=oc.eps_root,
                               weight_decay=oc.weight_decay)
    trainer, fwd_state = Trainer.initialize(model, optimizer)
    ckpts = tempfile.mkdtemp(prefix="bergson_ckpts_")
    torch.manual_seed(seed)
    begin = time.perf_counter()
    fwd_state = trainer.train(fwd_state, stream, inplace=True, save_dir=ckpts)
    train_seconds = time.perf_counter() - begin

    final = fwd_state.to("cpu").detach_()
    zeros = [torch.zeros_like(b) for b in tree_iter(fwd_state.opt_state)
             if isinstance(b, torch.Tensor) and b.is_floating_point()]
    test_rows = rows(ds.x_test, ds.y_test)
    scores, seconds = [], []
    for q in range(queries):
        begin = time.perf_counter()
        fwd_state.detach_()
        fwd_state.copy_(final.to("cpu"))
        qstream = DataStream(Dataset.from_dict({"input_ids": [test_rows[q]]}), 1, weight_shape=(1,))
        qgrads, _ = compute_query_gradients(fwd_state, model, qstream, "mean", False, 1)
        fwd_state.detach_()
        stream.requires_grad = True
        stream.weights.grad = None
        bwd = BackwardState(qgrads, [z.clone() for z in zeros], torch.zeros_like(stream.weights))
        bwd = trainer.backward(ckpts, stream, bwd, fwd_state, cleanup=False, inplace=True,
                               state_prefix=f"backward_q{q}")
        scores.append(bwd.weight_grads.detach().double().cpu().numpy())
        seconds.append(time.perf_counter() - begin)
    shutil.rmtree(ckpts, ignore_errors=True)
    return train_seconds, seconds, np.stack(scores, 1)


def agreement(a: np.ndarray, b: np.ndarray, k: int = 10) -> dict:
    """a against b, both (N, J): max |a - b| / max |b|, the mean Pearson and top-k overlap per column."""
    pearson = [np.corrcoef(a[:, j], b[:, j])[0, 1] for j in range(a.shape[1])]
    top = [len(set(np.argsort(-np.abs(a[:, j]))[:k]) & set(np.argsort(-np.abs(b[:, j]))[:k])) / k
           for j in range(a.shape[1])]
    return {"rel_max_diff": float(np.abs(a - b).max() / np.abs(b).max()), "pearson": float(np.mean(pearson)),
            "top10": float(np.mean(top))}


def lds(run, scores: np.ndarray, p: float) -> float:
    """Mean Spearman over the queries between predicted and actual changes (magic's ground truth)."""
    from magic_cli.core.metrics import per_test_correlations, predicted_change

    masks, outputs = run.ground_truth(p)
    base = run.train_outputs()
    j = scores.shape[1]
    actual = outputs[:, :j] - base[None, :j]
    return float(np.nanmean(per_test_correlations(predicted_change(scores, masks), actual)["spearman"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries", type=int, nargs="+", default=[1, 8, 64], help="query counts to time")
    parser.add_argument("--n-train", type=int, default=500, help="training chunks")
    parser.add_argument("--n-test", type=int, default=100, help="test chunks (queries are the first ones)")
    parser.add_argument("--context", type=int, default=32, help="tokens predicted per chunk")
    parser.add_argument("--batch", type=int, default=20, help="chunks per step (must divide --n-train)")
    parser.add_argument("--epochs", type=int, default=2, help="passes over the chunks")
    parser.add_argument("--seed", type=int, default=0, help="bergson's shuffle seed and magic's seed")
    parser.add_argument("--subsets", type=int, default=50, help="retrained subsets for the LDS (0: no LDS)")
    parser.add_argument("--drop", type=float, default=0.05, help="drop fraction of the subsets")
    parser.add_argument("--workers", type=int, default=2, help="retraining processes for the ground truth")
    parser.add_argument("--out", default="runs/bench_peer", help="folder for magic's runs")
    parser.add_argument("--json", default=None, help="write the figures to this JSON file")
    args = parser.parse_args()
    if args.n_train % args.batch:
        parser.error("--batch must divide --n-train (bergson would pad the last batch)")
    try:
        import bergson  # noqa: F401
    except ImportError:
        raise SystemExit("bench_peer needs bergson: run `make install-peer`, then .venv-peer/bin/python "
                         "scripts/bench_peer.py") from None

    import magic_cli
    from magic_cli.determinism import enable_determinism
    from magic_cli.stages.assemble import assemble

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    order_file = out / "order.npy"
    order = bergson_order(args.n_train, args.epochs, args.seed, args.batch)
    np.save(order_file, order)
    ids = sorted(args.queries)

    cfg32 = magic_cli.compose(overrides(args, order_file, out / "float32", "float32"))
    enable_determinism(cfg32.device, cfg32.threads)
    magic_train, magic_seconds, magic_scores = run_magic(cfg32, ids)
    cfg64 = magic_cli.compose(overrides(args, order_file, out / "float64", "float64"))
    _, _, exact = run_magic(cfg64, [ids[-1]])
    problem = assemble(cfg32)
    bergson_train, bergson_seconds, bergson_scores = run_bergson(problem, order, ids[-1], args.seed, args.epochs)

    j = bergson_scores.shape[1]
    figures = {"setting": vars(args), "steps": int(order.shape[0]),
               "magic": {"train_s": magic_train, "attribute_s": magic_seconds},
               "bergson": {"train_s": bergson_train, "backward_s": bergson_seconds},
               "agreement": agreement(bergson_scores, magic_scores[:, :j]),
               "to_float64": {"magic": agreement(magic_scores[:, :j], exact[:, :j]),
                              "bergson": agreement(bergson_scores, exact[:, :j])}}
    print(f"tiny untied GPT-2, {args.n_train} chunks of {args.context} tokens, {order.shape[0]} steps of "
          f"{args.batch}, float32")
    print(f"training: magic {magic_train:.2f} s, bergson {bergson_train:.2f} s (with its checkpoints); magic's "
          f"compiling (attribute.compile, once per query count, not in the rows): "
          f"{', '.join(f'{magic_seconds[n][1]:.1f} s' for n in ids)}")
    print(f"{'queries':>8}{'magic s/query':>16}{'bergson s/query':>18}{'bergson / magic':>17}"
          f"{'magic, compiling counted':>26}{'bergson / magic':>17}")
    per_query = {}
    for n in ids:
        m = (magic_train + magic_seconds[n][0]) / n
        mc = m + magic_seconds[n][1] / n
        b = (bergson_train + sum(bergson_seconds[:n])) / n
        per_query[n] = {"magic": m, "magic_with_compiling": mc, "bergson": b}
        print(f"{n:>8}{m:>16.3f}{b:>18.3f}{b / m:>17.2f}{mc:>26.3f}{b / mc:>17.2f}")
    figures["per_query_s"] = per_query
    a = figures["agreement"]
    print(f"agreement over {j} queries: max|diff|/max|magic| {a['rel_max_diff']:.2e}, Pearson {a['pearson']:.6f}, "
          f"top-10 overlap {a['top10']:.2f}")
    for tool in ("magic", "bergson"):
        d = figures["to_float64"][tool]
        print(f"{tool} float32 vs magic float64: max|diff|/max {d['rel_max_diff']:.2e}, Pearson {d['pearson']:.6f}")
    if args.subsets:
        magic_cli.retrain_ground_truth(cfg32, workers=args.workers)
        run = magic_cli.load_run(cfg32.out_dir)
        figures["lds"] = {"magic": lds(run, magic_scores[:, :j], args.drop),
                          "bergson": lds(run, bergson_scores, args.drop)}
        print(f"LDS at {args.drop:g} ({args.subsets} subsets, {j} queries): magic {figures['lds']['magic']:.3f}, "
              f"bergson {figures['lds']['bergson']:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
