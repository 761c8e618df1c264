"""The small "ResNet-18" encoder TAG (Fifty et al. 2021) trains on 64x64 CelebA, also used by DMTG.

The released code (google-research ``tag/celeba/CelebA.ipynb``, a Keras model named ``ResNet18``;
ported to PyTorch by DMTG's ``models/resnet.py``) builds only a ResNet-18's stem and one residual
block, and this module follows the code:

    conv 3x3/1 (64 channels, 'same' padding, no bias) -> BN -> ReLU -> max pool 3x3/2 (no padding)
    -> one basic residual block 64 -> 64 with identity shortcut -> average pool 2x2/2 -> flatten

For 3x64x64 inputs the feature vector has 64 x 15 x 15 = 14,400 entries (64 -> max pool -> 31 ->
average pool -> 15; DMTG's CelebA decoders read ``in_channel: 14400``) and the network has 75,840
trainable parameters. Each task head is one linear layer (2 logits per attribute in TAG), which
the default vector head provides.

Choices where the sources differ or are silent:

* Batch norm: the original uses Keras defaults (epsilon 1e-3, moving-average decay 0.99, i.e.
  PyTorch ``eps=1e-3, momentum=0.01``); DMTG's port uses PyTorch's defaults (1e-5, 0.1). We
  follow TAG by default; ``keras_batchnorm=False`` gives DMTG's.
* Initialisation: Glorot-uniform convolutions, as both implementations do.
* Blocks: DMTG's "shared" CelebA configurations share the convolutional stem (conv, BN, ReLU,
  max pool) and branch the residual block, so the children are exactly those two:
  ``shared_blocks=1`` is DMTG's shared setting and ``0`` its fully branched one.
"""

from __future__ import annotations

from functools import partial

from torch import nn

from taskgrouping.models.backbones import register_backbone
from taskgrouping.models.resnet import BasicBlock, image_channels, positive_int


@register_backbone("tag_resnet")
def tag_resnet(input_shape: tuple[int, ...], width: int = 64, keras_batchnorm: bool = True) -> nn.Sequential:
    """TAG's CelebA encoder (module docstring); returns a flat feature vector.

    Args:
        input_shape: (C, H, W); H and W at least 4 (TAG uses 64x64).
        width: channels of the stem and the residual block (TAG: 64).
        keras_batchnorm: Keras batch-norm constants (TAG) instead of PyTorch's (DMTG's port).
    """
    c = image_channels("tag_resnet", input_shape)
    width = positive_int("tag_resnet", "width", width)
    if min(input_shape[1:]) < 4:
        raise ValueError(f"backbone 'tag_resnet' needs H, W >= 4 (max pool 3x3/2 then average pool 2x2); "
                         f"got input shape {tuple(input_shape)}")
    norm = partial(nn.BatchNorm2d, eps=1e-3, momentum=0.01) if keras_batchnorm else nn.BatchNorm2d
    stem = nn.Sequential(nn.Conv2d(c, width, 3, stride=1, padding=1, bias=False), norm(width), nn.ReLU(),
                         nn.MaxPool2d(3, stride=2))
    residual = nn.Sequential(BasicBlock(width, width, stride=1, norm=norm), nn.AvgPool2d(2), nn.Flatten())
    net = nn.Sequential(stem, residual)
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.xavier_uniform_(m.weight)
    return net
