"""3D residual U-Net backbone: weight-standardised convs, GroupNorm, pre-activation residual blocks.

Layout (widths ``w0..w3``; resolution relative to the input):

```
stem      conv3 in->w0                                  1     -> skip0
enc0      block w0                                      1
down1     GN-ReLU-conv3/2 w0->w1, block w1              1/2   -> skip1
down2     GN-ReLU-conv3/2 w1->w2, block w2              1/4   -> skip2
down3     GN-ReLU-conv3/2 w2->w3, block w3              1/8
dilated   block w3, dilation 2                          1/8   -> bottleneck (projection head input)
fusion    GN-ReLU-Dropout3d-conv3 w3->w2                1/8
dec2      up x2 + skip2, block w2->w1                   1/4
dec1      up x2 + skip1, block w1->w0                   1/2
dec0      up x2 + skip0, block w0                       1     -> decoder features (seg/restoration heads)
```

MONAI has no weight-standardised convolution and its residual blocks (SegResNet's ``ResBlock``)
have neither dilation nor channel changes, so the few lines below are written here.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class WSConv3d(nn.Conv3d):
    """Conv3d whose kernel is standardised on every call: zero mean, variance 1/fan_in per output channel.

    Weight standardisation pairs with GroupNorm for small batches (Qiao et al., 2019). The extra
    1/sqrt(fan_in) ("scaled WS", Brock et al., 2021) keeps a conv's output variance near its
    input's: the follow-up's unit-variance kernels multiply it by fan_in (27 C), which GroupNorm
    undoes inside a block but not on the residual stream, so the heads' inputs grow to std ~15
    at initialisation and the softmax and sigmoid start saturated. GroupNorm makes the two
    equivalent everywhere else.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        flat = w.reshape(w.shape[0], -1)
        mean = flat.mean(dim=1).reshape(-1, 1, 1, 1, 1)
        var = flat.var(dim=1, unbiased=False).reshape(-1, 1, 1, 1, 1)
        w = (w - mean) * torch.rsqrt(var * flat.shape[1] + 1e-10)
        return F.conv3d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


def ws_conv(in_ch: int, out_ch: int, kernel: int = 3, stride: int = 1, dilation: int = 1) -> WSConv3d:
    """Bias-free weight-standardised conv with 'same' padding (for stride 1)."""
    return WSConv3d(in_ch, out_ch, kernel, stride=stride, padding=dilation * (kernel // 2),
                    dilation=dilation, bias=False)


class PreActResBlock(nn.Module):
    """``x + conv(ReLU(GN(conv(ReLU(GN(x))))))``; a GN-ReLU-1x1x1 conv projects the skip when widths differ.

    Input ``(B, in_ch, X, Y, Z)`` -> output ``(B, out_ch, X, Y, Z)``.
    """

    def __init__(self, in_ch: int, out_ch: int, groups: int = 8, dilation: int = 1) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch)
        self.conv1 = ws_conv(in_ch, out_ch, dilation=dilation)
        self.norm2 = nn.GroupNorm(groups, out_ch)
        self.conv2 = ws_conv(out_ch, out_ch, dilation=dilation)
        self.project: nn.Module = (
            nn.Sequential(nn.GroupNorm(groups, in_ch), nn.ReLU(), ws_conv(in_ch, out_ch, kernel=1))
            if in_ch != out_ch else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.relu(self.norm1(x)))
        h = self.conv2(F.relu(self.norm2(h)))
        return h + self.project(x)


def _down(in_ch: int, out_ch: int, groups: int) -> nn.Sequential:
    """Pre-activation strided conv halving every spatial size."""
    return nn.Sequential(nn.GroupNorm(groups, in_ch), nn.ReLU(), ws_conv(in_ch, out_ch, stride=2))


def upsample_nearest2x(x: torch.Tensor) -> torch.Tensor:
    """Nearest-neighbour x2 upsampling of ``(B, C, X, Y, Z)`` -> ``(B, C, 2X, 2Y, 2Z)``.

    Written as expand + reshape so its backward is a plain sum: deterministic on CUDA, unlike
    ``upsample_nearest3d``'s atomic-add backward.
    """
    b, c, d, h, w = x.shape
    x = x[:, :, :, None, :, None, :, None].expand(b, c, d, 2, h, 2, w, 2)
    return x.reshape(b, c, 2 * d, 2 * h, 2 * w)


class ResidualUNet3D(nn.Module):
    """Residual encoder to 1/8 with a dilated last stage, additive-skip decoder back to full resolution.

    ``forward(x)`` takes ``(B, in_channels, X, Y, Z)`` with X, Y, Z multiples of 8 and returns
    ``(bottleneck (B, w3, X/8, Y/8, Z/8), features (B, w0, X, Y, Z))``; heads are attached outside.
    """

    def __init__(self, in_channels: int, widths: Sequence[int], norm_groups: int = 8,
                 last_dilation: int = 2, dropout: float = 0.1) -> None:
        super().__init__()
        if len(widths) != 4:
            raise ValueError(f"model.widths: give four encoder widths, got {tuple(widths)}")
        w0, w1, w2, w3 = (int(w) for w in widths)
        g = norm_groups
        self.widths = (w0, w1, w2, w3)
        self.stem = ws_conv(in_channels, w0)
        self.enc0 = PreActResBlock(w0, w0, g)
        self.down1 = _down(w0, w1, g)
        self.enc1 = PreActResBlock(w1, w1, g)
        self.down2 = _down(w1, w2, g)
        self.enc2 = PreActResBlock(w2, w2, g)
        self.down3 = _down(w2, w3, g)
        self.enc3 = PreActResBlock(w3, w3, g)
        self.dilated = PreActResBlock(w3, w3, g, dilation=last_dilation)
        self.fusion = nn.Sequential(nn.GroupNorm(g, w3), nn.ReLU(), nn.Dropout3d(dropout), ws_conv(w3, w2))
        self.dec2 = PreActResBlock(w2, w1, g)
        self.dec1 = PreActResBlock(w1, w0, g)
        self.dec0 = PreActResBlock(w0, w0, g)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        bottleneck, pyramid = self.decode(x)
        return bottleneck, pyramid[0]

    def decode(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``(bottleneck, [dec0 (B, w0, X, Y, Z), dec1 (B, w0, X/2, Y/2, Z/2), dec2 (B, w1, X/4, Y/4, Z/4)])``:
        the decoder's outputs from full resolution down (deep supervision reads the coarser two)."""
        if x.dim() != 5:
            raise ValueError(f"expected input (B, C, X, Y, Z), got shape {list(x.shape)}")
        if x.shape[2] % 8 != 0 or x.shape[3] % 8 != 0 or x.shape[4] % 8 != 0:
            raise ValueError(f"spatial size {list(x.shape[2:])} must be a multiple of 8 (the encoder "
                             "downsamples by 8): pad it, e.g. monai.transforms.DivisiblePad(k=8)")
        skip0 = self.enc0(self.stem(x))
        skip1 = self.enc1(self.down1(skip0))
        skip2 = self.enc2(self.down2(skip1))
        bottleneck = self.dilated(self.enc3(self.down3(skip2)))
        h = self.fusion(bottleneck)
        quarter = self.dec2(upsample_nearest2x(h) + skip2)
        half = self.dec1(upsample_nearest2x(quarter) + skip1)
        full = self.dec0(upsample_nearest2x(half) + skip0)
        return bottleneck, [full, half, quarter]
