""" Pretrained cfgs of the ResNets with added layers that load timm's plain-ResNet ImageNet weights. """
from typing import Any, Dict

__all__ = ['resnet_weights_cfg', 'RSB_CFG']

# timm's ResNet Strikes Back weights (a1 / a1h): their eval settings and license
RSB_CFG = dict(interpolation='bicubic', crop_pct=0.95, test_input_size=(3, 288, 288), test_crop_pct=1.0,
               license='apache-2.0')


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
