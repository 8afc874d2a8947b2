""" The one switch between the fused sampled-attention op and its portable path, read when a layer is built. """
from timm.layers import is_exportable, is_scriptable, use_fused_attn

__all__ = ['use_fused_sampled_attention']


def use_fused_sampled_attention(attn_drop: float = 0.) -> bool:
    """ True: the layer calls ``torch.ops.dgmn_timm.sampled_attention``; False: ``sampled_attention_portable``.

    timm's switches select the portable path as they do timm's own fused attention:
    ``set_fused_attn(False)`` (or ``TIMM_FUSED_ATTN=0``), ``set_layer_config(exportable=True)`` or
    ``scriptable=True``, ``create_model(..., exportable=True)``; so does attention dropout, which
    the op does not have. DGMN2's and RepGraph's layers store the answer as ``fused_attn``.
    """
    return use_fused_attn() and not (is_exportable() or is_scriptable()) and attn_drop == 0.
