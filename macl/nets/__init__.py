"""Networks: the 2D/3D U-Net, projection heads, MACL's asymmetric model, the fine-tuning net.

Open `unet.py` first, then `macl_model.py` (the asymmetric encoder / decoder branches and their heads).
Any encoder–decoder (MONAI's BasicUNet / UNet / DynUNet included): `taps.py` (module paths read with forward
hooks), `adapters.py` (MACL / PCL / GCL models on the taps), `monai_maps.py`, `api.py` (`adapt`); docs/monai.md.
Fine-tuning: `finetune.py` (build, load pre-trained tensors), `freeze.py` (frozen parts, BatchNorm re-estimation),
`param_groups.py` (optimiser groups and schedule).
"""
from .adapters import TappedEncoderProjector, TappedGCLModel, TappedMACLModel
from .api import adapt
from .finetune import build_finetune_net, load_pretrained
from .heads import ImageHead, PixelHead
from .macl_model import EncoderProjector, MACLModel, MACLOutputs
from .taps import TapError, Taps
from .unet import UNet, UNetDecoder, UNetEncoder

__all__ = ["UNet", "UNetEncoder", "UNetDecoder", "PixelHead", "ImageHead", "MACLModel", "MACLOutputs",
           "EncoderProjector", "build_finetune_net", "load_pretrained", "adapt", "Taps", "TapError",
           "TappedMACLModel", "TappedEncoderProjector", "TappedGCLModel"]
