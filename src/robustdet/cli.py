"""The ``robustdet`` command line: train, sweep, eval, predict, export, convert, noise, report, compare,
audit, plot-losses.

Known errors (bad config, bad dataset, bad checkpoint, missing file, a diverged run, a lost rank) end
with one line naming the file, image or key, and exit code 2; ``--debug`` shows the traceback instead.
SIGINT (Ctrl-C) and SIGTERM during training save a checkpoint and exit with 130 and 143 (128 + the
signal number, the shell's convention). See docs/robustness.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from robustdet.config import load_config
from robustdet.errors import ConfigError, SweepFailed

EXIT_USAGE = 2
EXIT_SIGINT = 130


def _cmd_train(args: argparse.Namespace) -> int:
    from robustdet.engine.trainer import Trainer

    cfg = load_config(args.config, args.overrides)
    out = Path(args.out) if args.out else Path("runs") / Path(args.config).stem
    if not args.resume and (out / "checkpoints" / "last.pt").exists() and not args.overwrite:
        raise ConfigError(
            f"{out}: already holds a run with checkpoints; use --resume to continue it, "
            "--overwrite to start it again, or another --out"
        )
    metrics = Trainer(cfg, out, resume=args.resume).train()
    if metrics is not None and os.environ.get("RANK", "0") == "0":
        print(f"run directory: {out}  (metrics.json, log.jsonl, checkpoints/last.pt, tensorboard/)")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from robustdet.data import build_dataset, build_eval_loader
    from robustdet.engine.evaluator import evaluate, format_metrics
    from robustdet.engine.inference import load_trained, per_class_table

    overrides = [*args.overrides, *(f"data.{item}" for item in args.data)]
    loaded = load_trained(args.checkpoint, overrides)
    cfg = loaded.cfg
    dataset = build_dataset(cfg.data.val, cfg.data, train=False)
    if dataset.classes != loaded.classes:
        raise ConfigError(
            f"{args.checkpoint}: the model's classes differ from data.val's "
            f"({loaded.classes[:3]}... vs {dataset.classes[:3]}...)"
        )
    loader = build_eval_loader(dataset, cfg.eval.batch_size, cfg.data.num_workers, max_images=cfg.eval.max_images)
    results: list[dict] = []
    metrics = evaluate(loaded.model, loader, dataset, loaded.device, keep_results=results, backend=cfg.eval.backend)
    metrics["iter"] = loaded.iteration
    print(format_metrics(metrics))
    print(per_class_table(metrics, dataset.coco, dataset.image_ids[: cfg.eval.max_images]))
    metrics_path, results_path = _eval_outputs(args)
    if metrics_path is not None:
        if metrics_path != Path(args.out):  # --out DIR
            metrics_path.parent.mkdir(parents=True, exist_ok=True)
        metrics_path.write_text(json.dumps(metrics, indent=2) + "\n")
        print(f"metrics written to {metrics_path}")
    if results_path is not None:
        from robustdet.files import write_json_atomic

        results_path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(results_path, results, indent=None)
        print(f"{len(results)} detections (COCO results) written to {results_path}")
    return 0


def _eval_outputs(args: argparse.Namespace) -> tuple[Path | None, Path | None]:
    """Where ``eval`` writes the metrics and the COCO results. ``--out DIR``: DIR/metrics.json, and with
    ``--save-json`` DIR/detections.json, as ``predict --out DIR --save-json``; ``--out FILE.json``: the
    metrics file itself, detections.json beside it. ``--save-json FILE`` (the old form) still names the
    results file, with a one-line deprecation notice."""
    out = Path(args.out) if args.out else None
    metrics = None if out is None else out if out.suffix == ".json" else out / "metrics.json"
    if isinstance(args.save_json, str):
        print(f"robustdet eval: warning: --save-json {args.save_json} is deprecated; use --save-json with "
              "--out DIR, which writes DIR/detections.json", file=sys.stderr)  # fmt: skip
        return metrics, Path(args.save_json)
    if not args.save_json:
        return metrics, None
    if metrics is None:
        raise ConfigError("eval --save-json: needs --out DIR (detections.json and metrics.json go there)")
    return metrics, metrics.parent / "detections.json"


def _override_taken_as_file(args: argparse.Namespace) -> list[str]:
    """``eval CKPT --save-json KEY=VALUE``: argparse hands the override to ``--save-json`` (its old FILE
    form takes a value); give it back to the overrides, in its place."""
    value = getattr(args, "save_json", None)
    if args.command != "eval" or not isinstance(value, str) or "=" not in value:
        return []
    args.save_json = True
    return [value]


def _cmd_predict(args: argparse.Namespace) -> int:
    from robustdet.engine.inference import class_filter, collect_images, image_ids_from, load_trained, predict

    if args.batch < 1:
        raise ConfigError(f"--batch {args.batch}: must be at least 1")
    loaded = load_trained(args.checkpoint)
    paths, root = collect_images(args.images)
    classes = None
    if args.classes:
        wanted = [c.strip() for item in args.classes for c in item.split(",") if c.strip()]
        classes = class_filter(loaded, wanted, "--classes")
    ids = image_ids_from(Path(args.image_ids), paths) if args.image_ids else None
    out = Path(args.out)
    records, coco = predict(loaded, paths, out, score_thresh=args.score_thresh, batch_size=args.batch,
                            root=root, classes=classes, image_ids=ids)
    for r in records:
        print(f"{r['image']}: {len(r['detections'])} detections -> {r['output']}")
    if args.save_json:
        from robustdet.files import write_json_atomic

        write_json_atomic(out / "detections.json", coco, indent=None)
        print(f"{len(coco)} detections (COCO results) written to {out / 'detections.json'}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from robustdet.engine.export import export_model

    out = export_model(
        args.checkpoint,
        args.format,
        args.out,
        dynamic=args.dynamic,
        size=tuple(args.size) if args.size else None,
        overrides=args.overrides,
    )
    print(f"wrote {out} ({args.format}, {'dynamic' if args.dynamic else 'fixed'} size; see docs/export.md)")
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from robustdet.data import convert_to_coco

    image_root = convert_to_coco(args.format, args.path, args.split, args.out)
    print(f"wrote {args.out}; its file_names are relative to {image_root}")
    print(f"use it as: {{format: coco, path: {args.out}, image_root: {image_root}}}")
    return 0


def _cmd_noise(args: argparse.Namespace) -> int:
    from robustdet.data.noise import NOISE_KINDS, label_noise_config, noise_coco_file

    options = {k: getattr(args, k) for k in (*NOISE_KINDS, "flip_mode", "seed")}
    cfg = label_noise_config(options, name_of=lambda key: "--" + key.replace("_", "-"))
    sidecar, report = noise_coco_file(args.src, args.dst, cfg)
    realised = ", ".join(f"{k} {report['realised'][k]:.4f} ({report['counts'][k]})" for k in NOISE_KINDS)
    print(f"wrote {args.dst} ({report['annotations']} boxes; realised {realised}) and {sidecar}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from robustdet.report import make_report, methods_summary, metrics_markdown
    from robustdet.runs.reader import read_log, read_metrics

    files = make_report(args.run_dir)
    if (Path(args.run_dir) / "metrics.json").exists():
        print(metrics_markdown(read_metrics(args.run_dir)))
    print("report files:")
    for f in files:
        print(f"  {f}")
    print("\n".join(methods_summary(read_log(Path(args.run_dir)))))
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    from robustdet.errors import TrainingDiverged
    from robustdet.runs.launch import child_args, launch
    from robustdet.runs.sweep import plan_text
    from robustdet.runs.sweep_spec import build_cells, select_cells, spec_from_args

    spec = spec_from_args(args.config, args.overrides, args.grid, args.seeds)
    cells = build_cells(spec)
    only = select_cells(cells, spec, args.only) if args.only else None
    out = Path(args.out)
    if args.dry_run:
        print(plan_text(spec, cells if only is None else only, out))
        return 0
    child = child_args(args.config, args.overrides, args.grid, args.only, args.seeds, out)
    diverged = launch(spec, cells, out, only=only, executor=args.executor, jobs=args.jobs, slurm=args.slurm,
                      child_args=child)
    print(f"sweep directory: {out}  (summary.csv; compare with: robustdet compare {out})")
    if diverged:
        raise TrainingDiverged(f"{out}: {len(diverged)} cells diverged ({', '.join(diverged)}); see their events.jsonl")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from robustdet.runs.compare import DEFAULT_METRICS, build_comparison, format_runs
    from robustdet.runs.reader import expand_run_dirs, load_run

    paths, notes = expand_run_dirs(args.run_dirs)
    metrics = _metric_names(args.metrics, "--metrics") if args.metrics else list(DEFAULT_METRICS)
    plot_metrics = _metric_names(args.plot_metrics or "AP", "--plot-metrics")
    if args.plot_metrics and not args.plot:
        raise ConfigError("compare: --plot-metrics needs --plot DIR (where the figures go)")
    by = args.by.split(",") if args.by else None
    runs = [load_run(p) for p in paths]
    comp = build_comparison(runs, args.baseline, by, metrics, notes)
    for w in comp.warnings:
        print(f"robustdet compare: warning: {w}", file=sys.stderr)
    if not (comp.replicated or args.baseline or args.plot):
        print(format_runs(runs, metrics))  # one run per setting: the plain side-by-side table
        print("".join(f"note: {n}\n" for n in notes), end="")
        return 0
    print(comp.text())
    if args.plot:
        from robustdet.plots.compare_figures import plot_comparison

        for metric in plot_metrics:
            for f in plot_comparison(comp.groups, Path(args.plot), comp.base, metric):
                print(f"wrote {f}")
    return 0


def _metric_names(text: str, option: str) -> list[str]:
    """A comma list of the 12 COCO numbers' names (AP, AP50, ..., ARl), checked: a typo would otherwise
    print a column of dashes."""
    from robustdet.engine.evaluator import METRIC_NAMES

    names = [n.strip() for n in text.split(",")]
    unknown = [n for n in names if n not in METRIC_NAMES]
    if unknown:
        raise ConfigError(f"compare {option}: unknown metric {', '.join(unknown)}; one of {', '.join(METRIC_NAMES)}")
    return names


def _cmd_audit(args: argparse.Namespace) -> int:
    from robustdet.audit.run import AuditOptions, run_audit

    print(run_audit(AuditOptions(args.config, Path(args.out), args.overrides, args.folds, args.weights,
                                 args.threshold, args.fix, args.overwrite)))
    return 0


def _cmd_plot_losses(args: argparse.Namespace) -> int:
    from robustdet.plots.loss_figures import plot_paper_figures

    for path in plot_paper_figures(Path(args.out)):
        print(f"wrote {path}")
    return 0


def _add_train(sub: Any) -> None:
    p = sub.add_parser("train", help="train a detector from a YAML config")
    p.add_argument("config", help="YAML config, e.g. configs/default.yaml")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. train.max_iter=200")
    p.add_argument("--out", help="run directory (default: runs/<config name>)")
    p.add_argument("--resume", action="store_true", help="continue from the run directory's last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="start again in a run directory that has checkpoints")
    p.set_defaults(func=_cmd_train)


def _add_sweep(sub: Any) -> None:
    p = sub.add_parser("sweep", help="train the product of a grid and seeds, one run directory per cell")
    p.add_argument("config", help="a run config (with --grid) or a sweep file (config, overrides, seeds, grid)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides for every cell")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2", help="an axis (repeatable)")
    p.add_argument("--seeds", metavar="0,1,2", help="the seeds (default: the sweep file's, else the config's)")
    p.add_argument("--out", required=True, help="the sweep directory: one folder per cell, summary.csv")
    p.add_argument("--dry-run", action="store_true", help="list the cells and iterations; train nothing")
    p.add_argument(
        "--only", action="append", default=[], metavar="AXIS=L1,L2",
        help="train only the cells with these labels (repeatable); summary.csv still lists every finished cell",
    )  # fmt: skip
    p.add_argument(
        "--jobs", type=int, metavar="N",
        help="train N cells at a time: in N processes sharing the cores (default 1), or N jobs at a time "
        "with --executor",
    )  # fmt: skip
    p.add_argument(
        "--executor", choices=["slurm", "local"],
        help="one submitit job per cell: on SLURM, or as local processes (docs/distributed.md)",
    )  # fmt: skip
    p.add_argument(
        "--slurm", action="append", default=[], metavar="KEY=VALUE",
        help="a submitit option over the sweep file's slurm: section (repeatable): partition=gpu timeout_min=240",
    )  # fmt: skip
    p.set_defaults(func=_cmd_sweep)


def _add_eval(sub: Any) -> None:
    p = sub.add_parser("eval", help="COCO-evaluate a checkpoint on its config's data.val (or another dataset)")
    p.add_argument("checkpoint")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. data.val.path=other.json eval.max_images=50")
    p.add_argument("--data", action="append", default=[], metavar="KEY=VALUE",
                   help="a data-section override (repeatable): --data val.format=coco --data val.path=x.json")
    p.add_argument("--out", metavar="DIR", help="write DIR/metrics.json (a path ending in .json: the metrics file)")
    p.add_argument("--save-json", nargs="?", const=True, metavar="FILE",
                   help="also write detections.json (COCO results) into --out DIR (the FILE form is deprecated)")
    p.set_defaults(func=_cmd_eval)


def _add_predict(sub: Any) -> None:
    p = sub.add_parser("predict", help="draw a checkpoint's detections on images, folders or globs")
    p.add_argument("checkpoint")
    p.add_argument("images", nargs="+", help="image files, folders (searched recursively) or globs ('imgs/**/*.jpg')")
    p.add_argument("--out", required=True, help="folder for the drawn images (the inputs' tree) and predictions.json")
    p.add_argument("--score-thresh", type=float, default=0.3)
    p.add_argument("--batch", type=int, default=1, help="images per forward pass")
    p.add_argument("--classes", action="append", metavar="NAMES_OR_IDS",
                   help="keep only these classes: names or dataset category ids, comma-separated or repeated")
    p.add_argument("--save-json", action="store_true", help="also write detections.json (COCO results) into --out DIR")
    p.add_argument("--image-ids", metavar="COCO_JSON",
                   help="take image_id from this COCO json's images (by file_name); default: a numeric file stem")
    p.set_defaults(func=_cmd_predict)


def _add_export(sub: Any) -> None:
    p = sub.add_parser("export", help="export a checkpoint's detector (pre- and post-processing included)")
    p.add_argument("checkpoint")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. model.score_thresh=0.3")
    p.add_argument("--format", required=True, metavar="{onnx,torchscript}")
    p.add_argument("--out", required=True, help="the file to write, e.g. model.onnx or model.pt")
    p.add_argument("--dynamic", action="store_true", help="ONNX: any input height and width (default: --size only)")
    p.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="input size (default: model.min_size square)")
    p.set_defaults(func=_cmd_export)


def _add_convert(sub: Any) -> None:
    p = sub.add_parser("convert", help="convert a YOLO or Pascal VOC dataset split to COCO json")
    p.add_argument("--format", required=True, choices=["yolo", "voc"])
    p.add_argument("--path", required=True, help="YOLO data.yaml, or the VOC20xx folder")
    p.add_argument("--split", required=True, help="YOLO data.yaml key or VOC ImageSets/Main list")
    p.add_argument("--out", required=True, help="the COCO json to write")
    p.set_defaults(func=_cmd_convert)


def _add_noise(sub: Any) -> None:
    p = sub.add_parser("noise", help="write a copy of a COCO json with synthetic label noise (and a report)")
    p.add_argument("src", help="the COCO json to read (never modified)")
    p.add_argument("dst", help="the noisy COCO json to write; the report goes to DST-stem.label_noise.json")
    p.add_argument("--class-flip", type=float, default=0.0, help="probability that a box changes class")
    p.add_argument("--flip-mode", default="uniform", help="uniform (any other class) or pairs (0<->1, 2<->3, ...)")
    p.add_argument("--box-jitter", type=float, default=0.0, help="r: each edge moves by U(-r, r) x width/height")
    p.add_argument("--drop", type=float, default=0.0, help="probability that a box is removed")
    p.add_argument("--spurious", type=float, default=0.0, help="expected number of added boxes per box")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_noise)


def _add_report(sub: Any) -> None:
    p = sub.add_parser("report", help="plots of losses, weights, RLO probabilities and σ; the metrics table")
    p.add_argument("run_dir")
    p.set_defaults(func=_cmd_report)


def _add_compare(sub: Any) -> None:
    p = sub.add_parser("compare", help="side-by-side metrics of runs; mean ± std over seeds, paired differences")
    p.add_argument("run_dirs", nargs="+", help="run directories, or a sweep directory (its finished cells)")
    p.add_argument("--baseline", help="a group label, a run, or labels such as method=baseline")
    p.add_argument("--by", metavar="KEY,...", help="the config keys or sections (loss.) the comparison is about")
    p.add_argument("--metrics", metavar="AP,AP50,...", help="the COCO numbers to show")
    p.add_argument("--plot", metavar="DIR", help="write AP-vs-iteration and final-AP figures here")
    p.add_argument("--plot-metrics", metavar="AP,AP50,...",
                   help="the COCO numbers to draw, a set of figures each (default AP)")
    p.set_defaults(func=_cmd_compare)


def _add_audit(sub: Any) -> None:
    from robustdet.audit.run import DEFAULT_FIX, DEFAULT_FOLDS

    p = sub.add_parser("audit", help="find label errors in data.train from out-of-fold detections (docs/audit.md)")
    p.add_argument("config", help="the run config whose data.train is audited (and whose model the folds train)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, as for train")
    p.add_argument("--out", required=True, help="the audit folder: csv files, cleaned.json, index.html, fold_k/")
    p.add_argument("--folds", type=int, help=f"train K fold models, each on the other folds (default {DEFAULT_FOLDS})")
    p.add_argument("--weights", metavar="CKPT", help="score with this checkpoint instead of training folds")
    p.add_argument("--threshold", type=float, default=0.5, help="score at which an annotation is a suspect (0.5)")
    p.add_argument("--fix", default=DEFAULT_FIX, metavar="relabel,drop,add",
                   help=f"the fixes cleaned.json applies above --threshold, or none (default {DEFAULT_FIX})")
    p.add_argument("--overwrite", action="store_true", help="write over a finished audit in --out")
    p.set_defaults(func=_cmd_audit)


def _add_plot_losses(sub: Any) -> None:
    p = sub.add_parser("plot-losses", help="the papers' Figures 1 and 2 (Bayesian smooth L1 and focal)")
    p.add_argument("--out", required=True)
    p.set_defaults(func=_cmd_plot_losses)


# the subcommands, in the order ``robustdet --help`` lists them: each adds its parser (and its ``func``)
COMMANDS: tuple[Callable[[Any], None], ...] = (
    _add_train, _add_sweep, _add_eval, _add_predict, _add_export,
    _add_convert, _add_noise, _add_report, _add_compare, _add_audit, _add_plot_losses,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="robustdet",
        description="Train object detectors with Bayesian losses and AVW/RLO multi-scale loss weighting.",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)
    for add_command in COMMANDS:
        add_command(sub)
    return parser


def _known_errors() -> tuple[type[BaseException], ...]:
    from robustdet.errors import CheckpointError, DatasetError, DistributedFailure, ExportError, TrainingDiverged

    return (
        ConfigError, DatasetError, CheckpointError, TrainingDiverged, DistributedFailure, FileNotFoundError,
        ExportError, SweepFailed,
    )


def _message(exc: BaseException) -> str:
    """The error's own message; one re-raised from a DataLoader worker carries the worker's traceback
    ("Caught DatasetError in DataLoader worker process 0. Original Traceback ..."): keep what follows
    the traceback's last ``DatasetError: ``."""
    text = str(exc)
    if text.startswith("Caught ") and "Original Traceback" in text:
        marker = f"{type(exc).__name__}: "
        if marker in text:
            return text.rsplit(marker, 1)[1].strip()
    return text


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if hasattr(args, "overrides"):
        args.overrides = [*args.overrides, *_override_taken_as_file(args)]
    if rest:
        # argparse leaves KEY=VALUE after options unmatched (`train CONFIG --out DIR KEY=VALUE`)
        options = [r for r in rest if r.startswith("-")]
        if args.command not in ("train", "sweep", "eval", "audit") or options:
            parser.error(f"unrecognized arguments: {' '.join(options or rest)}")
        args.overrides = [*args.overrides, *rest]
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt as exc:
        print(f"robustdet: interrupted ({exc or 'SIGINT'})", file=sys.stderr)
        return int(getattr(exc, "exit_code", EXIT_SIGINT))
    except Exception as exc:
        if args.debug or not isinstance(exc, _known_errors()):
            raise
        print(f"robustdet {args.command}: error: {_message(exc)}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
