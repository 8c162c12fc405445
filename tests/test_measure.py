"""The weighting measure (equations.md, "Bayesian losses with AVW / RLO"): with ``loss.bayesian`` the
detectors also return each level's plain loss at σ = 1 (``DetectorLosses.plain_level_losses``), and AVW,
RLO and DWA take their statistics on it (``measure: plain``, the default) while their weights multiply the
trained (Bayesian) loss; ``measure: trained`` keeps the old behaviour.

The plain losses are checked against a second model, built with ``loss.bayesian=false`` and loaded with
the same weights, on the same images, while the log-variances are forced far from their initial values."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from robustdet.cli import main
from robustdet.config import Config
from robustdet.models import DetectorLosses
from robustdet.weighting import (
    ACTIONS,
    ActionWeighting,
    AdaptiveVarianceWeighting,
    DynamicWeightAverage,
    ReinforcementLearningOptimization,
    WindowStats,
    amplify_smallest_loss,
)
from tests import test_models_faster_rcnn as frcnn
from tests import test_models_fcos as fcos
from tests import test_models_retinanet as retina
from tests.conftest import REPO, tiny_overrides

# s forced to drift: σ_cls = e^(−1.5) ≈ 0.22 scales the focal loss by e^3 ≈ 20, σ_reg = e^(1.25) ≈ 3.5
DRIFT = {"cls": -3.0, "reg": 2.5}
FRCNN_DRIFT = {"rpn_cls": -3.0, "rpn_reg": 2.5, "roi_cls": -3.0, "roi_reg": 2.5}
TIGHT = {"rtol": 1e-9, "atol": 1e-12}  # float64 models: the same sums up to rounding

Batch = tuple[list[Tensor], list[dict[str, Tensor]]]


def _force(model: nn.Module, values: dict[str, float]) -> None:
    lv = model.log_variances  # type: ignore[union-attr]
    assert lv is not None and set(lv.names) == set(values)
    with torch.no_grad():
        for task, s in values.items():
            lv.log_vars[task].fill_(s)


def _twin(bayes: nn.Module, plain: nn.Module) -> None:
    """``plain`` gets ``bayes``'s weights, all but the log-variances."""
    missing, unexpected = plain.load_state_dict(bayes.state_dict(), strict=False)
    assert missing == [] and unexpected and all(k.startswith("log_variances.") for k in unexpected)
    assert plain.log_variances is None  # type: ignore[union-attr]


def _pair(module, bayes_cfg: Config, plain_cfg: Config, drift: dict[str, float]) -> tuple[nn.Module, nn.Module]:  # type: ignore[no-untyped-def]
    bayes = module.build(bayes_cfg)
    _force(bayes, drift)
    plain = module.build(plain_cfg, seed=1)
    _twin(bayes, plain)
    return bayes, plain


def _forward(model: nn.Module, data: Batch, seed: int | None) -> DetectorLosses:
    if seed is not None:  # Faster R-CNN samples anchors and RoIs
        torch.manual_seed(seed)
    out = model(*data)
    assert isinstance(out, DetectorLosses)
    return out


def _check_plain(bayes_out: DetectorLosses, plain_out: DetectorLosses) -> None:
    assert plain_out.plain_level_losses is None  # a plain model has no separate plain measure
    assert bayes_out.plain_level_losses is not None
    assert bayes_out.plain_level_losses.dtype == torch.float64 and not bayes_out.plain_level_losses.requires_grad
    torch.testing.assert_close(bayes_out.plain_level_losses, plain_out.level_losses.detach(), **TIGHT)
    # the drifted s really change the trained losses: by far more than the tolerance
    assert not torch.allclose(bayes_out.level_losses.detach(), plain_out.level_losses.detach(), rtol=0.1)
    # measured(): plain by default, trained on request; a plain model gives its (only) losses either way
    assert torch.equal(bayes_out.measured("plain"), bayes_out.plain_level_losses)
    assert torch.equal(bayes_out.measured("trained"), bayes_out.level_losses.detach())
    assert not bayes_out.measured("trained").requires_grad
    assert torch.equal(plain_out.measured("plain"), plain_out.level_losses.detach())
    assert torch.equal(plain_out.measured("trained"), plain_out.level_losses.detach())


# --- the plain losses equal a plain model's, on every detector ------------------------------------------


@pytest.mark.parametrize("normalization", ["per_image", "per_batch"])
def test_retinanet_plain_level_losses_are_the_plain_models(normalization: str) -> None:
    loss = {"box_loss": "smooth_l1", "beta": 0.1, "normalization": normalization}
    bayes, plain = _pair(retina, retina.tiny_cfg(bayesian=True, **loss), retina.tiny_cfg(**loss), DRIFT)
    data = retina.batch()
    b, p = _forward(bayes, data, None), _forward(plain, data, None)
    _check_plain(b, p)
    # the plain model's own split: focal + smooth L1 per level
    torch.testing.assert_close(b.plain_level_losses, p.components["cls"] + p.components["reg"], **TIGHT)


def test_fcos_plain_level_losses_are_focal_smooth_l1_and_centerness() -> None:
    loss = {"box_loss": "smooth_l1", "beta": 0.1}
    bayes, plain = _pair(
        fcos, fcos.tiny_cfg(fcos.SMALL_SIZES, bayesian=True, **loss), fcos.tiny_cfg(fcos.SMALL_SIZES, **loss), DRIFT
    )
    data = fcos.batch()
    b, p = _forward(bayes, data, None), _forward(plain, data, None)
    _check_plain(b, p)
    assert set(p.components) == {"cls", "reg", "ctr"}
    torch.testing.assert_close(
        b.plain_level_losses, p.components["cls"] + p.components["reg"] + p.components["ctr"], **TIGHT
    )
    # centerness is plain in both: the Bayesian model's ctr part is the plain one
    torch.testing.assert_close(b.components["ctr"], p.components["ctr"], **TIGHT)


def test_faster_rcnn_plain_level_losses_are_ce_and_smooth_l1() -> None:
    bayes, plain = _pair(frcnn, frcnn.tiny_cfg(bayesian=True), frcnn.tiny_cfg(), FRCNN_DRIFT)
    data = frcnn.batch()
    b, p = _forward(bayes, data, frcnn.SEED), _forward(plain, data, frcnn.SEED)
    _check_plain(b, p)
    torch.testing.assert_close(b.plain_level_losses, p.components["roi_cls"] + p.components["roi_reg"], **TIGHT)
    # the RPN stays outside the weighting (extra_loss) and outside the measure
    assert b.extra_loss.requires_grad and len(b.level_losses) == 4


# --- the weightings see the plain losses ------------------------------------------------------------------

ITERATIONS = 8  # 4 windows of 2


@pytest.fixture(scope="module")
def retinanet_streams() -> dict[str, list[Tensor]]:
    """Eight iterations of a RetinaNet whose s drift, s_cls from −3 up to 1.9 and s_reg from 2.5 down to
    −1.7 (σ_cls from 0.22 to 2.6), on noisy copies of one batch: the Bayesian model's plain and trained
    per-level losses, and the plain model's losses, as the trainer hands them to ``step`` (float32)."""
    loss = {"box_loss": "smooth_l1", "beta": 0.1, "normalization": "per_batch"}
    bayes, plain = _pair(retina, retina.tiny_cfg(bayesian=True, **loss), retina.tiny_cfg(**loss), DRIFT)
    images, targets = retina.batch()
    streams: dict[str, list[Tensor]] = {"plain": [], "trained": [], "reference": []}
    for k in range(ITERATIONS):
        _force(bayes, {"cls": DRIFT["cls"] + 0.7 * k, "reg": DRIFT["reg"] - 0.6 * k})
        g = torch.Generator().manual_seed(k)
        noisy = [(img + 0.3 * torch.rand(img.shape, generator=g, dtype=img.dtype)).clamp(0, 1) for img in images]
        b, p = _forward(bayes, (noisy, targets), None), _forward(plain, (noisy, targets), None)
        _check_plain(b, p)
        streams["plain"].append(b.measured("plain").float())
        streams["trained"].append(b.measured("trained").float())
        streams["reference"].append(p.level_losses.detach().float())
    return streams


WEIGHTINGS: dict[str, Callable[[], ActionWeighting | DynamicWeightAverage]] = {
    "avw": lambda: AdaptiveVarianceWeighting(5, interval=2),
    "rlo": lambda: ReinforcementLearningOptimization(5, interval=2, rl_step=0.2, seed=11),
    "dwa": lambda: DynamicWeightAverage(5, interval=2),
}


def _flat(fields: dict) -> dict[str, float]:
    """Log fields with their vectors spread out, for pytest.approx (which does not nest)."""
    flat: dict[str, float] = {}
    for key, value in fields.items():
        for i, v in enumerate(value if isinstance(value, list) else [value]):
            flat[f"{key}/{i}"] = float(v)
    return flat


def _trace(weighting: ActionWeighting | DynamicWeightAverage, stream: list[Tensor]) -> Iterator[tuple]:
    for row in stream:
        yield weighting.step(row).tolist(), weighting.log_fields()


@pytest.mark.parametrize("name", list(WEIGHTINGS))
def test_plain_measure_gives_the_weights_of_the_plain_model(name: str, retinanet_streams) -> None:  # type: ignore[no-untyped-def]
    """Fed ``measured("plain")`` of the drifting Bayesian model, a weighting takes exactly the weights,
    actions (RLO) and statistics of one fed the plain model's losses; fed the trained losses it does not."""
    plain = list(_trace(WEIGHTINGS[name](), retinanet_streams["plain"]))
    reference = list(_trace(WEIGHTINGS[name](), retinanet_streams["reference"]))
    trained = list(_trace(WEIGHTINGS[name](), retinanet_streams["trained"]))
    assert len(plain) == ITERATIONS
    for k, ((w, fields), (w_ref, fields_ref)) in enumerate(zip(plain, reference, strict=True)):
        torch.testing.assert_close(w, w_ref, rtol=1e-6, atol=1e-9, msg=f"iteration {k + 1}")
        assert fields.keys() == fields_ref.keys(), k
        if name == "rlo":  # the same actions drawn, the same probabilities
            assert fields["action"] == fields_ref["action"], k
            assert _flat(fields) == pytest.approx(_flat(fields_ref), rel=1e-6, abs=1e-9), k
    assert plain[-1][0] != [1.0] * 5  # the windows moved the weights
    # the drifting s would have steered the trained measure elsewhere
    assert any(
        not torch.allclose(torch.tensor(w), torch.tensor(w_t), rtol=1e-3)
        for (w, _), (w_t, _) in zip(plain, trained, strict=True)
    )


class AlwaysSmallestLoss(ActionWeighting):
    """An action weighting whose every window takes action a1 (amplify the two smallest 𝓛)."""

    def _choose_action(self, stats: WindowStats) -> int:
        return 1


def _last_window_sums(stream: list[Tensor]) -> list[float]:
    return torch.stack(stream[-2:]).double().sum(dim=0).tolist()


def test_a1_picks_the_two_smallest_plain_losses(retinanet_streams) -> None:  # type: ignore[no-untyped-def]
    """In the last window (s_cls ≈ 1.2-1.9: the log σ term, one per anchor, makes the levels with many
    anchors large) the trained losses order the levels differently from the plain ones; a1 on the plain
    measure amplifies the two levels with the smallest plain window losses, λ 1.5 to the smallest."""
    assert ACTIONS[1] is amplify_smallest_loss
    plain_sums = _last_window_sums(retinanet_streams["plain"])
    trained_sums = _last_window_sums(retinanet_streams["trained"])
    smallest = sorted(range(5), key=plain_sums.__getitem__)[:2]
    smallest_trained = sorted(range(5), key=trained_sums.__getitem__)[:2]
    assert smallest != smallest_trained, (plain_sums, trained_sums)  # the premise: the orders differ

    def a1_weights(stream: list[Tensor]) -> list[float]:
        a1 = AlwaysSmallestLoss(5, interval=2)
        for row in stream:
            weights = a1.step(row).tolist()
        assert a1.windows_closed == ITERATIONS // 2
        return weights

    weights = a1_weights(retinanet_streams["plain"])
    total = sum(plain_sums)  # plain losses are ≥ 0: Eq. 5's share needs no guard
    assert all(v >= 0 for v in plain_sums)
    expected = [1.0] * 5
    expected[smallest[0]] = 1.0 + 1.5 * plain_sums[smallest[0]] / total
    expected[smallest[1]] = 1.0 + 1.0 * plain_sums[smallest[1]] / total
    assert weights == pytest.approx(expected, rel=1e-12)
    assert weights[smallest[0]] > 1.0 and weights[smallest[1]] > 1.0  # a1 does not collapse into a3
    # the same as a1 on the plain model's losses
    assert weights == pytest.approx(a1_weights(retinanet_streams["reference"]), rel=1e-6)
    # on the trained measure a1 would have amplified other levels
    trained_weights = a1_weights(retinanet_streams["trained"])
    assert trained_weights == pytest.approx(ACTIONS[1]([0.0] * 5, trained_sums, (1.5, 1.0)), rel=1e-12)
    assert trained_weights != pytest.approx(weights, rel=1e-3)


# --- the trainer feeds the measure the config names ------------------------------------------------------


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("measure", ["plain", "trained"])
def test_trainer_feeds_the_configured_measure(measure: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    """A Bayesian AVW run (interval 2, 5 iterations): replaying the logged ``level_plain_losses`` (plain)
    or ``level_losses`` (trained) through a fresh AVW gives the logged weights of every iteration; the
    other one does not."""
    data = tmp_path_factory.getbasetemp() / "measure_data"  # one synthetic cache for both runs
    run = tmp_path_factory.mktemp(f"measure_{measure}")
    extra = {
        "loss.bayesian": "true",
        "loss.bayesian_form": "paper",
        "weighting.name": "avw",
        "weighting.interval": 2,
        "weighting.measure": measure,
        "train.max_iter": 5,
        "checkpoint.period": 0,
        "log.tensorboard": "false",
        # a large learning rate for the log-variances so that s drifts within the 5 iterations
        "train.optimizer.log_var_lr": 0.5,
    }
    argv = ["train", str(REPO / "configs" / "default.yaml"), *tiny_overrides(data, extra), "--out", str(run)]
    assert main(argv) == 0
    records = _records(run)
    assert [r["iter"] for r in records] == [1, 2, 3, 4, 5]

    def replay(key: str) -> list[list[float]]:
        avw = AdaptiveVarianceWeighting(5, interval=2)
        used = [avw.weights.tolist()]  # the weights iteration k uses are those after k − 1 steps
        for r in records[:-1]:
            used.append(avw.step(torch.tensor(r[key], dtype=torch.float32)).tolist())
        return used

    logged = [r["level_weights"] for r in records]
    fed, other = ("level_plain_losses", "level_losses")[:: 1 if measure == "plain" else -1]
    assert all(r["level_plain_losses"] != r["level_losses"] for r in records)
    assert logged == replay(fed)
    assert logged[2] != [1.0] * 5 and logged[4] != logged[2]  # windows 1 and 2 set the weights
    assert logged != replay(other)
