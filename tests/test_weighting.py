"""AVW and RLO (Luo et al., Eq. 2-9) on windows worked out by hand, plus the interface contract."""

from __future__ import annotations

import io
import json
import math
from collections.abc import Iterator

import pytest
import torch

from robustdet.weighting import (
    ACTIONS,
    WEIGHTINGS,
    AdaptiveVarianceWeighting,
    DynamicWeightAverage,
    EqualWeighting,
    LevelWeighting,
    ReinforcementLearningOptimization,
    UncertaintyWeighting,
    amplify_largest_loss,
    amplify_largest_rate,
    amplify_smallest_loss,
    equal_weights,
    sample_action,
    two_levels,
    update_probabilities,
    window_reward,
)

EPS = 1e-5


def feed(weighting: LevelWeighting, rows: list[list[float]]) -> list[list[float]]:
    """Step through ``rows``; return the weights each step returned."""
    return [weighting.step(torch.tensor(row, dtype=torch.float64)).tolist() for row in rows]


def force_probabilities(rlo: ReinforcementLearningOptimization, probabilities: list[float]) -> None:
    state = rlo.get_extra_state()
    state["probabilities"] = probabilities
    rlo.set_extra_state(state)


def assert_close(actual: list[float], expected: list[float], tol: float = 1e-12) -> None:
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected, strict=True):
        assert a == pytest.approx(e, abs=tol, rel=0)


# ---------------------------------------------------------------- AVW, Eq. 2-5


def test_avw_two_hand_worked_windows_with_a_tie() -> None:
    avw = AdaptiveVarianceWeighting(3, interval=3)
    # Window 1 (columns = levels 0, 1, 2):
    #   level 0: 1, 2, 3       𝓛 = 6, mean 2, Var = (1 + 0 + 1) / 2 = 1
    #   level 1: 2, 2, 2       𝓛 = 6, Var = 0
    #   level 2: 0.5, 1, 1.5   𝓛 = 3, mean 1, Var = (0.25 + 0 + 0.25) / 2 = 0.25
    # Var^prev = 1: r = (1 − Var) / (1 + 1e-5) = (0, 0.99999, 0.7499925)
    # largest r: level 1 (λ 1.5), then level 2 (λ 1.0); Σ𝓛 = 15
    #   w1 = 1 + 1.5 · 6/15 = 1.6,  w2 = 1 + 1.0 · 3/15 = 1.2,  w0 = 1
    returned = feed(avw, [[1.0, 2.0, 0.5], [2.0, 2.0, 1.0], [3.0, 2.0, 1.5]])
    assert returned[:2] == [[1.0, 1.0, 1.0]] * 2  # before the first window closes
    assert_close(returned[2], [1.0, 1.6, 1.2])
    # Window 2, Var^prev = (1, 0, 0.25):
    #   level 0: 1, 2, 3       𝓛 = 6, Var = 1     r0 = (1 − 1) / (1 + 1e-5)       = 0
    #   level 1: 1, 2, 3       𝓛 = 6, Var = 1     r1 = (0 − 1) / (0 + 1e-5)       = −100000
    #   level 2: 0.5, 1, 1.5   𝓛 = 3, Var = 0.25  r2 = (0.25 − 0.25) / (0.25 + 1e-5) = 0
    # r0 = r2 = 0 tie for first place: the lower index, level 0, gets λ 1.5, level 2 gets λ 1.0:
    #   w0 = 1 + 1.5 · 6/15 = 1.6,  w2 = 1 + 1.0 · 3/15 = 1.2  (the other order would give 1.4 and 1.3)
    returned = feed(avw, [[1.0, 1.0, 0.5], [2.0, 2.0, 1.0], [3.0, 3.0, 1.5]])
    assert_close(returned[0], [1.0, 1.6, 1.2])  # window 1's weights hold during window 2
    assert_close(returned[1], [1.0, 1.6, 1.2])
    assert_close(returned[2], [1.6, 1.0, 1.2])
    assert avw.windows_closed == 2
    assert avw.weights.tolist() == returned[2]


def test_avw_rejected_step_does_not_enter_the_window() -> None:
    avw = AdaptiveVarianceWeighting(3, interval=3)
    feed(avw, [[1.0, 2.0, 0.5]])
    with pytest.raises(ValueError, match="level 2"):
        avw.step(torch.tensor([2.0, 2.0, math.nan]))
    with pytest.raises(ValueError, match="level 0"):
        avw.step(torch.tensor([math.inf, 2.0, 1.0]))
    # the same window 1 as above: w = (1, 1.6, 1.2)
    returned = feed(avw, [[2.0, 2.0, 1.0], [3.0, 2.0, 1.5]])
    assert_close(returned[1], [1.0, 1.6, 1.2])


# ---------------------------------------------------------------- the four actions (Sec. 3.3)


def test_two_levels_ties_go_to_the_lower_index() -> None:
    assert two_levels([0.5, 0.5, 0.5], largest=True) == (0, 1)
    assert two_levels([0.5, 0.5, 0.5], largest=False) == (0, 1)
    assert two_levels([0.2, 0.7, 0.7], largest=True) == (1, 2)
    assert two_levels([0.2, 0.1, 0.1], largest=False) == (1, 2)
    assert two_levels([0.9, 0.1, 0.9, 0.5], largest=True) == (0, 2)


def test_action_rules_on_a_hand_worked_window() -> None:
    sums = [3.0, 1.0, 4.0, 2.0]  # Σ𝓛 = 10
    rate = [0.3, 0.1, 0.2, -0.2]
    lambdas = (1.5, 1.0)
    # a0: largest r are level 0 (0.3, λ 1.5) and level 2 (0.2): 1 + 1.5 · 3/10 = 1.45, 1 + 4/10 = 1.4
    assert_close(amplify_largest_rate(rate, sums, lambdas), [1.45, 1.0, 1.4, 1.0])
    # a1: smallest 𝓛 are level 1 (1, λ 1.5) and level 3 (2): 1 + 1.5 · 1/10 = 1.15, 1 + 2/10 = 1.2
    assert_close(amplify_smallest_loss(rate, sums, lambdas), [1.0, 1.15, 1.0, 1.2])
    # a2: largest 𝓛 are level 2 (4, λ 1.5) and level 0 (3): 1 + 1.5 · 4/10 = 1.6, 1 + 3/10 = 1.3
    assert_close(amplify_largest_loss(rate, sums, lambdas), [1.3, 1.0, 1.6, 1.0])
    assert equal_weights(rate, sums, lambdas) == [1.0, 1.0, 1.0, 1.0]
    assert tuple(ACTIONS) == (
        amplify_largest_rate,
        amplify_smallest_loss,
        amplify_largest_loss,
        equal_weights,
    )


def test_all_zero_window_keeps_weights_one() -> None:
    # Σ𝓛 = 0 leaves no loss share to amplify (Eq. 5 would divide by 0)
    assert amplify_largest_loss([1.0, 0.0], [0.0, 0.0], (1.5, 1.0)) == [1.0, 1.0]


def test_negative_bayesian_level_losses_keep_weights_in_one_to_one_plus_lambda() -> None:
    # only reachable with weighting.measure=trained: the default measure (plain losses) is never negative
    # Bayesian per-level sums from a real run (s_cls < 0 makes the log σ terms negative):
    # 𝓛 = (-1.3, 0.9, 0.6, -0.1). Positive parts (0, 0.9, 0.6, 0), Σ = 1.5.
    sums = [-1.3, 0.9, 0.6, -0.1]
    # a1: smallest 𝓛 → level 0 (λ 1.5): share 0 → 1.0; level 3 (λ 1.0): share 0 → 1.0
    assert amplify_smallest_loss([0.0] * 4, sums, (1.5, 1.0)) == [1.0, 1.0, 1.0, 1.0]
    # a2: largest 𝓛 → level 1 (λ 1.5): 1 + 1.5 · 0.9/1.5 = 1.9; level 2: 1 + 0.6/1.5 = 1.4
    assert amplify_largest_loss([0.0] * 4, sums, (1.5, 1.0)) == pytest.approx([1.0, 1.9, 1.4, 1.0])
    # the plain ratio would have given 1 + 1.5 · (-1.3)/0.1 = -18.5 for a1's level 0
    assert amplify_smallest_loss([0.0] * 4, [-1.3, 0.5, 0.6, 0.3], (1.5, 1.0))[0] == 1.0
    # no positive mass at all: nothing to amplify
    assert amplify_largest_loss([0.0] * 2, [-1.0, -2.0], (1.5, 1.0)) == [1.0, 1.0]


@pytest.mark.parametrize(
    ("action", "expected"),
    [
        # window: rows (1, 0.5, 2, 1) and (2, 0.5, 2, 1); 𝓛 = (3, 1, 4, 2), Σ = 10
        # Var (ddof 1, two samples: (a − b)²/2) = (0.5, 0, 0, 0); r = (0.5, 1, 1, 1) / 1.00001
        # a0: r tie among levels 1, 2, 3 → levels 1 (λ 1.5) and 2: 1 + 1.5 · 1/10 = 1.15, 1 + 4/10 = 1.4
        (0, [1.0, 1.15, 1.4, 1.0]),
        # a1: smallest 𝓛 → level 1 (λ 1.5): 1.15, level 3 (2): 1 + 2/10 = 1.2
        (1, [1.0, 1.15, 1.0, 1.2]),
        # a2: largest 𝓛 → level 2 (λ 1.5): 1 + 1.5 · 4/10 = 1.6, level 0 (3): 1 + 3/10 = 1.3
        (2, [1.3, 1.0, 1.6, 1.0]),
        (3, [1.0, 1.0, 1.0, 1.0]),
    ],
)
def test_rlo_forced_action_weights(action: int, expected: list[float]) -> None:
    rlo = ReinforcementLearningOptimization(4, interval=2, p_min=0.0, p_max=1.0)
    force_probabilities(rlo, [1.0 if k == action else 0.0 for k in range(4)])
    returned = feed(rlo, [[1.0, 0.5, 2.0, 1.0], [2.0, 0.5, 2.0, 1.0]])
    assert returned[0] == [1.0] * 4
    assert rlo.action == action
    assert_close(returned[1], expected)


# ---------------------------------------------------------------- reward and Eq. 9


def test_window_reward_sign() -> None:
    assert window_reward(12.0, 6.0) == 1
    assert window_reward(6.0, 12.0) == -1
    assert window_reward(12.0, 12.0) == 0


def test_probability_update_hand_worked_sequence() -> None:
    step, p_min, p_max = 0.2, 0.1, 0.6
    p = [0.25, 0.25, 0.25, 0.25]
    # a0 rewarded: p0 = 0.45; others · (1 − 0.45)/(1 − 0.25) = 0.25 · 11/15 = 11/60
    p = update_probabilities(p, 0, 1, step, p_min, p_max)
    assert_close(p, [0.45, 11 / 60, 11 / 60, 11 / 60])
    # a0 rewarded: 0.65 clipped to p_max = 0.6; others · 0.4/0.55: 11/60 · 8/11 = 2/15
    p = update_probabilities(p, 0, 1, step, p_min, p_max)
    assert_close(p, [0.6, 2 / 15, 2 / 15, 2 / 15])
    # a1 punished: 2/15 − 0.2 < 0 clipped to p_min = 0.1; others · 0.9/(13/15) = 27/26:
    #   p0 = 0.6 · 27/26 = 81/130 ≈ 0.623 (only the updated one is clipped: this one exceeds p_max)
    #   p2 = p3 = 2/15 · 27/26 = 9/65
    p = update_probabilities(p, 1, -1, step, p_min, p_max)
    assert_close(p, [81 / 130, 0.1, 9 / 65, 9 / 65])
    # a2 with reward 0 (equal totals) is punished: 9/65 − 0.2 → 0.1; others · 0.9/(56/65) = 117/112:
    #   p0 = 81/130 · 117/112 = 729/1120, p1 = 0.1 · 117/112 = 117/1120, p3 = 9/65 · 117/112 = 81/560
    p = update_probabilities(p, 2, 0, step, p_min, p_max)
    assert_close(p, [729 / 1120, 117 / 1120, 0.1, 81 / 560])
    assert sum(p) == pytest.approx(1.0, abs=1e-15)


def test_probability_update_from_certainty() -> None:
    # p_old = 1 (possible only with p_max = 1): (1 − p_new)/(1 − p_old) is 0/0; the others share 1 − p_new
    p = update_probabilities([1.0, 0.0, 0.0, 0.0], 0, -1, 0.1, 0.0, 1.0)
    assert_close(p, [0.9, 0.1 / 3, 0.1 / 3, 0.1 / 3])
    assert update_probabilities([1.0, 0.0, 0.0, 0.0], 0, 1, 0.1, 0.0, 1.0) == [1.0, 0.0, 0.0, 0.0]


def test_sample_action_inverse_cdf() -> None:
    # cumulative 0.1, 0.3, 0.6, 1.0 (in floats 0.1 + 0.2 is just above 0.3, so stay off the boundaries)
    p = [0.1, 0.2, 0.3, 0.4]
    us = (0.0, 0.05, 0.1, 0.29, 0.31, 0.59, 0.61, 0.999)
    assert [sample_action(p, u) for u in us] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert sample_action([0.0, 0.0, 1.0, 0.0], 0.0) == 2
    # cumulative sum short of 1 by rounding and u beyond it: the last action with p > 0, never a p = 0 one
    assert sample_action([0.5, 0.5 - 1e-12, 0.0, 0.0], 0.9999999999999) == 1


class ScriptedRLO(ReinforcementLearningOptimization):
    """RLO whose draws follow a script, to test the reward/update timing by hand."""

    def __init__(self, script: list[int], **kwargs: object) -> None:
        super().__init__(3, interval=2, rl_step=0.05, **kwargs)  # type: ignore[arg-type]
        self._script: Iterator[int] = iter(script)

    def _draw_action(self) -> int:
        return next(self._script)


def test_rlo_reward_judges_the_action_drawn_one_window_earlier() -> None:
    rlo = ScriptedRLO([1, 3, 0, 2])
    # window 1: 𝓛 = (2, 4, 6), Σ = 12; no reward, no action in force: P stays 0.25; a1 is drawn:
    #   smallest 𝓛 level 0 (λ 1.5): 1 + 1.5 · 2/12 = 1.25, level 1: 1 + 4/12 = 4/3
    returned = feed(rlo, [[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])
    assert rlo.probabilities.tolist() == [0.25] * 4
    assert rlo.action == 1
    assert_close(returned[-1], [1.25, 4 / 3, 1.0])
    # window 2: Σ = 6 < 12, R = +1 for a1 (in force during window 2): p1 = 0.30,
    #   others · 0.70/0.75: 0.25 · 14/15 = 7/30; a3 is drawn: all weights 1
    returned = feed(rlo, [[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]])
    assert_close(rlo.probabilities.tolist(), [7 / 30, 0.3, 7 / 30, 7 / 30])
    assert rlo.action == 3
    assert returned[-1] == [1.0, 1.0, 1.0]
    # window 3: Σ = 12 > 6, R = −1 for a3: p3 = 7/30 − 0.05 = 11/60, others · (49/60)/(23/30) = 49/46:
    #   p0 = p2 = 7/30 · 49/46 = 343/1380, p1 = 0.3 · 49/46 = 147/460; a0 is drawn:
    #   Var = 0 and Var^prev = 0 for all levels: r = 0/1e-5 = 0, a three-way tie → levels 0 (λ 1.5), 1;
    #   𝓛 = (4, 4, 4): 1 + 1.5 · 4/12 = 1.5, 1 + 4/12 = 4/3
    returned = feed(rlo, [[2.0, 2.0, 2.0], [2.0, 2.0, 2.0]])
    assert_close(rlo.probabilities.tolist(), [343 / 1380, 147 / 460, 343 / 1380, 11 / 60])
    assert rlo.action == 0
    assert_close(returned[-1], [1.5, 4 / 3, 1.0])
    # window 4: Σ = 12 = 12, R = 0 punishes a0: p0 = 343/1380 − 0.05 = 137/690,
    #   others · (553/690)/(1037/1380) = 1106/1037: p1 = 147/460 · 1106/1037 = 81291/238510,
    #   p2 = 343/1380 · 1106/1037 = 189679/715530, p3 = 11/60 · 1106/1037 = 6083/31110;
    #   a2 is drawn: 𝓛 = (6, 4, 2), largest level 0 (λ 1.5): 1 + 1.5 · 6/12 = 1.75, level 1: 4/3
    returned = feed(rlo, [[3.0, 2.0, 1.0], [3.0, 2.0, 1.0]])
    assert_close(rlo.probabilities.tolist(), [137 / 690, 81291 / 238510, 189679 / 715530, 6083 / 31110])
    assert rlo.action == 2
    assert_close(returned[-1], [1.75, 4 / 3, 1.0])


@pytest.mark.parametrize(("rl_step", "p_min", "p_max"), [(0.05, 0.1, 0.9), (0.1, 0.2, 0.4)])
def test_rlo_probabilities_stay_a_distribution_over_a_long_run(
    rl_step: float, p_min: float, p_max: float
) -> None:
    rlo = ReinforcementLearningOptimization(4, interval=2, rl_step=rl_step, p_min=p_min, p_max=p_max, seed=7)
    losses = torch.rand(3000, 2, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    seen = set()
    for window in losses:
        in_force = rlo.action
        rlo.step(window[0])
        rlo.step(window[1])
        p = rlo.probabilities.tolist()
        assert abs(sum(p) - 1.0) < 1e-9
        assert all(0.0 <= q <= 1.0 for q in p)
        if in_force is not None:
            assert p_min <= p[in_force] <= p_max
        seen.add(rlo.action)
    assert seen == {0, 1, 2, 3}


# ---------------------------------------------------------------- checkpoints


def _make(kind: str, seed: int = 0) -> LevelWeighting:
    if kind == "rlo":
        return ReinforcementLearningOptimization(4, interval=4, rl_step=0.1, seed=seed)
    if kind == "avw":
        return AdaptiveVarianceWeighting(4, interval=4)
    return EqualWeighting(4)


def _snapshot(weighting: LevelWeighting) -> tuple[list[float], list[float] | None, int | None]:
    if isinstance(weighting, ReinforcementLearningOptimization):
        return weighting.weights.tolist(), weighting.probabilities.tolist(), weighting.action
    return weighting.weights.tolist(), None, None


@pytest.mark.parametrize("kind", ["rlo", "avw", "equal"])
def test_resume_from_checkpoint_continues_exactly(kind: str) -> None:
    losses = torch.rand(40, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    reference = _make(kind)
    expected = []
    for row in losses:
        reference.step(row)
        expected.append(_snapshot(reference))
    # k = 0 (nothing seen), mid-window (1, 6, 17), right at a boundary (4, 8, 36), last step (39)
    for k in (0, 1, 4, 6, 8, 17, 36, 39):
        first = _make(kind)
        for row in losses[:k]:
            first.step(row)
        buffer = io.BytesIO()
        torch.save(first.state_dict(), buffer)
        buffer.seek(0)
        # another seed: only the checkpointed generator state can make the draws match
        resumed = _make(kind, seed=12345)
        resumed.load_state_dict(torch.load(buffer, weights_only=True))
        for m in range(k, len(losses)):
            resumed.step(losses[m])
            assert _snapshot(resumed) == expected[m], f"resumed at {k}, differs at step {m}"


def test_checkpoint_of_another_interval_is_rejected() -> None:
    state = AdaptiveVarianceWeighting(3, interval=3).state_dict()
    with pytest.raises(ValueError, match="interval"):
        AdaptiveVarianceWeighting(3, interval=4).load_state_dict(state)


# ---------------------------------------------------------------- interface


@pytest.mark.parametrize("kind", ["rlo", "avw", "equal"])
def test_weights_are_one_before_the_first_window_closes(kind: str) -> None:
    weighting = _make(kind)
    assert weighting.weights.tolist() == [1.0] * 4
    for _ in range(3):  # interval 4
        assert weighting.step(torch.tensor([5.0, 0.1, 2.0, 7.0])).tolist() == [1.0] * 4


@pytest.mark.parametrize("kind", ["avw", "equal"])
def test_combine_is_the_weighted_sum_and_its_gradient_is_the_weights(kind: str) -> None:
    weighting: LevelWeighting = EqualWeighting(3)
    expected_weights = [1.0, 1.0, 1.0]
    if kind == "avw":
        weighting = AdaptiveVarianceWeighting(3, interval=3)
        feed(weighting, [[1.0, 2.0, 0.5], [2.0, 2.0, 1.0], [3.0, 2.0, 1.5]])  # → (1, 1.6, 1.2), see above
        expected_weights = [1.0, 1.6, 1.2]
    losses = torch.tensor([2.0, 3.0, 4.0], requires_grad=True)
    total = weighting.combine(losses)
    # (1, 1.6, 1.2) · (2, 3, 4) = 2 + 4.8 + 4.8 = 11.6; equal: 9
    assert total.item() == pytest.approx(11.6 if kind == "avw" else 9.0, rel=1e-6)
    assert total.dtype == torch.float32
    total.backward()
    assert losses.grad is not None
    assert_close(losses.grad.tolist(), expected_weights, tol=1e-6)
    assert not list(weighting.parameters())


def test_log_fields() -> None:
    rlo = ReinforcementLearningOptimization(3, interval=2)
    probabilities = {f"action_probability/{n}": 0.25 for n in ("a0_avw", "a1_smallest_loss", "a2_largest_loss",
                                                               "a3_equal")}
    assert rlo.log_fields() == {**probabilities, "action": -1}
    feed(rlo, [[1.0, 2.0, 3.0], [2.0, 2.0, 2.0]])
    fields = json.loads(json.dumps(rlo.log_fields()))
    assert fields["action"] in range(4)
    # r_i of the window (Eq. 4) with Var^prev = 1: Var = (0.5, 0, 0.5) → r = (0.5, 1, 0.5)/(1 + 1e-5)
    assert_close(fields["variance_rate"], [0.5 / (1 + 1e-5), 1 / (1 + 1e-5), 0.5 / (1 + 1e-5)], tol=1e-12)
    assert AdaptiveVarianceWeighting(2).log_fields() == {}
    assert EqualWeighting(2).log_fields() == {}


def test_weightings_table() -> None:
    assert dict(WEIGHTINGS) == {
        "equal": EqualWeighting,
        "avw": AdaptiveVarianceWeighting,
        "rlo": ReinforcementLearningOptimization,
        "uw": UncertaintyWeighting,
        "dwa": DynamicWeightAverage,
    }
    for name, cls in WEIGHTINGS.items():
        assert cls.section.model_fields["name"].default == name


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"num_levels": 1}, "num_levels"),
        ({"interval": 1}, "interval"),
        ({"interval": 2.5}, "interval"),
        ({"lambdas": (1.5,)}, "lambdas"),
        ({"lambdas": (1.5, 1.0, 0.5)}, "lambdas"),
        ({"eps": 0.0}, "eps"),
        ({"rl_step": -0.01}, "rl_step"),
        ({"p_min": -0.1}, "p_min"),
        ({"p_max": 1.5}, "p_max"),
        ({"p_min": 0.6, "p_max": 0.4}, "p_min"),
        ({"seed": -1}, "seed"),
    ],
)
def test_constructor_validation(kwargs: dict[str, object], name: str) -> None:
    arguments: dict[str, object] = {"num_levels": 3, **kwargs}
    with pytest.raises(ValueError, match=name):
        ReinforcementLearningOptimization(**arguments)  # type: ignore[arg-type]
    avw_only = {k: v for k, v in arguments.items() if k in {"num_levels", "interval", "lambdas", "eps"}}
    if name in avw_only:
        with pytest.raises(ValueError, match=name):
            AdaptiveVarianceWeighting(**avw_only)  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", ["rlo", "avw", "equal"])
def test_step_validation(kind: str) -> None:
    weighting = _make(kind)
    with pytest.raises(ValueError, match="4 per-level losses"):
        weighting.step(torch.ones(3))
    with pytest.raises(ValueError, match="4 per-level losses"):
        weighting.step(torch.ones(1, 4))
    with pytest.raises(ValueError, match="level 3"):
        weighting.step(torch.tensor([1.0, 1.0, 1.0, math.nan]))
    with pytest.raises(ValueError, match="4 per-level losses"):
        weighting.combine(torch.ones(5))
