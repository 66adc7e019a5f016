"""Building blocks: 3D Swin-Transformer stage, patch embedding/merging, conv blocks, cross-stitch.

Tensors are (batch, channels, z, y, x) between blocks and (batch, tokens, channels) inside a
Swin stage. The Swin part follows Liu et al. 2021 and TransMorph (Chen et al. 2022):
window attention with a learned relative-position bias, shifted windows on every second block,
patch merging by 2x2x2 concatenation, LayerNorm and a 2-layer MLP.
"""
from __future__ import annotations

import itertools

import torch
import torch.nn as nn
import torch.nn.functional as F


def _relative_position_index(window: tuple) -> torch.Tensor:
    """(N, N) index into the (2wz-1)(2wy-1)(2wx-1) bias table for a window of N tokens."""
    coords = torch.stack(torch.meshgrid(*(torch.arange(w) for w in window), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)
    for axis, w in enumerate(window):
        rel[..., axis] += w - 1
    wz, wy, wx = window
    return rel[..., 0] * (2 * wy - 1) * (2 * wx - 1) + rel[..., 1] * (2 * wx - 1) + rel[..., 2]


class WindowAttention(nn.Module):
    """Multi-head self-attention inside a window, with relative-position bias."""

    def __init__(self, dim: int, window: tuple, num_heads: int, qkv_bias: bool = False):
        super().__init__()
        self.window, self.num_heads = tuple(window), num_heads
        table = (2 * window[0] - 1) * (2 * window[1] - 1) * (2 * window[2] - 1)
        self.relative_position_bias_table = nn.Parameter(torch.zeros(table, num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.register_buffer("relative_position_index", _relative_position_index(self.window).flatten(),
                             persistent=False)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """x: (B, nW, N, C); mask: (nW, N, N) additive (0 / -inf-like) or None."""
        b, nw, n, c = x.shape
        qkv = self.qkv(x).reshape(b, nw, n, 3, self.num_heads, c // self.num_heads).permute(3, 0, 1, 4, 2, 5)
        bias = self.relative_position_bias_table[self.relative_position_index].reshape(n, n, -1).permute(2, 0, 1)
        attn_mask = bias[None, None] if mask is None else bias[None, None] + mask[None, :, None]
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=attn_mask.to(x.dtype))
        return self.proj(out.transpose(2, 3).reshape(b, nw, n, c))


class MLP(nn.Sequential):
    def __init__(self, dim: int, hidden: int):
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))


def _window_partition(x: torch.Tensor, window: tuple) -> torch.Tensor:
    """(B, Z, Y, X, C) -> (B, nW, N, C)."""
    b, z, y, xx, c = x.shape
    wz, wy, wx = window
    x = x.view(b, z // wz, wz, y // wy, wy, xx // wx, wx, c).permute(0, 1, 3, 5, 2, 4, 6, 7)
    return x.reshape(b, -1, wz * wy * wx, c)


def _window_reverse(windows: torch.Tensor, window: tuple, shape: tuple) -> torch.Tensor:
    """(B, nW, N, C) -> (B, Z, Y, X, C)."""
    b, _, _, c = windows.shape
    z, y, xx = shape
    wz, wy, wx = window
    x = windows.view(b, z // wz, y // wy, xx // wx, wz, wy, wx, c).permute(0, 1, 4, 2, 5, 3, 6, 7)
    return x.reshape(b, z, y, xx, c)


class SwinBlock(nn.Module):
    """One Swin-Transformer block; ``shifted`` blocks roll the windows by half a window."""

    def __init__(self, dim: int, num_heads: int, window: tuple, shifted: bool, mlp_ratio: float = 4.0,
                 qkv_bias: bool = False):
        super().__init__()
        self.window, self.shifted = tuple(window), shifted
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, self.window, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, int(dim * mlp_ratio))

    def _shift_mask(self, padded: tuple, shift: tuple, device) -> torch.Tensor | None:
        if not any(shift):
            return None
        region = torch.zeros(padded, device=device)
        cuts = [((0, -w), (-w, -s), (-s, None)) if s else ((0, None),) for w, s in zip(self.window, shift)]
        for label, (cz, cy, cx) in enumerate(itertools.product(*cuts)):
            region[slice(*cz), slice(*cy), slice(*cx)] = label
        ids = _window_partition(region[None, ..., None], self.window)[0, :, :, 0]
        different = ids[:, :, None] != ids[:, None, :]
        return different.float() * -100.0

    def forward(self, x: torch.Tensor, shape: tuple) -> torch.Tensor:
        b, n, c = x.shape
        shortcut = x
        x = self.norm1(x).view(b, *shape, c)
        pads = [(-s) % w for s, w in zip(shape, self.window)]
        if any(pads):
            x = F.pad(x, (0, 0, 0, pads[2], 0, pads[1], 0, pads[0]))
        padded = tuple(s + p for s, p in zip(shape, pads))
        shift = tuple(w // 2 if (self.shifted and s > w) else 0 for s, w in zip(shape, self.window))
        if any(shift):
            x = torch.roll(x, shifts=tuple(-s for s in shift), dims=(1, 2, 3))
        windows = self.attn(_window_partition(x, self.window), self._shift_mask(padded, shift, x.device))
        x = _window_reverse(windows, self.window, padded)
        if any(shift):
            x = torch.roll(x, shifts=shift, dims=(1, 2, 3))
        x = x[:, :shape[0], :shape[1], :shape[2]].reshape(b, n, c)
        x = shortcut + x
        return x + self.mlp(self.norm2(x))


class Conv3d(nn.Conv3d):
    """nn.Conv3d that, for inference on the CPU, always takes oneDNN's convolution. PyTorch's heuristic
    sends one small image (B = 1 and fewer than 20480 values in its first four dimensions: the 2-channel
    64^3 skip convolution, the 16-channel 32^3 and 32-channel 16^3 ones here) to its reference
    implementation, 5-20x slower on 2 cores; the same values to float32 rounding. Training (gradients)
    and other devices take the standard path."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.device.type == "cpu" and x.dtype == torch.float32 and self.padding_mode == "zeros"
                and not isinstance(self.padding, str) and not (torch.is_grad_enabled() and
                                                               (x.requires_grad or self.weight.requires_grad))
                and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
            try:
                return torch.mkldnn_convolution(x.contiguous(), self.weight, self.bias, self.padding, self.stride,
                                                self.dilation, self.groups)
            except (AttributeError, RuntimeError):   # a torch build without it: the standard path, same values
                pass
        return super().forward(x)


class PatchEmbed(nn.Module):
    """Non-overlapping patch_size^3 patches -> embed_dim tokens (strided conv + LayerNorm)."""

    def __init__(self, in_channels: int, embed_dim: int, patch_size: int):
        super().__init__()
        self.proj = Conv3d(in_channels, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor):
        x = self.proj(x)
        shape = tuple(x.shape[2:])
        return self.norm(x.flatten(2).transpose(1, 2)), shape


class PatchMerging(nn.Module):
    """2x2x2 neighbouring tokens (8C) -> LayerNorm -> linear to 2C; halves each spatial size."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(8 * dim)
        self.reduction = nn.Linear(8 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor, shape: tuple):
        b, _, c = x.shape
        x = x.view(b, *shape, c)
        if any(s % 2 for s in shape):
            x = F.pad(x, (0, 0, 0, shape[2] % 2, 0, shape[1] % 2, 0, shape[0] % 2))
        parts = [x[:, i::2, j::2, k::2] for i in (0, 1) for j in (0, 1) for k in (0, 1)]
        x = torch.cat(parts, dim=-1)
        new_shape = tuple(x.shape[1:4])
        return self.reduction(self.norm(x.reshape(b, -1, 8 * c))), new_shape


class SwinStage(nn.Module):
    """``depth`` Swin blocks (alternating plain and shifted windows)."""

    def __init__(self, dim: int, depth: int, num_heads: int, window: tuple, mlp_ratio: float, qkv_bias: bool):
        super().__init__()
        self.blocks = nn.ModuleList(SwinBlock(dim, num_heads, window, shifted=bool(i % 2), mlp_ratio=mlp_ratio,
                                              qkv_bias=qkv_bias) for i in range(depth))

    def forward(self, x: torch.Tensor, shape: tuple) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, shape)
        return x


class ConvNormAct(nn.Sequential):
    """3x3x3 convolution (no bias) -> InstanceNorm (no affine) -> LeakyReLU, as TransMorph's Conv3dReLU."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(Conv3d(in_channels, out_channels, 3, padding=1, bias=False),
                         nn.InstanceNorm3d(out_channels), nn.LeakyReLU(0.01))


class DecoderBlock(nn.Module):
    """Upsample x2 (trilinear), concatenate the skip, two ConvNormAct ("double convolution")."""

    def __init__(self, in_channels: int, out_channels: int, skip_channels: int):
        super().__init__()
        self.conv1 = ConvNormAct(in_channels + skip_channels, out_channels)
        self.conv2 = ConvNormAct(out_channels, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None) -> torch.Tensor:
        x = F.interpolate(x, size=skip.shape[2:] if skip is not None else None,
                          scale_factor=None if skip is not None else 2, mode="trilinear", align_corners=False)
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        return self.conv2(self.conv1(x))


class CrossStitch(nn.Module):
    """Learned 2x2 linear mix of CT and SPECT features (Misra et al. 2016): 4 parameters.

    [F_CT', F_SPECT'] = [[a11, a12], [a21, a22]] @ [F_CT, F_SPECT]; starts near identity.
    """

    def __init__(self, self_weight: float = 0.9):
        super().__init__()
        other = 1.0 - self_weight
        self.alpha = nn.Parameter(torch.tensor([[self_weight, other], [other, self_weight]]))

    def forward(self, f_ct: torch.Tensor, f_spect: torch.Tensor):
        a = self.alpha
        return a[0, 0] * f_ct + a[0, 1] * f_spect, a[1, 0] * f_ct + a[1, 1] * f_spect


class RegistrationHead(Conv3d):
    """3x3x3 convolution to a 3-channel (z, y, x) field in voxels; small initial weights, zero bias."""

    def __init__(self, in_channels: int):
        super().__init__(in_channels, 3, kernel_size=3, padding=1)
        nn.init.normal_(self.weight, 0.0, 1e-5)
        nn.init.zeros_(self.bias)
