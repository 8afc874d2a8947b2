""" Small helpers shared by the checkpoint loaders: safe reading, describing a state dict that does not fit. """
import argparse
import os
from typing import Any, Collection, List, Mapping, Sequence, Union

import torch

__all__ = ['safe_load', 'abbrev', 'shape_mismatches', 'mismatch_error']


def safe_load(path: Union[str, os.PathLike], map_location: Any = 'cpu', **kwargs) -> Any:
    """ ``torch.load(weights_only=True)`` that also allows ``argparse.Namespace`` and nothing else.

    The authors' DeiT-style checkpoints keep their training arguments as a Namespace under 'args'.
    ``import dgmn_timm`` registers that class globally; but ``torch.serialization.safe_globals``
    contexts (timm's loader uses one) remove it again on exit, so it is re-allowed here as needed.
    """
    if argparse.Namespace in torch.serialization.get_safe_globals():
        return torch.load(path, map_location=map_location, weights_only=True, **kwargs)
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location=map_location, weights_only=True, **kwargs)


def abbrev(items: Sequence[str], n: int = 8) -> str:
    """ The first ``n`` items, comma-separated, with a count of the rest. """
    more = f', ... (+{len(items) - n} more)' if len(items) > n else ''
    return ', '.join(items[:n]) + more


def shape_mismatches(
        state_dict: Mapping[str, Any],
        own: Mapping[str, torch.Tensor],
        skip: Collection[str] = (),
) -> List[str]:
    """ 'key: checkpoint (shape) vs model (shape)' for every tensor whose shape differs from the model's. """
    return [
        f'{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}'
        for k, v in state_dict.items()
        if k in own and k not in skip and isinstance(v, torch.Tensor) and v.shape != own[k].shape
    ]


def mismatch_error(
        title: str,
        missing: Sequence[str] = (),
        unexpected: Sequence[str] = (),
        mismatched: Sequence[str] = (),
        missing_label: str = 'Missing keys',
) -> RuntimeError:
    """ A RuntimeError whose message lists the missing, unexpected and mis-shaped keys under ``title``. """
    msg = [title]
    if missing:
        msg.append(f'{missing_label} ({len(missing)}): {abbrev(missing)}')
    if unexpected:
        msg.append(f'Unexpected keys ({len(unexpected)}): {abbrev(unexpected)}')
    if mismatched:
        msg.append(f'Shape mismatches ({len(mismatched)}): {abbrev(mismatched)}')
    return RuntimeError('\n  '.join(msg))
