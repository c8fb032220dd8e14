"""Networks: the 2D/3D U-Net, projection heads, MACL's asymmetric model, the fine-tuning net.

Open `unet.py` first, then `macl_model.py` (the asymmetric encoder / decoder branches and their heads).
Fine-tuning: `finetune.py` (build, load pre-trained tensors), `freeze.py` (frozen parts, BatchNorm re-estimation),
`param_groups.py` (optimiser groups and schedule).
"""
from .finetune import build_finetune_net, load_pretrained
from .heads import ImageHead, PixelHead
from .macl_model import EncoderProjector, MACLModel, MACLOutputs
from .unet import UNet, UNetDecoder, UNetEncoder

__all__ = ["UNet", "UNetEncoder", "UNetDecoder", "PixelHead", "ImageHead", "MACLModel", "MACLOutputs",
           "EncoderProjector", "build_finetune_net", "load_pretrained"]
