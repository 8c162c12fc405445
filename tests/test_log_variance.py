"""LogVariances: the learnable s = log σ² per task (Khanzhina et al. section 3; initial values 4.2)."""

from __future__ import annotations

import math

import pytest
import torch

from robustdet.losses import LogVariances, bayesian_focal_loss, bayesian_smooth_l1_loss


def test_paper_defaults_and_parameters():
    lv = LogVariances({"reg": 1.0, "cls": 0.0})
    assert lv.names == ("reg", "cls")
    assert lv.as_dict() == {"reg": 1.0, "cls": 0.0}
    params = dict(lv.named_parameters())
    assert set(params) == {"log_vars.reg", "log_vars.cls"}
    for p in params.values():
        assert isinstance(p, torch.nn.Parameter) and p.dim() == 0 and p.requires_grad
    assert lv["reg"] is params["log_vars.reg"]  # no range: the parameter itself
    assert lv.sigma("reg") == pytest.approx(math.exp(0.5))
    assert lv.sigma("cls") == pytest.approx(1.0)
    assert lv.out_of_range() == {}


def test_custom_tasks_and_unknown_name():
    lv = LogVariances({"rpn_cls": 0.0, "rpn_reg": 1.0, "roi_cls": 0.0, "roi_reg": 1.0})
    assert lv.names == ("rpn_cls", "rpn_reg", "roi_cls", "roi_reg")
    with pytest.raises(KeyError, match="no log-variance for task 'cls'"):
        lv["cls"]


def test_gradients_flow_from_both_losses():
    lv = LogVariances({"reg": 1.0, "cls": 0.0})
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(20, 3, generator=g)
    targets = (torch.rand(20, 3, generator=g) < 0.2).float()
    deltas = torch.randn(8, 4, generator=g) * 0.2
    loss = bayesian_smooth_l1_loss(deltas, torch.zeros_like(deltas), lv["reg"], reduction="sum") + (
        bayesian_focal_loss(logits, targets, lv["cls"], reduction="sum")
    )
    loss.backward()
    for name in lv.names:
        grad = lv.log_vars[name].grad
        assert grad is not None and torch.isfinite(grad) and float(grad) != 0.0
    # the parameter receives exactly the gradient the loss gives a plain tensor s
    s = torch.tensor(1.0, requires_grad=True)
    bayesian_smooth_l1_loss(deltas, torch.zeros_like(deltas), s, reduction="sum").backward()
    assert lv.log_vars["reg"].grad == pytest.approx(float(s.grad))


def test_range_clamps_and_stops_the_gradient_outside():
    lv = LogVariances({"reg": 1.0, "cls": 0.0}, log_var_range=(-2.0, 3.0))
    with torch.no_grad():
        lv.log_vars["reg"].fill_(5.0)  # above the range
        lv.log_vars["cls"].fill_(0.5)  # inside
    assert float(lv["reg"].detach()) == 3.0
    assert float(lv["cls"].detach()) == 0.5
    assert lv.as_dict() == {"reg": 5.0, "cls": 0.5}  # raw values for logging
    assert lv.out_of_range() == {"reg": 5.0}
    assert lv.sigma("reg") == pytest.approx(math.exp(1.5))  # the σ the losses see
    (lv["reg"] * 2.0 + lv["cls"] * 3.0).backward()
    assert float(lv.log_vars["reg"].grad) == 0.0  # clamp: no gradient outside the range
    assert float(lv.log_vars["cls"].grad) == 3.0
    with torch.no_grad():
        lv.log_vars["cls"].fill_(-2.5)
    assert lv.out_of_range() == {"reg": 5.0, "cls": -2.5}


def test_invalid_construction_raises():
    with pytest.raises(ValueError, match="low < high"):
        LogVariances({"reg": 1.0}, log_var_range=(1.0, 1.0))
    with pytest.raises(ValueError, match="low < high"):
        LogVariances({"reg": 1.0}, log_var_range=(-math.inf, 2.0))
    with pytest.raises(ValueError, match="strictly inside log_var_range"):
        LogVariances({"reg": 4.0}, log_var_range=(-1.0, 3.0))
    # on a bound: torch.clamp's gradient there is 0, so s would never move
    s = torch.tensor(1.0, requires_grad=True)
    torch.clamp(s, -6.0, 1.0).backward()
    assert float(s.grad) == 0.0
    with pytest.raises(ValueError, match="at a bound s gets no gradient"):
        LogVariances({"reg": 1.0}, log_var_range=(-6.0, 1.0))
    with pytest.raises(ValueError, match="must be finite"):
        LogVariances({"reg": math.nan})
    with pytest.raises(ValueError, match="Python identifier"):
        LogVariances({"roi.reg": 1.0})
    with pytest.raises(ValueError, match="at least one task"):
        LogVariances({})


def test_state_dict_round_trip_and_optimizer_step():
    lv = LogVariances({"reg": 1.0, "cls": 0.0})
    opt = torch.optim.SGD(lv.parameters(), lr=0.1)
    # Bayesian L2 region only: d/ds [ε²/(2σ²) + s/2] = 0.5 − ε²·e^(−s)/2 > 0 for ε = 0.01, so s decreases
    err = torch.full((4,), 0.01)
    bayesian_smooth_l1_loss(err, torch.zeros(4), lv["reg"], reduction="mean").backward()
    opt.step()
    assert lv.as_dict()["reg"] < 1.0
    fresh = LogVariances({"reg": 1.0, "cls": 0.0})
    fresh.load_state_dict(lv.state_dict())
    assert fresh.as_dict() == lv.as_dict()
