from .dgmn2 import DGMN2, checkpoint_filter_fn as dgmn2_checkpoint_filter_fn
from .resnet_dgmn import ResNetDGMN, checkpoint_filter_fn as resnet_dgmn_checkpoint_filter_fn
from .resnet_repgraph import ResNetRepGraph, checkpoint_filter_fn as resnet_repgraph_checkpoint_filter_fn
from ._resnet import GraphBottleneck
