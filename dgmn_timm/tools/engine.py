""" What the training and inference tools share: models from names or files, devices, files, training state,
and the one training loop of ``finetune``, ``train_detection`` and ``train_segmentation``.

The training loop
    ``add_train_args``, ``check_train_args`` and ``train`` hold the optimisation flags, the run-folder
    and ``--resume`` checks, and the epoch loop; a script gives its data, model and a ``Task`` (forward,
    evaluation, the metric that picks the best weights). The loop runs timm's ``create_optimizer_v2`` and
    ``create_scheduler_v2`` (stepped per update), ``NativeScaler`` for float16 AMP and ``ModelEmaV3``
    (``--model-ema``), and writes one run folder layout: ``args.json``, ``metrics.jsonl`` (one JSON line
    per epoch), ``last.safetensors`` / ``best.safetensors``, ``train_state.pt`` and ``summary.json``, all
    with the same permission bits.

How the dense scripts' paper recipes map onto timm's factories
    - weight decay on every parameter: ``create_optimizer_v2(filter_bias_and_bn=False)``
      (``--decay-bias-norm``, on by default in the dense scripts; finetune follows timm and skips
      biases and norms);
    - detection's 500 warm-up iterations from 1e-3 x lr, then x0.1 after epochs 8 and 11: ``sched='multistep'``,
      ``decay_milestones`` in epochs, ``warmup_lr = lr * --warmup-ratio`` and ``warmup_epochs = iterations /
      updates per epoch`` (``create_scheduler(warmup_steps=...)``); stepped per update, a milestone applies
      one update early (timm's convention) and warm-up is not scaled by a milestone it overlaps;
    - segmentation's poly decay over all iterations: ``sched='poly'`` with ``decay_rate`` the power;
      with ``--min-lr`` above 0 timm decays towards it (lr_min + (lr - lr_min)(1 - t/T)^p) rather than
      cutting the decay off at it.
"""
import argparse
import contextlib
import difflib
import json
import math
import os
import signal
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from tqdm import tqdm

import timm
from timm.utils import NativeScaler, dispatch_clip_grad, random_seed
from timm.utils.distributed import init_distributed_device_so

from ..errors import CheckpointError, DataDirError, mismatch
from ..weights.checkpoints import create_with_weights, read_checkpoint, unwrap_state_dict
from ..weights.hub import pretrained_file
from .cli import UsageError, check_model_name, check_positive, check_run_folder


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
    name = pretrained_name(model_name, pretrained)
    if pretrained:
        checkpoint = pretrained_weights(model_name, pretrained)
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
# files


def _file_mode() -> int:
    """ The permission bits ``open()`` gives a new file under the current umask (0644 under 022). """
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def atomic_path(path: str):
    """ Yield a temp path next to ``path`` (same extension); on success it replaces ``path``, on error it goes. """
    root, ext = os.path.splitext(path)
    tmp = f'{root}.tmp{ext}'
    try:
        yield tmp
        os.chmod(tmp, _file_mode())  # writers differ (safetensors: 0600, open(): 0666 & ~umask); files do not
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
# pretrained weights and input sizes (checked before a model is built)


def pretrained_name(model_name: str, pretrained: Any) -> str:
    """ The model name with the ``--pretrained TAG`` tag, if one is given. """
    if isinstance(pretrained, str) and pretrained.lower() not in ('', 'true', 'default'):
        return f'{model_name.split(".")[0]}.{pretrained}'
    return model_name


def pretrained_weights(model_name: str, pretrained: Any, flag: str = '--pretrained') -> Optional[str]:
    """ The local weights file of ``--pretrained [TAG]`` for ``model_name`` (None without the flag), found before
    any work: from the local Hugging Face cache, else one Hub request (``weights.hub.pretrained_file``).

    Raises:
        UsageError: the model has no such tag.
        CheckpointNotFoundError: the weights are not cached and the Hub cannot give them (one line, within one
            request; at once with HF_HUB_OFFLINE=1).
    """
    if not pretrained:
        return None
    name = pretrained_name(model_name, pretrained)
    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except RuntimeError:  # an unknown tag
        cfg = None
    if cfg is None and '.' in name:
        tags = [m.split('.', 1)[1] for m in timm.list_pretrained(f'{name.split(".")[0]}.*')]
        raise UsageError(f'{flag}: {name} has no pretrained weights' + (f'; tags: {", ".join(tags)}' if tags else ''))
    return pretrained_file(name)


# --------------------------------------------------------------------------------------------
# the training loop (finetune, train_detection, train_segmentation)


ARGS_FILE, METRICS_FILE, SUMMARY_FILE = 'args.json', 'metrics.jsonl', 'summary.json'
LAST_FILE, BEST_FILE = 'last.safetensors', 'best.safetensors'
RUN_FILES = (ARGS_FILE, METRICS_FILE, SUMMARY_FILE, LAST_FILE, BEST_FILE, TRAIN_STATE)
# options a --resume may change: how long the run goes, and how it runs, not what it trains
RESUME_MAY_CHANGE = ('epochs', 'stop_after', 'resume', 'overwrite', 'device', 'threads', 'workers', 'no_progress',
                     'pin_mem')


def add_train_args(parser: argparse.ArgumentParser, **defaults) -> argparse._ArgumentGroup:
    """ The optimisation, EMA and precision flags of the training loop (``train``); ``defaults`` set theirs. """
    g = parser.add_argument_group('training')
    g.add_argument('--epochs', type=int, help='training epochs')
    g.add_argument('--batch-size', type=int, help='images per step and process')
    g.add_argument('--opt', help='any timm optimizer name (adamw, sgd: Nesterov momentum, momentum: plain)')
    g.add_argument('--lr', type=float, help='peak learning rate')
    g.add_argument('--momentum', type=float, default=0.9, help='momentum of SGD-like optimizers')
    g.add_argument('--weight-decay', type=float, help='weight decay')
    g.add_argument('--decay-bias-norm', action=argparse.BooleanOptionalAction, default=False,
                   help='weight decay on biases and normalisation parameters too (timm skips them)')
    g.add_argument('--clip-grad', type=float, default=None, help='gradient clipping value (default: off)')
    g.add_argument('--clip-mode', default='norm', choices=['norm', 'value', 'agc'], help='what --clip-grad clips')
    g.add_argument('--model-ema', action='store_true', help='keep an EMA of the weights (evaluated too)')
    g.add_argument('--model-ema-decay', type=float, default=0.9998, help='EMA decay per update')
    g.add_argument('--model-ema-warmup', action='store_true', help='ramp the EMA decay up from 0')
    g.add_argument('--amp', action='store_true', help='mixed precision (bfloat16 on CPU, float16 with loss '
                                                      'scaling on GPU)')
    g.add_argument('--amp-dtype', default='auto', choices=['auto', 'float16', 'bfloat16'],
                   help='autocast dtype of --amp (auto: bfloat16 on CPU, float16 on GPU)')
    g.add_argument('--eval-interval', type=int, default=1, help='evaluate every n epochs (and after the last)')
    g.add_argument('--stop-after', type=int, default=None, metavar='N',
                   help='end this session after N epochs (e.g. a job time limit); continue with --resume')
    parser.set_defaults(**defaults)
    return g


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def check_train_args(args: argparse.Namespace) -> Tuple[List[str], Optional[Dict[str, Any]]]:
    """ The checks of the training loop's flags and run folder, before anything is built or written.

    Returns:
        the files of a previous run in ``--output-dir`` (for ``clear_run_files`` with ``--overwrite``)
        and, with ``--resume``, the training state to continue from (for ``train``).

    Raises:
        UsageError: a bad value, a folder holding another run, or a ``--resume`` whose options differ
            from the run's in more than ``RESUME_MAY_CHANGE``.
    """
    check_positive(args, 'epochs', 'batch_size', 'eval_interval', 'stop_after', 'threads')
    check_positive(args, 'workers', allow_zero=('workers',))
    from timm.optim import list_optimizers
    names = list_optimizers()
    opt = args.opt.lower()
    if (opt[len('lookahead_'):] if opt.startswith('lookahead_') else opt) not in names:
        close = difflib.get_close_matches(opt, names, n=3)
        raise UsageError(f'unknown --opt {args.opt}' + (f'; did you mean {", ".join(close)}?' if close else
                                                       '; see timm.optim.list_optimizers()'))
    previous = check_run_folder(args.output_dir, RUN_FILES, args.resume, args.overwrite)
    if not args.resume:
        return previous, None
    path = os.path.join(args.output_dir, TRAIN_STATE) if args.resume == 'auto' else args.resume
    state = load_train_state(path)
    if not {'args', 'num_updates', 'train_time_s', 'last'} <= set(state):
        raise UsageError(f'{path} is not a {TRAIN_STATE} written by this script; start over with --overwrite')
    now = _jsonable(vars(args))
    differ = sorted(k for k in set(now) | set(state['args'])
                    if k not in RESUME_MAY_CHANGE and now.get(k) != state['args'].get(k))
    if differ:
        raise UsageError('--resume: the run was trained with other ' + ', '.join(
            f'--{k.replace("_", "-")} ({state["args"].get(k)}, now {now.get(k)})' for k in differ)
            + '; only --epochs, --stop-after and how it runs (--device, --threads, --workers) may change')
    state['path'] = path
    return previous, state


@dataclass
class Task:
    """ What a script gives the training loop.

    Attributes:
        forward: (model, batch) -> (loss or None if the batch has no sample, named loss parts, samples,
            unreadable-sample records). Runs under autocast.
        evaluate: (model, description) -> metrics (nested dicts are flattened into the metrics line).
        score: the metric (flattened name) that picks ``best.safetensors``; higher is better.
        describe: metrics -> the text of the epoch line (e.g. 'top-1 98.44%').
        meta: metadata of the saved weights (the epoch and weights source are added).
        summary: what ``summary.json`` holds besides the loop's fields (model, classes, data sizes).
    """
    forward: Callable[[torch.nn.Module, Any], Tuple[Optional[torch.Tensor], Dict[str, torch.Tensor], int, list]]
    evaluate: Callable[[torch.nn.Module, str], Dict[str, Any]]
    score: str
    describe: Callable[[Dict[str, Any]], str]
    meta: Dict[str, Any]
    summary: Dict[str, Any]


def flatten(metrics: Dict[str, Any], prefix: str = '') -> Dict[str, Any]:
    """ {'bbox': {'AP': x}} -> {'bbox_AP': x}, with ``prefix`` before every name. """
    flat: Dict[str, Any] = {}
    for k, v in metrics.items():
        if isinstance(v, dict):
            flat.update(flatten(v, f'{prefix}{k}_'))
        else:
            flat[f'{prefix}{k}'] = v
    return flat


def create_optimizer(model: torch.nn.Module, args: argparse.Namespace, lr: float) -> torch.optim.Optimizer:
    """ timm's ``create_optimizer_v2``: biases and norms skip weight decay unless ``--decay-bias-norm``. """
    from timm.optim import create_optimizer_v2
    layer_decay = getattr(args, 'layer_decay', None)
    target = model if (layer_decay or not args.decay_bias_norm) else [p for p in model.parameters()
                                                                       if p.requires_grad]
    return create_optimizer_v2(target, opt=args.opt, lr=lr, weight_decay=args.weight_decay, momentum=args.momentum,
                               filter_bias_and_bn=not args.decay_bias_norm, layer_decay=layer_decay)


def create_scheduler(optimizer: torch.optim.Optimizer, epochs: int, updates_per_epoch: int,
                     warmup_steps: Optional[int] = None, **kwargs):
    """ timm's ``create_scheduler_v2``, stepped per update; ``warmup_steps`` counts warm-up in updates
    (instead of ``warmup_epochs``). The lr is a function of the update count, so a resume rebuilds it. """
    from timm.scheduler import create_scheduler_v2
    if warmup_steps is not None:
        kwargs['warmup_epochs'] = warmup_steps / updates_per_epoch
    scheduler, _ = create_scheduler_v2(optimizer, num_epochs=epochs, step_on_epochs=False,
                                       updates_per_epoch=updates_per_epoch, **kwargs)
    return scheduler


class _Terminated(Exception):
    pass


def _on_sigterm(main_pid: int):
    def handler(signum, frame):
        if os.getpid() != main_pid:  # a data-loading worker: just end, as without the handler
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        raise _Terminated()
    return handler


def _one_line(error: Exception) -> str:
    """ The message of an error raised in a loader worker (torch re-raises it with the worker's traceback). """
    text = str(error)
    if text.startswith('Caught ') and 'Traceback' in text:
        last = [line for line in text.splitlines() if line.strip()][-1]
        return last.split(': ', 1)[1] if ': ' in last else last
    return text


def train(
        args: argparse.Namespace,
        model: torch.nn.Module,
        train_loader: torch.utils.data.DataLoader,
        task: Task,
        schedule: Dict[str, Any],
        dist_info: DistInfo,
        state: Optional[Dict[str, Any]] = None,
        lr: Optional[float] = None,
        run_info: Optional[Dict[str, Any]] = None,
) -> Dict[str, Any]:
    """ The training loop every training script shares.

    timm's ``create_optimizer_v2`` / ``create_scheduler_v2`` (stepped per update), ``NativeScaler``
    (float16 AMP) and ``ModelEmaV3`` (``--model-ema``); DDP under torchrun.

    Args:
        args: parsed options (``add_run_args``, ``add_train_args`` and the script's own).
        model: the model on its device (initial weights loaded).
        train_loader: batches for ``task.forward``; its ``DistributedSampler``'s epoch, or the generator of
            its shuffle (``make_loader``), is set every epoch.
        task: forward, evaluation and records of the script.
        schedule: ``create_scheduler`` options (sched, warmup_epochs or warmup_steps, warmup_lr, min_lr, ...).
        dist_info: the device and process group.
        state: the training state to continue from (``check_train_args`` reads it for ``--resume``).
        lr: the peak learning rate (default ``--lr``).
        run_info: what ``args.json`` holds besides the options (resolved values, classes).

    Writes to ``--output-dir`` (rank 0): ``args.json``; after every epoch ``metrics.jsonl`` (one JSON line),
    ``last.safetensors``, ``best.safetensors`` (when ``task.score`` improves) and ``train_state.pt``;
    at the end ``summary.json``. Returns the summary.
    """
    from timm.utils import ModelEmaV3, distribute_bn
    out = args.output_dir
    device, is_main = dist_info.device, dist_info.is_main
    progress = is_main and not args.no_progress
    lr = args.lr if lr is None else lr
    amp_dtype = resolve_amp_dtype(device, args.amp_dtype) if args.amp else None
    loss_scaler = NativeScaler(device.type) if amp_dtype == torch.float16 else None
    updates_per_epoch = len(train_loader)
    optimizer = create_optimizer(model, args, lr)
    scheduler = create_scheduler(optimizer, args.epochs, updates_per_epoch, **schedule)
    ema = ModelEmaV3(model, decay=args.model_ema_decay, use_warmup=args.model_ema_warmup) if args.model_ema else None

    start_epoch, num_updates, train_time = 0, 0, 0.
    best: Dict[str, Any] = dict(epoch=0, weights=None, metrics=None)
    last: Optional[Dict[str, Any]] = None  # the last epoch's metrics line
    if state is not None:
        weights = os.path.join(os.path.dirname(os.path.abspath(state['path'])), state['weights_file'])
        load_model_weights(model, read_model_weights(weights), weights)
        optimizer.load_state_dict(state['optimizer'])
        if loss_scaler is not None and state.get('scaler'):
            loss_scaler.load_state_dict(state['scaler'])
        if ema is not None and state.get('ema') is not None:
            ema.module.load_state_dict(state['ema'])
        start_epoch, num_updates, best = state['epoch'], state['num_updates'], state['best']
        train_time, last = state['train_time_s'], state['last']
        if is_main:
            tqdm.write(f'Resumed from {state["path"]}: {start_epoch} of {args.epochs} epochs done')
    if scheduler is not None:
        scheduler.step_update(num_updates=num_updates)

    train_model = model
    if dist_info.distributed:
        from torch.nn.parallel import DistributedDataParallel
        train_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == 'cuda' else None)

    metrics_path = os.path.join(out, METRICS_FILE)

    def start_record():
        # written with the first epoch's files, so that a run failing before it leaves nothing behind
        os.makedirs(out, exist_ok=True)
        kept = []  # a resume keeps the lines of the epochs done (an interruption may have left one more)
        if state is not None and os.path.isfile(metrics_path):
            with open(metrics_path, encoding='utf-8') as f:
                kept = [line for line in f if line.strip() and json.loads(line)['epoch'] <= start_epoch]
        atomic_write_text(''.join(kept), metrics_path)
        write_json(dict(vars(args), lr_resolved=lr, world_size=dist_info.world_size, **(run_info or {})),
                   os.path.join(out, ARGS_FILE))

    end_epoch = args.epochs if args.stop_after is None else min(args.epochs, start_epoch + args.stop_after)
    session_start = time.time()
    old_handler = None
    try:
        old_handler = signal.signal(signal.SIGTERM, _on_sigterm(os.getpid()))
    except ValueError:  # not the main thread
        pass
    try:
        for epoch in range(start_epoch + 1, end_epoch + 1):
            t0 = time.time()
            # data order, augmentation, mixup and drop path draw from RNGs seeded per epoch (and rank), so a
            # resumed run continues as an uninterrupted one would
            random_seed(args.seed + 10007 * epoch, dist_info.rank)
            if hasattr(train_loader.sampler, 'set_epoch'):  # DistributedSampler: seeded with --seed + epoch - 1
                train_loader.sampler.set_epoch(epoch - 1)
            elif train_loader.generator is not None:  # make_loader's shuffle: seeded with --seed + epoch
                train_loader.generator.manual_seed(args.seed + epoch)
            elif hasattr(train_loader.dataset, 'set_epoch'):  # timm's iterable datasets: shard and sample shuffle
                train_loader.dataset.set_epoch(epoch - 1)
            train_model.train()
            sums: Dict[str, float] = {}
            n_seen = skipped = 0.
            bar = tqdm(train_loader, desc=f'epoch {epoch}/{args.epochs}', disable=not progress, dynamic_ncols=True)
            for batch in bar:
                with autocast(device, amp_dtype):
                    loss, parts, n, unreadable = task.forward(train_model, batch)
                skipped += len(unreadable)
                for item in unreadable:
                    tqdm.write(f'skipped unreadable image {item.path}: {item.reason}')
                if loss is None:
                    if not dist_info.distributed:
                        continue
                    # nothing readable in this batch: a zero step keeps the ranks in step
                    loss = sum(p.sum() * 0. for p in train_model.parameters())
                value = loss.item()
                if not math.isfinite(value):
                    raise FloatingPointError(
                        f'Loss is {value} at epoch {epoch}'
                        + (f' ({", ".join(f"{k} {v.item():.4g}" for k, v in parts.items())})' if parts else '')
                        + '; lower --lr or use --clip-grad')
                backward_step(loss, optimizer, loss_scaler, [p for p in model.parameters() if p.requires_grad],
                              args.clip_grad, args.clip_mode)
                num_updates += 1
                if scheduler is not None:
                    scheduler.step_update(num_updates=num_updates)
                if ema is not None:
                    ema.update(model, step=num_updates)
                sums['loss'] = sums.get('loss', 0.) + value * n
                for k, v in parts.items():
                    sums[k] = sums.get(k, 0.) + v.item() * n
                n_seen += n
                if progress:
                    bar.set_postfix(loss=f'{sums["loss"] / max(n_seen, 1):.4f}',
                                    lr=f'{optimizer.param_groups[0]["lr"]:.2e}')
            bar.close()
            names = sorted(sums)
            reduced = all_reduce_sum([sums[k] for k in names] + [n_seen, skipped], dist_info)
            n_seen, skipped = reduced[-2:]
            if n_seen == 0:
                raise DataDirError('No training sample could be decoded in this epoch.')
            if dist_info.distributed:
                distribute_bn(model, dist_info.world_size, reduce=True)  # same BatchNorm stats on every rank
            record: Dict[str, Any] = dict(epoch=epoch, lr=optimizer.param_groups[0]['lr'])
            record.update({f'train_{k}': v / n_seen for k, v in zip(names, reduced)})
            record.update(train_samples=int(n_seen), train_skipped=int(skipped))
            candidates = []
            if epoch % args.eval_interval == 0 or epoch == args.epochs:
                val = flatten(task.evaluate(model, 'val'))
                record.update(flatten(val, 'val_'))
                candidates.append(('model', val, model))
                if ema is not None:
                    ema_val = flatten(task.evaluate(ema.module, 'val (EMA)'))
                    record.update(flatten(ema_val, 'ema_val_'))
                    candidates.append(('ema', ema_val, ema.module))
            record['epoch_time'] = time.time() - t0
            improved = None
            if candidates:
                improved = max(candidates, key=lambda c: c[1][task.score])  # the model wins ties
                if best['metrics'] is not None and improved[1][task.score] <= best['metrics'][task.score]:
                    improved = None
                else:
                    best = dict(epoch=epoch, weights=improved[0], metrics=_jsonable(improved[1]))
            if is_main:
                if epoch == start_epoch + 1:
                    start_record()
                if improved is not None:
                    save_safetensors(improved[2].state_dict(), os.path.join(out, BEST_FILE),
                                     dict(task.meta, epoch=epoch, weights=improved[0]))
                save_safetensors(model.state_dict(), os.path.join(out, LAST_FILE),
                                 dict(task.meta, epoch=epoch, weights='model'))
                atomic_torch_save(dict(
                    epoch=epoch, num_updates=num_updates, best=best, args=_jsonable(vars(args)),
                    run_info=_jsonable(run_info or {}),
                    weights_file=LAST_FILE, optimizer=optimizer.state_dict(),
                    scaler=loss_scaler.state_dict() if loss_scaler is not None else None,
                    ema=ema.module.state_dict() if ema is not None else None,
                    train_time_s=train_time + time.time() - session_start, last=_jsonable(record),
                ), os.path.join(out, TRAIN_STATE))
                with open(metrics_path, 'a', encoding='utf-8') as f:
                    f.write(json.dumps(_jsonable(record)) + '\n')
                losses = ', '.join(f'{k[6:]} {v:.4f}' for k, v in record.items() if k.startswith('train_loss'))
                msg = f'epoch {epoch}/{args.epochs}: {losses}'
                if candidates:
                    msg += f', {task.describe(candidates[0][1])}'
                    if ema is not None:
                        msg += f', EMA {task.describe(candidates[1][1])}'
                if skipped or record.get('val_skipped'):
                    msg += f', skipped {int(skipped)} train / {record.get("val_skipped", 0)} val unreadable images'
                tqdm.write(msg + f' ({record["epoch_time"]:.1f}s)')
            last = record
            barrier(dist_info)
    except DataDirError as e:  # raised in a loader worker: its message, not the worker's traceback
        raise DataDirError(_one_line(e)) from None
    except (KeyboardInterrupt, _Terminated):
        if is_main:
            tqdm.write(f'Interrupted. Completed epochs are saved in {out}; continue with --resume.')
        raise SystemExit(130)
    finally:
        if old_handler is not None:
            signal.signal(signal.SIGTERM, old_handler)

    summary = dict(
        task.summary, epochs=end_epoch, epochs_planned=args.epochs, completed=end_epoch >= args.epochs,
        best_epoch=best['epoch'], best_weights=best['weights'],
        **flatten(best['metrics'] or {}, 'val_'),
        last=last, world_size=dist_info.world_size, global_batch_size=args.batch_size * dist_info.world_size,
        lr=lr, best_checkpoint=os.path.join(out, BEST_FILE), last_checkpoint=os.path.join(out, LAST_FILE),
        train_time_s=train_time + time.time() - session_start,
    )
    summary = _jsonable(summary)
    if is_main:
        write_json(summary, os.path.join(out, SUMMARY_FILE))
        if best['metrics'] is not None:
            tqdm.write(f'Best: epoch {best["epoch"]} ({best["weights"]} weights), '
                       f'{task.describe(best["metrics"])}: {os.path.join(out, BEST_FILE)}')
    barrier(dist_info)
    return summary


def evaluate_only(args: argparse.Namespace, model: torch.nn.Module, task: Task,
                  run_info: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """ ``--eval-only``: evaluate ``model`` once; ``args.json`` and ``summary.json`` (the metrics) in ``--output-dir``. """
    metrics = flatten(task.evaluate(model, 'eval'))
    summary = _jsonable(dict(task.summary, epochs=0, **flatten(metrics, 'val_')))
    os.makedirs(args.output_dir, exist_ok=True)
    write_json(dict(vars(args), **(run_info or {})), os.path.join(args.output_dir, ARGS_FILE))
    write_json(summary, os.path.join(args.output_dir, SUMMARY_FILE))
    tqdm.write(f'eval: {task.describe(metrics)}')
    return summary


# --------------------------------------------------------------------------------------------
# the dense scripts' model flags (detection, segmentation)


def add_dense_args(parser: argparse.ArgumentParser, frozen_bn: bool) -> argparse._ArgumentGroup:
    """ The backbone and whole-model flags of the dense training scripts; returns the model group. """
    model = parser.add_argument_group('model')
    model.add_argument('--backbone', default='dgmn2_tiny', help='timm model name (tags, hf-hub:, local-dir: allowed)')
    model.add_argument('--pretrained', nargs='?', const=True, default=None, metavar='TAG',
                       help='ImageNet weights for the backbone (the default tag, or the one given)')
    model.add_argument('--pretrained-file', default=None, metavar='FILE',
                       help='local ImageNet weights file for the backbone')
    model.add_argument('--backbone-checkpoint', default=None, metavar='FILE',
                       help="detection / segmentation checkpoint whose 'backbone.' weights initialise the backbone")
    model.add_argument('--checkpoint', default=None, metavar='FILE',
                       help='weights of the whole model (a last.safetensors or best.safetensors of this script)')
    model.add_argument('--frozen-stages', type=int, default=-1,
                       help='-1: none, 0: the stem, n: the stem and the first n stages')
    model.add_argument('--frozen-bn', action=argparse.BooleanOptionalAction, default=frozen_bn,
                       help='freeze the backbone BatchNorm layers')
    model.add_argument('--eval-only', action='store_true', help='only evaluate (use with --checkpoint)')
    return model


def check_dense_args(args: argparse.Namespace) -> Tuple[List[str], Optional[Dict[str, Any]], Optional[Dict[str, torch.Tensor]]]:
    """ The checks of ``add_dense_args``' / ``add_train_args``' options and the run folder, before anything
    is built: returns the previous run's files, the ``--resume`` state and the ``--checkpoint`` weights. """
    check_model_name(args.backbone)
    if args.pretrained and (args.pretrained_file or args.checkpoint):
        raise UsageError('give one of --pretrained, --pretrained-file and --checkpoint')
    for flag in ('pretrained_file', 'backbone_checkpoint'):
        path = getattr(args, flag)
        if path is not None and not os.path.exists(path):
            raise UsageError(f'--{flag.replace("_", "-")} {path} does not exist')
    if args.eval_only:
        if args.resume:
            raise UsageError('--eval-only writes args.json and summary.json; it takes no --resume')
        check_positive(args, 'batch_size', 'threads')
        previous, state = check_run_folder(args.output_dir, RUN_FILES, None, args.overwrite), None
    else:
        previous, state = check_train_args(args)
    weights = None
    if args.checkpoint and state is None:
        weights = read_model_weights(args.checkpoint)
    return previous, state, weights


def check_checkpoint_classes(path: Optional[str], num_classes: int):
    """ ``UsageError`` if a script's safetensors weights name another ``num_classes`` in their metadata. """
    if not path or not path.endswith('.safetensors'):
        return
    from safetensors import safe_open
    try:
        with safe_open(path, 'pt') as f:
            value = (f.metadata() or {}).get('num_classes')
    except Exception:  # read_model_weights has read the file: no usable metadata
        return
    if value is not None and int(value) != num_classes:
        raise UsageError(f'--checkpoint {path} was trained for {value} classes, the data has {num_classes}')
