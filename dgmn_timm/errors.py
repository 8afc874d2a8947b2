""" The errors a user gets for weights or data that cannot be used: the bottom floor, importable by every
module (models included).

A weights file that cannot be used raises ``CheckpointError`` (a ``ValueError``) or a subclass, with one line
that names the file, says what is wrong with it and what to do; a data folder, ``DataDirError``.
"""
from typing import Any, Collection, List, Mapping, Sequence

import torch

__all__ = [
    'CheckpointError', 'CheckpointNotFoundError', 'CheckpointMismatchError', 'DataDirError',
    'abbrev', 'shape_mismatches', 'mismatch_error', 'mismatch',
]


class CheckpointError(ValueError):
    """ A weights file cannot be used: the message names the file, the problem and what to do. """


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """ The weights file, folder or Hub repo does not exist or cannot be reached. """


class CheckpointMismatchError(CheckpointError, RuntimeError):
    """ The weights were read but do not fit the model (another variant or architecture, wrong shapes).

    Also a RuntimeError, as ``nn.Module.load_state_dict`` raises for the same mistakes.
    """


class DataDirError(ValueError):
    """ A data folder or file is missing, empty, unreadable or not laid out as the tool needs. """


def abbrev(items: Sequence[str], n: int = 8) -> str:
    """ The first ``n`` items, comma-separated, with a count of the rest. """
    items = list(items)
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
) -> CheckpointMismatchError:
    """ An error whose one-line message lists the missing, unexpected and mis-shaped keys after ``title``. """
    msg = []
    if missing:
        msg.append(f'{missing_label} ({len(missing)}): {abbrev(missing)}')
    if unexpected:
        msg.append(f'Unexpected keys ({len(unexpected)}): {abbrev(unexpected)}')
    if mismatched:
        msg.append(f'Shape mismatches ({len(mismatched)}): {abbrev(mismatched)}')
    return CheckpointMismatchError(f'{title} ' + '; '.join(msg))


def mismatch(source: Any, error: BaseException) -> CheckpointMismatchError:
    """ The one-line error for weights that were read from ``source`` but do not fit the model. """
    return CheckpointMismatchError(' '.join(f'{source}: {error}'.split()))
