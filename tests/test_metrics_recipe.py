"""Metrics of a run with a mixture task, a replay source and a held-out domain, on a
hand-made loss matrix whose numbers were worked out by hand (DESIGN.md, "Domains that are
not a task's"). The matrix is built so that ignoring the start row, or counting the
source as a task, changes forgetting and BWT."""

import numpy as np
import pytest

from cpt_jax.data.recipe import Recipe
from cpt_jax.eval import metrics

COLUMNS = ["src", "a", "b1", "b2", "held"]
TASKS = [{"a": 1.0}, {"b1": 0.75, "b2": 0.25}]
START = [2.0, 5.0, 6.0, 6.5, 4.0]
R = [[2.5, 3.0, 5.0, 5.5, 4.2],   # after task 0 (a)
     [2.8, 3.4, 3.2, 3.6, 4.5]]   # after task 1 (0.75 b1 + 0.25 b2)


def test_source_start_row_and_heldout_by_hand():
    m = metrics.recipe_metrics(R, COLUMNS, TASKS, ["src"], START, b=[10.0] * 5)
    assert m["learned_loss"] == pytest.approx((3.0 + (0.75 * 3.2 + 0.25 * 3.6)) / 2)  # 3.15
    assert m["retained_loss"] == pytest.approx((2.8 + 3.4) / 2)
    # src: 2.8 - min(2.5, start 2.0) = 0.8 (0.3 without the start row); a: 3.4 - 3.0
    assert m["forgetting"] == pytest.approx((0.8 + 0.4) / 2)
    assert m["bwt"] == pytest.approx(((2.0 - 2.8) + (3.0 - 3.4)) / 2)
    assert m["forgetting_last"] == pytest.approx(-m["bwt"])
    assert m["fwt"] == pytest.approx(10.0 - (0.75 * 5.0 + 0.25 * 5.5))
    assert m["final_loss_all"] == pytest.approx((2.8 + 3.4 + 3.2 + 3.6) / 4)
    assert m["init_loss_start"] == pytest.approx((2.0 + 5.0 + 6.0 + 6.5) / 4)
    assert m["heldout_change"] == {"mean": pytest.approx(0.5),
                                   "per_domain": {"held": pytest.approx(0.5)}}
    # the readings that would be wrong differ
    as_task = metrics.recipe_metrics(R, COLUMNS, TASKS, [], START)
    assert as_task["forgetting"] != pytest.approx(m["forgetting"])
    assert as_task["bwt"] != pytest.approx(m["bwt"])
    no_start = metrics.recipe_metrics(R, COLUMNS, TASKS, ["src"], None)
    assert no_start["forgetting"] == pytest.approx((0.3 + 0.4) / 2)


def test_one_task_run_reports_forgetting_of_the_source():
    m = metrics.recipe_metrics([R[0][:2]], ["src", "a"], [{"a": 1.0}], ["src"], START[:2])
    assert m["retained_loss"] == pytest.approx(2.5)
    assert m["forgetting"] == pytest.approx(0.5)
    assert m["bwt"] == pytest.approx(-0.5)


def test_plain_runs_keep_the_square_matrix_metrics():
    rng = np.random.default_rng(0)
    Rsq = rng.uniform(1, 5, (3, 3))
    b, start = rng.uniform(5, 9, 3), rng.uniform(5, 9, 3)
    general = metrics.recipe_metrics(Rsq, ["x", "y", "z"], [{"x": 1}, {"y": 1}, {"z": 1}],
                                     [], start, b)
    assert general == pytest.approx(metrics.summary(Rsq, b, start))


def test_metrics_from_results_reads_the_recipe_from_the_config():
    config = {"data": {"domains": [{"name": c} for c in COLUMNS]},
              "tasks": [{"domain": "a", "steps": 1},
                        {"domains": {"b1": 3, "b2": 1}, "steps": 1}],
              "replay": {"sources": ["src"]}}
    results = {"domains": COLUMNS, "columns": COLUMNS, "tasks": ["a", "b1+b2"],
               "loss_matrix": R, "init_losses": dict(zip(COLUMNS, START)),
               "eval_curve": [{"step": 0, "losses": dict(zip(COLUMNS, START))}],
               "config": config}
    m = metrics.metrics_from_results(results)
    assert m["forgetting"] == pytest.approx(0.6)
    assert m["heldout_change"]["per_domain"] == {"held": pytest.approx(0.5)}
    recipe = Recipe.of_config(config)
    assert recipe.kinds == {"src": "replay_source", "a": "task", "b1": "task", "b2": "task",
                            "held": "heldout"}
    assert recipe.slots == ("src", "a", "b1", "b2") and recipe.first_slot == [1, 2]
