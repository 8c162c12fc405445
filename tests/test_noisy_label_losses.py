"""The noise-robust classification losses (losses/noisy_labels.py) against float64 formulas written out here,
switched off equal to today's focal loss bit for bit, wired into RetinaNet and FCOS, and their config checks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torchvision

import robustdet.models.dense as dense_module
from robustdet.config import load_config
from robustdet.errors import ConfigError
from robustdet.losses import TaskLoss, set_finite_checks, sigmoid_focal_loss, task_loss
from robustdet.losses.noisy_labels import bootstrap_targets, gce_focal_loss, recalibrate_background, smooth_labels
from tests import test_models_fcos as fcos_tests
from tests import test_models_retinanet as retina_tests

F64 = torch.float64


@pytest.fixture
def rows() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits [50, 4] spread over ±6, one-hot rows for 20 foreground anchors, zero rows for the rest."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(50, 4, generator=g, dtype=F64) * 3
    fg = torch.zeros(50, dtype=torch.bool)
    fg[::5] = True
    fg[1::5] = True
    labels = torch.randint(0, 4, (50,), generator=g)
    t = torch.zeros_like(x).scatter_(1, labels[:, None], fg[:, None].to(F64))
    return x, t, fg


def np_sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def np_focal(x: np.ndarray, t: np.ndarray, alpha: float, gamma: float) -> np.ndarray:
    """RetinaNet's focal loss for soft targets, written out: α_t·(1 − p_t)^γ·CE."""
    p = np_sigmoid(x)
    ce = -(t * np.log(p) + (1 - t) * np.log(1 - p))
    one_minus_pt = (1 - t) * p + t * (1 - p)
    alpha_t = alpha * t + (1 - alpha) * (1 - t) if alpha >= 0 else 1.0
    return alpha_t * one_minus_pt**gamma * ce


# ------------------------------------------------------------------------------ the four functions


def test_bootstrap_target_is_reed_soft_form(rows):
    x, t, _ = rows
    beta = 0.8
    got = bootstrap_targets(x, t, beta)
    expected = beta * t.numpy() + (1 - beta) * np_sigmoid(x.numpy())
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-14, atol=0)
    # p is detached: the loss's gradient is that of the focal loss on a constant target
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ga = torch.autograd.grad(sigmoid_focal_loss(xa, bootstrap_targets(xa, t, beta)).sum(), xa)[0]
    gb = torch.autograd.grad(sigmoid_focal_loss(xb, torch.from_numpy(expected)).sum(), xb)[0]
    torch.testing.assert_close(ga, gb, rtol=1e-12, atol=1e-14)
    assert bootstrap_targets(x, t, 1.0) is t  # β = 1: the label itself
    with pytest.raises(ValueError, match="beta must be in"):
        bootstrap_targets(x, t, 1.5)


def test_label_smoothing_touches_foreground_rows_only(rows):
    _, t, fg = rows
    got = smooth_labels(t, fg, 0.2)
    # hand-worked, C = 4: the labelled class 0.8 + 0.05, the others 0.05; background rows stay 0
    k = int(t[0].argmax())
    assert got[0, k].item() == pytest.approx(0.85, abs=1e-15)
    assert sorted(got[0].tolist()) == pytest.approx([0.05, 0.05, 0.05, 0.85], abs=1e-15)
    assert torch.equal(got[~fg], t[~fg])
    torch.testing.assert_close(got[fg].sum(dim=1), torch.ones(int(fg.sum()), dtype=F64), rtol=0, atol=1e-15)
    assert smooth_labels(t, fg, 0.0) is t
    with pytest.raises(ValueError, match="foreground must be a bool"):
        smooth_labels(t, fg.long(), 0.1)


@pytest.mark.parametrize(("alpha", "gamma", "q"), [(0.25, 2.0, 0.7), (-1.0, 0.0, 0.3), (0.5, 1.5, 1.0)])
def test_gce_focal_matches_formula(rows, alpha, gamma, q):
    x, t, _ = rows
    xn, tn = x.numpy(), t.numpy()
    p = np_sigmoid(xn)
    pt = p * tn + (1 - p) * (1 - tn)
    alpha_t = alpha * tn + (1 - alpha) * (1 - tn) if alpha >= 0 else 1.0
    expected = alpha_t * (1 - pt) ** gamma * (1 - pt**q) / q
    got = gce_focal_loss(x, t, q, alpha, gamma)
    # 1e-9: the written-out 1 − p_t cancels where p_t ≈ 1 (the module computes it as −expm1(−CE))
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-9, atol=1e-300)
    xg = x.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda v: gce_focal_loss(v, t, q, alpha, gamma), (xg,))


def test_gce_focal_tends_to_the_focal_loss_and_rejects_soft_targets(rows):
    x, t, _ = rows
    near_zero = gce_focal_loss(x, t, 1e-7)
    tv = torchvision.ops.sigmoid_focal_loss(x, t, alpha=0.25, gamma=2.0)
    torch.testing.assert_close(near_zero, tv, rtol=1e-6, atol=1e-12)
    # the hard-target check is a value check: on only while finite checks are (another test in this
    # worker may have left them off, as an in-process training run does)
    previous = set_finite_checks(True)
    try:
        with pytest.raises(ValueError, match="hard"):
            gce_focal_loss(x, t * 0.9, 0.5)
    finally:
        set_finite_checks(previous)
    with pytest.raises(ValueError, match="q must be in"):
        gce_focal_loss(x, t, 0.0)


@pytest.mark.parametrize(("threshold", "alpha", "gamma"), [(0.5, 0.25, 2.0), (0.3, 0.25, 2.0), (0.8, -1.0, 1.0)])
def test_brl_replaces_confident_background_elements_by_the_mirrored_term(rows, threshold, alpha, gamma):
    x, t, fg = rows
    xn, tn = x.numpy(), t.numpy()
    p = np_sigmoid(xn)
    focal = np_focal(xn, tn, alpha, gamma)
    balance = (1 - alpha) if alpha >= 0 else 1.0
    mirrored = -balance * (1 - p) ** gamma * np.log(p)  # −α_t·p_t^γ·log(1 − p_t) with p_t = 1 − p
    mask = ~fg.numpy()[:, None] & (p > threshold)
    assert 10 < mask.sum() < mask.size - 10  # both branches are exercised
    expected = np.where(mask, mirrored, focal)
    xg = x.clone().requires_grad_(True)
    got = recalibrate_background(sigmoid_focal_loss(xg, t, alpha, gamma), xg, ~fg, threshold, alpha, gamma)
    np.testing.assert_allclose(got.detach().numpy(), expected, rtol=1e-11, atol=1e-300)
    grad = torch.autograd.grad(got.sum(), xg)[0].numpy()
    # d/dx of −b·(1 − p)^γ·log p = b·(1 − p)^γ·(γ·p·log p − (1 − p)): it pushes the score up
    mirrored_grad = balance * (1 - p) ** gamma * (gamma * p * np.log(p) - (1 - p))
    np.testing.assert_allclose(grad[mask], mirrored_grad[mask], rtol=1e-10, atol=1e-300)
    assert (grad[mask] < 0).all()
    # foreground rows keep the focal loss even where a score exceeds the threshold
    np.testing.assert_allclose(got.detach().numpy()[fg.numpy()], focal[fg.numpy()], rtol=1e-11)


def test_brl_hand_worked_and_continuous_at_one_half():
    x = torch.tensor([[2.0, -1.0]], dtype=F64)
    got = recalibrate_background(sigmoid_focal_loss(x, torch.zeros_like(x)), x, torch.tensor([True]), 0.5)
    p = 1 / (1 + math.exp(-2.0))
    assert got[0, 0].item() == pytest.approx(-0.75 * (1 - p) ** 2 * math.log(p), rel=1e-13)  # 0.001349...
    q = 1 / (1 + math.exp(1.0))
    assert got[0, 1].item() == pytest.approx(-0.75 * q**2 * math.log(1 - q), rel=1e-13)  # below τ: focal
    # at τ = 0.5 the two branches meet: both (1 − α)·0.5^γ·log 2
    half = torch.zeros(1, 1, dtype=F64)
    below = sigmoid_focal_loss(half - 1e-9, torch.zeros_like(half))
    above = recalibrate_background(sigmoid_focal_loss(half + 1e-9, torch.zeros_like(half)), half + 1e-9,
                                   torch.tensor([True]), 0.5)
    assert above.item() == pytest.approx(below.item(), rel=1e-8)
    assert above.item() == pytest.approx(0.75 * 0.25 * math.log(2), rel=1e-8)


def test_switched_off_is_todays_focal_loss_bit_for_bit(rows):
    x, t, fg = rows
    for dtype in (torch.float32, F64):
        xd, td = x.to(dtype), t.to(dtype)
        today = sigmoid_focal_loss(xd, td)
        assert torch.equal(sigmoid_focal_loss(xd, bootstrap_targets(xd, td, 1.0)), today)
        assert torch.equal(sigmoid_focal_loss(xd, smooth_labels(td, fg, 0.0)), today)
        assert torch.equal(recalibrate_background(today, xd, ~fg, 1.0), today)
    # and today's focal loss is torchvision's (to rounding; test_losses.py has the full check)
    torch.testing.assert_close(sigmoid_focal_loss(x, t), torchvision.ops.sigmoid_focal_loss(x, t), rtol=1e-12, atol=0)


# ------------------------------------------------------------------------------ in the detectors


def reference_cls(x, t, fg, log_var, loss):
    """The elementwise classification loss of each switch, in float64 formulas independent of the module."""
    assert log_var is None
    p = torch.sigmoid(x)
    a, g = loss.focal_alpha, loss.focal_gamma
    if loss.cls_method == "bootstrap":
        t = loss.bootstrap_beta * t + (1 - loss.bootstrap_beta) * p.detach()
    elif loss.cls_method == "label_smoothing":
        eps = loss.label_smoothing
        t = torch.where(fg[:, None], (1 - eps) * t + eps / t.shape[1], t)
    alpha_t = a * t + (1 - a) * (1 - t)
    pt = p * t + (1 - p) * (1 - t)
    if loss.cls_method == "gce":
        value = alpha_t * (1 - pt) ** g * (1 - pt**loss.gce_q) / loss.gce_q
    else:
        value = alpha_t * (1 - pt) ** g * -(t * torch.log(p) + (1 - t) * torch.log(1 - p))
    if loss.brl:
        mask = ~fg[:, None] & (p > loss.brl_threshold)
        value = torch.where(mask, -(1 - a) * (1 - p) ** g * torch.log(p), value)
    return TaskLoss(value, None)


def _levels_and_grad(tests, model, cfg, monkeypatch=None, patch=None):
    images, targets = tests.batch()
    args = (model, cfg, images, targets) if tests is retina_tests else (model, images, targets)
    _, t, outputs, anchors, counts = tests.head_pass(*args)
    outputs = {k: v.detach().requires_grad_(True) for k, v in outputs.items()}
    if patch is not None:
        monkeypatch.setattr(dense_module, "noisy_label_focal", patch)
    out = model.compute_level_losses(t, outputs, anchors, counts)
    grad = torch.autograd.grad(out.level_losses.sum(), outputs["cls_logits"])[0]
    return out.level_losses.detach(), grad


def todays_cls(x, t, fg, log_var, loss):
    return task_loss("focal", x, t, log_var, loss)


@pytest.mark.parametrize("tests", [retina_tests, fcos_tests], ids=["retinanet", "fcos"])
def test_detectors_with_switches_off_are_bitwise_today(tests, monkeypatch):
    for loss in ({}, {"bayesian": True, "box_loss": "smooth_l1"}):
        cfg = tests.tiny_cfg(**loss)
        model = tests.build(cfg)
        levels, grad = _levels_and_grad(tests, model, cfg)
        with monkeypatch.context() as m:
            levels_today, grad_today = _levels_and_grad(tests, model, cfg, m, todays_cls)
        assert torch.equal(levels, levels_today) and torch.equal(grad, grad_today)


@pytest.mark.parametrize("tests", [retina_tests, fcos_tests], ids=["retinanet", "fcos"])
@pytest.mark.parametrize(
    "switches",
    [
        {"cls_method": "bootstrap", "bootstrap_beta": 0.7},
        {"cls_method": "label_smoothing", "label_smoothing": 0.2},
        {"cls_method": "gce", "gce_q": 0.5},
        {"brl": True, "brl_threshold": 0.02},  # the tiny model scores near its prior: a low τ exercises BRL
        {"cls_method": "bootstrap", "brl": True, "brl_threshold": 0.02},
    ],
)
def test_detectors_train_on_each_switch(tests, switches, monkeypatch):
    cfg = tests.tiny_cfg(**switches)
    model = tests.build(cfg)
    levels, grad = _levels_and_grad(tests, model, cfg)
    with monkeypatch.context() as m:
        ref_levels, ref_grad = _levels_and_grad(tests, model, cfg, m, reference_cls)
    torch.testing.assert_close(levels, ref_levels, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-12)
    plain_cfg = tests.tiny_cfg()
    assert not torch.equal(levels, _levels_and_grad(tests, tests.build(plain_cfg), plain_cfg)[0])


# ------------------------------------------------------------------------------ config


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (["model.name=faster_rcnn", "loss.brl=true"],
         r"loss\.brl=true with model\.name=faster_rcnn: .*dense detectors \(retinanet, fcos\)"),
        (["model.name=faster_rcnn", "loss.cls_method=bootstrap"],
         r"loss\.cls_method=bootstrap with model\.name=faster_rcnn"),
        (["loss.bayesian=true", "loss.brl=true"], r"loss\.brl=true with loss\.bayesian=true"),
        (["loss.bayesian=true", "loss.cls_method=gce"], r"loss\.cls_method=gce with loss\.bayesian=true"),
        (["loss.brl_threshold=1.5"], r"loss\.brl_threshold"),
        (["loss.bootstrap_beta=-0.1"], r"loss\.bootstrap_beta"),
        (["loss.label_smoothing=1"], r"loss\.label_smoothing"),
        (["loss.gce_q=0"], r"loss\.gce_q"),
        (["loss.cls_method=coteaching"], r"loss\.cls_method"),
    ],
)
def test_bad_switches_are_one_line_naming_the_keys(overrides, fragment):
    with pytest.raises(ConfigError, match=fragment) as info:
        load_config(None, overrides)
    assert "\n" not in str(info.value)


def test_switches_compose_where_they_can():
    cfg = load_config(None, ["loss.bayesian=true", "loss.cls_method=bootstrap", "model.name=fcos"])
    assert cfg.loss.noisy_label_switches() == ["loss.cls_method=bootstrap"]
    assert load_config(None, []).loss.noisy_label_switches() == []
