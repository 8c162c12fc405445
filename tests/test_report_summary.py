"""`robustdet report`'s closing lines on what the methods did, on hand-written log records."""

import math

from robustdet.report import methods_summary

P = "weighting/action_probability/"


def _record(it: int, action: int, s_cls: float, s_reg: float, probs: tuple[float, ...]) -> dict[str, object]:
    names = ("a0_avw", "a1_smallest_loss", "a2_largest_loss", "a3_equal")
    return {
        "iter": it,
        "weighting/action": action,
        "loss/sigma/cls": math.exp(s_cls / 2),
        "loss/sigma/reg": math.exp(s_reg / 2),
        **{P + n: p for n, p in zip(names, probs, strict=True)},
        "level_names": ["P3", "P4"],
        "level_weights": [1.0, 1.75],
    }


def test_sigma_rlo_counts_and_weights() -> None:
    quarter = (0.25, 0.25, 0.25, 0.25)
    records = [
        _record(10, -1, 0.0, 1.0, quarter),  # before the first window closes: no action in force
        _record(20, 2, 0.0, 1.0, quarter),
        _record(30, 2, 0.0, 0.5, (0.2, 0.2, 0.4, 0.2)),
        _record(40, 0, 0.0, 0.0, (0.3, 0.1, 0.5, 0.1)),
    ]
    lines = methods_summary(records)
    assert lines == [
        "Bayesian losses, σ = exp(s/2) at iteration 40: σ_cls 1.000 (iteration 10: 1.000), "
        "σ_reg 1.000 (iteration 10: 1.649)",
        "RLO: action in force at 3 of 4 logged iterations: a0_avw 1, a1_smallest_loss 0, a2_largest_loss 2, a3_equal 0",
        "RLO: final action probabilities a0_avw 0.30, a1_smallest_loss 0.10, a2_largest_loss 0.50, a3_equal 0.10",
        "final level weights: P3 1.00, P4 1.75",
    ]


def test_plain_losses_and_equal_weights_say_only_the_weights() -> None:
    records = [{"iter": 5, "level_names": ["P3"], "level_weights": [1.0], "weighting/action": -1}]
    assert methods_summary(records) == ["final level weights: P3 1.00"]
