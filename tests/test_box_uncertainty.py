"""Per-box uncertainty, training side: the KL-Loss (He et al. 2019 Eq. 9/10), its warm-up and clamp, the
three detectors end to end through the CLI with exact resume, and old weights loading."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from robustdet.cli import main
from robustdet.config import config_from_dict
from robustdet.errors import ConfigError
from robustdet.losses import LossConfig, kl_box_loss, task_loss, uncertain_box_loss
from robustdet.models import build_model
from robustdet.models.heads import LOG_VAR_INIT_STD, RetinaNetBoxHead, clamp_log_var
from robustdet.models.weights import load_detector_weights
from tests.conftest import REPO, tiny_overrides

CONFIG = str(REPO / "configs" / "default.yaml")


def reference(d: torch.Tensor, alpha: torch.Tensor, c: float, w: float):
    """Value and both gradients written out in float64: ℓ the smooth L1 of threshold c (L1 for c = 0),
    L = (1 − w)ℓ + w(e^(−α)ℓ + α/2), dL/dδ = ((1 − w) + w e^(−α))·ℓ'(d), dL/dα = w(1/2 − e^(−α)ℓ)."""
    a = d.abs()
    if c > 0:
        ell = torch.where(a < c, 0.5 * d * d / c, a - 0.5 * c)
        dell = torch.where(a < c, d / c, torch.sign(d))
    else:
        ell, dell = a, torch.sign(d)
    e = torch.exp(-alpha)
    value = (1 - w) * ell + w * (e * ell + 0.5 * alpha)
    return value, ((1 - w) + w * e) * dell, w * (0.5 - e * ell)


@pytest.mark.parametrize(
    ("box_loss", "beta", "w"), [("smooth_l1", 0.1, 1.0), ("smooth_l1", 1.0, 0.3), ("l1", 0.1, 0.7)]
)
def test_loss_and_both_gradients_against_float64_reference(box_loss: str, beta: float, w: float) -> None:
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(6, 5, 4, generator=g, dtype=torch.float64).requires_grad_(True)
    target = torch.randn(6, 5, 4, generator=g, dtype=torch.float64)
    alpha = (3 * torch.randn(6, 5, 4, generator=g, dtype=torch.float64)).requires_grad_(True)
    loss = LossConfig(box_loss=box_loss, beta=beta, box_uncertainty_form="kl")
    out = uncertain_box_loss(pred, target, alpha, w, loss)
    assert out.value.shape == (6, 5) and out.plain is not None and not out.plain.requires_grad
    out.value.sum().backward()
    c = 0.0 if box_loss == "l1" else beta
    value, d_pred, d_alpha = reference(pred.detach() - target, alpha.detach(), c, w)
    torch.testing.assert_close(out.value, value.sum(-1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(pred.grad, d_pred, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(alpha.grad, d_alpha, rtol=1e-12, atol=1e-12)
    plain = task_loss("box", pred.detach(), target, None, loss).value
    assert torch.equal(out.plain, plain)


def test_at_alpha_zero_without_warmup_it_is_the_plain_box_loss_exactly() -> None:
    g = torch.Generator().manual_seed(1)
    target = torch.randn(50, 4, generator=g)
    base = torch.randn(50, 4, generator=g)
    loss = LossConfig(box_loss="smooth_l1", beta=0.1)
    p1, p2 = base.clone().requires_grad_(True), base.clone().requires_grad_(True)
    kl = uncertain_box_loss(p1, target, torch.zeros(50, 4), 1.0, loss).value
    plain = task_loss("box", p2, target, None, loss).value
    assert torch.equal(kl, plain)
    kl.sum().backward()
    plain.sum().backward()
    assert torch.equal(p1.grad, p2.grad)


@pytest.mark.parametrize(("box_loss", "beta"), [("smooth_l1", 0.1), ("l1", 0.1)])
def test_detached_form_trains_the_deltas_on_the_plain_loss_and_fits_alpha(box_loss: str, beta: float) -> None:
    g = torch.Generator().manual_seed(2)
    base = torch.randn(6, 5, 4, generator=g, dtype=torch.float64)
    target = torch.randn(6, 5, 4, generator=g, dtype=torch.float64)
    alpha = (3 * torch.randn(6, 5, 4, generator=g, dtype=torch.float64)).requires_grad_(True)
    loss = LossConfig(box_loss=box_loss, beta=beta, box_uncertainty_form="detached")
    pred, plain_pred = base.clone().requires_grad_(True), base.clone().requires_grad_(True)
    out = uncertain_box_loss(pred, target, alpha, 1.0, loss)
    plain = task_loss("box", plain_pred, target, None, LossConfig(box_loss=box_loss, beta=beta)).value
    assert torch.equal(out.value, plain) and out.plain is not None and torch.equal(out.plain, plain.detach())
    out.value.sum().backward()
    plain.sum().backward()
    assert torch.equal(pred.grad, plain_pred.grad)  # bitwise the plain box loss's gradient
    c = 0.0 if box_loss == "l1" else beta
    _, _, d_alpha = reference(base - target, alpha.detach(), c, 1.0)
    torch.testing.assert_close(alpha.grad, d_alpha, rtol=1e-12, atol=1e-12)


def test_detached_form_refuses_a_warmup_and_an_unknown_form() -> None:
    with pytest.raises(ConfigError) as err:
        tiny_cfg("retinanet", box_uncertainty_form="detached", box_uncertainty_warmup=10)
    assert "\n" not in str(err.value)
    assert "loss.box_uncertainty_warmup > 0 with loss.box_uncertainty_form=detached" in str(err.value)
    with pytest.raises(ValueError, match="box_uncertainty_form=isolated"):
        LossConfig(box_uncertainty_form="isolated", box_uncertainty_warmup=10)
    # the default form is isolated: a warm-up alone names the form it needs
    assert LossConfig().box_uncertainty_form == "isolated"
    with pytest.raises(ValueError, match=r"set the warm-up to 0 or loss\.box_uncertainty_form=kl"):
        LossConfig(box_uncertainty_warmup=10)
    with pytest.raises(ConfigError, match=r"box_uncertainty_form"):
        tiny_cfg("retinanet", box_uncertainty_form="kl_loss")


@pytest.mark.parametrize("name", ["retinanet", "fcos", "faster_rcnn"])
def test_detached_form_in_each_detector_logs_the_plain_loss_and_trains_alpha(name: str) -> None:
    images = [torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    targets = [{"boxes": torch.tensor([[4.0, 4.0, 30.0, 40.0], [20.0, 10.0, 60.0, 50.0]]),
                "labels": torch.tensor([1, 2])} for _ in images]
    outs = {}
    for form in ("kl", "detached"):
        torch.manual_seed(0)
        model = build_model(tiny_cfg(name, box_uncertainty_form=form), 3).train()
        with torch.no_grad():  # α ≈ 0 at init, where the KL-Loss is the plain loss: move it off 0
            for n, p in model.named_parameters():
                if "bbox_log_var" in n and n.endswith("bias"):
                    p.fill_(1.0)
        outs[form] = model(images, targets)
    out, kl = outs["detached"], outs["kl"]
    assert kl.plain_level_losses is not None
    torch.testing.assert_close(out.level_losses.detach(), kl.plain_level_losses)
    assert not torch.allclose(kl.level_losses.detach(), kl.plain_level_losses, rtol=0.05)
    out.total.backward()
    grads = [p.grad for n, p in model.named_parameters() if "bbox_log_var" in n]
    assert grads and all(g is not None and bool(g.abs().sum() > 0) for g in grads)


def non_alpha_grads(name: str, form: str | None, state: dict | None, alpha_bias: float = 0.0):
    """The gradients of every parameter but the α layer's after one training forward of ``name`` on fixed
    data, with ``form`` (None: model.box_uncertainty off), the weights ``state`` where given (the α layer's
    bias set to ``alpha_bias``), and the state it started from."""
    cfg = tiny_cfg(name, **({} if form is None else {"box_uncertainty_form": form}))
    if form is None:
        cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"box_uncertainty": False})})
    torch.manual_seed(0)
    model = build_model(cfg, 3).train()
    if state is not None:
        model.load_state_dict(state, strict=False)  # a plain model has no α layer: those keys are left out
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "bbox_log_var" in n and n.endswith("bias"):
                p.fill_(alpha_bias)
    images = [torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    targets = [{"boxes": torch.tensor([[4.0, 4.0, 30.0, 40.0], [20.0, 10.0, 60.0, 50.0]]),
                "labels": torch.tensor([1, 2])} for _ in images]
    torch.manual_seed(1)  # Faster R-CNN samples its proposals
    model(images, targets).total.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if "bbox_log_var" not in n and p.grad is not None}
    alpha = [p.grad for n, p in model.named_parameters() if "bbox_log_var" in n]
    return grads, alpha, model.state_dict()


@pytest.mark.parametrize("name", ["retinanet", "fcos", "faster_rcnn"])
def test_isolated_form_trains_the_detector_as_the_plain_one(name: str) -> None:
    _, _, state = non_alpha_grads(name, "isolated", None)
    plain, _, _ = non_alpha_grads(name, None, state)
    for bias in (1.0, -2.0):  # away from α = 0, where every form is the plain loss
        isolated, alpha, _ = non_alpha_grads(name, "isolated", state, bias)
        assert isolated.keys() == plain.keys()
        for n, g in plain.items():
            torch.testing.assert_close(isolated[n], g, rtol=1e-5, atol=1e-7, msg=n)
        assert alpha and all(g is not None and bool(g.abs().sum() > 0) for g in alpha)
    # the detached form's α reaches the box tower: its gradients differ there, so the check above can fail
    detached, _, _ = non_alpha_grads(name, "detached", state, 1.0)
    assert any(not torch.allclose(detached[n], g, rtol=1e-3, atol=1e-6) for n, g in plain.items())


def test_warmup_blend_starts_plain_and_ends_kl() -> None:
    ell = torch.tensor([0.0, 0.3, 2.0], dtype=torch.float64)
    alpha = torch.tensor([-1.0, 0.5, 2.0], dtype=torch.float64)
    assert torch.equal(kl_box_loss(ell, alpha, 0.0), ell)
    full = torch.exp(-alpha) * ell + alpha / 2
    torch.testing.assert_close(kl_box_loss(ell, alpha, 1.0), full)
    torch.testing.assert_close(kl_box_loss(ell, alpha, 0.25), 0.75 * ell + 0.25 * full)
    with pytest.raises(ValueError, match="weight must lie in"):
        kl_box_loss(ell, alpha, 1.5)


def tiny_cfg(name: str, **loss: object):
    model: dict[str, object] = {"name": name, "backbone": "resnet18", "fpn_channels": 16, "min_size": 64,
                                "max_size": 64, "box_uncertainty": True}
    if name != "fcos":
        model["anchor_sizes"] = [8, 16, 32, 64, 128]
    return config_from_dict({"model": model, "loss": {"box_loss": "smooth_l1", **loss}})


def test_detector_warmup_weight_follows_its_training_forwards() -> None:
    torch.manual_seed(0)
    model = build_model(tiny_cfg("retinanet", box_uncertainty_form="kl", box_uncertainty_warmup=4), 3).train()
    images = [torch.rand(3, 64, 64)]
    targets = [{"boxes": torch.tensor([[4.0, 4.0, 30.0, 40.0]]), "labels": torch.tensor([1])}]
    seen = []
    for _ in range(6):
        seen.append(float(model.box_uncertainty_weight()))
        model(images, targets)
    assert seen == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    assert int(model.state_dict()["box_uncertainty_iter"]) == 6
    model.eval()
    with torch.no_grad():
        model(images)  # evaluation does not count
    assert int(model.box_uncertainty_iter) == 6


def test_clamp_gradient_is_zero_outside_the_range_and_the_init_is_kl_loss() -> None:
    x = torch.linspace(-10, 10, 41, requires_grad=True)
    clamp_log_var(x, (-7.0, 7.0)).sum().backward()
    inside = (x.detach() > -7) & (x.detach() < 7)  # torch.clamp passes no gradient at the bounds either
    assert torch.equal(x.grad, inside.float())
    head = RetinaNetBoxHead(8, 9, log_var_range=(-7.0, 7.0))
    assert head.bbox_log_var is not None and float(head.bbox_log_var.bias.detach().abs().max()) == 0.0
    assert abs(float(head.bbox_log_var.weight.detach().std()) - LOG_VAR_INIT_STD) < 0.2 * LOG_VAR_INIT_STD
    with torch.no_grad():
        head.bbox_log_var.bias.fill_(9.0)  # every α beyond the range: clamped, and no gradient to the layer
    out = head.outputs([torch.rand(1, 8, 4, 4)])
    assert out["bbox_log_var"].shape == out["bbox_regression"].shape == (1, 144, 4)
    assert bool((out["bbox_log_var"] == 7.0).all())
    out["bbox_log_var"].sum().backward()
    assert float(head.bbox_log_var.bias.grad.abs().max()) == 0.0


def test_without_box_uncertainty_nothing_changes_in_the_state_dict() -> None:
    for name in ("retinanet", "fcos", "faster_rcnn"):
        cfg = tiny_cfg(name)
        plain = config_from_dict({**cfg.model_dump(), "model": {**cfg.model.model_dump(), "box_uncertainty": False}})
        torch.manual_seed(0)
        a = build_model(plain, 3).state_dict()
        torch.manual_seed(0)
        b = build_model(cfg, 3).state_dict()
        new = set(b) - set(a)
        assert set(a) <= set(b) and all("bbox_log_var" in k or k == "box_uncertainty_iter" for k in new), new
        assert len(new) == 3, new


@pytest.mark.parametrize("name", ["retinanet", "faster_rcnn", "fcos"])
def test_older_weights_load_with_one_report_line(name: str, tmp_path: Path) -> None:
    cfg = tiny_cfg(name)
    plain_cfg = config_from_dict({**cfg.model_dump(), "model": {**cfg.model.model_dump(), "box_uncertainty": False}})
    torch.manual_seed(0)
    old = build_model(plain_cfg, 3)
    path = tmp_path / "old.pt"
    torch.save({"model": old.state_dict()}, path)
    model = build_model(cfg, 3)
    fresh = {k: v.clone() for k, v in model.state_dict().items() if "bbox_log_var" in k}
    report = load_detector_weights(model, path, 3)
    assert sorted(report.initialised) == sorted(fresh) and len(fresh) == 2
    line = report.line()
    assert "\n" not in line and f"box uncertainty: initialised 2 ({', '.join(report.initialised)})" in line
    assert report.missing == [] and report.unexpected == []
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in fresh.items())  # kept their KL-Loss init
    assert all(torch.equal(state[k], v) for k, v in old.state_dict().items())
    # and the other way: a file with α layers into a model without them
    torch.save({"model": model.state_dict()}, path)
    back = load_detector_weights(build_model(plain_cfg, 3), path, 3)
    assert sorted(back.unexpected) == sorted(fresh)


def test_bad_combinations_are_one_line_naming_both_keys() -> None:
    with pytest.raises(ValueError, match=r"model\.box_uncertainty=true needs loss\.box_loss l1 or smooth_l1: "
                       r"loss\.box_loss=giou"):
        build_model(tiny_cfg("fcos", box_loss="giou"), 3)
    with pytest.raises(ValueError, match=r"model\.box_uncertainty=true with loss\.bayesian=true"):
        build_model(tiny_cfg("retinanet", bayesian=True), 3)
    with pytest.raises(ConfigError, match=r"loss\.box_log_var_range must be \(low, high\)"):
        tiny_cfg("retinanet", box_log_var_range=[3, -3])
    with pytest.raises(ConfigError, match=r"box_uncertainty_warmup"):
        tiny_cfg("retinanet", box_uncertainty_warmup=-1)


def _train(tmp_path: Path, out: Path, extra: dict[str, object], *flags: str) -> None:
    argv = ["train", CONFIG, *tiny_overrides(tmp_path, extra), "--out", str(out), *flags]
    assert main(argv) == 0


DETECTOR_KEYS: dict[str, dict[str, object]] = {
    "retinanet": {},
    "fcos": {"model.name": "fcos", "model.anchor_sizes": None},
    "faster_rcnn": {"model.name": "faster_rcnn", "model.box_batch_size_per_image": 32},
}


@pytest.mark.parametrize("name", list(DETECTOR_KEYS))
def test_cli_trains_with_box_uncertainty_and_resumes_exactly(name: str, tmp_path: Path) -> None:
    extra = {**DETECTOR_KEYS[name], "model.box_uncertainty": "true", "loss.bayesian": "false",
             "loss.box_uncertainty_form": "kl", "loss.box_uncertainty_warmup": 3, "train.max_iter": 4,
             "checkpoint.period": 2}
    run = tmp_path / "run"
    _train(tmp_path, run, extra)
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in records] == [1, 2, 3, 4]
    assert all(torch.isfinite(torch.tensor(r["level_plain_losses"])).all() for r in records)
    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed)
    (resumed / "checkpoints" / "last.pt").unlink()  # as if killed after the checkpoint at iteration 2
    _train(tmp_path, resumed, extra, "--resume")
    a = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["model"]
    b = torch.load(resumed / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert int(a["box_uncertainty_iter"]) == 4
    assert any("bbox_log_var" in k for k in a)
    for k, v in a.items():
        assert torch.equal(v, b[k]), k


def test_cli_refuses_giou_with_box_uncertainty_in_one_line(tmp_path: Path, capsys) -> None:
    extra = {"model.box_uncertainty": "true", "loss.bayesian": "false", "loss.box_loss": "giou"}
    argv = ["train", CONFIG, *tiny_overrides(tmp_path, extra), "--out", str(tmp_path / "run")]
    assert main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "model.box_uncertainty=true" in err[0] and "loss.box_loss=giou" in err[0], err


@pytest.mark.parametrize("name", ["retinanet", "faster_rcnn"])
def test_isolated_form_trains_the_plain_detector_bitwise(name: str, tmp_path: Path) -> None:
    """The whole run through the CLI, with a clipping norm so small that every step clips: the detector's
    weights end equal to the plain run's, bitwise (same initialisation, same draws, clipped apart from α)."""
    common = {**DETECTOR_KEYS[name], "loss.bayesian": "false", "train.max_iter": 3, "train.clip_grad_norm": 0.01}
    _train(tmp_path, tmp_path / "plain", common)
    _train(tmp_path, tmp_path / "isolated", {**common, "model.box_uncertainty": "true",
                                             "loss.box_uncertainty_form": "isolated"})
    a = torch.load(tmp_path / "plain" / "checkpoints" / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "isolated" / "checkpoints" / "last.pt", weights_only=True)["model"]
    alpha = [k for k in b if "bbox_log_var" in k]
    assert alpha and set(b) - set(a) == {*alpha, "box_uncertainty_iter"}
    for k, v in a.items():
        assert torch.equal(v, b[k]), k
    grads = [json.loads(line)["grad_norm"] for line in (tmp_path / "isolated" / "log.jsonl").read_text().splitlines()]
    plain = [json.loads(line)["grad_norm"] for line in (tmp_path / "plain" / "log.jsonl").read_text().splitlines()]
    assert all(g > p for g, p in zip(grads, plain, strict=True))  # α's gradients counted in the logged norm
