""" Deprecated: moved to ``dgmn_timm.checkpoints`` (kept for one release for existing imports). """
from .checkpoints import abbrev, mismatch_error, read_checkpoint as safe_load, shape_mismatches

__all__ = ['safe_load', 'abbrev', 'shape_mismatches', 'mismatch_error']
