"""U-Net size presets of the diffusion recipe (``--model-size``)."""

from __future__ import annotations

from typing import Any

#: U-Net presets: (base_channels, channel_mult, num_res_blocks).
MODEL_SIZES: dict[str, dict[str, Any]] = {
    "tiny": {"base_channels": 32, "channel_mult": [1, 2], "num_res_blocks": 1},
    "small": {"base_channels": 64, "channel_mult": [1, 2], "num_res_blocks": 2},
    "base": {"base_channels": 128, "channel_mult": [1, 2, 2, 2], "num_res_blocks": 2},
}
