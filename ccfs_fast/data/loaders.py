"""Loaders over index subsets of an IndexSpace: resident train batches augmented on the device, streamed
and resident evaluation batches."""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from beton_builder.base.errors import DataError
from beton_builder.beton import BetonFile
from ccfs_fast.data.augment import DEFAULT_RATIO, DEFAULT_SCALE, augment_batch, draw_augmentation, normalise_nhwc
from ccfs_fast.data.normalization import Normalization
from ccfs_fast.data.readers import eval_chunk
from ccfs_fast.data.space import IndexSpace
from ccfs_fast.data.threads import CpuShare, elementwise_threads


def _stats_tensors(norm: Normalization, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) float32 [1, 3, 1, 1] in 0..255 pixel units."""
    mean = torch.tensor(norm.mean, dtype=torch.float32, device=device).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(norm.std, dtype=torch.float32, device=device).view(1, 3, 1, 1) * 255.0
    return mean, std


def norm_tensors(norm: Normalization, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(inv_std255, shift) float32 [1, 3, 1, 1] on `device`: x_norm = x_uint8 * inv_std255 + shift."""
    mean255, std255 = _stats_tensors(norm, device)
    return 1.0 / std255, -mean255 / std255


def epoch_order(n: int, generator: torch.Generator, rank: int = 0, world_size: int = 1) -> torch.Tensor:
    """One epoch's sample order on the generator's device: a uniform permutation of n rows; with
    world_size > 1 this rank's strided share, padded to equal length as torch's DistributedSampler."""
    order = torch.randperm(n, generator=generator, device=generator.device)
    if world_size > 1:
        per_rank = -(-n // world_size)
        order = torch.cat((order, order[: per_rank * world_size - n]))[rank::world_size]
    return order


def augment_rows(images: torch.Tensor, rows: torch.Tensor, draws: torch.Tensor, inv_std255: torch.Tensor,
                 shift: torch.Tensor, scale: tuple[float, float], ratio: tuple[float, float],
                 sizes: torch.Tensor | None, share: CpuShare) -> torch.Tensor:
    """The one train augmentation of a resident set: the images at `rows` int64 [k] of `images` uint8
    [N, 3, S, S], RandomResizedCrop + flip by `draws` [k, AUG_DRAWS] (draw_augmentation) and normalised,
    all k at once: float [k, 3, S, S]. `sizes` float [N, 2]: the stored sizes of images of varying size
    (their crop boxes are drawn on them), else None. On the CPU it runs on the threads `share` grants."""
    with elementwise_threads(share, images.device):
        chosen = None if sizes is None else sizes.index_select(0, rows)
        return augment_batch(images.index_select(0, rows), draws, inv_std255, shift, scale, ratio, chosen)


class ResidentTrainLoader:
    """Train batches over a small index subset (a phase's train set) kept resident as uint8 on the
    device; each epoch a uniform shuffle, RandomResizedCrop + flip + normalise per whole batch.

    Random numbers come from one generator on the device, seeded once: per epoch the permutation
    (`epoch_order`), per batch one `draw_augmentation`: the same sequence the capturable train step
    (ccfs_fast.train.step) draws, so the two train identically. Yields (images [b, 3, S, S] normalised, in
    `dtype`, labels int64 [b], global index int64 [b]); with world_size > 1 this rank's share.
    """

    def __init__(self, space: IndexSpace, indices: np.ndarray, batch_size: int, device: torch.device | str,
                 seed: int, workers: int = 2, scale: tuple[float, float] = DEFAULT_SCALE,
                 ratio: tuple[float, float] = DEFAULT_RATIO, rank: int = 0, world_size: int = 1,
                 channels_last: bool = False, resident: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                 dtype: torch.dtype = torch.float32):
        """`resident`: the (images, labels, index) of `indices` already read by
        IndexSpace.read_resident (e.g. reused across runs on one train set); read here otherwise."""
        if len(indices) == 0:
            raise DataError("the train set is empty; nothing to train on")
        self.device = torch.device(device)
        self.batch_size, self.scale, self.ratio, self.dtype = batch_size, scale, ratio, dtype
        self.rank, self.world_size, self.channels_last = rank, world_size, channels_last
        mean255, std255 = _stats_tensors(space.norm, self.device)
        self.inv_std255, self.shift = 1.0 / std255, -mean255 / std255
        if resident is None:
            resident = space.read_resident(indices, self.device, workers)
        self.images, self.labels, self.index = resident
        self.sizes = space.crop_sizes(self.index)  # images of varying size: their stored (height, width)
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.share = CpuShare()

    def __len__(self) -> int:
        per_rank = -(-len(self.labels) // self.world_size)
        return -(-per_rank // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        order = epoch_order(len(self.labels), self.generator, self.rank, self.world_size)
        for start in range(0, len(order), self.batch_size):
            rows = order[start:start + self.batch_size]
            u = draw_augmentation(len(rows), self.generator, self.dtype)
            images = augment_rows(self.images, rows, u, self.inv_std255, self.shift, self.scale, self.ratio,
                                  self.sizes, self.share)
            if self.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            yield images, self.labels.index_select(0, rows), self.index.index_select(0, rows)


class EvalLoader:
    """Sequential, unaugmented batches over an index subset of one IndexSpace, streamed through
    FFCV (never materialised): (images float32 [b, 3, S, S] normalised on `device`, labels int64
    [b], global index int64 [b]), every index once: pool rows first, then distilled rows, each in
    the order given, normalised with the space's `norm`."""

    def __init__(self, space: IndexSpace, indices: np.ndarray, batch_size: int, device: torch.device | str,
                 workers: int = 2, channels_last: bool = False):
        self.space, self.indices = space, np.asarray(indices, dtype=np.int64)
        self.batch_size, self.workers, self.channels_last = batch_size, workers, channels_last
        self.device = torch.device(device)
        self.mean255, self.std255 = _stats_tensors(space.norm, self.device)

    def __len__(self) -> int:
        chunk = eval_chunk(self.batch_size)
        return sum((len(rows) // chunk) * -(-chunk // self.batch_size) + -(-(len(rows) % chunk) // self.batch_size)
                   for _, rows, _, _ in self.space.parts(self.indices))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        # FFCV reads chunks of READ_CHUNK rows (one short burst of its threads per chunk) that are cut
        # into model batches here: per-batch reads interleave FFCV's prefetch threads with the model's
        # intra-op threads and cost a third of the throughput on a 2-core CPU.
        chunk = eval_chunk(self.batch_size)
        for beton, rows, _, offset in self.space.parts(self.indices):
            for images, labels, index in self.space.reader(beton, chunk, self.workers, rows).read(rows):
                images = images.to(self.device, non_blocking=True)
                labels = self.space.as_pool_labels(beton, labels).to(self.device)
                index = (index + offset).to(self.device)
                for start in range(0, len(labels), self.batch_size):
                    stop = start + self.batch_size
                    yield (normalise_nhwc(images[start:stop], self.mean255, self.std255, self.channels_last),
                           labels[start:stop], index[start:stop])


class ResidentEvalLoader:
    """Sequential, unaugmented batches over a small index subset (e.g. the test set) read once into a
    resident uint8 tensor on the device, so per-epoch evaluation pays no FFCV compile or decode:
    (images float32 [b, 3, S, S] normalised with the space's `norm`, labels int64 [b], index int64 [b])."""

    def __init__(self, space: IndexSpace, indices: np.ndarray, batch_size: int, device: torch.device | str,
                 workers: int = 2, channels_last: bool = False):
        self.device = torch.device(device)
        self.batch_size, self.channels_last = batch_size, channels_last
        mean255, std255 = _stats_tensors(space.norm, self.device)
        self.inv_std255, self.shift = 1.0 / std255, -mean255 / std255
        self.images, self.labels, self.index = space.read_resident(indices, self.device, workers, "eval")

    def __len__(self) -> int:
        return -(-len(self.labels) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        for start in range(0, len(self.labels), self.batch_size):
            stop = start + self.batch_size
            images = torch.addcmul(self.shift, self.images[start:stop].float(), self.inv_std255)
            if self.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            yield images, self.labels[start:stop], self.index[start:stop]


def make_test_loader(test: BetonFile, num_classes: int, norm: Normalization, batch_size: int,
                     device: torch.device | str, workers: int = 2, channels_last: bool = False,
                     side: int | None = None) -> ResidentEvalLoader:
    """The whole test set, resident, sequential, normalised with the run's `norm` (the same as the
    pool's and the distilled images'); images of varying size centre-cropped at `side`."""
    if test.manifest.num_classes != num_classes:
        raise DataError(f"the test set {test.path} has {test.manifest.num_classes} classes but the pool "
                        f"has {num_classes}; pass the test split of the same dataset")
    return ResidentEvalLoader(IndexSpace(test, norm=norm, side=side), np.arange(test.n), batch_size, device, workers,
                              channels_last)
