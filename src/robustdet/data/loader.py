"""Data loaders whose order is a pure function of (seed, iteration), so a resumed run sees the same data.

The training stream is an endless concatenation of per-epoch permutations of the dataset; global
batch ``i`` is the slice ``[i*B*W, (i+1)*B*W)`` of it (B per-process batch size, W world size), of
which rank ``r`` takes ``[i*B*W + r*B, i*B*W + (r+1)*B)``. Every element carries a sample seed derived
from (seed, stream position), which alone decides the sample's augmentation (see DetectionDataset).
"""

from __future__ import annotations

import hashlib
import os
import signal
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

_MASK63 = (1 << 63) - 1


def hash63(domain: str, *values: int) -> int:
    """63 bits of BLAKE2b-64 over ``"domain:v1,v2,..."`` (little-endian, top bit dropped).

    63 bits so that it is a valid non-negative int64 anywhere a seed travels (tensors, numpy).
    """
    text = f"{domain}:{','.join(str(int(v)) for v in values)}".encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") & _MASK63


def epoch_seed(seed: int, epoch: int) -> int:
    return hash63("robustdet.epoch", seed, epoch)


def sample_seed(seed: int, position: int) -> int:
    return hash63("robustdet.sample", seed, position)


class InfiniteBatchSampler(Sampler[list[tuple[int, int]]]):
    """Batches of ``(index, sample_seed)``; batch ``i`` depends on (seed, i, rank, world size) only.

    Starting at ``start_iter=k`` yields exactly the batches an uninterrupted sampler yields from its
    k-th on. ``max_iter`` (exclusive) ends the stream; None makes it endless.
    """

    def __init__(
        self,
        dataset_size: int,
        batch_size: int,
        seed: int,
        start_iter: int = 0,
        max_iter: int | None = None,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
    ) -> None:
        if dataset_size < 1:
            raise ValueError(f"InfiniteBatchSampler: the dataset is empty (dataset_size={dataset_size})")
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(
                f"InfiniteBatchSampler: bad batch_size={batch_size}, rank={rank}, world_size={world_size}"
            )
        if start_iter < 0 or (max_iter is not None and max_iter < start_iter):
            raise ValueError(f"InfiniteBatchSampler: bad start_iter={start_iter}, max_iter={max_iter}")
        self.dataset_size = dataset_size
        self.batch_size = batch_size
        self.seed = seed
        self.start_iter = start_iter
        self.max_iter = max_iter
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self._perms: dict[int, torch.Tensor] = {}

    def _permutation(self, epoch: int) -> torch.Tensor:
        perm = self._perms.get(epoch)
        if perm is None:
            generator = torch.Generator().manual_seed(epoch_seed(self.seed, epoch))
            perm = torch.randperm(self.dataset_size, generator=generator)
            # a batch spans at most two epochs (or many when the dataset is smaller than a batch)
            if len(self._perms) >= 2:
                self._perms.pop(min(self._perms))
            self._perms[epoch] = perm
        return perm

    def index_at(self, position: int) -> int:
        epoch, offset = divmod(position, self.dataset_size)
        return int(self._permutation(epoch)[offset]) if self.shuffle else offset

    def batch(self, iteration: int) -> list[tuple[int, int]]:
        """This rank's part of global batch ``iteration``."""
        start = (iteration * self.world_size + self.rank) * self.batch_size
        return [(self.index_at(p), sample_seed(self.seed, p)) for p in range(start, start + self.batch_size)]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        iteration = self.start_iter
        while self.max_iter is None or iteration < self.max_iter:
            yield self.batch(iteration)
            iteration += 1

    def __len__(self) -> int:
        if self.max_iter is None:
            raise TypeError("an InfiniteBatchSampler without max_iter has no length")
        return self.max_iter - self.start_iter


def aspect_groups(dataset: Any) -> list[int]:
    """0 for images with width >= height (landscape, square), 1 for width < height, by annotated size."""
    return [int(w < h) for h, w in (dataset.annotated_size(i) for i in range(len(dataset)))]


class AspectRatioBatchSampler(InfiniteBatchSampler):
    """``InfiniteBatchSampler`` whose batches each hold images of one aspect group only.

    Padding a landscape and a portrait image to one canvas wastes about half of it; torchvision's
    GroupedBatchSampler and detectron2's AspectRatioGroupedDataset avoid that by batching within
    groups, but their batches depend on the order images arrive in, which a resume cannot replay.
    Here every batch is a function of (seed, epoch, index): epoch ``e``'s permutation (the same as
    InfiniteBatchSampler's) is split into the groups, keeping its order; each group is cut into
    batches of ``batch_size``; the last, short batch of a group is filled up with that group's first
    images of the epoch (so per epoch every image appears once, and at most batch_size - 1 images per
    group a second time; a group smaller than a batch repeats cyclically); the epoch's batches are put
    in an order drawn from ``hash63("robustdet.batch_order", seed, e)``. The ranks take consecutive
    batches of that stream: global batch ``i`` is stream batches ``[i*W, (i+1)*W)``, rank ``r`` takes
    ``i*W + r``. Sample seeds are ``sample_seed(seed, k*B + j)`` for slot ``j`` of stream batch ``k``.
    """

    def __init__(
        self,
        groups: Sequence[int],
        batch_size: int,
        seed: int,
        start_iter: int = 0,
        max_iter: int | None = None,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
    ) -> None:
        super().__init__(len(groups), batch_size, seed, start_iter, max_iter, rank, world_size, shuffle)
        self.groups = torch.as_tensor(list(groups), dtype=torch.int64)
        sizes = torch.bincount(self.groups, minlength=2).tolist()
        if len(sizes) > 2:
            raise ValueError(f"AspectRatioBatchSampler: groups must be 0 or 1, got {sorted(set(groups))}")
        # constant over epochs, so stream batch k lies in epoch k // batches_per_epoch
        self.batches_per_epoch = sum(-(-n // batch_size) for n in sizes)
        self._epoch_batches: dict[int, torch.Tensor] = {}

    def _batches(self, epoch: int) -> torch.Tensor:
        """[batches_per_epoch, batch_size] indices of ``epoch``, in the epoch's batch order."""
        batches = self._epoch_batches.get(epoch)
        if batches is None:
            perm = self._permutation(epoch) if self.shuffle else torch.arange(self.dataset_size)
            chunks = []
            for group in (0, 1):
                members = perm[self.groups[perm] == group]
                if len(members):
                    count = -(-len(members) // self.batch_size) * self.batch_size
                    chunks.append(members[torch.arange(count) % len(members)].view(-1, self.batch_size))
            batches = torch.cat(chunks)
            if self.shuffle:
                generator = torch.Generator().manual_seed(hash63("robustdet.batch_order", self.seed, epoch))
                batches = batches[torch.randperm(len(batches), generator=generator)]
            if len(self._epoch_batches) >= 2:
                self._epoch_batches.pop(min(self._epoch_batches))
            self._epoch_batches[epoch] = batches
        return batches

    def batch(self, iteration: int) -> list[tuple[int, int]]:
        """This rank's batch of global batch ``iteration``."""
        k = iteration * self.world_size + self.rank
        epoch, index = divmod(k, self.batches_per_epoch)
        indices = self._batches(epoch)[index].tolist()
        return [(i, sample_seed(self.seed, k * self.batch_size + j)) for j, i in enumerate(indices)]


# How long a data worker outlives a SIGTERM while its main process is alive (see ignore_stop_signals).
WORKER_SIGTERM_GRACE_S = 10.0
_worker_parent: int | None = None
_worker_term_timer: threading.Timer | None = None


def _worker_sigterm(signum: int, frame: Any) -> None:
    global _worker_term_timer
    if os.getppid() != _worker_parent:  # the main process is gone: nothing to wait for
        os._exit(0)
    if _worker_term_timer is None:
        _worker_term_timer = threading.Timer(WORKER_SIGTERM_GRACE_S, os._exit, args=(0,))
        _worker_term_timer.daemon = True
        _worker_term_timer.start()


def ignore_stop_signals(worker_id: int) -> None:
    """worker_init_fn: SIGINT and SIGTERM are the main process's to handle.

    Ctrl-C, and schedulers such as SLURM, signal the whole process group. A worker that died of it would
    make the loader raise in the main process while that one finishes its step and saves a checkpoint.
    So a worker ignores SIGINT, and outlives a SIGTERM by WORKER_SIGTERM_GRACE_S (enough to deliver the
    batches the main process still needs), then exits with status 0 (which the loader does not treat as
    a crash); the main process normally shuts it down before that.
    """
    global _worker_parent
    _worker_parent = os.getppid()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _worker_sigterm)


def shutdown_workers(loader_or_iterator: Any) -> None:
    """Stop the worker processes of a DataLoader (its persistent iterator) or of a DataLoader iterator now.

    Normally that happens when the iterator is garbage-collected. An exception's traceback can keep it
    (the ``self`` of ``__next__``) alive until interpreter exit, where multiprocessing SIGTERMs the
    workers and waits for them, and they outlive a SIGTERM by WORKER_SIGTERM_GRACE_S.
    """
    iterator = getattr(loader_or_iterator, "_iterator", loader_or_iterator)
    shutdown = getattr(iterator, "_shutdown_workers", None)
    if callable(shutdown):
        shutdown()
    if getattr(loader_or_iterator, "_iterator", None) is not None:
        loader_or_iterator._iterator = None


def collate(batch: Sequence[tuple[Any, Any]]) -> tuple[list[Any], list[Any]]:
    """(list of images, list of targets): detectors take lists, as images differ in size."""
    return [sample[0] for sample in batch], [sample[1] for sample in batch]


def build_train_loader(
    dataset: Dataset[Any],
    batch_size: int,
    seed: int,
    start_iter: int = 0,
    max_iter: int | None = None,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    pin_memory: bool = False,
    group_aspect_ratio: bool = False,
) -> DataLoader[Any]:
    """The training loader: batch ``i`` (from ``start_iter``) is the same whatever the number of workers.

    No seeding worker_init_fn is needed: each sample carries its own seed, so worker RNG states do not
    matter (the workers' init only leaves SIGINT/SIGTERM to the main process). Starting the loader leaves
    the global torch RNG untouched. ``group_aspect_ratio`` batches landscape and portrait images apart
    (AspectRatioBatchSampler; the dataset needs ``annotated_size``). ``pin_memory`` is for CUDA only.
    """
    sampler = (
        AspectRatioBatchSampler(aspect_groups(dataset), batch_size, seed, start_iter, max_iter, rank, world_size)
        if group_aspect_ratio
        else InfiniteBatchSampler(
            len(dataset),  # type: ignore[arg-type]
            batch_size,
            seed,
            start_iter=start_iter,
            max_iter=max_iter,
            rank=rank,
            world_size=world_size,
        )
    )
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        pin_memory=pin_memory,
        worker_init_fn=ignore_stop_signals,
        # DataLoader draws its workers' base seed from this generator; without one it would take a
        # number from the global RNG each time an iterator starts, shifting the caller's stream
        generator=torch.Generator().manual_seed(hash63("robustdet.loader", seed)),
    )


def eval_shard(dataset_size: int, rank: int, world_size: int) -> range:
    """Rank ``rank``'s contiguous slice of the dataset: sizes differ by at most one, no padding."""
    return range(dataset_size * rank // world_size, dataset_size * (rank + 1) // world_size)


def build_eval_loader(
    dataset: Dataset[Any],
    batch_size: int,
    num_workers: int,
    rank: int = 0,
    world_size: int = 1,
    max_images: int | None = None,
) -> DataLoader[Any]:
    """Sequential batches of this rank's contiguous shard; every image is seen exactly once overall.

    ``max_images`` keeps the first N images only (quick evaluations during training); the evaluator
    scores exactly the images it was given, so the metrics are those of that subset.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"build_eval_loader: bad rank={rank}, world_size={world_size}")
    if max_images is not None and max_images < 1:
        raise ValueError(f"build_eval_loader: max_images must be >= 1, got {max_images}")
    size = len(dataset)  # type: ignore[arg-type]
    if max_images is not None:
        size = min(size, max_images)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=eval_shard(size, rank, world_size),  # type: ignore[arg-type]
        collate_fn=collate,
        num_workers=num_workers,
        drop_last=False,
        generator=torch.Generator().manual_seed(0),  # keeps the global RNG untouched, as in training
        worker_init_fn=ignore_stop_signals,
    )
