"""Batched train augmentation on the device: RandomResizedCrop + horizontal flip + normalise.

torchvision's RandomResizedCrop samples one box per image with up to 10 tries; here the tries of a
whole batch (or epoch) are drawn at once and one `grid_sample` does crop, resize and flip for the
batch. Crops never exceed the image, so resizing only upsamples and needs no antialiasing.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

DEFAULT_SCALE = (0.08, 1.0)
DEFAULT_RATIO = (3.0 / 4.0, 4.0 / 3.0)


# One uniform draw per image covers its whole augmentation: 10 area tries, 10 log-aspect tries, 2
# offsets and the flip (torchvision's RandomResizedCrop + RandomHorizontalFlip).
AUG_DRAWS = 23


def draw_augmentation(n: int, generator: torch.Generator, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """u [n, AUG_DRAWS] uniform in [0, 1), drawn on the generator's device in one call (one kernel,
    no host synchronisation: it can sit inside a CUDA graph)."""
    return torch.rand((n, AUG_DRAWS), generator=generator, device=generator.device, dtype=dtype)


def crop_boxes_from(u: torch.Tensor, side: int, scale: tuple[float, float] = DEFAULT_SCALE,
                    ratio: tuple[float, float] = DEFAULT_RATIO) -> torch.Tensor:
    """torchvision's RandomResizedCrop.get_params for square side x side images, vectorised, from
    draws u [n, AUG_DRAWS]. Returns [n, 4] boxes (top, left, height, width) in pixels, u's dtype
    and device; no data-dependent shapes."""
    area = float(side * side) * (scale[0] + (scale[1] - scale[0]) * u[:, 0:10])
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u[:, 10:20])
    width = torch.round(torch.sqrt(area * aspect))
    height = torch.round(torch.sqrt(area / aspect))
    valid = (width > 0) & (width <= side) & (height > 0) & (height <= side)
    first = valid.int().argmax(1, keepdim=True)  # the first try that fits, as torchvision's loop
    found = valid.any(1)
    full = torch.full_like(width[:, 0], float(side))  # fallback for a square image: the whole image
    width = torch.where(found, width.gather(1, first)[:, 0], full)
    height = torch.where(found, height.gather(1, first)[:, 0], full)
    top = torch.floor(u[:, 20] * (side - height + 1))
    left = torch.floor(u[:, 21] * (side - width + 1))
    return torch.stack((top, left, height, width), 1)


def crop_boxes_sized(u: torch.Tensor, sizes: torch.Tensor, side: int, scale: tuple[float, float] = DEFAULT_SCALE,
                     ratio: tuple[float, float] = DEFAULT_RATIO) -> torch.Tensor:
    """torchvision's RandomResizedCrop.get_params for images of varying size, vectorised: the box is
    drawn in each image's stored pixels (sizes [n, 2]: height, width), with torchvision's fallback
    (the centre crop clamped to the ratio range) after 10 failed tries, then mapped onto its resident
    side x side copy (the whole image resized). Returns [n, 4] (top, left, height, width) in resident
    pixels, u's dtype: the crop geometry has the distribution torchvision draws on the image itself."""
    heights, widths = sizes[:, 0:1].to(u.dtype), sizes[:, 1:2].to(u.dtype)
    area = heights * widths * (scale[0] + (scale[1] - scale[0]) * u[:, 0:10])
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u[:, 10:20])
    width = torch.round(torch.sqrt(area * aspect))
    height = torch.round(torch.sqrt(area / aspect))
    valid = (width > 0) & (width <= widths) & (height > 0) & (height <= heights)
    first = valid.int().argmax(1, keepdim=True)
    found = valid.any(1)
    h_img, w_img = heights[:, 0], widths[:, 0]
    in_ratio = w_img / h_img
    fallback_w = torch.where(in_ratio > ratio[1], torch.round(h_img * ratio[1]), w_img)
    fallback_h = torch.where(in_ratio < ratio[0], torch.round(w_img / ratio[0]), h_img)
    width = torch.where(found, width.gather(1, first)[:, 0], fallback_w)
    height = torch.where(found, height.gather(1, first)[:, 0], fallback_h)
    top = torch.where(found, torch.floor(u[:, 20] * (h_img - height + 1)), torch.floor((h_img - height) / 2))
    left = torch.where(found, torch.floor(u[:, 21] * (w_img - width + 1)), torch.floor((w_img - width) / 2))
    to_y, to_x = side / h_img, side / w_img
    return torch.stack((top * to_y, left * to_x, height * to_y, width * to_x), 1)


def flips_from(u: torch.Tensor) -> torch.Tensor:
    """bool [n]: flip horizontally with probability 0.5, from draws u [n, AUG_DRAWS]."""
    return u[:, 22] < 0.5


def sample_crop_boxes(n: int, side: int, generator: torch.Generator,
                      scale: tuple[float, float] = DEFAULT_SCALE,
                      ratio: tuple[float, float] = DEFAULT_RATIO) -> torch.Tensor:
    """n crop boxes float32 [n, 4] (top, left, height, width) drawn from `generator`."""
    return crop_boxes_from(draw_augmentation(n, generator), side, scale, ratio)


def crop_grids(boxes: torch.Tensor, flips: torch.Tensor, side: int, out_side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampling rulers for `grid_sample` (align_corners=False) from boxes float [n, 4] (top, left,
    h, w) and flips bool [n] of side x side images: (grid_x [n, out_side], grid_y [n, out_side]).

    The crop-resize-flip map is axis-aligned, so the 2-D grid is the outer combination of two 1-D
    rulers; computing them once per epoch leaves one stack per batch (affine_grid costs 3x more)."""
    top, left, height, width = boxes.unbind(1)
    scale_x = torch.where(flips, -width, width) / side
    shift_x = (2 * left + width) / side - 1
    scale_y = height / side
    shift_y = (2 * top + height) / side - 1
    ruler = (torch.arange(out_side, device=boxes.device, dtype=boxes.dtype) + 0.5) * (2.0 / out_side) - 1
    grid_x = torch.addcmul(shift_x[:, None], scale_x[:, None], ruler[None, :])
    grid_y = torch.addcmul(shift_y[:, None], scale_y[:, None], ruler[None, :])
    return grid_x, grid_y


def resample_normalise(images: torch.Tensor, grid_x: torch.Tensor, grid_y: torch.Tensor,
                       inv_std255: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """images uint8 [B, 3, H, W]; rulers [B, S] from `crop_grids`; inv_std255 = 1 / (255 std) and
    shift = -mean / std, both [1, 3, 1, 1]. Returns normalised [B, 3, S, S] in the rulers' dtype
    (bilinear; crops lie inside the image so border padding is never reached beyond half a pixel)."""
    batch, out_side = grid_x.shape
    grid = torch.stack((grid_x[:, None, :].expand(batch, out_side, out_side),
                        grid_y[:, :, None].expand(batch, out_side, out_side)), dim=-1)
    sampled = F.grid_sample(images.to(grid.dtype), grid, mode="bilinear", padding_mode="border", align_corners=False)
    return torch.addcmul(shift.to(grid.dtype), sampled, inv_std255.to(grid.dtype))


def augment_batch(images: torch.Tensor, u: torch.Tensor, inv_std255: torch.Tensor, shift: torch.Tensor,
                  scale: tuple[float, float] = DEFAULT_SCALE, ratio: tuple[float, float] = DEFAULT_RATIO,
                  sizes: torch.Tensor | None = None) -> torch.Tensor:
    """RandomResizedCrop + flip + normalise of a batch uint8 [B, 3, S, S] with draws u [B, AUG_DRAWS]
    (their dtype is the output's): normalised [B, 3, S, S], the whole batch in one grid_sample.
    `sizes` [B, 2]: each image's stored (height, width) when the batch holds whole images of varying
    size resized to S x S (crop_boxes_sized); None when the images are S x S themselves."""
    side = images.shape[-1]
    boxes = crop_boxes_from(u, side, scale, ratio) if sizes is None else crop_boxes_sized(u, sizes, side, scale, ratio)
    grid_x, grid_y = crop_grids(boxes, flips_from(u), side, side)
    return resample_normalise(images, grid_x, grid_y, inv_std255, shift)


def crop_resize_flip(images: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor, out_side: int,
                     mean255: torch.Tensor, std255: torch.Tensor) -> torch.Tensor:
    """images uint8 [B, 3, H, W] (H == W) on the device; boxes float [B, 4] (top, left, h, w);
    flips bool [B]; mean255 / std255 float [1, 3, 1, 1] in 0..255 units.

    Returns the normalised float32 [B, 3, out_side, out_side] crops, bilinear, align_corners=False.
    """
    grid_x, grid_y = crop_grids(boxes, flips, images.shape[-1], out_side)
    return resample_normalise(images, grid_x, grid_y, 1.0 / std255, -mean255 / std255)


def normalise_nhwc(images: torch.Tensor, mean255: torch.Tensor, std255: torch.Tensor,
                   channels_last: bool = False) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> normalised float32 [B, 3, H, W] on the images' device. The layout
    change happens on the uint8 bytes, then one fused multiply-add converts and normalises (half
    the passes of float-then-subtract-then-divide)."""
    layout = torch.channels_last if channels_last else torch.contiguous_format
    planar = images.permute(0, 3, 1, 2).contiguous(memory_format=layout)
    return torch.addcmul(-mean255 / std255, planar.float(), 1.0 / std255)
