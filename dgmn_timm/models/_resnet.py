""" What the ResNets with added layers share: the block with the insertion points, and the pretrained
cfgs that load timm's plain-ResNet ImageNet weights. """
from typing import Any, Dict, Optional

import torch
import torch.nn as nn
from timm.models.resnet import Bottleneck

__all__ = ['GraphBottleneck', 'resnet_weights_cfg', 'RSB_CFG']

# timm's ResNet Strikes Back weights (a1 / a1h): their eval settings and license
RSB_CFG = dict(interpolation='bicubic', crop_pct=0.95, test_input_size=(3, 288, 288), test_crop_pct=1.0,
               license='apache-2.0')


class GraphBottleneck(Bottleneck):
    """ timm's Bottleneck with two insertion points, None until a model puts a layer in:
    ``context`` runs on the block's input (RepGraph, non-local), ``dgmn`` after the 3x3 conv
    (conv2 -> bn2 -> act (-> aa), before conv3). The forward is timm's with those two lines, so
    the ResNet's state-dict keys and FX node names stay timm's. """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.context: Optional[nn.Module] = None
        self.dgmn: Optional[nn.Module] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.context is not None:
            x = self.context(x)
        shortcut = x

        x = self.act1(self.bn1(self.conv1(x)))
        x = self.conv2(x)
        x = self.bn2(x)
        x = self.drop_block(x)
        x = self.act2(x)
        x = self.aa(x)
        if self.dgmn is not None:
            x = self.dgmn(x)
        x = self.bn3(self.conv3(x))
        if self.se is not None:
            x = self.se(x)
        if self.drop_path is not None:
            x = self.drop_path(x)
        if self.downsample is not None:
            shortcut = self.downsample(shortcut)
        x = x + shortcut
        return self.act3(x)


def resnet_weights_cfg(
        hf_hub_id: str,
        paper_ids: str,
        paper_name: str,
        not_pretrained: str,
        **kwargs,
) -> Dict[str, Any]:
    """ A cfg pointing at timm's plain-ResNet weights on the Hub (``hf_hub_id``).

    ``paper_ids`` / ``paper_name`` name the paper of the added layers; ``not_pretrained`` says
    which of them the weights leave at their initialisation (in the description and notes).
    """
    return {
        'hf_hub_id': hf_hub_id,
        'num_classes': 1000,
        'input_size': (3, 224, 224),
        'pool_size': (7, 7),
        'crop_pct': 0.875,
        'interpolation': 'bilinear',
        'mean': (0.485, 0.456, 0.406),
        'std': (0.229, 0.224, 0.225),
        'first_conv': 'conv1',
        'classifier': 'fc',
        'paper_ids': paper_ids,
        'paper_name': paper_name,
        'origin_url': 'https://github.com/huggingface/pytorch-image-models',
        'description': f'ResNet part: timm weights {hf_hub_id}. {not_pretrained}',
        'notes': (not_pretrained, f'ResNet weights: {hf_hub_id}'),
        **kwargs,
    }
