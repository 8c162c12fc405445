"""Issue 18 §3, does cleaning pay? One line per loop folder that experiments/cleaning/run.sh wrote
(``audit/``, ``noisy.json``, ``train_cleaned/``, ``train_noisy/``), on robust.yaml's cell:

- what ``cleaned.json`` changed against the audited noisy split, and how much of it was right against the
  clean labels (the synthetic split without noise) and ``label_noise.json``: relabels that restore the clean
  class, drops of spurious boxes, added boxes that match a dropped clean box (IoU >= 0.5, same class, each
  dropped box once);
- AP of the cell trained on ``cleaned.json`` and, as the control for the data path (a json on disk instead
  of the generated split, the noise applied by the audit), on the noisy split as json; beside them the
  baseline's AP on the clean and on the noisy labels of the same seed from experiments/robust/summary.csv
  (the sweep's cells, same machine kind), and the recovery (AP_cleaned − AP_noisy) / (AP_clean − AP_noisy).

    .venv/bin/python experiments/cleaning/summarize.py /work/runs/clean/drop40_s0 [MORE ...]

A loop folder's ``audit_t<T>/`` (run.sh with THRESHOLD=T: the same folds scored at --threshold T) gets a row
of its own, trained in ``train_cleaned_t<T>/``.
"""

from __future__ import annotations

import argparse
import csv
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import stats
from torchvision.ops import box_convert, box_iou

from robustdet.config import config_from_stored
from robustdet.data import load_synthetic

SUMMARY = Path(__file__).resolve().parents[1] / "robust" / "summary.csv"


def by_id(coco: dict[str, Any]) -> dict[int, dict[str, Any]]:
    return {a["id"]: a for a in coco["annotations"]}


def matched_drops(added: list[dict[str, Any]], dropped: list[dict[str, Any]]) -> int:
    """How many added boxes match a dropped clean box of their image and class (IoU >= 0.5, each once;
    greedy in the order the boxes were added)."""
    groups: dict[tuple[int, int], list[list[float]]] = defaultdict(list)
    for d in dropped:
        groups[(d["image_id"], d["category_id"])].append(d["bbox"])
    candidates: dict[tuple[int, int], list[list[float]]] = defaultdict(list)
    for a in added:
        candidates[(a["image_id"], a["category_id"])].append(a["bbox"])
    hits = 0
    for key, boxes in candidates.items():
        if key not in groups:
            continue
        xyxy = [box_convert(torch.tensor(b, dtype=torch.float64), "xywh", "xyxy") for b in (boxes, groups[key])]
        iou = box_iou(*xyxy)
        free = torch.ones(iou.shape[1], dtype=torch.bool)
        for row in iou:
            match = torch.nonzero((row >= 0.5) & free)
            if len(match):
                free[match[0, 0]] = False
                hits += 1
    return hits


def fixes(loop: Path, audit_dir: Path) -> dict[str, Any]:
    audit = json.loads((audit_dir / "audit.json").read_text())
    cfg = config_from_stored(audit["fingerprint"]["config"], str(audit_dir / "audit.json"))
    clean = by_id(load_synthetic(cfg.data.synthetic, "train")[0])
    noisy = by_id(json.loads((loop / "noisy.json").read_text()))
    cleaned = by_id(json.loads((audit_dir / "cleaned.json").read_text()))
    report = json.loads((audit_dir / "label_noise.json").read_text())
    flipped, spurious = set(report["changed"].get("class_flip", [])), set(report.get("added", []))
    relabeled = [i for i in noisy.keys() & cleaned.keys() if noisy[i]["category_id"] != cleaned[i]["category_id"]]
    removed = [i for i in noisy if i not in cleaned]
    added = [cleaned[i] for i in cleaned if i not in noisy]
    dropped = [clean[i] for i in report["changed"].get("drop", [])]
    return {
        "flipped": len(flipped), "relabeled": len(relabeled),
        "relabeled_right": sum(i in flipped and cleaned[i]["category_id"] == clean[i]["category_id"]
                               for i in relabeled),
        "spurious": len(spurious), "removed": len(removed), "removed_right": sum(i in spurious for i in removed),
        "dropped": len(dropped), "added": len(added), "added_right": matched_drops(added, dropped),
        "seed": cfg.seed, "data": cfg.data.synthetic.seed, "noise": _noise(loop),
        "threshold": audit.get("threshold", 0.5),
    }


def _noise(loop: Path) -> str:
    """The sweep's noise label of a loop folder (``drop40_s0`` -> drop40; 0 % of any kind -> clean)."""
    name = loop.name.split("_s")[0]
    return "clean" if name.rstrip("0123456789") + "0" == name else name


def baseline_ap(loop: Path, noise: str, seed: int) -> tuple[float, float]:
    """The baseline's AP on clean and on noisy labels: the sweep's cells of that seed in
    experiments/robust/summary.csv, or for a seed the sweep has not (select.sh: 100) the loop's own
    ``train_noisy`` and ``clean_s<seed>`` beside the loop folder."""
    with SUMMARY.open(newline="") as f:
        rows = {(r["method"], r["noise"], int(r["seed"])): r for r in csv.DictReader(f) if r["status"] == "done"}
    if ("baseline", noise, seed) in rows:
        return float(rows[("baseline", "clean", seed)]["AP"]), float(rows[("baseline", noise, seed)]["AP"])
    return final_ap(loop.parent / f"clean_s{seed}"), final_ap(loop / "train_noisy")


def final_ap(run: Path) -> float:
    path = run / "metrics.json"
    return float(json.loads(path.read_text())["bbox"]["AP"]) if path.exists() else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("loops", nargs="+", type=Path)
    args = parser.parse_args()
    print("| noise | seed | threshold | relabeled (right / flipped) | removed (right / spurious) | added (right / "
          "dropped) | AP clean labels | AP noisy (sweep) | AP noisy json | AP cleaned.json | recovery |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    paired: dict[tuple[int, str, float], dict[int, tuple[float, float, float]]] = defaultdict(dict)
    for loop in args.loops:
        for audit_dir in [loop / "audit", *sorted(loop.glob("audit_t*/"))]:
            if not (audit_dir / "cleaned.json").is_file():
                continue
            f = fixes(loop, audit_dir)
            ap_clean, ap_noisy = baseline_ap(loop, f["noise"], f["seed"])
            train = loop / ("train_cleaned" + audit_dir.name.removeprefix("audit"))
            ap_json, ap_cleaned = final_ap(loop / "train_noisy"), final_ap(train)
            recovery = (ap_cleaned - ap_noisy) / (ap_clean - ap_noisy) if ap_clean != ap_noisy else float("nan")
            paired[(f["data"], f["noise"], f["threshold"])][f["seed"]] = (ap_clean, ap_noisy, ap_cleaned)
            print(f"| {f['noise']} | {f['seed']} | {f['threshold']} | {f['relabeled']} ({f['relabeled_right']} / "
                  f"{f['flipped']}) | {f['removed']} ({f['removed_right']} / {f['spurious']}) | {f['added']} "
                  f"({f['added_right']} / {f['dropped']}) | {ap_clean:.2f} | {ap_noisy:.2f} | {ap_json:.2f} "
                  f"| {ap_cleaned:.2f} | {recovery:+.1%} |")
    print_paired(paired)


def _interval(x: np.ndarray) -> tuple[float, float, float]:
    half = stats.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / np.sqrt(len(x))
    return float(x.mean()), float(x.mean() - half), float(x.mean() + half)


def print_paired(paired: dict[tuple[int, str, float], dict[int, tuple[float, float, float]]]) -> None:
    """Per dataset (data.synthetic.seed: select.sh's 100 is kept apart), noise and threshold over its seeds
    (2 or more): AP cleaned − AP noisy (on clean labels: − AP clean),
    its paired 95 % t interval, that over the mean loss (the recovery), and the paired difference to the
    default threshold 0.5 on the seeds both have."""
    print("\n| dataset | noise | threshold | seeds | AP cleaned − noisy [95 % t] | recovery [95 %] "
          "| − threshold 0.5, paired |")
    print("|---|---|---|---|---|---|---|")
    for (data, noise, threshold), by_seed in sorted(paired.items()):
        seeds = sorted(s for s, v in by_seed.items() if not np.isnan(v).any())
        if len(seeds) < 2:
            continue
        clean, noisy, cleaned = (np.array([by_seed[s][i] for s in seeds]) for i in range(3))
        m, lo, hi = _interval(cleaned - noisy)
        loss = float((clean - noisy).mean())
        rec = f"{m / loss:+.1%} [{lo / loss:+.1%}, {hi / loss:+.1%}]" if loss else "–"
        default = paired.get((data, noise, 0.5), {})
        both = [s for s in seeds if s in default and threshold != 0.5 and not np.isnan(default[s]).any()]
        vs = "–"
        if len(both) >= 2:
            d = np.array([by_seed[s][2] - default[s][2] for s in both])
            vs = "{:+.2f} [{:+.2f}, {:+.2f}]".format(*_interval(d))
        seed_list = ",".join(map(str, seeds))
        print(f"| {data} | {noise} | {threshold} | {seed_list} | {m:+.2f} [{lo:+.2f}, {hi:+.2f}] | {rec} | {vs} |")


if __name__ == "__main__":
    main()
