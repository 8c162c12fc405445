"""Classification losses for noisy labels in a dense sigmoid detector: class flips and missing boxes.

All four act on the per-anchor, per-class tensors of RetinaNet / FCOS: ``logits`` x and ``targets`` t
[N, C] (one-hot rows for foreground anchors, zero rows for background), p = sigmoid(x), and, where the
method needs it, ``foreground`` [N] (the anchors assigned to a box). Elementwise, p_t = p·t + (1 − p)·(1 − t).

| function                     | kind of noise | what it changes                                              |
|------------------------------|---------------|--------------------------------------------------------------|
| :func:`bootstrap_targets`    | class flips   | target β·t + (1 − β)·p, p detached (Reed et al. 2015, soft)  |
| :func:`smooth_labels`        | class flips   | foreground rows (1 − ε)·t + ε/C (label smoothing, control)   |
| :func:`gce_focal_loss`       | class flips   | −log p_t of the focal loss → (1 − p_t^q)/q (Zhang & Sabuncu) |
| :func:`recalibrate_background` | missing boxes | confident background elements get the mirrored focal term (BRL) |

The first two are target transforms for the (Bayesian) focal loss, which takes soft targets; the last two
are per-element losses. docs/losses.md has the equations and what each paper reports.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from robustdet.losses._reduction import finite_checks_enabled
from robustdet.losses.focal import sigmoid_focal_loss

__all__ = ["bootstrap_targets", "gce_focal_loss", "recalibrate_background", "smooth_labels"]


def _check_rows(name: str, x: Tensor, targets: Tensor, foreground: Tensor | None = None) -> None:
    if x.dim() != 2 or targets.shape != x.shape:
        shapes = f"{tuple(x.shape)} and {tuple(targets.shape)}"
        raise ValueError(f"{name}: logits and targets must both be [N, C], got {shapes}")
    if foreground is not None and (foreground.dtype != torch.bool or foreground.shape != x.shape[:1]):
        got = f"{foreground.dtype} {tuple(foreground.shape)}"
        raise ValueError(f"{name}: foreground must be a bool [N] = [{x.shape[0]}], got {got}")


def bootstrap_targets(logits: Tensor, targets: Tensor, beta: float) -> Tensor:
    """Soft bootstrapping (Reed et al. 2015, "Training deep neural networks on noisy labels with
    bootstrapping", section 3.2, the "soft" form): the target becomes

        t' = β·t + (1 − β)·p,        p = sigmoid(x), detached

    so a label the model disagrees with is partly replaced by the model's own belief; β = 1 is the label.
    Reed et al. write it for a softmax (q_k for p); here it is applied to each sigmoid output, on every
    element (background rows too: there t' = (1 − β)·p, which lowers the push against a confident score
    on an unlabelled object). The gradient does not flow through p (the paper treats t' as a target).
    Shapes [N, C]; returns [N, C] in the logits' dtype. β = 1 returns ``targets`` exactly.
    """
    _check_rows("bootstrap_targets", logits, targets)
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"bootstrap_targets: beta must be in [0, 1], got {beta}")
    t = targets.to(logits.dtype)
    if beta == 1.0:
        return t
    return t * beta + torch.sigmoid(logits.detach()) * (1.0 - beta)


def smooth_labels(targets: Tensor, foreground: Tensor, epsilon: float) -> Tensor:
    """Label smoothing of the foreground rows (Szegedy et al. 2016, section 7; the control for the
    noise-robust targets): a foreground anchor's one-hot row t becomes

        t' = (1 − ε)·t + ε/C

    (row sum 1, as in the softmax form), background rows stay 0. The common sigmoid variant
    t·(1 − ε) + ε/2 on every element is not used: it would give each of the ~10⁵ background elements per
    image the target ε/2, which at ε = 0.1 is the default score threshold 0.05, so every location would be
    trained to sit at the threshold. Shapes: ``targets`` [N, C], ``foreground`` bool [N]; ε = 0 returns
    ``targets`` exactly.
    """
    _check_rows("smooth_labels", targets, targets, foreground)
    if not 0.0 <= epsilon < 1.0:
        raise ValueError(f"smooth_labels: epsilon must be in [0, 1), got {epsilon}")
    if epsilon == 0.0:
        return targets
    smoothed = targets * (1.0 - epsilon) + epsilon / targets.shape[1]
    return torch.where(foreground[:, None], smoothed, targets)


def gce_focal_loss(logits: Tensor, targets: Tensor, q: float, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """The focal loss with the generalized cross entropy in place of −log p_t (Zhang & Sabuncu, NeurIPS
    2018, "Generalized Cross Entropy Loss for Training Deep Neural Networks with Noisy Labels", the L_q
    loss of section 3), elementwise on hard targets:

        L = α_t·(1 − p_t)^γ·(1 − p_t^q)/q,        0 < q <= 1

    (1 − p_t^q)/q tends to −log p_t (the focal loss, Eq. 7 of Khanzhina et al.) as q → 0 and to the
    bounded, noise-tolerant MAE 1 − p_t at q = 1. Its gradient in the logit is the focal loss's scaled by
    about p_t^q, so an element the model confidently contradicts (a flipped label) pulls less. From the
    logits: p_t^q = exp(−q·CE), 1 − p_t = −expm1(−CE). α < 0 switches α_t off. Shapes [N, C] → [N, C].
    """
    _check_rows("gce_focal_loss", logits, targets)
    if not (0.0 < q <= 1.0):
        raise ValueError(f"gce_focal_loss: q must be in (0, 1], got {q}")
    t = targets.to(logits.dtype)
    if finite_checks_enabled() and bool(((t != 0) & (t != 1)).any()):  # a host sync, like the other value checks
        raise ValueError("gce_focal_loss: targets must be hard (0 or 1)")
    ce = torch.nn.functional.binary_cross_entropy_with_logits(logits, t, reduction="none")
    loss = torch.expm1(-q * ce) / -q
    if gamma != 0.0:
        loss = loss * (-torch.expm1(-ce)).pow(gamma)
    if alpha >= 0:
        loss = loss * (t * (2.0 * alpha - 1.0) + (1.0 - alpha))
    return loss


def recalibrate_background(
    loss: Tensor, logits: Tensor, background: Tensor, threshold: float, alpha: float = 0.25, gamma: float = 2.0
) -> Tensor:
    """Background Recalibration Loss (Zhang, Chen, Shen, Hao, Zhu, Savvides, ICASSP 2020, "Solving
    Missing-Annotation Object Detection with Background Recalibration Loss"): on a background anchor the
    element of class c is a negative (t = 0, p_t = 1 − p), and where the model scores it above
    ``threshold`` (p > τ, i.e. the paper's p_t < t with t = 1 − τ) its negative focal term is replaced by
    the mirror of the positive one:

        BRL = −α_t·p_t^γ·log(1 − p_t) = −(1 − α)·(1 − p)^γ·log p      if p > τ (background elements)
        FL  = −(1 − α)·p^γ·log(1 − p)                                  otherwise

    The confident score of a likely unlabelled object then gets the gradient of a positive, weakened as p
    nears 1, instead of the full push to 0. At τ = 0.5 (the paper's t) the two terms meet (both equal
    (1 − α)·0.5^γ·log 2). The form is the paper's as its authors' CUDA kernel computes it (their
    mmdetection-selective-iou, ``mirror_sigmoid_focal_loss``; their patent's claim 2); that repository
    also reweights it and assigns it only to anchors far from every box (IoU < 0.1), which this function
    does not (docs/losses.md).

    ``loss`` [N, C] is the elementwise classification loss to recalibrate (any of this module's or the
    focal loss), ``logits`` [N, C], ``background`` bool [N]; the mask is taken without gradient. Returns
    [N, C]; elements outside the mask are ``loss``'s own (τ >= 1 returns ``loss`` itself).
    """
    _check_rows("recalibrate_background", logits, loss, background)
    if not threshold > 0.0:  # NaN too
        raise ValueError(f"recalibrate_background: threshold must be in (0, 1], got {threshold}")
    if threshold >= 1.0:
        return loss
    with torch.no_grad():
        mask = background[:, None] & (logits > math.log(threshold / (1.0 - threshold)))  # p > τ
    mirrored_alpha = 1.0 - alpha if alpha >= 0 else alpha
    # on every element and then selected, rather than on the masked ones: no host sync on a GPU
    mirrored = sigmoid_focal_loss(logits, torch.ones_like(logits), alpha=mirrored_alpha, gamma=gamma)
    return torch.where(mask, mirrored.to(loss.dtype), loss)
