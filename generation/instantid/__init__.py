"""InstantID building blocks, written for this project after the paper and the public release.

- `resampler`: the IP-Adapter Resampler that turns a face embedding into ID tokens.
- `attention`: decoupled cross-attention processors that add the ID tokens to the SDXL UNet.
- `keypoints`: IdentityNet's 5-keypoint control image.
- `weights`: strict loading of the released `ip-adapter.bin`.

The generation method that puts them together is `generation.methods.instantid_sdxl`.
"""

from generation.instantid.attention import IPAttnProcessor, install_ip_processors, ip_adapter_keys, set_ip_scale
from generation.instantid.keypoints import draw_keypoints, place_keypoints
from generation.instantid.resampler import INSTANTID_RESAMPLER, Resampler, config_from_state_dict

__all__ = [
    "INSTANTID_RESAMPLER",
    "IPAttnProcessor",
    "Resampler",
    "config_from_state_dict",
    "draw_keypoints",
    "install_ip_processors",
    "ip_adapter_keys",
    "place_keypoints",
    "set_ip_scale",
]
