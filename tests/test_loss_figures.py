"""The loss figures are written, non-trivial PNGs; the measured minimiser in s matches scipy."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import scipy.optimize
from PIL import Image

from robustdet.plots import plot_bayesian_smooth_l1, plot_paper_figures
from robustdet.plots.loss_figures import BATCH_MIX, batch_mix_minimiser


def test_plot_paper_figures_writes_three_pngs(tmp_path: Path):
    out = tmp_path / "new" / "figures"  # created on demand
    paths = plot_paper_figures(out)
    assert [p.name for p in paths] == ["bayesian_smooth_l1.png", "bayesian_focal.png", "focal_vs_log_var.png"]
    for path in paths:
        assert path.parent == out and path.is_file()
        assert path.stat().st_size > 20_000, path  # axes, several curves and text, not a blank canvas
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            assert image.format == "PNG"
            width, height = image.size
            assert width >= 600 and height >= 400
            # not a single-colour image
            colours = image.convert("RGB").getcolors(maxcolors=1_000_000)
            assert colours is not None and len(colours) > 50


def test_single_figure_accepts_str_path(tmp_path: Path):
    path = plot_bayesian_smooth_l1(str(tmp_path / "fig1.png"), beta=0.5)
    assert path == tmp_path / "fig1.png" and path.stat().st_size > 10_000


def test_batch_mix_minimiser_matches_scipy_on_eq16():
    def mean_loss(s: float) -> float:
        sigma2 = math.exp(s)
        total = 0.0
        for p_t, count in BATCH_MIX:
            # Eq. 16 with γ = 2, no α, for a positive anchor: [σ⁻¹·(1 − p_t)^(σ⁻²)]²·(σ⁻²·(−log p_t) + log σ)
            focal = (sigma2**-0.5 * (1 - p_t) ** (1 / sigma2)) ** 2 * (-math.log(p_t) / sigma2 + s / 2)
            total += count * focal
        return total / sum(count for _, count in BATCH_MIX)

    reference = scipy.optimize.minimize_scalar(mean_loss, bounds=(-1.0, 2.0), method="bounded",
                                               options={"xatol": 1e-10})
    assert batch_mix_minimiser() == pytest.approx(reference.x, abs=1e-5)
    assert 0.3 <= reference.x <= 0.5
