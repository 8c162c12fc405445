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
"""

from __future__ import annotations

import argparse
import csv
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
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


def fixes(loop: Path) -> dict[str, Any]:
    audit = json.loads((loop / "audit" / "audit.json").read_text())
    cfg = config_from_stored(audit["fingerprint"]["config"], str(loop / "audit" / "audit.json"))
    clean = by_id(load_synthetic(cfg.data.synthetic, "train")[0])
    noisy = by_id(json.loads((loop / "noisy.json").read_text()))
    cleaned = by_id(json.loads((loop / "audit" / "cleaned.json").read_text()))
    report = json.loads((loop / "audit" / "label_noise.json").read_text())
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
        "seed": cfg.seed, "noise": loop.name.split("_s")[0],
    }


def baseline_ap(noise: str, seed: int) -> tuple[float, float]:
    with SUMMARY.open(newline="") as f:
        rows = {(r["method"], r["noise"], int(r["seed"])): r for r in csv.DictReader(f) if r["status"] == "done"}
    return float(rows[("baseline", "clean", seed)]["AP"]), float(rows[("baseline", noise, seed)]["AP"])


def final_ap(run: Path) -> float:
    path = run / "metrics.json"
    return float(json.loads(path.read_text())["bbox"]["AP"]) if path.exists() else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("loops", nargs="+", type=Path)
    args = parser.parse_args()
    print("| noise | seed | relabeled (right / flipped) | removed (right / spurious) | added (right / dropped) "
          "| AP clean labels | AP noisy (sweep) | AP noisy json | AP cleaned.json | recovery |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for loop in args.loops:
        f = fixes(loop)
        ap_clean, ap_noisy = baseline_ap(f["noise"], f["seed"])
        ap_json, ap_cleaned = final_ap(loop / "train_noisy"), final_ap(loop / "train_cleaned")
        recovery = (ap_cleaned - ap_noisy) / (ap_clean - ap_noisy)
        print(f"| {f['noise']} | {f['seed']} | {f['relabeled']} ({f['relabeled_right']} / {f['flipped']}) "
              f"| {f['removed']} ({f['removed_right']} / {f['spurious']}) | {f['added']} ({f['added_right']} / "
              f"{f['dropped']}) | {ap_clean:.2f} | {ap_noisy:.2f} | {ap_json:.2f} | {ap_cleaned:.2f} "
              f"| {recovery:+.1%} |")


if __name__ == "__main__":
    main()
