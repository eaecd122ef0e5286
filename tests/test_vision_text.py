"""Images (CNN with BatchNorm and augmentation, CIFAR-10's on-disk format) and text (character
chunks, the transformer): the loader, the augmentation, and exact metagradients."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from conftest import TINY, assert_eager_step_bit_equal, problem_for, unrolled_scores

CNN = ["dataset=digits_images", "model=cnn_small", "model.channels=[3,4]", "train.epochs=1", "train.batch_size=64",
       "dtype=float64"]
LM = ["dataset=text_chars", "dataset.n_train=48", "dataset.n_test=6", "dataset.context=8", "model=transformer",
      "model.dim=8", "model.n_heads=2", "model.n_layers=1", "train.epochs=1", "train.batch_size=12", "dtype=float64"]


def write_fake_cifar(root, n_train=60, n_test=20, seed=0):
    """A tiny CIFAR-10 in its own on-disk format: cifar-10-batches-py/{data_batch_1..5,test_batch}."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)

    def batch(n):
        labels = rng.integers(0, 10, n)
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        data[:, :1024] = np.clip(data[:, :1024].astype(int) + 20 * labels[:, None], 0, 255)  # learnable signal
        return {"data": data, "labels": labels.tolist()}

    for i in range(1, 6):
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(batch(n_train // 5)))
    (folder / "test_batch").write_bytes(pickle.dumps(batch(n_test)))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}))


@pytest.fixture
def fake_cifar(tmp_path, monkeypatch):
    """The real torchvision loader on fake files (its md5 check is what cannot pass on them)."""
    import torchvision.datasets.cifar

    write_fake_cifar(tmp_path / "cifar")
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args, **kwargs: True)
    return ["dataset=cifar10", f"dataset.root={tmp_path / 'cifar'}", "dataset.download=false"]


def test_cifar10_loader_reads_the_on_disk_format(fake_cifar):
    p = problem_for(fake_cifar + ["dataset.classes=[0,1,2,3,4,5,6,7,8,9]", "dataset.n_train=50",
                                  "dataset.n_test=15"])
    ds = p.dataset
    assert ds.x_train.shape == (50, 3, 32, 32) and ds.x_test.shape == (15, 3, 32, 32) and ds.n_classes == 10
    assert abs(float(ds.x_train.mean())) < 1e-5  # normalised with training statistics
    assert ds.augment is not None


def test_cifar10_class_subset_relabels(fake_cifar):
    ds = problem_for(fake_cifar + ["dataset.classes=[3,7]", "train.batch_size=4"]).dataset
    assert ds.n_classes == 2 and set(ds.y_train.tolist()) <= {0, 1}


def test_cifar10_missing_is_one_clear_error(cli, tmp_path):
    code, _, err = cli("train", "dataset=cifar10", f"dataset.root={tmp_path}", "dataset.download=false",
                       f"out_dir={tmp_path / 'run'}")
    assert code == 2 and "dataset.root" in err and err.count("\n") == 1


def test_augmentation_is_a_pure_function_of_seed_and_step(fake_cifar):
    p = problem_for(fake_cifar + ["dataset.n_train=40", "train.batch_size=8"])
    a, b = p.batch(3).x, p.batch(3).x
    assert torch.equal(a, b)
    raw = p.dataset.x_train[p.schedule[3]]
    assert not torch.equal(a, raw)  # flips and shifts happened
    assert not torch.equal(p.dataset.augment(raw, None, p.config.seed, 4), a)


def test_translate_shifts_pixels():
    from magic_cli.data.augment import flip_translate

    x = torch.arange(16.0).view(1, 1, 4, 4).repeat(64, 1, 1, 1)
    out = flip_translate(False, 1)(x, None, 0, 0)
    for i in range(64):  # each image is the original shifted by at most one pixel, zero-filled
        found = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)
                 if torch.equal(out[i, 0, max(dy, 0):4 + min(dy, 0), max(dx, 0):4 + min(dx, 0)],
                                x[i, 0, max(-dy, 0):4 + min(-dy, 0), max(-dx, 0):4 + min(-dx, 0)])]
        assert found


def test_text_chunks_are_next_character_pairs():
    ds = problem_for(LM).dataset
    assert ds.x_train.shape == (48, 8) and ds.y_train.shape == (48, 8) and ds.x_train.dtype == torch.int64
    assert torch.equal(ds.x_train[:, 1:], ds.y_train[:, :-1])


@pytest.mark.parametrize("overrides", [CNN, LM], ids=["cnn_bn_augment", "transformer"])
def test_scores_match_unrolled_autograd_and_finite_differences(cli, tmp_path, overrides):
    args = overrides + [f"out_dir={tmp_path}"]
    assert cli("train", *args)[0] == 0
    code, _, err = cli("attribute", "--test-ids", "0,2", *args)
    assert code == 0, err
    scores = np.load(tmp_path / "attribute" / "magic" / "scores.npy")
    problem = problem_for(args)
    assert problem.init_state().buffers or overrides is LM  # BatchNorm statistics are in the state
    want = unrolled_scores(problem, [0, 2]).numpy().T
    assert np.abs(scores - want).max() <= 1e-10 * np.abs(want).max()
    h = 1e-4
    for i in (1, 17):
        e = torch.zeros(problem.dataset.n_train, dtype=problem.dtype)
        e[i] = h
        plus = problem.outputs(problem.run(weights=problem.weights + e)[0])["loss"]
        minus = problem.outputs(problem.run(weights=problem.weights - e)[0])["loss"]
        np.testing.assert_allclose(scores[i], ((plus - minus) / (2 * h))[[0, 2]], rtol=1e-6,
                                   atol=1e-6 * np.abs(scores).max())


def test_cnn_strategies_are_bit_identical(cli, tmp_path):
    results = []
    for name, extra in [("all", ["checkpoint=all"]), ("replay", ["checkpoint=replay", "checkpoint.k=3"])]:
        args = CNN + extra + [f"out_dir={tmp_path / name}"]
        assert cli("train", *args)[0] == 0
        assert cli("attribute", "--test-ids", "0:3", *args)[0] == 0
        results.append((tmp_path / name / "attribute" / "magic" / "scores.npy").read_bytes())
    assert results[0] == results[1]


def test_cuda_asked_for_without_cuda_is_one_line(cli, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code, _, err = cli("train", "device=cuda", *CNN, f"out_dir={tmp_path}")
    assert code == 2 and "CUDA is not available" in err and err.count("\n") == 1


@pytest.mark.slow
@pytest.mark.parametrize("experiment", ["digits_mlp", "breast_cancer_logreg", "digits_cnn", "text_tiny_lm",
                                        "cifar10_small", "cifar10_resnet9"])
def test_every_experiment_smoke_runs(cli, tmp_path, fake_cifar, experiment):
    """Each experiment, shrunk to a few steps, through train -> attribute -> ground truth -> score."""
    args = [f"experiment={experiment}", f"out_dir={tmp_path / 'run'}", "train.epochs=1",
            "ground_truth.drop_fractions=[0.1]", "ground_truth.num_subsets=3"]
    if experiment.startswith("cifar10"):
        args += fake_cifar[1:] + ["dataset.classes=[0,1,2,3,4,5,6,7,8,9]", "dataset.n_train=60", "dataset.n_test=20",
                                  "train.batch_size=20", "model.width=0.0625" if "resnet9" in experiment else "seed=0"]
    if experiment == "text_tiny_lm":
        args += ["dataset.n_train=64", "dataset.n_test=8"]
    for command in (["train"], ["attribute", "--test-ids", "0:2"], ["retrain-ground-truth"], ["score"]):
        code, _, err = cli(*command, *args)
        assert code == 0, (command, err)



@pytest.mark.parametrize("overrides", [TINY, TINY + ["train.loss_reduction=sum"], CNN, LM,
                                       LM + ["train.loss_reduction=token_mean"], CNN + ["dtype=float32"]],
                         ids=["mlp", "mlp-sum", "cnn", "lm", "lm-token_mean", "cnn-float32"])
def test_eager_step_is_bit_equal_to_the_transformable_step(overrides):
    assert_eager_step_bit_equal(problem_for(overrides))
