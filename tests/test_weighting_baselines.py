"""The per-level baselines from the multi-task literature (equations.md, "Per-level baselines"):
Dynamic Weight Average (Liu et al.) against hand-worked windows, and Kendall et al.'s uncertainty
weighting (UW) against its formula and its gradients; both built from the config."""

from __future__ import annotations

import io
import math

import pytest
import torch

from robustdet.config import config_from_dict
from robustdet.engine.trainer import build_optimizer
from robustdet.errors import ConfigError
from robustdet.weighting import (
    WEIGHTINGS,
    DynamicWeightAverage,
    UncertaintyWeighting,
    build_weighting,
)

# --- DWA: four windows worked by hand ------------------------------------------------------------------
#
# 3 levels, interval 2, T = 2, K = 3. Each window's two rows and their mean 𝓛(t) (exact binary fractions):
#
#   window 1: [1, 2, 4],   [3, 2, 4]   -> 𝓛(1) = [2,   2, 4]
#   window 2: [1, 1, 2],   [1, 3, 2]   -> 𝓛(2) = [1,   2, 2]
#   window 3: [.5, 2, 1],  [.5, 2, 3]  -> 𝓛(3) = [.5,  2, 2]
#   window 4: [.25, 1, 1], [.75, 1, 1] -> 𝓛(4) = [.5,  1, 1]
#
# Weights in force (what ``step`` returns after each iteration holds from the next iteration on):
#   windows 1 and 2 (iterations 1-4): all 1. The close of window 1 leaves them 1 (one mean, no ratio);
#   the close of window 2 (after iteration 4) sets the weights of window 3 from
#       r = 𝓛(2)/𝓛(1) = [1/2, 1, 1/2],  w = 3·exp(r/2)/Σ exp(r/2) = 3·[e^¼, e^½, e^¼] / (2e^¼ + e^½)
#   the close of window 3 (after iteration 6) sets window 4's from
#       r = 𝓛(3)/𝓛(2) = [1/2, 1, 1],    w = 3·[e^¼, e^½, e^½] / (e^¼ + 2e^½)
#   the close of window 4 (after iteration 8) sets window 5's from
#       r = 𝓛(4)/𝓛(3) = [1, 1/2, 1/2],  w = 3·[e^½, e^¼, e^¼] / (e^½ + 2e^¼)
# The level whose loss fell least (largest r) gets the most weight; the weights sum to K = 3.

ROWS = [
    [1.0, 2.0, 4.0], [3.0, 2.0, 4.0],
    [1.0, 1.0, 2.0], [1.0, 3.0, 2.0],
    [0.5, 2.0, 1.0], [0.5, 2.0, 3.0],
    [0.25, 1.0, 1.0], [0.75, 1.0, 1.0],
]  # fmt: skip
Q, H = math.exp(0.25), math.exp(0.5)
W3 = [3 * Q / (2 * Q + H), 3 * H / (2 * Q + H), 3 * Q / (2 * Q + H)]
W4 = [3 * Q / (Q + 2 * H), 3 * H / (Q + 2 * H), 3 * H / (Q + 2 * H)]
W5 = [3 * H / (H + 2 * Q), 3 * Q / (H + 2 * Q), 3 * Q / (H + 2 * Q)]
# the weights returned by step k (1-based), i.e. in force during iteration k + 1
EXPECTED = [[1.0] * 3] * 3 + [W3, W3, W4, W4, W5]
RATIOS = [None] * 3 + [[0.5, 1.0, 0.5]] * 2 + [[0.5, 1.0, 1.0]] * 2 + [[1.0, 0.5, 0.5]]


def test_dwa_hand_worked_windows() -> None:
    dwa = DynamicWeightAverage(3, interval=2)
    assert dwa.temperature == 2.0 and dwa.weights.dtype == torch.float64
    assert dwa.weights.tolist() == [1.0, 1.0, 1.0] and dwa.log_fields() == {}
    losses = torch.tensor(ROWS, dtype=torch.float64)
    for k, (row, expected, ratios) in enumerate(zip(losses, EXPECTED, RATIOS, strict=True), start=1):
        returned = dwa.step(row)
        torch.testing.assert_close(returned, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-12)
        assert torch.equal(returned, dwa.weights), k
        assert math.isclose(float(returned.sum()), 3.0, abs_tol=1e-12)
        assert dwa.windows_closed == k // 2
        if ratios is None:
            assert dwa.log_fields() == {}, k
        else:
            assert dwa.log_fields() == {"loss_ratio": ratios}, k  # exact: ratios of binary fractions
        # combine applies the weights in force, as constants: Σ w_i L_i
        level = torch.tensor([0.3, 0.7, 1.1], dtype=torch.float64, requires_grad=True)
        total = dwa.combine(level)
        total.backward()
        assert level.grad is not None and torch.equal(level.grad, dwa.weights)
    assert list(dwa.parameters()) == []  # nothing to learn: no optimizer group


def test_dwa_float32_losses_like_the_trainers() -> None:
    """The trainer feeds float32 losses; the window and the weights stay float64 and give the same."""
    dwa = DynamicWeightAverage(3, interval=2)
    for row, expected in zip(torch.tensor(ROWS, dtype=torch.float32), EXPECTED, strict=True):
        torch.testing.assert_close(dwa.step(row), torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-12)


def test_dwa_temperature() -> None:
    """T = 1: w = 3·softmax(r) on the window 3 ratios [1/2, 1, 1/2]."""
    dwa = DynamicWeightAverage(3, interval=2, temperature=1.0)
    for row in ROWS[:4]:
        weights = dwa.step(torch.tensor(row, dtype=torch.float64))
    a, b = math.exp(0.5), math.exp(1.0)
    expected = [3 * a / (2 * a + b), 3 * b / (2 * a + b), 3 * a / (2 * a + b)]
    torch.testing.assert_close(weights, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="temperature"):
        DynamicWeightAverage(3, interval=2, temperature=0.0)


def test_dwa_level_without_loss_keeps_ratio_one() -> None:
    """A level with no loss in window t−2 (no objects of its size): ratio 1, not 0/0."""
    dwa = DynamicWeightAverage(2, interval=2)
    for row in [[0.0, 2.0], [0.0, 2.0], [1.0, 1.0], [1.0, 1.0]]:
        weights = dwa.step(torch.tensor(row, dtype=torch.float64))
    assert dwa.log_fields() == {"loss_ratio": [1.0, 0.5]}
    e1, eh = math.exp(0.5), math.exp(0.25)
    expected = [2 * e1 / (e1 + eh), 2 * eh / (e1 + eh)]
    torch.testing.assert_close(weights, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-12)
    assert all(math.isfinite(w) for w in weights.tolist())


def test_dwa_rejects_bad_input() -> None:
    dwa = DynamicWeightAverage(3, interval=2)
    with pytest.raises(ValueError, match="3 per-level losses"):
        dwa.step(torch.ones(4))
    with pytest.raises(ValueError, match="level 1 loss is nan"):
        dwa.step(torch.tensor([1.0, math.nan, 1.0]))
    # the bad row did not enter the window: the hand-worked run still holds
    for row, expected in zip(ROWS, EXPECTED, strict=True):
        torch.testing.assert_close(
            dwa.step(torch.tensor(row, dtype=torch.float64)), torch.tensor(expected, dtype=torch.float64),
            rtol=0, atol=1e-12,
        )  # fmt: skip


@pytest.mark.parametrize("stop", [1, 4, 7, 9])  # interval 3: mid windows 1, 2 and 3, at the close of 3
def test_dwa_state_dict_round_trip_continues_identically(stop: int) -> None:
    """Save after ``stop`` iterations (through torch.save with weights_only loading, as a checkpoint),
    load into a fresh DWA, and feed both the rest: every returned weight and log field is identical."""
    g = torch.Generator().manual_seed(0)
    losses = torch.rand(14, 3, generator=g, dtype=torch.float64) + 0.1
    a = DynamicWeightAverage(3, interval=3)
    for row in losses[:stop]:
        a.step(row)
    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)
    buffer.seek(0)
    b = DynamicWeightAverage(3, interval=3)
    b.load_state_dict(torch.load(buffer, weights_only=True))
    assert torch.equal(a.weights, b.weights) and a.windows_closed == b.windows_closed
    assert a.log_fields() == b.log_fields()
    for row in losses[stop:]:
        assert torch.equal(a.step(row), b.step(row))
        assert a.log_fields() == b.log_fields()
    assert a.windows_closed == b.windows_closed == 14 // 3
    assert a.weights.tolist() != [1.0, 1.0, 1.0]  # the run went past two windows and moved the weights


def test_dwa_state_of_another_shape_is_refused() -> None:
    a = DynamicWeightAverage(3, interval=2)
    with pytest.raises(ValueError, match="window"):
        DynamicWeightAverage(3, interval=4).load_state_dict(a.state_dict())


# --- UW: Σ ½·exp(−u_i)·L_i + ½·u_i ---------------------------------------------------------------------

U = [-1.3, -math.log(2.0), 0.0, 0.4, 2.2]
L = [0.8, 1.7, 0.05, 3.0, 0.6]


def _uw64(u: list[float]) -> UncertaintyWeighting:
    uw = UncertaintyWeighting(len(u)).double()
    with torch.no_grad():
        uw.log_vars.copy_(torch.tensor(u, dtype=torch.float64))
    return uw


def test_uw_combine_value_and_gradients_against_the_formula() -> None:
    uw = _uw64(U)
    assert uw.log_vars.dtype == torch.float64
    level = torch.tensor(L, dtype=torch.float64, requires_grad=True)
    total = uw.combine(level)
    expected = sum(0.5 * math.exp(-u) * loss + 0.5 * u for u, loss in zip(U, L, strict=True))
    assert math.isclose(float(total.detach()), expected, rel_tol=1e-14, abs_tol=1e-14)
    total.backward()
    assert uw.log_vars.grad is not None and level.grad is not None
    # ∂/∂u_i = −½·exp(−u_i)·L_i + ½   (drives u_i towards log L_i)
    grad_u = [-0.5 * math.exp(-u) * loss + 0.5 for u, loss in zip(U, L, strict=True)]
    torch.testing.assert_close(uw.log_vars.grad, torch.tensor(grad_u, dtype=torch.float64), rtol=1e-14, atol=1e-15)
    # ∂/∂L_i = ½·exp(−u_i): the weights carry gradient to the detector
    grad_l = [0.5 * math.exp(-u) for u in U]
    torch.testing.assert_close(level.grad, torch.tensor(grad_l, dtype=torch.float64), rtol=1e-14, atol=0)


def test_uw_gradient_is_zero_where_u_is_log_l() -> None:
    """The stationary point of u_i: exp(u_i) = L_i."""
    uw = _uw64([math.log(v) for v in L])
    uw.combine(torch.tensor(L, dtype=torch.float64)).backward()
    assert uw.log_vars.grad is not None
    torch.testing.assert_close(uw.log_vars.grad, torch.zeros(len(L), dtype=torch.float64), rtol=0, atol=1e-15)


def test_uw_float32_like_the_trainer() -> None:
    """The trainer's float32 level losses and float32 u: the same values to float32 precision."""
    uw = UncertaintyWeighting(len(U))
    with torch.no_grad():
        uw.log_vars.copy_(torch.tensor(U))
    level = torch.tensor(L, requires_grad=True)
    total = uw.combine(level)
    assert total.dtype == torch.float32
    total.backward()
    u32 = uw.log_vars.detach().double().tolist()  # the float32 values actually used
    grad_u = [-0.5 * math.exp(-u) * loss + 0.5 for u, loss in zip(u32, L, strict=True)]
    assert uw.log_vars.grad is not None
    expected = torch.tensor(grad_u, dtype=torch.float64)
    torch.testing.assert_close(uw.log_vars.grad.double(), expected, rtol=1e-6, atol=1e-6)


def test_uw_default_init_weights_one_and_sigma() -> None:
    uw = UncertaintyWeighting(5)
    assert isinstance(uw.log_vars, torch.nn.Parameter) and uw.log_vars.requires_grad
    assert [p is uw.log_vars for p in uw.parameters()] == [True]
    torch.testing.assert_close(uw.log_vars.double(), torch.full((5,), -math.log(2.0), dtype=torch.float64))
    # u = −log 2 rounded to float32 (off by 2e-9): the weights are 1 to that precision
    torch.testing.assert_close(uw.weights, torch.ones(5, dtype=torch.float64), rtol=0, atol=1e-8)
    assert uw.weights.dtype == torch.float64
    sigma = uw.log_fields()["sigma"]
    assert isinstance(sigma, list) and len(sigma) == 5
    # σ_i = exp(u_i / 2) = 1/√2 at the default init
    assert sigma == pytest.approx([math.sqrt(0.5)] * 5, rel=1e-8)
    # the same at other u
    uw = _uw64(U)
    assert uw.log_fields() == {"sigma": pytest.approx([math.exp(u / 2) for u in U], rel=1e-14)}


def test_uw_step_refreshes_the_weights_after_the_optimizer() -> None:
    uw = _uw64(U)
    # the weights of the initial u until a step after u moved
    with torch.no_grad():
        uw.log_vars.add_(0.5)
    moved = [u + 0.5 for u in U]
    returned = uw.step(torch.tensor(L))
    expected = torch.tensor([0.5 * math.exp(-u) for u in moved], dtype=torch.float64)
    torch.testing.assert_close(returned, expected, rtol=1e-14, atol=0)
    assert torch.equal(uw.weights, returned)
    with pytest.raises(ValueError, match="level 2 loss is inf"):
        uw.step(torch.tensor([1.0, 1.0, math.inf, 1.0, 1.0]))
    # a state-dict round trip restores u and the weights
    fresh = UncertaintyWeighting(len(U)).double()
    fresh.load_state_dict(uw.state_dict())
    assert torch.equal(fresh.log_vars, uw.log_vars) and torch.equal(fresh.weights, uw.weights)


def test_uw_trains_towards_log_l() -> None:
    """A few SGD steps on Σ ½·exp(−u)·L + ½·u with L fixed: u moves towards log L on every level."""
    uw = _uw64([0.0] * len(L))
    opt = torch.optim.SGD(uw.parameters(), lr=0.5)
    level = torch.tensor(L, dtype=torch.float64)
    start = (uw.log_vars.detach() - level.log()).abs()
    for _ in range(20):
        opt.zero_grad()
        uw.combine(level).backward()
        opt.step()
    assert ((uw.log_vars.detach() - level.log()).abs() < start).all()


def test_uw_parameters_are_in_the_log_var_group_without_weight_decay() -> None:
    cfg = config_from_dict({"weighting": {"name": "uw"}, "train": {"optimizer": {"weight_decay": 0.1}}})
    uw = build_weighting(cfg.weighting, 5, cfg.seed)
    model = torch.nn.Linear(2, 2)
    opt = build_optimizer(model, uw, cfg)
    groups = {g["name"]: g for g in opt.param_groups}
    assert [p is uw.log_vars for p in groups["log_var"]["params"]] == [True]
    assert groups["log_var"]["weight_decay"] == 0.0 and groups["model"]["weight_decay"] == 0.1
    assert all(p is not uw.log_vars for p in groups["model"]["params"])


# --- both built from the config -------------------------------------------------------------------------


def test_built_through_the_config() -> None:
    assert WEIGHTINGS["uw"] is UncertaintyWeighting and WEIGHTINGS["dwa"] is DynamicWeightAverage
    cfg = config_from_dict({"weighting": {"name": "uw"}})
    uw = build_weighting(cfg.weighting, 5, cfg.seed)
    assert isinstance(uw, UncertaintyWeighting) and uw.num_levels == 5
    torch.testing.assert_close(uw.weights, torch.ones(5, dtype=torch.float64), rtol=0, atol=1e-8)
    cfg = config_from_dict({"weighting": {"name": "uw", "init": 0.3}})
    uw = build_weighting(cfg.weighting, 4, cfg.seed)
    assert isinstance(uw, UncertaintyWeighting)
    torch.testing.assert_close(uw.log_vars.detach(), torch.full((4,), 0.3))

    cfg = config_from_dict({"weighting": {"name": "dwa"}})
    dwa = build_weighting(cfg.weighting, 5, cfg.seed)
    assert isinstance(dwa, DynamicWeightAverage)
    assert (dwa.interval, dwa.temperature, dwa.measure) == (100, 2.0, "plain")
    cfg = config_from_dict({"weighting": {"name": "dwa", "interval": 2, "temperature": 0.5, "measure": "trained"}})
    dwa = build_weighting(cfg.weighting, 3, cfg.seed)
    assert isinstance(dwa, DynamicWeightAverage)
    assert (dwa.num_levels, dwa.interval, dwa.temperature, dwa.measure) == (3, 2, 0.5, "trained")


@pytest.mark.parametrize(
    ("section", "key"),
    [
        ({"name": "uw", "interval": 2}, "interval"),
        ({"name": "uw", "measure": "plain"}, "measure"),
        ({"name": "uw", "temperature": 2.0}, "temperature"),
        ({"name": "dwa", "init": 0.0}, "init"),
        ({"name": "dwa", "lambdas": [1.5, 1.0]}, "lambdas"),
        ({"name": "dwa", "rl_step": 0.1}, "rl_step"),
        ({"name": "equal", "temperature": 2.0}, "temperature"),
        ({"name": "avw", "init": 0.0}, "init"),
    ],
)
def test_a_key_the_component_does_not_declare_is_an_error_naming_it(section: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError, match=f"weighting.{key}: unknown key for weighting name={section['name']}"):
        config_from_dict({"weighting": section})


@pytest.mark.parametrize(
    "section",
    [
        {"name": "dwa", "temperature": 0.0},
        {"name": "dwa", "interval": 1},
        {"name": "dwa", "measure": "bayesian"},
        {"name": "uw", "init": math.inf},
    ],
)
def test_bad_values_are_config_errors(section: dict[str, object]) -> None:
    with pytest.raises(ConfigError, match="weighting"):
        config_from_dict({"weighting": section})
