"""CoRX-NET, its ablation and TransMorph: configs, layers, networks, transformer, losses, metrics."""
from .config import NetworkConfig, NAMED_CONFIGS, PAPER_PARAMETER_COUNTS, named_config  # noqa: F401
from .networks import build_network, count_parameters  # noqa: F401
