"""Explicit network configurations (TransMorph-style config objects).

One code base builds every network; a configuration says which. The paper's three networks
(Medical Physics 2024, Table 2) are named configurations; smaller ones are the same code with
other numbers. Units: ``image_size`` in voxels (z, y, x) of the network grid.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

ARCHITECTURES = ("corx", "transmorph")


@dataclass(frozen=True)
class NetworkConfig:
    """Everything that defines a network's structure (weights excluded).

    architecture: "corx" (two streams: CT pair and SPECT pair) or "transmorph" (one stream,
        CT pair only).
    cross_stitch: learned 2x2 mix of CT and SPECT features after each Swin stage and each
        decoder double-convolution (corx only).
    embed_dim: channels of the first Swin stage, doubled per stage; depths / num_heads per stage.
    window_size: attention window in tokens (z, y, x); patch_size: voxels per token edge.
    skip_channels: channels of the two convolutional skips at 1/2 and full resolution
        (the full-resolution one is also the registration head's input width).
    flow_level: 0 predicts the field at full resolution; 1 at half resolution, then upsampled
        (drops the most expensive decoder block; for CPU-sized models).
    diffeomorphic: the head predicts a stationary velocity field integrated by scaling and
        squaring (``integration_steps``), giving a diffeomorphism.
    spect_correction: a second head predicts a smooth correction the SPECT field adds to the CT
        field (within a session SPECT and CT are not exactly registered, and breathing moves the
        uptake organs under a CT that barely shows them); smooth because it is averaged over cells of
        ``spect_correction_cell`` field voxels and interpolated back (corx only).
    """

    name: str = "custom"
    architecture: str = "corx"
    cross_stitch: bool = True
    in_channels: int = 2
    image_size: tuple = (128, 128, 128)
    patch_size: int = 4
    embed_dim: int = 64
    depths: tuple = (2, 2, 2)
    num_heads: tuple = (4, 4, 8)
    window_size: tuple = (4, 4, 4)
    mlp_ratio: float = 4.0
    qkv_bias: bool = False
    skip_channels: tuple = (32, 16)
    flow_level: int = 0
    diffeomorphic: bool = False
    integration_steps: int = 7
    spect_correction: bool = False
    spect_correction_cell: int = 8

    def __post_init__(self):
        for name in ("image_size", "depths", "num_heads", "window_size", "skip_channels"):
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
        self.validate()

    def validate(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"architecture must be one of {ARCHITECTURES}, got {self.architecture!r}")
        if len(self.depths) != len(self.num_heads) or not self.depths:
            raise ValueError("depths and num_heads need one entry per Swin stage")
        if len(self.image_size) != 3 or len(self.window_size) != 3 or len(self.skip_channels) != 2:
            raise ValueError("image_size and window_size need 3 values, skip_channels 2")
        for h, d in zip(self.num_heads, self.stage_dims):
            if d % h:
                raise ValueError(f"stage width {d} is not divisible by {h} heads")
        factor = self.patch_size * 2 ** (len(self.depths) - 1)
        if any(s % factor for s in self.image_size):
            raise ValueError(f"image_size {self.image_size} must be divisible by {factor} "
                             f"(patch {self.patch_size} x 2^(stages-1))")
        if self.flow_level not in (0, 1):
            raise ValueError("flow_level must be 0 (full resolution) or 1 (half resolution)")
        if self.architecture == "transmorph" and self.cross_stitch:
            raise ValueError("TransMorph has a single stream: cross_stitch must be False")
        if self.architecture == "transmorph" and self.spect_correction:
            raise ValueError("TransMorph does not read the SPECT: spect_correction must be False")
        field_size = [s // 2 ** self.flow_level for s in self.image_size]
        if self.spect_correction and (self.spect_correction_cell < 1
                                      or any(s % self.spect_correction_cell for s in field_size)):
            raise ValueError(f"spect_correction_cell {self.spect_correction_cell} must divide the field grid "
                             f"{tuple(field_size)}")

    @property
    def stage_dims(self) -> tuple:
        return tuple(self.embed_dim * 2 ** i for i in range(len(self.depths)))

    def to_dict(self) -> dict:
        """The fields as JSON-ready values; without the SPECT-head fields when there is none, so configurations
        stored before the head existed compare equal to themselves read back."""
        d = asdict(self)
        if not self.spect_correction:
            del d["spect_correction"], d["spect_correction_cell"]
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @staticmethod
    def from_dict(d: dict) -> "NetworkConfig":
        known = {f.name for f in fields(NetworkConfig)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown network configuration keys: {sorted(unknown)}")
        return NetworkConfig(**d)

    def with_changes(self, **changes) -> "NetworkConfig":
        """A copy with fields changed; refuses names that are not fields of the configuration."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ValueError(f"unknown network configuration field(s) {', '.join(unknown)}; the fields are "
                             f"{', '.join(sorted(known))}")
        return replace(self, **changes)


# Paper, Table 2 ("# of Parameter").
PAPER_PARAMETER_COUNTS = {
    "corx-paper": 9_557_138,
    "corx-paper-nocs": 9_557_110,
    "transmorph-paper": 20_800_563,
}

NAMED_CONFIGS = {
    # Paper CoRX-NET: per stream patch 4, embed 64, depths 2,2,2, heads 4,4,8, window 4^3.
    "corx-paper": NetworkConfig(name="corx-paper"),
    "corx-paper-nocs": NetworkConfig(name="corx-paper-nocs", cross_stitch=False),
    # "Vanilla TransMorph with 64 channels in the first layer", CT pair only.
    "transmorph-paper": NetworkConfig(name="transmorph-paper", architecture="transmorph", cross_stitch=False,
                                      depths=(2, 2, 4, 2), num_heads=(4, 4, 8, 8), window_size=(4, 4, 4),
                                      skip_channels=(32, 16)),
}
NAMED_CONFIGS.update({
    # CPU-sized versions of the same three networks (bundled-model candidates); the same code.
    "corx-cpu": NAMED_CONFIGS["corx-paper"].with_changes(name="corx-cpu", embed_dim=16, num_heads=(2, 2, 4),
                                                         skip_channels=(16, 16), flow_level=1),
    "corx-cpu-nocs": NAMED_CONFIGS["corx-paper"].with_changes(name="corx-cpu-nocs", cross_stitch=False,
                                                              embed_dim=16, num_heads=(2, 2, 4),
                                                              skip_channels=(16, 16), flow_level=1),
    "transmorph-cpu": NAMED_CONFIGS["transmorph-paper"].with_changes(name="transmorph-cpu", embed_dim=16,
                                                                     num_heads=(2, 2, 4, 4), window_size=(4, 4, 4),
                                                                     skip_channels=(16, 16), flow_level=1),
    # Tiny network for tests (64^3 input).
    "corx-tiny": NetworkConfig(name="corx-tiny", image_size=(64, 64, 64), embed_dim=8, num_heads=(2, 2, 2),
                               skip_channels=(8, 8), flow_level=1),
})


def named_config(name: str, **overrides) -> NetworkConfig:
    """A named configuration, optionally with fields changed (e.g. ``diffeomorphic=True``)."""
    if name not in NAMED_CONFIGS:
        raise ValueError(f"unknown network configuration {name!r}; choose from {sorted(NAMED_CONFIGS)}")
    cfg = NAMED_CONFIGS[name]
    return cfg.with_changes(**overrides) if overrides else cfg
