from .dgmn2 import DGMN2, checkpoint_filter_fn as dgmn2_checkpoint_filter_fn
from .resnet_dgmn import ResNetDGMN, DGMNBottleneck, checkpoint_filter_fn as resnet_dgmn_checkpoint_filter_fn
