"""What several benchmarks share: a randomly initialised CARE model folder and the JSON report ending."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np


def random_care_model(path: Path, *, kern_size: int, n_first: int, depth: int = 2, channel: str = "AC-15") -> Path:
    """Export a residual CARE U-Net with random but well-scaled weights (activations neither vanish nor explode)."""
    from l2l_scale.model import ModelSpec, build_unet, export_model

    spec = ModelSpec(n_dim=2, n_channel_in=1, n_channel_out=1, unet_n_depth=depth, unet_kern_size=kern_size,
                     unet_n_first=n_first, unet_last_activation="linear", unet_residual=True, probabilistic=False,
                     axes="YXC")
    net = build_unet(spec)
    rng = np.random.default_rng(0)
    net.set_weights([rng.normal(0, 1 / math.sqrt(max(1, np.prod(w.shape[:-1]))), w.shape).astype(np.float32)
                     for w in net.get_weights()])
    return export_model(net, spec, path, metadata={"channels": {"input": [channel], "output": ["phalloidin"]}})


def emit(report: dict, json_path: str | None) -> None:
    """Print the report as JSON on stdout and, with ``--json``, write the same text to that file."""
    text = json.dumps(report, indent=2)
    print(text)
    if json_path:
        Path(json_path).write_text(text + "\n")
