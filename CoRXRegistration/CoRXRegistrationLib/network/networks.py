"""CoRX-NET (two Swin streams + cross-stitch units) and TransMorph (one stream) from one code base.

Every network maps (fixed CT, moving CT, fixed SPECT, moving SPECT), each (B, 1, Z, Y, X) on the
network grid and normalised to about [0, 1], to a displacement field (B, 3, Z, Y, X) in voxels of
that grid, channels (z, y, x), resampling convention: the warped moving image at voxel p is the
moving image sampled at p + u(p). TransMorph uses only the CT pair. A CoRX network built with
``spect_correction`` also gives the field the SPECT follows (``forward(..., with_spect=True)``).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import NetworkConfig
from .layers import (Conv3d, ConvNormAct, CrossStitch, DecoderBlock, PatchEmbed, PatchMerging, RegistrationHead,
                     SwinStage)
from .transform import integrate_velocity, upsample_displacement


class SwinStream(nn.Module):
    """One stream: Swin encoder with a normalised output per stage, two convolutional skips
    (1/2 and full resolution) and a convolutional decoder back to the field resolution."""

    def __init__(self, cfg: NetworkConfig):
        super().__init__()
        dims = cfg.stage_dims
        self.patch_embed = PatchEmbed(cfg.in_channels, cfg.embed_dim, cfg.patch_size)
        self.stages = nn.ModuleList(SwinStage(d, n, h, cfg.window_size, cfg.mlp_ratio, cfg.qkv_bias)
                                    for d, n, h in zip(dims, cfg.depths, cfg.num_heads))
        self.merges = nn.ModuleList(PatchMerging(d) for d in dims[:-1])
        self.out_norms = nn.ModuleList(nn.LayerNorm(d) for d in dims)
        half, full = cfg.skip_channels
        self.skip_half = ConvNormAct(cfg.in_channels, half)
        self.skip_full = ConvNormAct(cfg.in_channels, full) if cfg.flow_level == 0 else None
        blocks = [DecoderBlock(dims[i], dims[i - 1], dims[i - 1]) for i in range(len(dims) - 1, 0, -1)]
        blocks.append(DecoderBlock(dims[0], half, half))
        if cfg.flow_level == 0:
            blocks.append(DecoderBlock(half, full, full))
        self.decoder = nn.ModuleList(blocks)
        self.out_channels = full if cfg.flow_level == 0 else half

    def conv_skips(self, x: torch.Tensor) -> list:
        """Skips for the last two decoder blocks, deepest first: [1/2 resolution, full resolution]."""
        skips = [self.skip_half(F.avg_pool3d(x, 3, stride=2, padding=1))]
        if self.skip_full is not None:
            skips.append(self.skip_full(x))
        return skips

    def stage_output(self, i: int, tokens: torch.Tensor, shape: tuple) -> torch.Tensor:
        """Normalised stage-i tokens as a (B, C, z, y, x) feature map."""
        b, _, c = tokens.shape
        return self.out_norms[i](tokens).transpose(1, 2).reshape(b, c, *shape)


def run_streams(streams: list, inputs: list, encoder_mix=None, decoder_mix=None) -> list:
    """Run 1 or 2 streams in lockstep; after each Swin stage and each decoder block the optional
    cross-stitch units mix the two streams' features. Returns each stream's last feature map."""
    skips = [[] for _ in streams]
    conv_skips = [s.conv_skips(x) for s, x in zip(streams, inputs)]
    embedded = [s.patch_embed(x) for s, x in zip(streams, inputs)]
    tokens, shape = [e[0] for e in embedded], embedded[0][1]
    n_stages = len(streams[0].stages)
    for i in range(n_stages):
        tokens = [s.stages[i](t, shape) for s, t in zip(streams, tokens)]
        if encoder_mix is not None:
            tokens = list(encoder_mix[i](*tokens))
        for k, (s, t) in enumerate(zip(streams, tokens)):
            skips[k].append(s.stage_output(i, t, shape))
        if i < n_stages - 1:
            merged = [s.merges[i](t, shape) for s, t in zip(streams, tokens)]
            tokens, shape = [m[0] for m in merged], merged[0][1]
    features = [sk.pop() for sk in skips]
    for j in range(len(streams[0].decoder)):
        skip_for = [sk.pop() if sk else cs.pop(0) for sk, cs in zip(skips, conv_skips)]
        features = [s.decoder[j](f, skip) for s, f, skip in zip(streams, features, skip_for)]
        if decoder_mix is not None:
            features = list(decoder_mix[j](*features))
    return features


class RegistrationNetwork(nn.Module):
    """CoRX-NET (architecture "corx") or TransMorph (architecture "transmorph")."""

    def __init__(self, cfg: NetworkConfig):
        super().__init__()
        self.config = cfg
        n_streams = 2 if cfg.architecture == "corx" else 1
        self.streams = nn.ModuleList(SwinStream(cfg) for _ in range(n_streams))
        if cfg.cross_stitch:
            self.encoder_stitch = nn.ModuleList(CrossStitch() for _ in cfg.depths)
            self.decoder_stitch = nn.ModuleList(CrossStitch() for _ in self.streams[0].decoder)
        else:
            self.encoder_stitch = self.decoder_stitch = None
        self.head = RegistrationHead(self.streams[0].out_channels)
        self.spect_head = None
        if cfg.spect_correction:                      # starts at zero: a fine-tuned CT network is unchanged
            self.spect_head = Conv3d(self.streams[0].out_channels, 3, 3, padding=1)
            nn.init.zeros_(self.spect_head.weight)
            nn.init.zeros_(self.spect_head.bias)

    def spect_correction(self, features: torch.Tensor) -> torch.Tensor:
        """The smooth SPECT correction (B, 3, Z, Y, X) network voxels: the head's output averaged over cells
        of ``spect_correction_cell`` voxels and interpolated trilinearly onto the network grid."""
        cell = self.config.spect_correction_cell
        coarse = F.avg_pool3d(self.spect_head(features), cell, stride=cell)
        return F.interpolate(coarse, size=tuple(self.config.image_size), mode="trilinear", align_corners=False)

    def forward(self, fixed_ct, moving_ct, fixed_spect=None, moving_spect=None, with_spect: bool = False):
        """Displacement (B, 3, Z, Y, X) in network voxels, channels (z, y, x), which the CT follows; with
        ``with_spect`` (CT field, SPECT field): the SPECT field is the CT field plus the SPECT correction
        where the network has one, else the CT field itself."""
        expected = tuple(self.config.image_size)
        needs_spect = self.config.architecture == "corx"
        for name, t, needed in (("fixed CT", fixed_ct, True), ("moving CT", moving_ct, True),
                                ("fixed SPECT", fixed_spect, needs_spect), ("moving SPECT", moving_spect, needs_spect)):
            if t is None and not needed:
                continue
            if t is None:
                raise ValueError(f"CoRX-NET needs the {name} image")
            if t.dim() != 5 or tuple(t.shape[2:]) != expected or t.shape[1] != 1:
                raise ValueError(f"{name} must have shape (B, 1, {expected[0]}, {expected[1]}, {expected[2]}), "
                                 f"got {tuple(t.shape)}; preprocess it onto the network grid first")
        inputs = [torch.cat([moving_ct, fixed_ct], dim=1)]
        if len(self.streams) == 2:
            inputs.append(torch.cat([moving_spect, fixed_spect], dim=1))
        features = sum(run_streams(list(self.streams), inputs, self.encoder_stitch, self.decoder_stitch))
        field = self.head(features)
        if self.config.diffeomorphic:
            field = integrate_velocity(field, self.config.integration_steps)
        if self.config.flow_level == 1:
            field = upsample_displacement(field, expected)
        if not with_spect:
            return field
        return field, (field if self.spect_head is None else field + self.spect_correction(features))


def build_network(cfg: NetworkConfig) -> RegistrationNetwork:
    return RegistrationNetwork(cfg)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
