"""Losses against the papers' formulas (written out here in float64 scalars), torch and torchvision."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.integrate
import scipy.optimize
import scipy.special
import torch
import torch.nn.functional as F
import torchvision

from robustdet.losses import (
    bayesian_binary_cross_entropy,
    bayesian_cross_entropy,
    bayesian_focal_loss,
    bayesian_smooth_l1_loss,
    finite_checks_enabled,
    set_finite_checks,
    sigmoid_focal_loss,
    smooth_l1_loss,
)

F64 = torch.float64


# ---------------------------------------------------------------- references, straight from the papers


def ref_bayesian_focal(x: float, t: float, s: float, alpha: float, gamma: float) -> float:
    """Eq. 16 in the form of equations.md, one element: α_t·[σ⁻¹·(1 − p_t)^(σ⁻²)]^γ·(σ⁻²·CE + log σ)."""
    sigma = math.exp(s / 2)
    p = 1.0 / (1.0 + math.exp(-x))
    ce = -(t * math.log(p) + (1 - t) * math.log(1 - p))
    p_t = p * t + (1 - p) * (1 - t)
    alpha_t = alpha * t + (1 - alpha) * (1 - t) if alpha >= 0 else 1.0
    return alpha_t * ((1 / sigma) * (1 - p_t) ** (sigma**-2)) ** gamma * (ce / sigma**2 + math.log(sigma))


def ref_smooth_l1(d: float, c: float) -> float:
    """Eq. 6 with threshold c = 1/β²."""
    e = abs(d)
    return 0.5 * e * e / c if e < c else e - 0.5 * c


def ref_bayesian_smooth_l1(d: float, s: float, c: float) -> float:
    """Eq. 14 in the paper's own letters: β² = 1/c, τ = 1 − erf(1/(β²·√(2σ²)))."""
    sigma2 = math.exp(s)
    beta2 = 1.0 / c
    tau = 1.0 - math.erf(1.0 / (beta2 * math.sqrt(2.0 * sigma2)))
    e = abs(d)
    if e < 1.0 / beta2:
        return e * e / (2 * sigma2) + 0.5 * math.log(sigma2)
    return -beta2 * e * math.log(tau) + math.log(tau) + 1 / (2 * sigma2 * beta2**2) + 0.5 * math.log(sigma2)


def elementwise(fn, *tensors: torch.Tensor, **kwargs: float) -> torch.Tensor:
    flat = [t.detach().reshape(-1).tolist() for t in tensors]
    return torch.tensor([fn(*vals, **kwargs) for vals in zip(*flat, strict=True)], dtype=F64).reshape(
        tensors[0].shape
    )


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


def logits_targets(gen: torch.Generator, soft: bool, shape: tuple[int, ...] = (40, 6)):
    x = torch.randn(shape, generator=gen, dtype=F64) * 3
    t = torch.rand(shape, generator=gen, dtype=F64)
    if not soft:
        t = (t < 0.3).to(F64)
    return x, t


# ---------------------------------------------------------------- focal


@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("alpha", [0.25, -1.0])
@pytest.mark.parametrize("gamma", [2.0, 0.5, 0.0])
@pytest.mark.parametrize("s", [-1.3, 0.0, 0.7, 2.5])
def test_bayesian_focal_matches_eq16(gen, soft, alpha, gamma, s):
    x, t = logits_targets(gen, soft)
    expected = elementwise(ref_bayesian_focal, x, t, s=s, alpha=alpha, gamma=gamma)
    got = bayesian_focal_loss(x, t, s, alpha=alpha, gamma=gamma)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(
        bayesian_focal_loss(x, t, torch.tensor(s, dtype=F64), alpha=alpha, gamma=gamma, reduction="sum"),
        expected.sum(), rtol=1e-12, atol=1e-12,
    )
    torch.testing.assert_close(
        bayesian_focal_loss(x, t, s, alpha=alpha, gamma=gamma, reduction="mean"), expected.mean(),
        rtol=1e-12, atol=1e-12,
    )


@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("alpha", [0.25, 0.0, 1.0, -1.0])
@pytest.mark.parametrize("gamma", [2.0, 1.0, 0.5, 0.0])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_focal_at_s0_equals_torchvision(gen, soft, alpha, gamma, reduction):
    x, t = logits_targets(gen, soft)
    x_tv = x.clone().requires_grad_()
    x_b = x.clone().requires_grad_()
    x_f = x.clone().requires_grad_()
    expected = torchvision.ops.sigmoid_focal_loss(x_tv, t, alpha=alpha, gamma=gamma, reduction=reduction)
    bayes = bayesian_focal_loss(x_b, t, 0.0, alpha=alpha, gamma=gamma, reduction=reduction)
    focal = sigmoid_focal_loss(x_f, t, alpha=alpha, gamma=gamma, reduction=reduction)
    torch.testing.assert_close(bayes, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(focal, expected, rtol=1e-12, atol=1e-12)
    # The closed-form backward against torchvision's autograd.
    weights = torch.rand(expected.shape, generator=gen, dtype=F64)
    for out, leaf in ((expected, x_tv), (bayes, x_b), (focal, x_f)):
        (out * weights).sum().backward()
        assert leaf.grad is not None
    torch.testing.assert_close(x_b.grad, x_tv.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(x_f.grad, x_tv.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("s", [-0.8, 0.0, 1.9])
def test_bayesian_bce_is_focal_without_gamma_and_alpha(gen, s):
    x, t = logits_targets(gen, soft=True)
    expected = elementwise(ref_bayesian_focal, x, t, s=s, alpha=-1.0, gamma=0.0)
    # and written out once more as Kendall's form: exp(−s)·BCE + s/2
    bce = F.binary_cross_entropy_with_logits(x, t, reduction="none")
    torch.testing.assert_close(expected, math.exp(-s) * bce + s / 2, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(bayesian_binary_cross_entropy(x, t, s), expected, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("s", [-2.0, 0.0, 0.9])
def test_bayesian_cross_entropy_is_kendall_softmax_term(gen, s):
    logits = torch.randn(30, 5, generator=gen, dtype=F64) * 2
    targets = torch.randint(5, (30,), generator=gen)
    rows = logits.numpy()
    ce = scipy.special.logsumexp(rows, axis=1) - rows[np.arange(30), targets.numpy()]
    expected = torch.from_numpy(np.exp(-s) * ce + s / 2)
    torch.testing.assert_close(bayesian_cross_entropy(logits, targets, s), expected, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(
        bayesian_cross_entropy(logits, targets, s, reduction="mean"), expected.mean(), rtol=1e-12, atol=1e-13
    )


def test_bayesian_cross_entropy_optimal_s_is_log_2ce(gen):
    """d/ds [e^(−s)·CE + s/2] = 0 at s = log(2·CE): Kendall's σ² = 2·CE for a softmax task."""
    logits = torch.randn(50, 4, generator=gen, dtype=F64)
    targets = torch.randint(4, (50,), generator=gen)
    ce = F.cross_entropy(logits, targets)
    s = torch.log(2 * ce).detach().requires_grad_()
    bayesian_cross_entropy(logits, targets, s, reduction="mean").backward()
    assert s.grad is not None and abs(float(s.grad)) < 1e-12


# ---------------------------------------------------------------- smooth L1


@pytest.mark.parametrize("beta", [0.1, 1.0, 0.0])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_smooth_l1_equals_torch_and_eq6(gen, beta, reduction):
    a = torch.randn(50, 4, generator=gen, dtype=F64) * 0.5
    b = torch.randn(50, 4, generator=gen, dtype=F64) * 0.5
    got = smooth_l1_loss(a, b, beta=beta, reduction=reduction)
    torch.testing.assert_close(got, F.smooth_l1_loss(a, b, beta=beta, reduction=reduction), rtol=0, atol=0)
    if beta == 0.0:
        torch.testing.assert_close(got, F.l1_loss(a, b, reduction=reduction), rtol=0, atol=0)
    else:
        expected = elementwise(ref_smooth_l1, a - b, c=beta)
        expected = {"none": expected, "sum": expected.sum(), "mean": expected.mean()}[reduction]
        torch.testing.assert_close(got, expected, rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("beta", [0.1, 0.5, 1.0])
@pytest.mark.parametrize("s", [-3.0, -0.5, 0.0, 1.0, 4.0])
def test_bayesian_smooth_l1_matches_eq14(gen, beta, s):
    a = torch.randn(60, 4, generator=gen, dtype=F64) * beta * 2
    b = torch.zeros_like(a)
    expected = elementwise(ref_bayesian_smooth_l1, a - b, s=s, c=beta)
    torch.testing.assert_close(bayesian_smooth_l1_loss(a, b, s, beta=beta), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        bayesian_smooth_l1_loss(a, b, torch.tensor(s, dtype=F64), beta=beta, reduction="sum"),
        expected.sum(), rtol=1e-12, atol=1e-12,
    )


@pytest.mark.parametrize("beta", [0.05, 0.1, 1.0, 3.0])
@pytest.mark.parametrize("s", [-6.0, -1.0, 0.0, 1.0, 6.0])
def test_bayesian_smooth_l1_continuous_at_beta(beta, s):
    sigma2 = math.exp(s)
    at_c = beta**2 / (2 * sigma2) + s / 2  # the Gaussian case evaluated at ε = c
    for side in (beta * (1 - 1e-12), beta, beta * (1 + 1e-12)):
        err = torch.tensor([side, -side], dtype=F64)
        got = bayesian_smooth_l1_loss(err, torch.zeros_like(err), s, beta=beta)
        torch.testing.assert_close(got, torch.full_like(got, at_c), rtol=1e-9, atol=1e-9)


def _tail_slope(s: float, beta: float) -> float:
    """dL/dε of our loss deep in the tail, by autograd: the Laplace rate it uses."""
    err = torch.tensor([3.0 * beta], dtype=F64, requires_grad=True)
    bayesian_smooth_l1_loss(err, torch.zeros_like(err), s, beta=beta).sum().backward()
    assert err.grad is not None
    return float(err.grad[0])


def _code_loss(e: float, s: float, beta: float) -> float:
    """The library's Eq. 14 at one error e (either sign)."""
    err = torch.tensor([e], dtype=F64)
    return float(bayesian_smooth_l1_loss(err, torch.zeros_like(err), s, beta=beta))


@pytest.mark.parametrize("beta", [0.1, 0.5, 1.0, 2.0])
@pytest.mark.parametrize("s", [-4.0, -1.0, 0.0, 1.0, 3.0])
def test_gaussian_core_and_laplace_rate_of_eq14(beta, s):
    """Eq. 11-12: on |ε| < c, exp(−L(ε))/√(2π) of our loss is the N(0, σ²) density (mass 1 − τ, which pins
    the log σ term too), and beyond ±c the loss is linear with the Laplace rate λ = −(1/c)·log τ (Eq. 12),
    not the authors' TensorFlow rate −c·log τ."""
    sigma = math.exp(s / 2)
    tau = math.erfc(beta / (sigma * math.sqrt(2)))
    rate = _tail_slope(s, beta)
    assert rate == pytest.approx(-math.log(tau) / beta, rel=1e-12)
    for e in (beta, 1.7 * beta, 5.0 * beta, 20.0 * beta):
        for sign in (1.0, -1.0):
            assert _code_loss(sign * e, s, beta) - _code_loss(beta, s, beta) == pytest.approx(
                rate * (e - beta), rel=1e-10, abs=1e-12
            )
    core = sum(
        scipy.integrate.quad(lambda e: math.exp(-_code_loss(e, s, beta)) / math.sqrt(2 * math.pi), a, b,
                             epsabs=1e-13, epsrel=1e-12)[0]
        for a, b in ((-beta, 0.0), (0.0, beta))
    )
    assert core == pytest.approx(1 - tau, rel=1e-9)


# docs/losses.md's table of Z(s, c), to its three decimals
DOCUMENTED_MASS = {
    (0.1, -4.0): 1.118, (0.1, -2.0): 1.081, (0.1, 0.0): 1.036, (0.1, 1.0): 1.023, (0.1, 2.0): 1.014,
    (1.0, -4.0): 1.000, (1.0, -2.0): 1.004, (1.0, 0.0): 1.104, (1.0, 1.0): 1.118, (1.0, 2.0): 1.098,
}
# sup over c/σ of 1 − τ + 2·(c/σ)·φ(c/σ)/(−log τ): 1.11845 at c/σ ≈ 0.678 ("about 1.12")
MASS_SUP = 1.1185


def _eq14_mass(s: float, beta: float, nodes: int = 400) -> float:
    """Z(s, c) = ∫ exp(−L(ε))/√(2π) dε over both signs of ε, L our loss (one vectorised call per piece).

    Gauss-Legendre on the core (−b, b), b = min(c, 40σ) (beyond 40σ the integrand is below e^−800), and on
    each tail ε = ±(c − log(1 − u)/λ) for u in (0, 1), λ = −(1/c)·log τ from the formula: if our tail has
    that rate the integrand in u is constant, and if not the mass comes out wrong.
    """
    u, w = np.polynomial.legendre.leggauss(nodes)  # on (−1, 1)
    sigma = math.exp(s / 2)
    b = min(beta, 40 * sigma)
    core_e = torch.tensor(b * u, dtype=F64)
    core_density = torch.exp(-bayesian_smooth_l1_loss(core_e, torch.zeros_like(core_e), s, beta=beta))
    core = b * float((torch.tensor(w) * core_density).sum())
    rate = -(math.log(2) + scipy.special.log_ndtr(-beta / sigma)) / beta
    v = (u + 1) / 2  # on (0, 1), weights w / 2
    tail_e = torch.tensor(beta - np.log1p(-v) / rate, dtype=F64)
    tail_e = torch.cat([tail_e, -tail_e])
    density = torch.exp(-bayesian_smooth_l1_loss(tail_e, torch.zeros_like(tail_e), s, beta=beta))
    jacobian = torch.tensor(np.tile(w / 2 / (rate * (1 - v)), 2))
    tails = float((jacobian * density).sum())
    return (core + tails) / math.sqrt(2 * math.pi)


@pytest.mark.parametrize("beta", [0.05, 0.1, 0.5, 1.0, 2.0])
def test_eq14_mass_in_documented_range(beta):
    """Z(s, c) of our loss (:func:`_eq14_mass`) over a grid of s: between 1 and about 1.12 (equations.md),
    equal to docs/losses.md's closed form 1 − τ + 2·(c/σ)·φ(c/σ)/(−log τ) and to its table. The continuity
    fix of Eq. 14 trades exact normalisation away."""
    masses = []
    for s in (-8.0, -4.0, -2.0, -1.0, 0.0, 0.78, 1.0, 2.0, 4.0, 8.0):
        mass = _eq14_mass(s, beta)
        x = beta * math.exp(-s / 2)
        log_tau = math.log(2) + scipy.special.log_ndtr(-x)
        closed = -math.expm1(log_tau) + 2 * x * math.exp(-x * x / 2) / math.sqrt(2 * math.pi) / (-log_tau)
        assert mass == pytest.approx(closed, rel=1e-9), (s, beta)
        assert 1.0 - 1e-9 <= mass <= MASS_SUP, (s, beta)
        if (beta, s) in DOCUMENTED_MASS:
            assert round(mass, 3) == DOCUMENTED_MASS[(beta, s)], (s, beta)
        masses.append(mass)
    assert max(masses) > 1.01, "every c should leave visible extra mass somewhere on the grid"
    if beta != 1.0:
        return
    # the quadrature itself, once, against scipy's adaptive quad of the same integrand (1.104 at s = 0)
    pieces = ((-math.inf, -beta), (-beta, 0.0), (0.0, beta), (beta, math.inf))
    by_quad = sum(
        scipy.integrate.quad(lambda e: math.exp(-_code_loss(e, 0.0, beta)) / math.sqrt(2 * math.pi), a, b,
                             epsabs=1e-12, epsrel=1e-10)[0]
        for a, b in pieces
    )
    assert by_quad == pytest.approx(masses[4], rel=1e-8)


def test_bayesian_smooth_l1_optimal_s_in_gaussian_region(gen):
    """All errors below c: Kendall's Bayesian L2, minimised at σ² = mean(ε²)."""
    err = torch.rand(200, 4, generator=gen, dtype=F64) * 0.09
    s = torch.log(err.square().mean()).requires_grad_()
    bayesian_smooth_l1_loss(err, torch.zeros_like(err), s, beta=0.1, reduction="mean").backward()
    assert s.grad is not None and abs(float(s.grad)) < 1e-12


# ---------------------------------------------------------------- gradients


@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("alpha", [0.25, -1.0])
@pytest.mark.parametrize("gamma", [2.0, 0.5, 0.0])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_gradcheck_bayesian_focal(gen, soft, alpha, gamma, reduction):
    x, t = logits_targets(gen, soft, shape=(7, 3))
    x.requires_grad_()
    s = torch.tensor(0.4, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, s: bayesian_focal_loss(x, t, s, alpha=alpha, gamma=gamma, reduction=reduction), (x, s)
    )


@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_gradcheck_bayesian_bce_and_ce(gen, reduction):
    x, t = logits_targets(gen, True, shape=(6, 3))
    s = torch.tensor(-0.3, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, s: bayesian_binary_cross_entropy(x, t, s, reduction=reduction), (x.requires_grad_(), s)
    )
    logits = torch.randn(6, 4, generator=gen, dtype=F64, requires_grad=True)
    labels = torch.randint(4, (6,), generator=gen)
    assert torch.autograd.gradcheck(
        lambda x, s: bayesian_cross_entropy(x, labels, s, reduction=reduction), (logits, s)
    )


@pytest.mark.parametrize("beta", [0.1, 1.0])
@pytest.mark.parametrize("s_value", [-2.0, 1.0])
def test_gradcheck_bayesian_smooth_l1(gen, beta, s_value):
    # errors on both sides of c, away from the kinks at 0 and ±c where finite differences straddle
    mags = torch.tensor([0.2, 0.5, 0.8, 1.5, 2.0, 4.0], dtype=F64) * beta
    signs = torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0, -1.0], dtype=F64)
    target = torch.randn(6, generator=gen, dtype=F64)
    pred = (target + signs * mags).requires_grad_()
    s = torch.tensor(s_value, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda p, s: bayesian_smooth_l1_loss(p, target, s, beta=beta), (pred, s))
    assert torch.autograd.gradcheck(
        lambda p, s: bayesian_smooth_l1_loss(p, target, s, beta=beta, reduction="mean"), (pred, s)
    )


def test_log_var_gradient_reaches_float32_parameter(gen):
    x, t = logits_targets(gen, soft=False)
    s = torch.nn.Parameter(torch.tensor(0.3))
    bayesian_focal_loss(x, t, s, reduction="sum").backward()
    assert s.grad is not None and s.grad.dtype == torch.float32 and torch.isfinite(s.grad)
    # and the value is d/ds of Eq. 16, by central differences on the reference
    h = 1e-6
    numeric = sum(
        ref_bayesian_focal(xi, ti, 0.3 + h, 0.25, 2.0) - ref_bayesian_focal(xi, ti, 0.3 - h, 0.25, 2.0)
        for xi, ti in zip(x.reshape(-1).tolist(), t.reshape(-1).tolist(), strict=True)
    ) / (2 * h)
    assert float(s.grad) == pytest.approx(numeric, rel=1e-5)


# ---------------------------------------------------------------- extremes

EXTREME_LOGITS = [-100.0, -95.0, -87.0, -40.0, -17.0, -3.0, 0.0, 3.0, 17.0, 40.0, 87.0, 95.0, 100.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_focal_finite_for_extreme_logits_and_log_vars(dtype):
    x0 = torch.tensor(EXTREME_LOGITS, dtype=dtype)
    targets = {
        "hard": torch.tensor([0.0, 1.0] * 6 + [1.0], dtype=dtype),
        "soft": torch.linspace(0.0, 1.0, len(EXTREME_LOGITS), dtype=dtype),
    }
    for s_value in torch.linspace(-20.0, 20.0, 41).tolist():
        for kind, t in targets.items():
            for fn, kw in ((bayesian_focal_loss, {}), (bayesian_focal_loss, {"gamma": 0.5}),
                           (bayesian_binary_cross_entropy, {})):
                x = x0.clone().requires_grad_()
                s = torch.tensor(s_value, dtype=dtype, requires_grad=True)
                loss = fn(x, t, s, **kw)
                loss.sum().backward()
                what = f"{fn.__name__} {kw} {kind} s={s_value} {dtype}"
                assert torch.isfinite(loss).all(), what
                assert x.grad is not None and torch.isfinite(x.grad).all(), what
                assert s.grad is not None and torch.isfinite(s.grad), what


def test_focal_float32_extremes_agree_with_float64():
    """Not only finite: where float32 σ(±x) is denormal or 0 (|x| ≥ 87) the hard-target path still gives
    the float64 values and gradients."""
    x64 = torch.tensor([*EXTREME_LOGITS, -120.0, 120.0], dtype=F64)
    t64 = (x64 > 0).to(F64)  # well classified everywhere ...
    t64[::3] = 1.0 - t64[::3]  # ... but for a badly classified third
    for s_value in (-1.0, 0.0, 3.0, 6.0):
        results = []
        for dtype in (torch.float32, F64):
            x = x64.to(dtype).clone().requires_grad_()
            s = torch.tensor(s_value, dtype=dtype, requires_grad=True)
            loss = bayesian_focal_loss(x, t64.to(dtype), s)
            loss.sum().backward()
            assert x.grad is not None and s.grad is not None
            results.append((loss.detach().to(F64), x.grad.to(F64), s.grad.to(F64)))
        (l32, gx32, gs32), (l64, gx64, gs64) = results
        # float32 underflows below ~1e-38 where float64 does not: hence the tiny atol
        torch.testing.assert_close(l32, l64, rtol=1e-5, atol=1e-20)
        torch.testing.assert_close(gx32, gx64, rtol=1e-5, atol=1e-20)
        torch.testing.assert_close(gs32, gs64, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bayesian_smooth_l1_finite_for_extreme_log_vars(dtype):
    err0 = torch.tensor([0.0, 1e-4, 0.05, 0.0999, 0.1, 0.2, 3.0, 100.0], dtype=dtype)
    for s_value in torch.linspace(-20.0, 20.0, 41).tolist():
        err = err0.clone().requires_grad_()
        s = torch.tensor(s_value, dtype=dtype, requires_grad=True)
        loss = bayesian_smooth_l1_loss(err, torch.zeros_like(err), s, beta=0.1)
        loss.sum().backward()
        assert torch.isfinite(loss).all() and err.grad is not None and torch.isfinite(err.grad).all(), s_value
        assert s.grad is not None and torch.isfinite(s.grad), s_value
        # against the float64 scalar reference wherever erf does not yet underflow there
        if dtype == F64 and s_value >= -8:
            expected = elementwise(ref_bayesian_smooth_l1, err0, s=s_value, c=0.1)
            torch.testing.assert_close(loss.detach(), expected, rtol=1e-9, atol=1e-9)


# ---------------------------------------------------------------- behaviour in s (equations.md)


def test_bfl_tends_to_zero_as_s_goes_to_plus_and_minus_infinity():
    x = torch.tensor([-6.0, -1.0, 0.0, 2.0, 5.0], dtype=F64)
    for t in (torch.zeros_like(x), torch.ones_like(x)):
        for s in (-60.0, 60.0):
            assert bayesian_focal_loss(x, t, s).abs().max() < 1e-10, (t, s)
        # and shrinks monotonically on the way out
        far = [float(bayesian_focal_loss(x, t, s).abs().max()) for s in (20.0, 30.0, 40.0)]
        assert far[0] > far[1] > far[2]


def test_bfl_slightly_negative_for_well_classified_anchor_when_s_negative():
    x = torch.tensor([math.log(0.95 / 0.05)], dtype=F64)  # p_t = 0.95
    one = torch.ones_like(x)
    s_grid = torch.linspace(-1.5, 0.0, 301).tolist()
    values = [float(bayesian_focal_loss(x, one, s, alpha=-1.0)) for s in s_grid]
    lowest = min(values)
    assert -1e-4 < lowest < -1e-5  # negative, but only slightly
    s_low = s_grid[values.index(lowest)]
    assert lowest == pytest.approx(ref_bayesian_focal(float(x), 1.0, s_low, -1.0, 2.0), rel=1e-10)
    # never negative for s >= 0: then σ⁻²·CE + log σ >= 0
    assert all(float(bayesian_focal_loss(x, one, s, alpha=-1.0)) >= 0 for s in (0.0, 0.5, 3.0))


def _mix_reference(s: float) -> float:
    """99 anchors at p_t = 0.95 and 1 at p_t = 0.1, γ = 2, no α: mean of the reference Eq. 16."""
    easy = ref_bayesian_focal(math.log(0.95 / 0.05), 1.0, s, -1.0, 2.0)
    hard = ref_bayesian_focal(math.log(0.1 / 0.9), 1.0, s, -1.0, 2.0)
    return (99 * easy + hard) / 100


def test_batch_mix_has_local_minimum_in_s_near_0_4():
    x = torch.tensor([math.log(0.95 / 0.05)] * 99 + [math.log(0.1 / 0.9)], dtype=F64)
    one = torch.ones_like(x)
    grid = torch.linspace(-1.0, 2.0, 3001).tolist()
    ours = [float(bayesian_focal_loss(x, one, s, alpha=-1.0, reduction="mean")) for s in grid]
    i = int(np.argmin(ours))
    s_ours = grid[i]
    assert 0.3 <= s_ours <= 0.5
    ref = scipy.optimize.minimize_scalar(_mix_reference, bounds=(-1.0, 2.0), method="bounded",
                                         options={"xatol": 1e-9})
    assert ref.x == pytest.approx(0.4103, abs=1e-3)
    assert s_ours == pytest.approx(ref.x, abs=2e-3)
    # a local minimum only: past the barrier near s = 2.3 the loss falls to 0, so nothing stops a drift
    barrier = max(_mix_reference(s) for s in np.linspace(1.5, 3.5, 201))
    assert barrier > ours[i]
    assert _mix_reference(8.0) < ours[i]


# ---------------------------------------------------------------- argument checks


def test_shape_mismatch_raises():
    a = torch.zeros(4, 3)
    with pytest.raises(ValueError, match="logits and targets must have the same shape"):
        bayesian_focal_loss(a, torch.zeros(4, 2), 0.0)
    with pytest.raises(ValueError, match="logits and targets must have the same shape"):
        sigmoid_focal_loss(a, torch.zeros(3, 4))
    with pytest.raises(ValueError, match="input and target must have the same shape"):
        smooth_l1_loss(a, torch.zeros(4))
    with pytest.raises(ValueError, match="input and target must have the same shape"):
        bayesian_smooth_l1_loss(a, torch.zeros(4, 3, 1), 0.0)
    with pytest.raises(ValueError, match="targets must have shape"):
        bayesian_cross_entropy(a, torch.zeros(3, dtype=torch.long), 0.0)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_inputs_raise(bad):
    good = torch.zeros(5, 2)
    poisoned = good.clone()
    poisoned[3, 1] = bad
    with pytest.raises(ValueError, match="logits contains NaN or inf"):
        bayesian_focal_loss(poisoned, good, 0.0)
    with pytest.raises(ValueError, match="targets contains NaN or inf"):
        sigmoid_focal_loss(good, poisoned)
    with pytest.raises(ValueError, match="input contains NaN or inf"):
        bayesian_smooth_l1_loss(poisoned, good, 1.0)
    with pytest.raises(ValueError, match="target contains NaN or inf"):
        smooth_l1_loss(good, poisoned)
    with pytest.raises(ValueError, match="logits contains NaN or inf"):
        bayesian_cross_entropy(poisoned, torch.zeros(5, dtype=torch.long), 0.0)
    with pytest.raises(ValueError, match="log_var must be finite"):
        bayesian_focal_loss(good, good, bad)
    with pytest.raises(ValueError, match="log_var must be finite"):
        bayesian_smooth_l1_loss(good, good, torch.tensor(bad))


def test_finite_check_catches_overflowing_sum_only_when_real():
    big = torch.full((10,), 3e38)  # finite, but its float32 sum overflows
    assert torch.isfinite(bayesian_focal_loss(-big, torch.zeros(10), 0.0)).all()


def test_finite_checks_can_be_switched_off():
    poisoned = torch.tensor([0.0, math.nan])
    previous = set_finite_checks(False)
    try:
        assert not finite_checks_enabled()
        assert torch.isnan(bayesian_focal_loss(poisoned, torch.zeros(2), 0.0)).any()
    finally:
        set_finite_checks(previous)
    assert finite_checks_enabled()
    with pytest.raises(ValueError, match="NaN or inf"):
        bayesian_focal_loss(poisoned, torch.zeros(2), 0.0)


@pytest.mark.parametrize("beta", [0.0, -0.1, math.nan, math.inf])
def test_bayesian_smooth_l1_rejects_beta_not_positive(beta):
    with pytest.raises(ValueError, match="beta must be finite and > 0"):
        bayesian_smooth_l1_loss(torch.zeros(3), torch.zeros(3), 0.0, beta=beta)


@pytest.mark.parametrize("beta", [-0.1, -1.0, math.nan])
def test_smooth_l1_rejects_negative_beta(beta):
    with pytest.raises(ValueError, match="beta must be finite and >= 0"):
        smooth_l1_loss(torch.zeros(3), torch.zeros(3), beta=beta)


def test_bad_reduction_and_arguments_raise():
    z = torch.zeros(3)
    for call in (
        lambda: sigmoid_focal_loss(z, z, reduction="avg"),
        lambda: bayesian_focal_loss(z, z, 0.0, reduction="batchmean"),
        lambda: smooth_l1_loss(z, z, reduction="Mean"),
        lambda: bayesian_smooth_l1_loss(z, z, 0.0, reduction=""),
        lambda: bayesian_binary_cross_entropy(z, z, 0.0, reduction="max"),
        lambda: bayesian_cross_entropy(torch.zeros(3, 2), torch.tensor([0, 1, 0]), 0.0, reduction="x"),
    ):
        with pytest.raises(ValueError, match="reduction must be one of"):
            call()
    with pytest.raises(ValueError, match="alpha must be in"):
        bayesian_focal_loss(z, z, 0.0, alpha=1.5)
    with pytest.raises(ValueError, match="gamma must be finite and >= 0"):
        sigmoid_focal_loss(z, z, gamma=-1.0)
    with pytest.raises(ValueError, match="log_var must be a float or a 0-dim tensor"):
        bayesian_focal_loss(z, z, torch.zeros(1))
    with pytest.raises(ValueError, match="targets must not require grad"):
        bayesian_focal_loss(z, torch.zeros(3, requires_grad=True), 0.0)
    with pytest.raises(ValueError, match="logits must be a floating-point tensor"):
        sigmoid_focal_loss(torch.zeros(3, dtype=torch.long), z)
    with pytest.raises(ValueError, match="targets must be integer class indices"):
        bayesian_cross_entropy(torch.zeros(3, 2), torch.zeros(3), 0.0)
    with pytest.raises(ValueError, match=r"targets must lie in \[0, 2\)"):
        bayesian_cross_entropy(torch.zeros(3, 2), torch.tensor([0, 2, 1]), 0.0)


def test_bool_targets_and_no_grad_mode():
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(0), dtype=F64, requires_grad=True)
    hard = torch.rand(8, 3, generator=torch.Generator().manual_seed(1)) < 0.4
    expected = torchvision.ops.sigmoid_focal_loss(x, hard.to(F64))
    torch.testing.assert_close(sigmoid_focal_loss(x, hard), expected, rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        loss = bayesian_focal_loss(x, hard, torch.tensor(0.5, requires_grad=True))
    assert not loss.requires_grad
