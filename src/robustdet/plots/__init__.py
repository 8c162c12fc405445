"""Figures: the Bayesian losses (``loss_figures``)."""

from robustdet.plots.loss_figures import (
    plot_bayesian_focal,
    plot_bayesian_smooth_l1,
    plot_focal_vs_log_var,
    plot_paper_figures,
)

__all__ = ["plot_bayesian_focal", "plot_bayesian_smooth_l1", "plot_focal_vs_log_var", "plot_paper_figures"]
