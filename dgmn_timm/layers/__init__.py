from .fused import use_fused_sampled_attention
from .dgmn import DGMN, DGMNHead, NodeLinear
from .repgraph import RepGraph, NonLocal2d
from .cdgc import CDGC, cdgc_class_masks
