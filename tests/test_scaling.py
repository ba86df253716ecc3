"""cpt_jax.eval.scaling and scripts/analyze_sweep.py against closed-form references: a
power law recovered from its own values, standard errors against Monte Carlo, seed means
and standard errors by hand, the Pareto frontier of a hand-made set, the replay-vs-size
comparison interpolated in log FLOPs by hand, and a whole synthetic sweep end to end."""

import json
import math
import os

import numpy as np
import pytest

from cpt_jax.eval import scaling
from synthetic_sweep import A, B, C_INF, C_REF, write_sweep
from tiny_runs import load_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_power_law_recovers_its_constants_in_the_reported_units():
    C = np.geomspace(1e12, 1e14, 6)
    L = 5.0 * (C / 1e12) ** -0.25 + 1.0  # generated with reference 1e12
    fit = scaling.fit_power_law(C, L)
    assert fit["C0"] == 1e13  # a power of ten at the data's centre (in log)
    assert fit["b"] == pytest.approx(0.25, abs=1e-6)
    assert fit["c"] == pytest.approx(1.0, abs=1e-5)
    assert fit["a"] == pytest.approx(5.0 * 10 ** -0.25, rel=1e-5)  # a (C/1e12)^-b at C0
    assert scaling.power_law(fit, 3e12) == pytest.approx(5.0 * 3 ** -0.25 + 1.0, rel=1e-6)
    assert not fit["at_bound"]


def test_power_law_needs_three_flops_levels():
    assert scaling.fit_power_law([1e12, 1e12, 2e12, 2e12], [3.0, 3.1, 2.5, 2.6]) is None
    exact = scaling.fit_power_law([1e12, 2e12, 4e12], [3.0, 2.5, 2.3])
    assert exact is not None and exact["b_se"] is None  # no residual degrees of freedom


def test_power_law_standard_errors_match_the_spread_of_refits():
    rng = np.random.default_rng(0)
    C = np.repeat(np.geomspace(1e12, 1e15, 5), 2)
    truth = 1.0 * (C / 1e13) ** -0.5 + 2.0
    fits = [scaling.fit_power_law(C, truth + rng.normal(0, 0.01, C.shape))
            for _ in range(300)]
    for key in ("a", "b", "c"):
        spread = np.std([f[key] for f in fits])
        reported = np.median([f[f"{key}_se"] for f in fits])
        assert reported == pytest.approx(spread, rel=0.25), key
    assert np.mean([f["b"] for f in fits]) == pytest.approx(0.5, abs=0.01)


def _row(size, rate, seed, flops, retained, learned=1.0, params=1):
    return {"name": f"{size}{rate}{seed}", "values": {"model": size, "replay.rate": str(rate),
                                                     "seed": str(seed)},
            "size": size, "rate": rate, "seed": seed, "flops": flops, "params": params,
            "learned_loss": learned, "retained_loss": retained, "forgetting": 0.0,
            "final_loss_all": 0.0}


def test_cells_hold_seed_means_and_standard_errors():
    rows = [_row("s", 0.0, k, 1e12, x) for k, x in enumerate((1.0, 2.0, 4.0))]
    rows.append(_row("s", 0.5, 0, 2e12, 3.0))
    cells = scaling.aggregate(rows)
    assert [c["n"] for c in cells] == [3, 1]
    assert cells[0]["retained_loss"] == pytest.approx(7 / 3)
    # sample sd sqrt(((1-7/3)^2 + (2-7/3)^2 + (4-7/3)^2) / 2) = sqrt(7/3), over sqrt(3)
    assert cells[0]["retained_loss_se"] == pytest.approx(math.sqrt(7 / 3) / math.sqrt(3))
    assert cells[1]["retained_loss_se"] is None


def test_pareto_front_keeps_only_undominated_cells():
    cells = [{"learned_loss": x, "retained_loss": y} for x, y in
             [(1.0, 5.0), (2.0, 3.0), (2.5, 3.0), (3.0, 1.0), (3.0, 4.0), (1.5, 5.0)]]
    # (2.5, 3) ties (2, 3) on retained and is worse on learned; (3, 4) is beaten by (2, 3)
    assert scaling.pareto_front(cells) == [0, 1, 3]


def _cell(size, rate, flops, loss, se, params):
    return {"values": {"model": size, "replay.rate": str(rate)}, "size": size, "rate": rate,
            "flops": flops, "params": params, "retained_loss": loss,
            "retained_loss_se": se}


def test_replay_vs_size_interpolates_the_size_path_in_log_flops():
    cells = [_cell("s", 0.0, 1e12, 5.0, 0.03, 1), _cell("s", 0.25, 2e12, 4.7, 0.04, 1),
             _cell("m", 0.0, 8e12, 4.4, 0.06, 4)]
    (c,) = scaling.replay_vs_size(cells)
    # 2e12 is one doubling of three from 1e12 to 8e12: the size path is at 5 - 0.6 / 3 = 4.8
    # (linear in C would give 5 - 0.6 / 7; comparing the raw cells, 4.7 > 4.4, says "no")
    assert c["loss_size_at_replay_flops"] == pytest.approx(4.8)
    assert c["margin"] == pytest.approx(0.1) and c["replay_wins"]
    se = math.sqrt((2 / 3 * 0.03) ** 2 + (1 / 3 * 0.06) ** 2 + 0.04 ** 2)
    assert c["margin_se"] == pytest.approx(se)
    assert c["clear"] == (0.1 > 2 * se)


def test_replay_vs_size_at_matched_flops_compares_the_cells_directly():
    cells = [_cell("s", 0.0, 1e13, 5.0, None, 1), _cell("s", 0.5, 1e13, 4.6, None, 1),
             _cell("m", 0.0, 1e13, 4.5, None, 4)]
    (c,) = scaling.replay_vs_size(cells)
    assert c["matched"] and c["margin"] == pytest.approx(-0.1) and not c["replay_wins"]
    assert "no" in scaling.answer([c]).split("**")[1]


def _analyze_sweep_script():
    return load_script("analyze_sweep")


def test_analyze_sweep_end_to_end_on_a_closed_form_sweep(tmp_path, capsys):
    sweep = write_sweep(tmp_path)
    assert _analyze_sweep_script().main([sweep, "--out", str(tmp_path / "out")]) == 0
    out = json.load(open(tmp_path / "out" / "analysis.json"))
    assert {os.path.basename(p) for p in os.listdir(tmp_path / "out")} == {
        "analysis.md", "analysis.json", "scaling.png", "pareto.png"}
    fits = {f["curve"]: f["fit"] for f in out["fits"]}
    for rate in (0.0, 0.25, 0.5):  # each replay-rate curve is an exact power law
        fit = fits[f"replay {rate:g}"]
        assert fit["b"] == pytest.approx(B, abs=1e-4)
        assert fit["c"] == pytest.approx(C_INF, abs=1e-3)
        assert fit["a"] * (fit["C0"] / C_REF) ** B == pytest.approx(A[rate], rel=1e-3)
    # hand-computed margins (tiny and small; see tests/synthetic_sweep.py)
    by_step = {(c["rate_from"], c["size_from"]): c for c in out["comparisons"]}

    def ret(rate, flops):
        return A[rate] * (flops / C_REF) ** -B + C_INF

    t = math.log(1.25) / math.log(4)
    path = (1 - t) * ret(0.0, 1e12) + t * ret(0.0, 4e12)
    assert by_step[(0.0, "tiny")]["margin"] == pytest.approx(path - ret(0.25, 1.25e12))
    assert by_step[(0.0, "tiny")]["margin"] > 0.5
    assert all(by_step[(0.0, s)]["replay_wins"] for s in ("tiny", "small"))
    assert not any(by_step[(0.25, s)]["replay_wins"] for s in ("tiny", "small"))
    answer = out["answer"].splitlines()
    assert answer[0].startswith("- **Replay 0 -> 0.25 vs the next model size, at matched "
                                "FLOPs: yes**")
    assert ": no**" in answer[1]
    # learned = l0 - 0.5 - rate / 2 (lowest for base, 0.5), and base at 0.5 also retains
    # best (1.7 * 2.56^-0.3 + 3 = 4.282 against 4.299 for base at 0.25): it alone is the front
    front = [out["cells"][i] for i in out["pareto"]]
    assert [(c["size"], c["rate"]) for c in front] == [("base", 0.5)]
    assert front[0]["learned_loss"] == pytest.approx(4.2 - 0.5 - 0.25)
    md = capsys.readouterr().out
    assert "| tiny | 0.15M | 0 | 2 |" in md
    assert md.count("| yes |") == 1  # the Pareto column


def test_analyze_sweep_names_a_missing_sweep(tmp_path, capsys):
    assert _analyze_sweep_script().main([str(tmp_path / "nope")]) == 2
    assert "has no index.json" in capsys.readouterr().err
