from .dgmn import DGMN, DGMNHead, NodeLinear
from .cdgc import CDGC, cdgc_class_masks
