"""Models-Genesis-style image corruptions (Zhou et al., 2019/2021) restricted to chosen voxels.

Only the chosen voxels (blobs inside the boundary band) change. Every corruption is written
point-wise on a list of voxels (``Voxels``), runs on the batch's device and is batched over
samples (each sample draws its own corruptions and parameters). MONAI's RandCoarseShuffle /
RandCoarseDropout / RandHistogramShift do whole-image versions one sample at a time on the CPU,
which is neither of those things.

Two drivers of the same corruptions:

* ``corrupt_batch`` (the training default): the list is EVERY voxel of the (cropped) batch, in raster
  order, and the chosen ones are kept with ``torch.where``. Fixed shapes, no host round trip;
  O(crop voxels) work, which the crop (``loss.rec_crop``) keeps small.
* ``corrupt_batch_reference`` (the original code): the list is the chosen voxels (``nonzero``, a host
  sync) and a corruption that no sample drew is skipped (another sync). O(chosen voxels).

Given the same RNG state, both give the same image when every voxel is chosen and every
corruption is drawn by some sample; otherwise they consume the random stream differently.
``select_voxels`` (sorting) and ``select_voxels_reference`` (``kthvalue`` per sample) choose the same
voxels from the same RNG state.

The chain per sample, in Models Genesis' order and with its probabilities (``CORRUPTION_TABLE``):
local pixel shuffling, then a non-linear intensity curve, then in- or out-painting.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

CORRUPTION_TABLE: dict[str, float] = {
    # name: probability per sample (Models Genesis: local_rate, nonlinear_rate, paint_rate)
    "local_pixel_shuffle": 0.5,
    "nonlinear_intensity": 0.9,
    "painting": 0.9,
}
OUT_PAINTING_SHARE = 0.8
"""Share of ``painting`` that is out-painting, the rest is in-painting (Models Genesis: outpaint_rate)."""

MAX_PAINT_BOXES = 5
PAINT_BOX_PROB = 0.95
"""Each box after the first exists with this probability (Models Genesis: ``while cnt > 0 and random() < 0.95``)."""
IN_PAINT_SIDE = (1 / 6, 1 / 3)
"""In-painting box side as a fraction of the patch side (noise inside the boxes)."""
OUT_PAINT_SIDE = (3 / 7, 4 / 7)
"""Out-painting box side as a fraction of the patch side (noise outside the boxes)."""


@dataclass(frozen=True)
class Voxels:
    """The voxels to corrupt in a batch: indices ``b, x, y, z`` each ``(N,)`` long; ``size`` = (B, X, Y, Z)."""

    b: torch.Tensor
    x: torch.Tensor
    y: torch.Tensor
    z: torch.Tensor
    size: tuple[int, int, int, int]

    @classmethod
    def from_mask(cls, mask: torch.Tensor) -> "Voxels":
        """From a ``(B, 1, X, Y, Z)`` bool mask (``nonzero``: a host sync on a GPU)."""
        b, x, y, z = mask[:, 0].nonzero(as_tuple=True)
        return cls(b, x, y, z, (mask.shape[0], *mask.shape[2:]))

    @classmethod
    def every(cls, size: tuple[int, int, int, int], device: torch.device) -> "Voxels":
        """Every voxel of a ``size = (B, X, Y, Z)`` batch in raster order (what ``from_mask`` of an
        all-True mask gives), without a host sync."""
        grids = torch.meshgrid(*(torch.arange(n, device=device) for n in size), indexing="ij")
        b, x, y, z = (g.reshape(-1) for g in grids)
        return cls(b, x, y, z, tuple(int(n) for n in size))  # type: ignore[arg-type]

    def __len__(self) -> int:
        return int(self.b.numel())

    def read(self, image: torch.Tensor) -> torch.Tensor:
        """Values of ``image (B, C, X, Y, Z)`` at the voxels: ``(N, C)``."""
        return image[self.b, :, self.x, self.y, self.z]


def _rand(*shape: int, like: torch.Tensor) -> torch.Tensor:
    return torch.rand(*shape, device=like.device, dtype=torch.float32)


def local_pixel_shuffle(image: torch.Tensor, vox: Voxels, max_block: int | None = None) -> torch.Tensor:
    """Each voxel takes the value of a random voxel of its block; blocks tile the patch.

    Block sides are drawn per sample and axis from 2 to about a tenth of the patch side (Models
    Genesis shuffles inside blocks up to that size), on the device. Intensities stay, local texture
    and edges go. The source is drawn with replacement (a point-wise stand-in for a permutation).
    ``image (B, C, X, Y, Z)`` -> values ``(N, C)``.
    """
    out = []
    for coord, n in zip((vox.x, vox.y, vox.z), vox.size[1:]):
        side = torch.randint(2, max(2, max_block or n // 10) + 1, (vox.size[0],), device=image.device)[vox.b]
        start = coord - coord % side
        offset = (_rand(vox.b.numel(), like=image) * side).long()
        out.append((start + offset).clamp(max=n - 1))
    return image[vox.b, :, out[0], out[1], out[2]]


def bezier_lut(batch: int, like: torch.Tensor, lut_size: int = 1024, points: int = 256) -> torch.Tensor:
    """Random intensity curves through (0, 0) and (1, 1) sampled on a uniform grid: ``(B, lut_size)``.

    Cubic Bezier with two random inner control points, made a function of x by sorting;
    half of the curves are flipped (decreasing), as in Models Genesis.
    """
    t = torch.linspace(0, 1, points, device=like.device)[None, :]
    p1, p2 = _rand(batch, 2, like=like), _rand(batch, 2, like=like)
    w1, w2, w3 = 3 * (1 - t) ** 2 * t, 3 * (1 - t) * t ** 2, t ** 3
    xs = (w1 * p1[:, :1] + w2 * p2[:, :1] + w3).sort(dim=1).values
    ys = (w1 * p1[:, 1:] + w2 * p2[:, 1:] + w3).sort(dim=1).values
    ys = torch.where(_rand(batch, 1, like=like) < 0.5, ys.flip(1), ys)
    grid = torch.linspace(0, 1, lut_size, device=like.device).expand(batch, lut_size).contiguous()
    hi = torch.searchsorted(xs, grid).clamp(1, points - 1)
    x0, x1, y0, y1 = xs.gather(1, hi - 1), xs.gather(1, hi), ys.gather(1, hi - 1), ys.gather(1, hi)
    return y0 + ((grid - x0) / (x1 - x0).clamp_min(1e-8)).clamp(0, 1) * (y1 - y0)


def nonlinear_intensity(values: torch.Tensor, vox: Voxels) -> torch.Tensor:
    """Map ``values (N, C)`` in [0, 1] through a random Bezier curve of each voxel's sample. Same shape."""
    lut = bezier_lut(vox.size[0], values)
    size = lut.shape[1]
    pos = values.float().clamp(0.0, 1.0) * (size - 1)
    lo = pos.floor().long().clamp(max=size - 2)
    flat = lut.reshape(-1)
    idx = vox.b[:, None] * size + lo  # (N, C) into the flattened (B, size) tables
    v0, v1 = flat[idx], flat[idx + 1]
    return (v0 + (pos - lo) * (v1 - v0)).to(values.dtype)


def in_boxes(vox: Voxels, side_frac: tuple[float, float], like: torch.Tensor) -> torch.Tensor:
    """Whether each voxel lies in one of its sample's random boxes: ``(N,)`` bool.

    Each sample gets up to ``MAX_PAINT_BOXES`` axis-aligned boxes (the first always, the next
    each with ``PAINT_BOX_PROB``), sides ``n * U(side_frac)`` along an axis of size n.
    """
    nb = vox.size[0]
    alive = torch.cumprod((_rand(nb, MAX_PAINT_BOXES, like=like) < PAINT_BOX_PROB).float(), dim=1).bool()
    alive[:, 0] = True
    inside = alive[vox.b]  # (N, boxes)
    for coord, n in zip((vox.x, vox.y, vox.z), vox.size[1:]):
        frac = side_frac[0] + (side_frac[1] - side_frac[0]) * _rand(nb, MAX_PAINT_BOXES, like=like)
        side = (n * frac).floor().clamp(1, n)
        start = ((n - side + 1) * _rand(nb, MAX_PAINT_BOXES, like=like)).floor()
        pos = torch.arange(n, device=like.device, dtype=start.dtype)
        span = (pos >= start[..., None]) & (pos < (start + side)[..., None])  # (B, boxes, n) along this axis
        inside = inside & span[vox.b, :, coord]
    return inside.any(dim=1)


def in_painting(values: torch.Tensor, vox: Voxels) -> torch.Tensor:
    """Uniform noise at the voxels inside up to 5 random boxes per sample (sides 1/6 to 1/3 of the patch)."""
    hole = in_boxes(vox, IN_PAINT_SIDE, values)[:, None]
    return torch.where(hole, _rand(*values.shape, like=values).to(values.dtype), values)


def out_painting(values: torch.Tensor, vox: Voxels) -> torch.Tensor:
    """Uniform noise at the voxels outside up to 5 random boxes per sample (sides 3/7 to 4/7 of the patch)."""
    keep = in_boxes(vox, OUT_PAINT_SIDE, values)[:, None]
    return torch.where(keep, values, _rand(*values.shape, like=values).to(values.dtype))


def draw_corruptions(batch: int, like: torch.Tensor) -> dict[str, torch.Tensor]:
    """Which corruptions each sample gets, from ``CORRUPTION_TABLE``: name -> ``(B,)`` bool.

    A sample that draws none gets the non-linear one, so its chosen voxels always change.
    """
    u = _rand(batch, 4, like=like)
    shuffle = u[:, 0] < CORRUPTION_TABLE["local_pixel_shuffle"]
    nonlinear = u[:, 1] < CORRUPTION_TABLE["nonlinear_intensity"]
    paint = u[:, 2] < CORRUPTION_TABLE["painting"]
    out = paint & (u[:, 3] < OUT_PAINTING_SHARE)
    nonlinear = nonlinear | ~(shuffle | nonlinear | paint)
    return {"local_pixel_shuffle": shuffle, "nonlinear_intensity": nonlinear,
            "in_painting": paint & ~out, "out_painting": out}


def _check_mask(image: torch.Tensor, mask: torch.Tensor) -> None:
    if mask.shape[0] != image.shape[0] or mask.shape[1] != 1 or mask.shape[2:] != image.shape[2:]:
        raise ValueError(f"mask must be (B, 1, X, Y, Z) matching image {list(image.shape)}, got {list(mask.shape)}")


def _chain(image: torch.Tensor, vox: Voxels, drawn: dict[str, torch.Tensor],
           skip_undrawn: bool) -> torch.Tensor:
    """The Models Genesis chain at ``vox``: ``(N, C)`` values; each sample takes its drawn steps.
    ``skip_undrawn`` skips a step no sample drew (reads a device flag: a host sync)."""
    values = vox.read(image)
    steps = (("local_pixel_shuffle", lambda v: local_pixel_shuffle(image, vox)),
             ("nonlinear_intensity", lambda v: nonlinear_intensity(v, vox)),
             ("in_painting", lambda v: in_painting(v, vox)),
             ("out_painting", lambda v: out_painting(v, vox)))
    for name, step in steps:
        if not skip_undrawn or bool(drawn[name].any()):
            values = torch.where(drawn[name][vox.b][:, None], step(values), values)
    return values


def corrupt_batch(image: torch.Tensor, mask: torch.Tensor,
                  drawn: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Corrupt ``image (B, C, X, Y, Z)`` at the voxels of ``mask (B, 1, X, Y, Z)`` bool; equal to it elsewhere.

    ``drawn`` (from ``draw_corruptions``) says which corruptions each sample gets; drawn here when None.
    Every voxel goes through the chain and ``mask`` picks the result: fixed shapes, no host sync.
    """
    _check_mask(image, mask)
    drawn = draw_corruptions(image.shape[0], image) if drawn is None else drawn
    b, c, *size = image.shape
    vox = Voxels.every((b, *size), image.device)  # type: ignore[arg-type]
    values = _chain(image, vox, drawn, skip_undrawn=False)  # (B*X*Y*Z, C), raster order
    corrupted = values.reshape(b, *size, c).permute(0, 4, 1, 2, 3)
    return torch.where(mask, corrupted, image)


def corrupt_batch_reference(image: torch.Tensor, mask: torch.Tensor,
                            drawn: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """``corrupt_batch`` point-wise on the chosen voxels only (the original code; host syncs)."""
    _check_mask(image, mask)
    drawn = draw_corruptions(image.shape[0], image) if drawn is None else drawn
    vox = Voxels.from_mask(mask)
    if len(vox) == 0:
        return image
    values = _chain(image, vox, drawn, skip_undrawn=True)
    out = image.clone()
    out[vox.b, :, vox.x, vox.y, vox.z] = values
    return out


def _blob_field(region: torch.Tensor, ratio: float, blob: int) -> torch.Tensor:
    """The smooth random field of ``select_voxels``, ``-1`` outside ``region``: ``(B, X*Y*Z)``."""
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"loss.corruption_ratio: must lie in [0, 1], got {ratio}")
    b, _, *size = region.shape
    coarse = _rand(b, 1, *[-(-n // blob) + 1 for n in size], like=region)
    field = F.interpolate(coarse, size=size, mode="trilinear", align_corners=False)
    return torch.where(region, field, -1.0).reshape(b, -1)  # the field lies in [0, 1]


def select_voxels(region: torch.Tensor, ratio: float, blob: int = 4) -> torch.Tensor:
    """Blobs inside ``region`` covering ``round(ratio * |region|)`` of its voxels, per sample.

    A smooth random field (uniform noise on a grid ``blob`` voxels apart, trilinearly upsampled)
    is cut per sample at the value that keeps exactly that many region voxels, so whole blobs
    are taken first. ``region (B, 1, X, Y, Z)`` bool -> same shape bool, a subset of ``region``.
    The cut is the target-th largest value, read from one batched sort: no host sync.
    """
    field = _blob_field(region, ratio, blob)
    counts = region.flatten(1).sum(dim=1)
    target = torch.round(counts.double() * ratio).long()  # as Python's round(ratio * count): half to even
    ordered = field.sort(dim=1, descending=True).values
    cut = ordered.gather(1, (target - 1).clamp(min=0)[:, None])
    thresholds = torch.where(target[:, None] > 0, cut, 2.0)  # 2 selects nothing
    return (field >= thresholds).reshape(region.shape)


def select_voxels_reference(region: torch.Tensor, ratio: float, blob: int = 4) -> torch.Tensor:
    """``select_voxels`` with one ``kthvalue`` per sample (the original code; reads counts on the host)."""
    field = _blob_field(region, ratio, blob)
    b = region.shape[0]
    counts = region.reshape(b, -1).sum(dim=1).tolist()
    thresholds = torch.full((b, 1), 2.0, device=region.device)  # 2 selects nothing
    for i, count in enumerate(counts):
        target = int(round(ratio * count))
        if target > 0:
            thresholds[i] = torch.kthvalue(field[i], field.shape[1] - target + 1).values
    return (field >= thresholds).reshape(region.shape)
