""" What the training and inference tools share: models from names or files, devices, files, training state,
and the epoch loop of the dense (detection and segmentation) training scripts.

Dense training
    ``add_dense_args`` and ``train_dense`` hold the argument group, optimiser, schedule, epoch
    loop, metrics file, checkpoints and training state of ``scripts/train_detection.py`` and
    ``scripts/train_segmentation.py``; a script gives its data, model, loss and evaluation.
"""
import argparse
import contextlib
import difflib
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import timm
from timm.utils import NativeScaler, dispatch_clip_grad, random_seed
from timm.utils.distributed import init_distributed_device_so

from ..errors import CheckpointError, mismatch
from ..weights.checkpoints import create_with_weights, read_checkpoint, unwrap_state_dict
from ..weights.hub import pretrained_file
from .cli import UsageError, add_alias, check_model_name, check_positive, check_run_folder


TRAIN_STATE = 'train_state.pt'


# --------------------------------------------------------------------------------------------
# models


def create_model(
        model_name: str,
        pretrained: Any = None,
        checkpoint: Optional[str] = None,
        num_classes: Optional[int] = None,
        **kwargs,
) -> torch.nn.Module:
    """ Build a registered model from scratch, a pretrained tag or a weights file (the scripts' models).

    Args:
        model_name: registered name, optionally with a pretrained tag ('dgmn2_tiny.in1k').
        pretrained: False/None for random weights, True for the default tag, or a tag string. The weights
            come from the local Hugging Face cache or one Hub request (``weights.hub.pretrained_file``).
        checkpoint: a weights file or converted folder in any layout the model loads (ours, the
            authors', timm's), read by ``dgmn_timm.weights.checkpoints`` (``create_with_weights``): the
            model is built with the file's classifier, loaded strictly, and its classifier is then
            reset to ``num_classes`` if that differs (a new head on the trained backbone).
        num_classes: classifier size (None: the model's default or the file's, 0: no classifier).
        kwargs: passed to ``timm.create_model``.

    Raises:
        CheckpointError: the weights cannot be found or read, or do not fit the model.
    """
    if pretrained and checkpoint:
        raise UsageError('give --pretrained or --checkpoint, not both')
    name = model_name
    if isinstance(pretrained, str) and pretrained.lower() not in ('', 'true', 'default'):
        name = f'{model_name.split(".")[0]}.{pretrained}'
    if pretrained:
        checkpoint = pretrained_file(name)
    if checkpoint:
        return create_with_weights(name, checkpoint, num_classes=num_classes, **kwargs)
    if num_classes is not None:
        kwargs['num_classes'] = num_classes
    return timm.create_model(name, **kwargs)


# --------------------------------------------------------------------------------------------
# data loaders


def make_loader(dataset, batch_size: int, workers: int, shuffle: bool = False, seed: Optional[int] = None, **kwargs
                ) -> torch.utils.data.DataLoader:
    """ A DataLoader with ``workers`` processes (torch gives each one intra-op thread); ``seed`` fixes the
    shuffle order. """
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, num_workers=workers, generator=generator, **kwargs)


# --------------------------------------------------------------------------------------------
# devices and distributed


@dataclass
class DistInfo:
    device: torch.device
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    distributed: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(device: str = 'auto') -> torch.device:
    """ ``auto`` -> cuda if available, else cpu; ``UsageError`` for an unknown or unavailable device. """
    if device in (None, '', 'auto'):
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UsageError(f'unknown --device {device!r}; use cpu, cuda, cuda:N or auto') from None
    if dev.type == 'cuda' and not torch.cuda.is_available():
        raise UsageError(f'--device {device}: CUDA is not available here; use --device cpu')
    return dev


def init_distributed(device: str = 'auto') -> DistInfo:
    """ The device, and the process group under torchrun (timm's set-up: gloo on CPU, nccl on GPU). """
    info = init_distributed_device_so(str(resolve_device(device)))
    return DistInfo(device=torch.device(info['device']), rank=info['global_rank'], local_rank=info['local_rank'],
                    world_size=info['world_size'], distributed=info['distributed'])


def barrier(info: DistInfo):
    if info.distributed:
        dist.barrier()


def all_reduce_sum(values: Sequence[float], info: DistInfo) -> List[float]:
    """ Sum a few numbers over all ranks (float64, exact for counts). """
    if not info.distributed:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


# --------------------------------------------------------------------------------------------
# mixed precision and the update step


def resolve_amp_dtype(device: torch.device, amp_dtype: Optional[str] = None) -> torch.dtype:
    """ bfloat16 on CPU; float16 on GPU unless ``amp_dtype`` says otherwise. """
    if amp_dtype in (None, '', 'auto'):
        return torch.float16 if device.type == 'cuda' else torch.bfloat16
    dtypes = {'float16': torch.float16, 'bfloat16': torch.bfloat16}
    if amp_dtype not in dtypes:
        raise UsageError(f'unknown --amp-dtype {amp_dtype}; use float16 or bfloat16')
    if device.type == 'cpu' and amp_dtype == 'float16':
        raise UsageError('float16 autocast is for GPUs; use --amp-dtype bfloat16 on CPU')
    return dtypes[amp_dtype]


def autocast(device: torch.device, dtype: Optional[torch.dtype]):
    """ torch.autocast for ``dtype``, or a no-op context when ``dtype`` is None (AMP off). """
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def backward_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, loss_scaler: Optional[NativeScaler],
                  parameters, clip_grad: Optional[float] = None, clip_mode: str = 'norm'):
    """ One update: zero grads, backward (through timm's ``NativeScaler`` for float16), clip, step. """
    optimizer.zero_grad(set_to_none=True)
    if loss_scaler is not None:
        loss_scaler(loss, optimizer, clip_grad=clip_grad or None, clip_mode=clip_mode, parameters=parameters)
        return
    loss.backward()
    if clip_grad:
        dispatch_clip_grad(parameters, clip_grad, mode=clip_mode)
    optimizer.step()


# --------------------------------------------------------------------------------------------
# RNG state (for --resume)


def rng_state() -> Dict[str, Any]:
    """ RNG states of Python, NumPy and torch, in a form torch.load(weights_only=True) reads back. """
    np_state = np.random.get_state()
    state = dict(
        python=random.getstate(),
        numpy=(np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]),
               float(np_state[4])),
        torch=torch.get_rng_state(),
    )
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]):
    py = state['python']
    random.setstate((py[0], tuple(py[1]), py[2]))
    name, keys, pos, has_gauss, cached = state['numpy']
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state['torch'])
    if 'cuda' in state and torch.cuda.is_available() and len(state['cuda']) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state['cuda'])


# --------------------------------------------------------------------------------------------
# files


@contextlib.contextmanager
def atomic_path(path: str):
    """ Yield a temp path next to ``path`` (same extension); on success it replaces ``path``, on error it goes. """
    root, ext = os.path.splitext(path)
    tmp = f'{root}.tmp{ext}'
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_safetensors(state_dict: Dict[str, torch.Tensor], path: str, metadata: Optional[Dict[str, Any]] = None):
    """ Write a state dict as safetensors, atomically. Metadata values that are not strings are stored as JSON. """
    from safetensors.torch import save_file
    tensors = {k: v.detach().to('cpu', copy=True).contiguous() for k, v in state_dict.items()}
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=meta)


def atomic_torch_save(obj: Any, path: str):
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def atomic_write_text(text: str, path: str):
    with atomic_path(path) as tmp:
        with open(tmp, 'w', encoding='utf-8') as f:
            f.write(text)


def write_json(obj: Any, path: str):
    atomic_write_text(json.dumps(obj, indent=2, default=str), path)


def read_model_weights(path: str) -> Dict[str, torch.Tensor]:
    """ The whole model's state dict as a script saved it (a dense script's ``--checkpoint``, a run's
    ``last.safetensors``), read by ``dgmn_timm.weights.checkpoints`` before the model is built.

    Its ``backbone.`` keys belong to the model, so they are kept as they are.
    """
    return unwrap_state_dict(read_checkpoint(path), source=path, backbone_only=False)


def load_model_weights(model: torch.nn.Module, state_dict: Dict[str, torch.Tensor], path: str):
    """ Load ``read_model_weights``' result strictly; ``CheckpointMismatchError`` if it does not fit. """
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as e:
        raise mismatch(path, e) from e


def load_train_state(path: str) -> Dict[str, Any]:
    """ A training state written by a script (read by ``dgmn_timm.weights.checkpoints``); ``UsageError`` if unreadable. """
    if not os.path.isfile(path):
        raise UsageError(f'no training state to resume from at {path}')
    try:
        state = read_checkpoint(path)
    except CheckpointError as e:  # truncated, corrupt, or not a torch file: the user's file, not our bug
        raise UsageError(f'cannot read the training state to resume from: {e} If it is not a {TRAIN_STATE} of '
                         f'this script, start over with --overwrite') from None
    if not isinstance(state, dict) or 'epoch' not in state:
        raise UsageError(f'{path} is not a {TRAIN_STATE} written by this script; start over with --overwrite')
    return state


# --------------------------------------------------------------------------------------------
# dense training (detection, segmentation)


DENSE_FILES = ('metrics.json', 'last.safetensors', TRAIN_STATE)


def add_dense_args(parser: argparse.ArgumentParser) -> Dict[str, Any]:
    """ The model, optimisation and run flags of the dense training scripts; returns the groups by name. """
    model = parser.add_argument_group('model')
    model.add_argument('--backbone', default='dgmn2_tiny', help='timm model name (tags, hf-hub:, local-dir: allowed)')
    model.add_argument('--pretrained', action='store_true', help='ImageNet weights for the backbone (timm)')
    model.add_argument('--pretrained-file', default=None, metavar='FILE',
                       help='local ImageNet weights file for the backbone')
    model.add_argument('--backbone-checkpoint', default=None, metavar='FILE',
                       help="detection / segmentation checkpoint whose 'backbone.' weights initialise the backbone")
    model.add_argument('--checkpoint', default=None, metavar='FILE',
                       help='weights of the whole model (a last.safetensors of this script)')
    add_alias(model, '--weights', '--checkpoint', 'checkpoint')
    model.add_argument('--frozen-stages', type=int, default=-1,
                       help='-1: none, 0: the stem, n: the stem and the first n stages')
    train = parser.add_argument_group('training')
    train.add_argument('--epochs', type=int, help='training epochs')
    train.add_argument('--batch-size', type=int, help='images per step')
    train.add_argument('--opt', choices=('adamw', 'sgd'), help='optimiser (sgd: with --momentum)')
    train.add_argument('--lr', type=float, help='peak learning rate')
    train.add_argument('--momentum', type=float, default=0.9, help='SGD momentum')
    train.add_argument('--weight-decay', type=float, help='weight decay (all parameters)')
    train.add_argument('--clip-grad', type=float, default=0.0, help='max gradient norm (0: off)')
    train.add_argument('--amp', action='store_true', help='mixed precision (bfloat16 on CPU, float16 with loss '
                                                          'scaling on GPU)')
    train.add_argument('--eval-interval', type=int, default=1, help='evaluate every n epochs (and after the last)')
    train.add_argument('--eval-only', action='store_true', help='only evaluate (use with --checkpoint)')
    return dict(model=model, train=train)


def check_dense_args(args: argparse.Namespace) -> Tuple[List[str], Optional[Dict[str, Any]]]:
    """ The checks of ``add_dense_args``' options and the run folder, before anything is built.

    Returns:
        the files of a previous run in ``--output-dir`` (for ``clear_run_files`` with ``--overwrite``)
        and, with ``--resume``, the training state to continue from (for ``train_dense``).
    """
    check_positive(args, 'epochs', 'batch_size', 'eval_interval', 'threads')
    check_positive(args, 'workers', allow_zero=('workers',))
    check_model_name(args.backbone)
    for flag in ('pretrained_file', 'backbone_checkpoint'):
        path = getattr(args, flag)
        if path is not None and not os.path.exists(path):
            raise UsageError(f'--{flag.replace("_", "-")} {path} does not exist')
    if args.eval_only:
        if args.resume or args.overwrite:
            raise UsageError('--eval-only writes only metrics.json; it takes no --resume or --overwrite')
        return check_run_folder(args.output_dir, ['metrics.json']), None
    previous = check_run_folder(args.output_dir, DENSE_FILES, args.resume, args.overwrite)
    state = None
    if args.resume:
        path = os.path.join(args.output_dir, TRAIN_STATE) if args.resume == 'auto' else args.resume
        state = load_train_state(path)
        state['path'] = path
    return previous, state


def _optimizer(params: List[torch.nn.Parameter], args: argparse.Namespace) -> torch.optim.Optimizer:
    if args.opt == 'sgd':
        return torch.optim.SGD(params, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    return torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)


def _train_one_epoch(model, loader, loss_fn, optimizer, scheduler, loss_scaler, device, amp_dtype, epoch, args
                     ) -> Dict[str, float]:
    model.train()
    totals: Dict[str, float] = {}
    count = 0
    bar = tqdm(loader, desc=f'epoch {epoch}/{args.epochs}', disable=args.no_progress, dynamic_ncols=True)
    for batch in bar:
        with autocast(device, amp_dtype):
            parts = loss_fn(model, batch, device)
        loss = sum(parts.values())
        if not math.isfinite(loss.item()):
            raise FloatingPointError(
                f'Loss is {loss.item()} at epoch {epoch} ({", ".join(f"{k} {v.item():.4g}" for k, v in parts.items())})'
                f'; lower --lr or use --clip-grad')
        backward_step(loss, optimizer, loss_scaler, [p for p in model.parameters() if p.requires_grad],
                      args.clip_grad)
        scheduler.step()
        count += 1
        totals['loss'] = totals.get('loss', 0.0) + loss.item()
        for k, v in parts.items():
            if k != 'loss':
                totals[k] = totals.get(k, 0.0) + v.item()
        bar.set_postfix(loss=f'{loss.item():.4f}', lr=f'{optimizer.param_groups[0]["lr"]:.2e}')
    return {k: v / max(1, count) for k, v in totals.items()}


def train_dense(
        args: argparse.Namespace,
        model: torch.nn.Module,
        train_loader: torch.utils.data.DataLoader,
        loss_fn: Callable[[torch.nn.Module, Any, torch.device], Dict[str, torch.Tensor]],
        evaluate: Callable[[torch.nn.Module], Dict[str, Any]],
        lr_factor: Callable[[int, int], float],
        describe: Callable[[Dict[str, Any]], str],
        history: Dict[str, Any],
        meta: Dict[str, Any],
        state: Optional[Dict[str, Any]] = None,
) -> Dict[str, Any]:
    """ The epoch loop of a dense training script.

    Args:
        args: parsed ``add_dense_args`` / ``add_run_args`` options.
        model: the model on its device (``--checkpoint`` already loaded).
        train_loader: batches for ``loss_fn``; its shuffle order is re-seeded every epoch.
        loss_fn: (model, batch, device) -> named losses; the training loss is their sum.
        evaluate: model -> metrics dict (kept in ``metrics.json``).
        lr_factor: (iteration, iterations per epoch) -> factor of ``--lr`` (a LambdaLR, stepped per iteration).
        describe: evaluation metrics -> the text that ends the epoch line (e.g. 'mIoU 0.7512').
        history: what ``metrics.json`` holds besides ``epochs`` / ``eval`` (the arguments, data sizes).
        meta: metadata of ``last.safetensors`` (the epoch is added).
        state: the training state to continue from (``check_dense_args`` reads it for ``--resume``).

    Writes ``metrics.json``, ``last.safetensors`` and ``train_state.pt`` to ``--output-dir`` after every
    epoch; ``--resume`` continues from the last state. Returns the history.
    """
    out = args.output_dir
    device = next(model.parameters()).device
    history = dict(history, args=vars(args), epochs=[], eval=None)
    metrics_path = os.path.join(out, 'metrics.json')
    if args.eval_only:
        os.makedirs(out, exist_ok=True)
        history['eval'] = evaluate(model)
        write_json(history, metrics_path)
        return history

    ckpt_path, state_path = os.path.join(out, 'last.safetensors'), os.path.join(out, TRAIN_STATE)
    amp_dtype = resolve_amp_dtype(device) if args.amp else None
    loss_scaler = NativeScaler(device.type) if amp_dtype == torch.float16 else None
    optimizer = _optimizer([p for p in model.parameters() if p.requires_grad], args)
    iters_per_epoch = len(train_loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_factor(it, iters_per_epoch))
    start_epoch = 0
    if state is not None:
        weights = os.path.join(os.path.dirname(state['path']), state['weights_file'])
        load_model_weights(model, read_model_weights(weights), weights)
        optimizer.load_state_dict(state['optimizer'])
        scheduler.load_state_dict(state['scheduler'])
        if loss_scaler is not None and state.get('scaler'):
            loss_scaler.load_state_dict(state['scaler'])
        start_epoch, history['epochs'], history['eval'] = state['epoch'], state['epochs'], state['eval']
        tqdm.write(f'Resumed from {state["path"]}: {start_epoch} of {args.epochs} epochs done')
    os.makedirs(out, exist_ok=True)

    for epoch in range(start_epoch + 1, args.epochs + 1):
        start = time.time()
        random_seed(args.seed + 10007 * epoch)  # augmentation in the main process; order via the generator
        if train_loader.generator is not None:
            train_loader.generator.manual_seed(args.seed + epoch)
        record: Dict[str, Any] = {'epoch': epoch}
        record.update(_train_one_epoch(model, train_loader, loss_fn, optimizer, scheduler, loss_scaler, device,
                                       amp_dtype, epoch, args))
        record['lr'] = optimizer.param_groups[0]['lr']
        record['time_s'] = time.time() - start
        save_safetensors(model.state_dict(), ckpt_path, dict(meta, epoch=epoch))
        if epoch % args.eval_interval == 0 or epoch == args.epochs:
            record['eval'] = history['eval'] = evaluate(model)
        history['epochs'].append(record)
        write_json(history, metrics_path)
        atomic_torch_save(dict(
            epoch=epoch, weights_file='last.safetensors', optimizer=optimizer.state_dict(),
            scheduler=scheduler.state_dict(), scaler=loss_scaler.state_dict() if loss_scaler is not None else None,
            epochs=json.loads(json.dumps(history['epochs'])), eval=json.loads(json.dumps(history['eval']))),
            state_path)
        losses = ', '.join(f'{k} {v:.4f}' for k, v in record.items() if k == 'loss' or k.startswith('loss_'))
        tqdm.write(f'epoch {epoch}/{args.epochs}: {losses}' + (f', {describe(record["eval"])}' if 'eval' in record
                                                                 else '') + f' ({record["time_s"]:.1f}s)')
    history['checkpoint'] = ckpt_path
    write_json(history, metrics_path)
    return history
