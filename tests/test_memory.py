"""attribute.memory: groups of test ids sized to a memory budget, from a measured reverse step."""

from __future__ import annotations

import json

import numpy as np
import torch
from conftest import TINY, problem_for
from test_faults import one_line_error

from magic_cli.core.memory import peak_tensor_bytes, plan_groups, reverse_step_bytes


def test_peak_tensor_bytes_counts_what_is_alive_at_once():
    def fn():
        a = torch.zeros(1000)  # 4000 bytes
        b = torch.ones(2000)  # 8000 more while a lives
        view = b[:10]  # a view adds nothing
        b.add_(1)  # nor does an in-place result
        del a, b, view
        torch.zeros(500)  # 2000 bytes after both were freed

    assert peak_tensor_bytes(fn) == 12000
    assert peak_tensor_bytes(lambda: None) == 0


def test_a_reverse_step_grows_linearly_in_the_ids_and_is_measured_the_same_every_time(tmp_path):
    problem = problem_for(TINY)
    state = problem.init_state()
    m = {J: reverse_step_bytes(problem, state, J) for J in (2, 4, 8)}
    assert m[2] < m[4] < m[8] and abs((m[8] - m[4]) / (2 * (m[4] - m[2])) - 1) < 0.1  # nearly linear
    assert reverse_step_bytes(problem, state, 4) == m[4]  # deterministic: the groups are too


def _run(cli, run_dir, *extra):
    code, _, err = cli("train", *TINY, f"out_dir={run_dir}", "checkpoint=sqrt")
    assert code == 0, err
    code, _, err = cli("attribute", "--test-ids", "0:10", *TINY, f"out_dir={run_dir}", *extra)
    assert code == 0, err
    return (np.load(run_dir / "attribute" / "magic" / "scores.npy"),
            json.loads((run_dir / "attribute" / "magic" / "last_run.json").read_text()))


def test_a_memory_budget_forms_the_largest_groups_that_fit(cli, tmp_path):
    run = tmp_path / "run"
    problem = problem_for(TINY)
    state = problem.init_state()
    row = problem.dataset.n_train * 8  # float64 scores of one id
    one_group = {J: reverse_step_bytes(problem, state, J) + J * row for J in range(1, 11)}
    budget = one_group[4] + (one_group[5] - one_group[4]) // 2  # room for 4 ids, not 5
    scores, last = _run(cli, run, "checkpoint=sqrt", f"attribute.memory={budget}B")
    plan = last["memory"]
    assert last["batch_size"] == plan["batch_size"] == 4 and plan["total_bytes"] <= budget
    assert plan["groups_per_pass"] == 1  # no room to hold a second group's cotangents and scores
    same, _ = _run(cli, tmp_path / "fixed", "checkpoint=sqrt", "attribute.batch_size=4", "attribute.replay_groups=1")
    assert scores.tobytes() == same.tobytes()  # the groups of attribute.batch_size=4
    _, again = _run(cli, run, "checkpoint=sqrt", f"attribute.memory={budget}B")
    assert again["ids_computed"] == 0  # a rerun forms the same groups: nothing to do

    roomy = plan_groups(problem, state, 10 ** 9, 64, 0, 10, shared=True)
    assert (roomy.batch_size, roomy.groups_per_pass) == (10, 1)  # capped by the ids asked
    capped = plan_groups(problem, state, 10 ** 9, 3, 2, 10, shared=True)
    assert (capped.batch_size, capped.groups_per_pass) == (3, 2)  # by batch_size and replay_groups
    assert capped.total_bytes == capped.step_bytes + 3 * row + capped.held_bytes


def test_too_small_or_malformed_memory_budgets_are_one_line(cli, tmp_path):
    run = tmp_path / "run"
    code, _, err = cli("train", *TINY, f"out_dir={run}")
    assert code == 0, err
    code, _, err = cli("attribute", "--test-ids", "0:4", *TINY, f"out_dir={run}", "attribute.memory=1KB")
    one_line_error(code, err, "attribute.memory=1,000 bytes is less than one test id's reverse pass needs")
    assert not (run / "attribute" / "magic" / "scores.npy").exists()
    code, _, err = cli("attribute", "--test-ids", "0:4", *TINY, f"out_dir={run}", "attribute.memory=lots")
    one_line_error(code, err, "attribute.memory must be a size with a unit")
