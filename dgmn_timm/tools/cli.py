""" The command line every tool shares: one flag vocabulary, errors as one line, run folders, threads.

``add_run_args`` gives every script the same run flags; ``run_cli`` turns a ``UsageError``,
``DataDirError`` or ``CheckpointError`` into one ``error:`` line on stderr and exit code 2, as argparse
does; any other exception keeps its traceback. ``HelpFormatter`` shows each option's default once.
``check_run_folder`` refuses a folder that holds files of a previous run unless ``--resume`` (continue
it) or ``--overwrite`` (replace it) is given. torch runs each data-loading worker on one intra-op
thread; the main process takes the cores left after one per loader worker (``default_threads``), and
the number of workers is half this process's share of the cores (``default_workers``).
"""
import argparse
import difflib
import os
import shutil
import sys
from typing import Any, Callable, Iterable, List, Optional, Sequence

import torch

import timm

from ..errors import CheckpointError, DataDirError


# --------------------------------------------------------------------------------------------
# command line


class UsageError(ValueError):
    """ A mistake in the command line or its inputs: reported as one ``error:`` line, exit code 2. """


def run_cli(main: Callable[[Optional[List[str]]], Any], argv: Optional[List[str]] = None) -> int:
    """ Run a script's ``main``: a user's mistake ends in ``error: <message>`` on stderr and exit code 2; else
    the exit code is ``main``'s result if it is an int (e.g. 1 for a failed check), 0 otherwise. """
    try:
        result = main(argv)
    except (UsageError, DataDirError, CheckpointError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    return result if isinstance(result, int) else 0


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """ Keeps the description's line breaks; appends ``(default: X)`` where there is a default to show
    and the help text does not already say it. """

    def _get_help_string(self, action):
        help_text = action.help or ''
        if action.default is None or action.default is False or action.default in ('', argparse.SUPPRESS) \
                or 'default' in help_text:
            return help_text
        return super()._get_help_string(action)


def add_run_args(parser: argparse.ArgumentParser, output_dir: Optional[str] = None, seed: Optional[int] = 0,
                 resume: bool = True):
    """ The run flags the scripts share (one vocabulary); returns the argument group.

    ``output_dir`` None leaves out ``--output-dir`` (a script that writes one file names it itself),
    ``seed`` None leaves out ``--seed``, ``resume`` False leaves out ``--resume``.
    """
    g = parser.add_argument_group('run')
    if output_dir is not None:
        g.add_argument('--output-dir', default=output_dir, metavar='DIR', help='folder for the run\'s files')
    g.add_argument('--overwrite', action='store_true', help='replace the files of a previous run (deleted first)')
    if resume:
        g.add_argument('--resume', nargs='?', const='auto', default=None, metavar='STATE',
                       help='continue the run in --output-dir (from its train_state.pt, or the given state file)')
    g.add_argument('--device', default='auto', help='cpu, cuda, cuda:N, or auto (cuda if available); under '
                   'torchrun (finetune, extract_features) each process takes its local rank\'s GPU')
    g.add_argument('--threads', type=int, default=None,
                   help='intra-op CPU threads of the main process (default: OMP_NUM_THREADS if set, else the cores '
                        'left after one per loader worker, at least 1)')
    g.add_argument('--workers', type=int, default=default_workers(),
                   help='data-loading processes (one thread each; 0 loads in the main process)')
    if seed is not None:
        g.add_argument('--seed', type=int, default=seed, help='seed of data order, augmentation and initialisation')
    g.add_argument('--no-progress', action='store_true', help='no progress bars')
    return g


def check_positive(args: argparse.Namespace, *names: str, allow_zero: Sequence[str] = ()):
    """ ``UsageError`` for the first option in ``names`` that is below 1 (or below 0 if in ``allow_zero``). """
    for name in names:
        value = getattr(args, name, None)
        low = 0 if name in allow_zero else 1
        if value is not None and value < low:
            raise UsageError(f'--{name.replace("_", "-")} must be at least {low}, got {value}')


def check_model_name(name: str) -> str:
    """ ``UsageError`` unless timm has a model (or a ``hf-hub:`` / ``local-dir:`` source) of this name. """
    if ':' in name.split('.')[0]:  # hf-hub:..., local-dir:...: timm resolves the source
        return name
    arch = timm.models.split_model_name_tag(name)[0]
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=3)
        hint = f'; did you mean {", ".join(close)}?' if close else "; see timm.list_models('dgmn*')"
        raise UsageError(f'unknown model {name!r}{hint}')
    return name


def min_input_size(model_name: str) -> int:
    """ The smallest input side a model takes: the larger side of its pretrained config's ``min_input_size``
    (DGMN2: 32), read from timm's registry before any model is built; 1 where it names none (and for a
    ``hf-hub:`` / ``local-dir:`` source, whose config is in the source). """
    if ':' in model_name.split('.')[0]:
        return 1
    try:
        cfg = timm.models.get_pretrained_cfg(timm.models.split_model_name_tag(model_name)[0])
    except (RuntimeError, ValueError):
        cfg = None
    return max(cfg.min_input_size[1:]) if cfg is not None and cfg.min_input_size else 1


def check_input_size(model_name: str, flag: str, *sizes: Optional[int]):
    """ ``UsageError`` if a size given with ``flag`` is below the model's minimum input side (or below 1). """
    low = min_input_size(model_name)
    for size in sizes:
        if size is not None and size < low:
            raise UsageError(f'{flag} {" ".join(str(s) for s in sizes)}: {model_name} takes inputs of at least '
                             f'{low} pixels')


def check_model_args(args: argparse.Namespace):
    """ ``UsageError`` for the model options the image tools share: ``--pretrained`` with
    ``--checkpoint``, an unknown ``--model``, an ``--img-size`` below the model's minimum. """
    if args.pretrained and args.checkpoint:
        raise UsageError('give --pretrained or --checkpoint, not both')
    check_model_name(args.model)
    check_input_size(args.model, '--img-size', args.img_size)


def read_rgb_image(path: str):
    """ An image file as an RGB PIL image; ``UsageError`` if it is missing or not an image Pillow decodes. """
    from PIL import Image
    if not os.path.exists(path):
        raise UsageError(f'image {path} does not exist')
    if not os.path.isfile(path):
        raise UsageError(f'image {path} is not a file')
    try:
        with Image.open(path) as im:
            return im.convert('RGB')
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise UsageError(f'cannot read image {path}: {e}') from None


def check_run_folder(folder: str, run_files: Iterable[str], resume: Any = None, overwrite: bool = False
                     ) -> List[str]:
    """ Refuse to write a run into a folder that holds one, unless resuming or overwriting.

    Args:
        folder: the run folder.
        run_files: names of the files the run writes there.
        resume: the ``--resume`` value (continue the previous run).
        overwrite: ``--overwrite`` (replace it: call ``clear_run_files`` once all checks pass).

    Returns:
        the run files present in ``folder``.

    Raises:
        UsageError: the folder holds a previous run and neither flag is given, or both are.
    """
    if resume and overwrite:
        raise UsageError('give --resume or --overwrite, not both')
    found = [f for f in run_files if os.path.lexists(os.path.join(folder, f))]
    if found and not (resume or overwrite):
        raise UsageError(
            f'{folder} holds a previous run ({", ".join(found)}); continue it with --resume, replace it with '
            f'--overwrite, or give another --output-dir')
    return found


def clear_run_files(folder: str, names: Iterable[str]):
    """ Delete the files of a previous run (``--overwrite``), nothing else. """
    for name in names:
        path = os.path.join(folder, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.remove(path)



# --------------------------------------------------------------------------------------------
# threads and data loaders


def cpu_count() -> int:
    """ CPU cores this process may run on. """
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _local_processes() -> int:
    return max(1, int(os.environ.get('LOCAL_WORLD_SIZE', '1')))


def default_workers() -> int:
    """ Loader workers per process: half the cores of this process's share, between 1 and 4. """
    return min(4, max(1, cpu_count() // _local_processes() // 2))


def default_threads(workers: int) -> int:
    """ Main-process threads: this process's share of the cores less one per loader worker, at least 1. """
    return max(1, cpu_count() // _local_processes() - workers)


def set_threads(threads: Optional[int], workers: int) -> int:
    """ Set the main process's intra-op threads; returns the number.

    ``threads`` if given, else ``OMP_NUM_THREADS`` if set (torch already follows it), else ``default_threads``.
    """
    if not threads and os.environ.get('OMP_NUM_THREADS'):
        return torch.get_num_threads()
    n = threads if threads else default_threads(workers)
    torch.set_num_threads(n)
    return n
