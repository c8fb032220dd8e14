"""macl: contrastive pre-training of medical segmentation networks (MACL, PCL, SimCLR) on 2D slices and 3D patches.

Entry points:
    macl.settings.config.PretrainConfig        every setting (net, method, optim, train)
    macl.train.pretrain(config, batches, run_dir, resume=None, progress=None)
    macl.train.export_weights(checkpoint, out_path=None)
    macl.nets.build_finetune_net(net, num_classes), macl.nets.load_pretrained(net, state_dict)
Every contrastive term is computed by the sibling package `macl_kernels`.
"""
from .settings import MethodConfig, NetConfig, OptimConfig, PretrainConfig, TrainConfig

__all__ = ["PretrainConfig", "NetConfig", "MethodConfig", "OptimConfig", "TrainConfig"]
__version__ = "0.1.0"  # the one version source: pyproject.toml reads it (setuptools dynamic)
