import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
COCO128 = REPO.parent / "shared" / "data" / "coco128"

# Tests run two at a time (pytest -n 2) on 2 cores: one thread each keeps them from fighting.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _finite_checks_left_on() -> Iterator[None]:
    """A test that leaves the losses' input checks off (the trainer turns them off for its loop) would make
    later tests of those checks fail far from the cause: the test that leaked them fails instead."""
    from robustdet.losses import finite_checks_enabled, set_finite_checks

    yield
    if not finite_checks_enabled():
        set_finite_checks(True)
        pytest.fail("the losses' finite checks were left switched off (set_finite_checks)")


@pytest.fixture(scope="module", autouse=True)
def _drop_module_temp_dirs(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Remove the temp dirs a module made (``tmp_path_factory.mktemp``: its module-scoped runs) once it passed.

    pytest removes a passed test's ``tmp_path`` at once, but ``mktemp`` dirs only at the end of the session,
    so without this the suite's checkpoints piled up to 8.9 GB. Runs after the module's other fixtures are
    torn down (autouse fixtures are set up first); a module with a failure keeps everything for inspection.
    """
    base = tmp_path_factory.getbasetemp()
    before = set(base.iterdir())
    failed = request.session.testsfailed
    yield
    if request.session.testsfailed == failed:
        for path in set(base.iterdir()) - before:
            shutil.rmtree(path, ignore_errors=True)


def tiny_overrides(tmp_path: Path, extra: dict[str, object] | None = None) -> list[str]:
    """A RetinaNet small enough to train a few iterations in seconds on synthetic 64 px images.

    The body is ``model.backbone=tiny`` (6,680 parameters, models/backbones.py): a whole run's checkpoint
    is well under 1 MB where ResNet-18's is 136 MB (weights + AdamW state). Tests whose point needs a real
    ResNet pass ``{"model.backbone": "resnet18"}`` (DDP's several gradient buckets, the bitwise resume after
    SIGKILL). ``num_classes`` is pinned at 5, the tests' count, whatever configs/default.yaml says.
    """
    base = {
        "model.backbone": "tiny",
        "model.fpn_channels": 16,
        "model.head_norm": "group_norm",
        "model.group_norm_groups": 4,
        "model.min_size": 64,
        "model.max_size": 64,
        "model.anchor_sizes": "[8, 16, 32, 64, 128]",
        "data.synthetic.image_size": 64,
        "data.synthetic.num_classes": 5,
        "data.synthetic.num_train": 24,
        "data.synthetic.num_val": 6,
        "data.synthetic.cache_dir": str(tmp_path / "cache"),
        "data.num_workers": 0,
        "train.max_iter": 4,
        "train.batch_size": 2,
        "train.num_threads": 1,
        "train.optimizer.name": "adamw",
        "train.optimizer.lr": 0.0005,
        "train.schedule.warmup_iters": 1,
        "eval.batch_size": 3,
        "log.period": 1,
        "log.progress": False,
        "checkpoint.period": 2,
    }
    base.update(extra or {})
    return [f"{k}={v}" for k, v in base.items() if v is not None]  # None: leave the key out


def same_state(a: Any, b: Any) -> bool:
    """Exact equality through nested dicts and lists of tensors and plain values."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_state(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return type(a) is type(b) and len(a) == len(b) and all(same_state(x, y) for x, y in zip(a, b, strict=True))
    return a == b
