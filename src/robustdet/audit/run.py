"""``robustdet audit``: check the inputs, prepare the audit folder, get the out-of-fold detections (train
and predict each fold, or one given model), score, and write the outputs (docs/audit.md).

The folder's ``audit.json`` records what the audit is of (the resolved config, the folds or the weights)
and whether it finished. A rerun of an unfinished audit of the same resumes it (finished folds skipped,
a fold's training resumed from its checkpoint); anything else in a non-empty folder is refused, unless
``--overwrite``, which rewrites the outputs and keeps the folds only when they are of the same config.
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from robustdet.audit.folds import Predictions, load_for_audit, predict_images, train_fold
from robustdet.audit.outputs import FIXES, score_split, summary_text, write_outputs
from robustdet.audit.page import write_page
from robustdet.audit.split import AuditSplit, assign_folds, load_split
from robustdet.config import Config, load_config, read_settings
from robustdet.data.noise import write_noise_report
from robustdet.engine.inference import LoadedModel
from robustdet.errors import CheckpointError, ConfigError
from robustdet.files import write_json_atomic

DEFAULT_FOLDS = 2
DEFAULT_FIX = "relabel,drop,add"
MANIFEST = "audit.json"
# what the audit writes at the top of its folder (besides fold_k/): what --overwrite may replace
OUTPUTS = ("annotations.csv", "missing.csv", "images.csv", "cleaned.json", "index.html", "label_noise.json")


@dataclass
class AuditOptions:
    config: str
    out: Path
    overrides: list[str] = field(default_factory=list)
    folds: int | None = None
    weights: str | None = None
    threshold: float = 0.5
    fix: str = DEFAULT_FIX
    overwrite: bool = False


def parse_fix(text: str) -> set[str]:
    """``--fix relabel,drop,add`` (any of them; ``none`` for none) as a set."""
    items = {item.strip() for item in text.split(",") if item.strip()}
    if items == {"none"}:
        return set()
    unknown = sorted(items - set(FIXES))
    if unknown:
        raise ConfigError(f"--fix {text}: unknown fix {', '.join(unknown)}; any of {', '.join(FIXES)}, or none")
    return items


def check_options(opts: AuditOptions) -> set[str]:
    fixes = parse_fix(opts.fix)
    if not 0.0 <= opts.threshold <= 1.0:
        raise ConfigError(f"--threshold {opts.threshold}: must be in [0, 1] (the scores are)")
    if opts.weights is not None and opts.folds is not None:
        raise ConfigError("--folds and --weights: give one (--weights scores with that model, no folds are trained)")
    if opts.weights is not None and not Path(opts.weights).is_file():
        raise FileNotFoundError(f"--weights {opts.weights}: no such checkpoint")
    return fixes


def fingerprint(cfg: Config, opts: AuditOptions) -> dict[str, Any]:
    """What the out-of-fold detections depend on: same fingerprint, same detections."""
    weights = str(Path(opts.weights).resolve()) if opts.weights else None
    return {"config": cfg.model_dump(mode="json"), "folds": None if weights else opts.folds or DEFAULT_FOLDS,
            "weights": weights}  # fmt: skip


def _comparable(stamp: Any) -> Any:
    """A fingerprint without the config settings of a switch that is off (``config.SWITCHED_KEYS``): a
    changed default of theirs leaves the detections as they were, so an audit from before it still resumes
    and is scored again without training its folds anew."""
    if not isinstance(stamp, dict) or not isinstance(stamp.get("config"), dict):
        return stamp
    return {**stamp, "config": read_settings(stamp["config"])}


def prepare_dir(out: Path, stamp: dict[str, Any], overwrite: bool) -> None:
    """Refuse, resume or (``--overwrite``) clear the audit folder; then record the audit in audit.json."""
    manifest = out / MANIFEST
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: is a file, not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not manifest.is_file():
            raise ConfigError(f"--out {out}: not empty and not an audit folder (no {MANIFEST}); give a new or empty "
                              "one")
        try:
            old = json.loads(manifest.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{manifest}: unreadable ({exc}); remove the folder or give another --out") from None
        same = _comparable(old.get("fingerprint")) == _comparable(stamp)
        if not overwrite and old.get("finished"):
            raise ConfigError(f"--out {out}: holds a finished audit ({manifest}); --overwrite to write it again")
        if not overwrite and not same:
            raise ConfigError(f"--out {out}: holds an unfinished audit of another config, --folds or --weights "
                              f"({manifest}); rerun it as it was to resume, or --overwrite to start again")
        if overwrite:
            _clear(out, keep_folds=same)
    write_json_atomic(manifest, {"version": 1, "finished": False, "fingerprint": stamp})


def _clear(out: Path, keep_folds: bool) -> None:
    for name in OUTPUTS:
        (out / name).unlink(missing_ok=True)
    if not keep_folds:
        (out / "predictions.npz").unlink(missing_ok=True)
        for fold in out.glob("fold_*"):
            shutil.rmtree(fold)


def fold_predictions(cfg: Config, split: AuditSplit, folds: int, out: Path) -> Predictions:
    """Each fold's model trained (or resumed) and its held-out images predicted; finished folds are read."""
    from tqdm import tqdm

    fold_of = assign_folds(len(split.dataset), folds, cfg.seed)
    parts = []
    fold_bar = tqdm(total=folds, desc="audit folds", unit="fold", disable=None, file=sys.stderr, position=0)
    image_bar = tqdm(total=len(split.dataset), desc="audit images", unit="img", disable=None, file=sys.stderr,
                     position=1)  # fmt: skip
    try:
        for k in range(folds):
            fold_dir = out / f"fold_{k}"
            held_out = np.flatnonzero(fold_of == k).tolist()
            done = fold_dir / "predictions.npz"
            if not done.is_file():
                fold_dir.mkdir(parents=True, exist_ok=True)
                ids = {split.dataset.image_ids[i] for i in held_out}
                # the trainer's own console goes to fold_k/train.log: the bar says where its progress is
                fold_bar.set_description(f"audit fold {k + 1}/{folds}: training ({fold_dir / 'train.log'})")
                loaded = load_for_audit(train_fold(cfg, split, ids, fold_dir))
                fold_bar.set_description(f"audit fold {k + 1}/{folds}: predicting")
                predict_images(loaded, split, held_out, cfg.eval.batch_size, image_bar).save(done)
            else:
                image_bar.update(len(held_out))
            parts.append(Predictions.load(done))
            fold_bar.update(1)
    finally:
        image_bar.close()
        fold_bar.close()
    return Predictions.concat(parts)


def load_weights(weights: str, split: AuditSplit) -> LoadedModel:
    """The ``--weights`` model, checked against the split's categories."""
    loaded = load_for_audit(Path(weights))
    if loaded.category_ids != split.dataset.category_ids:
        raise CheckpointError(f"--weights {weights}: the model's categories {loaded.category_ids[:5]}... differ "
                              f"from data.train's {split.dataset.category_ids[:5]}...")
    return loaded


def weights_predictions(loaded: LoadedModel, split: AuditSplit, batch_size: int, out: Path) -> Predictions:
    """The ``--weights`` model's detections of every image, kept in DIR/predictions.npz (read on a rerun)."""
    done = out / "predictions.npz"
    if not done.is_file():
        predict_images(loaded, split, list(range(len(split.dataset))), batch_size).save(done)
    return Predictions.load(done)


def run_audit(opts: AuditOptions) -> str:
    """The whole audit; returns the summary to print. Every check that can fail on the inputs runs before
    the folder is touched."""
    fixes = check_options(opts)
    cfg = load_config(opts.config, opts.overrides)
    split = load_split(cfg)
    loaded = load_weights(opts.weights, split) if opts.weights is not None else None
    if loaded is None:
        assign_folds(len(split.dataset), opts.folds or DEFAULT_FOLDS, cfg.seed)  # K < 2, K > images
    out = opts.out
    prepare_dir(out, fingerprint(cfg, opts), opts.overwrite)
    if loaded is None:
        try:
            preds = fold_predictions(cfg, split, opts.folds or DEFAULT_FOLDS, out)
        except KeyboardInterrupt:  # the fold's checkpoint is saved (its train.log says where)
            print(f"robustdet audit: stopped; the same command resumes the audit in {out}", file=sys.stderr)
            raise
    else:
        preds = weights_predictions(loaded, split, cfg.eval.batch_size, out)
    result = score_split(split, preds, opts.threshold)
    rows, done = write_outputs(result, out, fixes)
    write_page(result, out)
    if split.dataset.label_noise is not None:
        write_noise_report(split.dataset.label_noise, out / "label_noise.json")
    manifest = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
    write_json_atomic(out / MANIFEST, {**manifest, "finished": True, "image_root": str(split.dataset.image_root),
                                       "source": split.base_name, "threshold": opts.threshold,
                                       "fix": sorted(fixes)})  # fmt: skip
    return summary_text(result, rows, done, out)
