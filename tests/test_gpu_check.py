"""The GPU check's smoke run on the CPU (--device cpu --quick): every table row is there and consistent."""

from __future__ import annotations

import sys

import pytest

from robustdet.config import config_from_dict
from robustdet.errors import ConfigError
from tests.conftest import REPO


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _accepted(weighting: str) -> bool:
    try:
        config_from_dict({"weighting": {"name": weighting}})
    except ConfigError:
        return False
    return True


def _printed_ratio_fits(ratio: str, num: str, den: str, exact_num: bool = False) -> bool:
    """``ratio`` as printed lies within what ``num / den`` (times printed to 1 decimal) allows.

    The script divides unrounded times, so the printed quotient can differ from the quotient of the
    printed times by the rounding of all three: bound it over the times' rounding intervals (half a unit
    of the last printed digit each), never by a fixed tolerance, which flaked on small times.
    """
    n, d = float(num), float(den)
    dn = 0.0 if exact_num else 0.05
    decimals = len(ratio.split(".")[1]) if "." in ratio else 0
    low, high = (n - dn) / (d + 0.05), (n + dn) / max(d - 0.05, 1e-9)
    half = 0.5 * 10.0**-decimals
    return low - half <= float(ratio) <= high + half


def test_gpu_check_quick_on_cpu_prints_every_row(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import gpu_check

    monkeypatch.setattr(sys, "argv", ["gpu_check.py", "--device", "cpu", "--quick"])
    gpu_check.main()
    out = capsys.readouterr().out
    rows = [_cells(line) for line in out.splitlines() if line.startswith("| ") and not line.startswith("| ---")]
    batches = [str(b) for b in gpu_check.QUICK.batches]

    train = {(r[0], r[1]): r for r in rows if r[0] in gpu_check.METHODS}
    for method in gpu_check.METHODS:
        name = gpu_check.METHODS[method].get("weighting", {}).get("name")
        if name is not None and not _accepted(name):  # a weighting the config rejects: one n/a row
            assert train[(method, "all")][2:] == ["n/a"] * 7, method
            continue
        for batch in batches:
            ours_ms, tv_ms, speedup, ours_ips, tv_ips, ours_mib, tv_mib = train[(method, batch)][2:]
            assert _printed_ratio_fits(speedup, tv_ms, ours_ms), (method, batch, speedup, tv_ms, ours_ms)
            ours_ms, tv_ms = float(ours_ms), float(tv_ms)
            assert ours_ms > 0 and tv_ms > 0
            assert _printed_ratio_fits(ours_ips, str(1e3 * int(batch)), str(ours_ms), exact_num=True)
            assert _printed_ratio_fits(tv_ips, str(1e3 * int(batch)), str(tv_ms), exact_num=True)
            assert ours_mib == tv_mib == "n/a"  # no CUDA memory on the CPU
    assert not _accepted("no_such_weighting")  # the n/a path above is reachable
    assert f"goal: speed-up >= 1.25 at batch {batches[-1]}" in out

    losses = {r[0]: r for r in rows if r[0] in ("torchvision", "standard", "bayesian")}
    assert set(losses) == {"torchvision", "standard", "bayesian"}
    assert all(float(x) > 0 for r in losses.values() for x in r[1:])
    ratios = {r[0]: r[1] for r in rows if "/" in r[0]}
    for ratio, (num, den) in {
        "bayesian/standard": ("bayesian", "standard"),
        "bayesian/torchvision": ("bayesian", "torchvision"),
        "standard/torchvision": ("standard", "torchvision"),
    }.items():
        assert _printed_ratio_fits(ratios[ratio], losses[num][1], losses[den][1]), (ratio, ratios, losses)

    (evaluation,) = [r for r in rows if r[0] == "eval"]
    assert evaluation[1] == batches[-1] and float(evaluation[2]) > 0 and float(evaluation[3]) > 0
