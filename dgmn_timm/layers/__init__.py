from .dgmn import DGMN, DGMNHead, NodeLinear
