"""Eq. 14 and Eq. 16 of Khanzhina et al. and their derivatives in s, written out for the model tests.

Independent of ``robustdet.losses`` on purpose: plain float64 torch arithmetic in the form of
``shared/design/equations.md``, derivatives in s worked out by hand (checked against central differences
in :func:`check_derivatives`), so a model test compares the detector's Bayesian terms with the formulas
rather than with the library's own loss functions.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def eq16(x: Tensor, t: Tensor, s: float, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """BFL = α_t·[σ⁻¹·(1 − p_t)^(σ⁻²)]^γ·(σ⁻²·CE + log σ), elementwise, σ = exp(s/2)."""
    sigma = math.exp(s / 2)
    p = torch.sigmoid(x)
    # 1 − p_t written as p·(1 − t) + (1 − p)·t, so that a confident p_t does not cancel to 0
    one_minus_pt = p * (1 - t) + (1 - p) * t
    ce = F.binary_cross_entropy_with_logits(x, t, reduction="none")
    alpha_t = alpha * t + (1 - alpha) * (1 - t) if alpha >= 0 else torch.ones_like(x)
    return alpha_t * (one_minus_pt ** (sigma**-2) / sigma) ** gamma * (ce / sigma**2 + math.log(sigma))


def eq16_ds(x: Tensor, t: Tensor, s: float, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """d BFL / ds by hand: BFL = C·A with C = α_t·e^(−γs/2)·q^(γ·e^(−s)), A = e^(−s)·CE + s/2, q = 1 − p_t:
    dC/ds = −C·(γ/2 + γ·e^(−s)·log q), dA/ds = −e^(−s)·CE + 1/2."""
    e = math.exp(-s)
    p = torch.sigmoid(x)
    q = p * (1 - t) + (1 - p) * t
    ce = F.binary_cross_entropy_with_logits(x, t, reduction="none")
    alpha_t = alpha * t + (1 - alpha) * (1 - t) if alpha >= 0 else torch.ones_like(x)
    c = alpha_t * math.exp(-gamma * s / 2) * q ** (gamma * e)
    a = e * ce + s / 2
    return -c * (gamma / 2 + gamma * e * torch.log(q)) * a + c * (0.5 - e * ce)


def _log_tau(s: float, c: float) -> float:
    """log τ, τ = 1 − erf(c/(σ√2)): the Gaussian's mass outside (−c, c) (Eq. 12)."""
    return math.log(math.erfc(c / math.sqrt(2 * math.exp(s))))


def eq14(err: Tensor, s: float, c: float) -> Tensor:
    """Bayesian smooth L1 of ε = |err|: ε²/(2σ²) + log σ below c, −(ε/c)·log τ + log τ + c²/(2σ²) + log σ above."""
    eps = err.abs()
    sigma2 = math.exp(s)
    log_tau = _log_tau(s, c)
    gauss = eps**2 / (2 * sigma2) + s / 2
    laplace = -(eps / c) * log_tau + log_tau + c**2 / (2 * sigma2) + s / 2
    return torch.where(eps < c, gauss, laplace)


def eq14_ds(err: Tensor, s: float, c: float) -> Tensor:
    """d Eq. 14 / ds by hand: −ε²/(2σ²) + 1/2 below c; (1 − ε/c)·d log τ/ds − c²/(2σ²) + 1/2 above, where
    τ = erfc(u), u = c·e^(−s/2)/√2, du/ds = −u/2, so d log τ/ds = u·exp(−u²)/(√π·τ)."""
    eps = err.abs()
    sigma2 = math.exp(s)
    u = c / math.sqrt(2 * sigma2)
    dlog_tau = u * math.exp(-u * u) / (math.sqrt(math.pi) * math.erfc(u))
    gauss = -(eps**2) / (2 * sigma2) + 0.5
    laplace = (1 - eps / c) * dlog_tau - c**2 / (2 * sigma2) + 0.5
    return torch.where(eps < c, gauss, laplace)


def check_derivatives(s: float, c: float) -> None:
    """The hand derivatives against float64 central differences of eq16 / eq14 (away from the kink at c)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, generator=g, dtype=torch.float64) * 4
    t = (torch.rand(200, generator=g, dtype=torch.float64) < 0.3).to(torch.float64)
    err = torch.cat([torch.linspace(0, 0.9 * c, 50), torch.linspace(1.1 * c, 8 * c, 50)]).to(torch.float64)
    h = 1e-6
    for fn, dfn, args in ((eq16, eq16_ds, (x, t)), (eq14, eq14_ds, (err,))):
        extra = () if fn is eq16 else (c,)
        numeric = (fn(*args, s + h, *extra) - fn(*args, s - h, *extra)) / (2 * h)
        torch.testing.assert_close(dfn(*args, s, *extra), numeric, rtol=1e-6, atol=1e-9)
