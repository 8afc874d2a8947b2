""" Small helpers shared by the checkpoint loaders: describing a state dict that does not fit. """
from typing import Any, Collection, List, Mapping, Sequence

import torch

__all__ = ['abbrev', 'shape_mismatches', 'mismatch_error']


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
