from .dgmn2 import DGMN2, checkpoint_filter_fn as dgmn2_checkpoint_filter_fn
