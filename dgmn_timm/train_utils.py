""" Helpers shared by the fine-tuning, feature-extraction and visualisation scripts.

Everything here wraps timm's public API (``create_model``, ``create_dataset`` readers,
``create_transform``, ``init_distributed_device_so``) with what the scripts need on top:

- checking an ImageFolder tree (``train/<class>/*``, ``val/<class>/*``) and failing with a
  message that says what is wrong (``DataDirError``);
- a dataset that skips images it cannot decode and a collate function that counts them;
- building any registered model from a pretrained tag, a checkpoint file or scratch;
- distributed set-up for ``torchrun`` (gloo on CPU, nccl on GPU) and exact sharded metrics;
- reproducible per-epoch seeding and RNG state capture for ``--resume``;
- atomic safetensors / torch writes (an interrupted run never leaves a half-written file);
- ``write_digits_imagefolder``: scikit-learn's bundled 8x8 digits as a small ImageFolder tree.
"""
import json
import logging
import os
import random
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.utils.data as data
from PIL import Image

import timm
from timm.data import ImageDataset
from timm.data.readers.reader import Reader
from timm.utils import natural_key

from .state_dicts import safe_load

_logger = logging.getLogger(__name__)

__all__ = [
    'DataDirError', 'IMAGE_EXTENSIONS', 'scan_class_folder', 'scan_image_folder_tree', 'list_images',
    'FolderReader', 'SafeImageDataset', 'collate_skip', 'ShardSampler', 'DistInfo', 'init_distributed',
    'barrier', 'all_reduce_sum', 'create_model', 'checkpoint_num_classes', 'seed_everything',
    'rng_state', 'set_rng_state', 'patch_timm_posterize', 'save_safetensors', 'atomic_torch_save',
    'atomic_write_text', 'autocast', 'resolve_amp_dtype', 'backward_step',
    'write_digits_imagefolder',
]

# timm's image extensions (.png, .jpg, .jpeg) and the other common ones Pillow reads
IMAGE_EXTENSIONS = tuple(sorted(set(timm.data.get_img_extensions(as_set=True)) | {'.bmp', '.webp', '.tif', '.tiff'}))
VAL_SPLIT_NAMES = ('val', 'validation')


class DataDirError(ValueError):
    """ The data directory is missing, empty or not laid out as an ImageFolder tree. """


# --------------------------------------------------------------------------------------------
# ImageFolder trees


def _is_image(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _images_under(folder: str) -> List[str]:
    """ Image files under ``folder`` (recursive, hidden entries skipped), naturally sorted. """
    found = []
    for root, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = [d for d in dirs if not d.startswith('.')]
        found.extend(os.path.join(root, f) for f in files if not f.startswith('.') and _is_image(f))
    return sorted(found, key=natural_key)


def scan_class_folder(split_dir: str) -> Tuple[List[str], Dict[str, List[str]]]:
    """ Classes (top-level sub-folders) of one split and the images of each (recursive).

    Raises:
        DataDirError: the folder is missing, holds loose images, has no class sub-folders,
            or a class sub-folder has no images.
    """
    if not os.path.isdir(split_dir):
        raise DataDirError(f'{split_dir} is not a directory.')
    entries = sorted(os.scandir(split_dir), key=lambda e: natural_key(e.name))
    loose = [e.name for e in entries if e.is_file() and _is_image(e.name)]
    if loose:
        raise DataDirError(
            f'{split_dir} holds images directly ({", ".join(loose[:3])}{", ..." if len(loose) > 3 else ""}); '
            f'put every image in a class sub-folder: {split_dir}/<class>/<image>.')
    class_dirs = [e for e in entries if e.is_dir() and not e.name.startswith('.')]
    if not class_dirs:
        raise DataDirError(
            f'{split_dir} has no class sub-folders; expected {split_dir}/<class>/<image> '
            f'(image extensions: {", ".join(IMAGE_EXTENSIONS)}).')
    images = {}
    for d in class_dirs:
        files = _images_under(d.path)
        if not files:
            raise DataDirError(
                f'Class folder {d.path} has no images (looked for {", ".join(IMAGE_EXTENSIONS)}).')
        images[d.name] = files
    return [d.name for d in class_dirs], images


def scan_image_folder_tree(data_dir: str) -> Dict[str, Any]:
    """ Check ``data_dir`` holds ``train/<class>/*`` and ``val/<class>/*`` with the same classes.

    Returns:
        dict with ``classes`` (sorted naturally, index = label), ``train`` and ``val`` lists of
        (path, label) and the split directories ``train_dir`` and ``val_dir``.

    Raises:
        DataDirError: with a message naming what is missing or malformed.
    """
    if not os.path.exists(data_dir):
        raise DataDirError(f'Data directory {data_dir} does not exist.')
    if not os.path.isdir(data_dir):
        raise DataDirError(f'Data directory {data_dir} is not a directory.')
    layout = f'expected {data_dir}/train/<class>/<image> and {data_dir}/val/<class>/<image>'
    train_dir = os.path.join(data_dir, 'train')
    if not os.path.isdir(train_dir):
        raise DataDirError(f'{data_dir} has no train/ folder; {layout}.')
    val_dir = next((os.path.join(data_dir, n) for n in VAL_SPLIT_NAMES if os.path.isdir(os.path.join(data_dir, n))),
                   None)
    if val_dir is None:
        raise DataDirError(f'{data_dir} has no val/ folder; {layout}.')
    classes, train_images = scan_class_folder(train_dir)
    val_classes, val_images = scan_class_folder(val_dir)
    missing = [c for c in classes if c not in val_images]
    if missing:
        raise DataDirError(
            f'Class{"es" if len(missing) > 1 else ""} {", ".join(missing)} of {train_dir} '
            f'{"are" if len(missing) > 1 else "is"} missing from {val_dir}; every class needs validation images.')
    extra = [c for c in val_classes if c not in train_images]
    if extra:
        raise DataDirError(
            f'Class{"es" if len(extra) > 1 else ""} {", ".join(extra)} of {val_dir} '
            f'{"have" if len(extra) > 1 else "has"} no folder in {train_dir}.')
    index = {c: i for i, c in enumerate(classes)}
    train = [(p, index[c]) for c in classes for p in train_images[c]]
    val = [(p, index[c]) for c in classes for p in val_images[c]]
    return dict(classes=classes, train=train, val=val, train_dir=train_dir, val_dir=val_dir)


def list_images(source: str) -> List[str]:
    """ Image paths of a folder (recursive, natural order) or of a list file (one path a line).

    In a list file, blank lines and lines starting with '#' are skipped and relative paths are
    taken relative to the list file's folder.
    """
    if os.path.isdir(source):
        paths = _images_under(source)
        if not paths:
            raise DataDirError(f'No images under {source} (looked for {", ".join(IMAGE_EXTENSIONS)}).')
        return paths
    if not os.path.isfile(source):
        raise DataDirError(f'{source} is neither a folder of images nor a list file.')
    if _is_image(source):
        return [source]
    base = os.path.dirname(os.path.abspath(source))
    paths = []
    with open(source, encoding='utf-8') as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith('#'):
                continue
            paths.append(line if os.path.isabs(line) else os.path.join(base, line))
    if not paths:
        raise DataDirError(f'List file {source} names no images.')
    return paths


class FolderReader(Reader):
    """ A timm dataset reader over a fixed list of (path, label) samples. """

    def __init__(self, samples: Sequence[Tuple[str, int]], root: Optional[str] = None):
        super().__init__()
        self.samples = list(samples)
        self.root = root

    def __getitem__(self, index):
        path, target = self.samples[index]
        return path, target

    def __len__(self):
        return len(self.samples)

    def _filename(self, index, basename=False, absolute=False):
        path = self.samples[index][0]
        if basename:
            return os.path.basename(path)
        if absolute:
            return os.path.abspath(path)
        return os.path.relpath(path, self.root) if self.root else path


class SafeImageDataset(ImageDataset):
    """ timm ImageDataset that returns None for an image it cannot read or decode.

    ``collate_skip`` drops those samples and counts them, so a broken file costs one sample,
    not the epoch. Returns (image, target, index).
    """

    def __init__(self, samples: Sequence[Tuple[str, int]], root: Optional[str] = None, transform=None,
                 input_img_mode: str = 'RGB'):
        super().__init__(root, reader=FolderReader(samples, root), transform=transform,
                         input_img_mode=input_img_mode)

    def __getitem__(self, index):
        path, target = self.reader[index]
        try:
            with Image.open(path) as img:
                img = img.convert(self.input_img_mode)  # decodes, so broken files fail here
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            _logger.warning(f'Skipped unreadable image {path}: {e}')
            return None
        if self.transform is not None:
            img = self.transform(img)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return img, target, index


def collate_skip(batch):
    """ Collate (image, target, index) samples, dropping the None of unreadable images.

    Returns:
        (images, targets, indices, num_skipped); images is None if every sample was skipped.
    """
    kept = [b for b in batch if b is not None]
    skipped = len(batch) - len(kept)
    if not kept:
        return None, None, None, skipped
    images, targets, indices = zip(*kept)
    return torch.stack(images), torch.as_tensor(targets), torch.as_tensor(indices), skipped


class ShardSampler(data.Sampler):
    """ Every ``world_size``-th index from ``rank``, in order, without padding (exact sharded metrics). """

    def __init__(self, length: int, rank: int = 0, world_size: int = 1):
        self.indices = list(range(rank, length, world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def patch_timm_posterize() -> bool:
    """ Let timm's RandAugment posterize to 0 bits on Pillow >= 11, as older Pillow did.

    timm's RandAugment can ask for ``ImageOps.posterize(img, 0)`` (magnitude 10 of the
    'increasing' posterize, reachable with magnitude noise) and newer Pillow raises
    "bits must be between or equal to 1 and 8" instead of returning the black image older
    Pillow gave. Swaps in a posterize that handles bits <= 0 for timm's three posterize ops
    only, and only when the installed Pillow raises. Returns True if it patched.
    """
    from PIL import ImageOps
    try:
        ImageOps.posterize(Image.new('RGB', (1, 1)), 0)
        return False
    except ValueError:
        pass
    from timm.data import auto_augment

    def posterize(img, bits_to_keep, **kwargs):
        if bits_to_keep <= 0:
            return Image.new(img.mode, img.size)  # keeping 0 bits: every channel 0
        return auto_augment.posterize(img, bits_to_keep, **kwargs)

    for name in ('Posterize', 'PosterizeIncreasing', 'PosterizeOriginal'):
        if name in auto_augment.NAME_TO_OP:
            auto_augment.NAME_TO_OP[name] = posterize
    return True


# --------------------------------------------------------------------------------------------
# distributed


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


def init_distributed(device: str = 'auto') -> DistInfo:
    """ Set up the device, and the process group when launched by torchrun (gloo on CPU, nccl on GPU).

    Under torchrun (WORLD_SIZE > 1 in the environment) a GPU device becomes ``cuda:LOCAL_RANK``.
    """
    if device in (None, '', 'auto'):
        device = 'cuda' if torch.cuda.is_available() else 'cpu'
    device = torch.device(device)
    world_size = int(os.environ.get('WORLD_SIZE', '1'))
    if world_size <= 1:
        if device.type == 'cuda' and device.index is not None:
            torch.cuda.set_device(device)
        return DistInfo(device=device)
    local_rank = int(os.environ.get('LOCAL_RANK', '0'))
    if device.type == 'cuda':
        device = torch.device('cuda', local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend='nccl' if device.type == 'cuda' else 'gloo', init_method='env://')
    return DistInfo(device=device, rank=dist.get_rank(), local_rank=local_rank, world_size=dist.get_world_size(),
                    distributed=True)


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
# models


def _classifier_key(model_name: str) -> Optional[str]:
    try:
        classifier = timm.models.get_pretrained_cfg_value(model_name, 'classifier')
    except Exception:  # no pretrained cfg for this name
        classifier = None
    if isinstance(classifier, (list, tuple)):
        classifier = classifier[0] if classifier else None
    return classifier


def checkpoint_num_classes(path: str, classifier: str = 'head') -> Optional[int]:
    """ Rows of the classifier weight in a checkpoint file, or None if it has no classifier.

    Reads safetensors headers without loading tensors; other files with torch.load(weights_only=True).
    """
    key = classifier + '.weight'
    if path.endswith('.safetensors'):
        from safetensors import safe_open
        with safe_open(path, framework='pt') as f:
            return f.get_slice(key).get_shape()[0] if key in f.keys() else None
    try:
        sd = safe_load(path, mmap=True)
    except Exception:
        return None
    for wrapper in ('model', 'state_dict', 'model_ema', 'state_dict_ema'):
        if isinstance(sd, dict) and isinstance(sd.get(wrapper), dict):
            sd = sd[wrapper]
            break
    if not isinstance(sd, dict):
        return None
    for k, v in sd.items():
        if (k == key or k.endswith('.' + key)) and isinstance(v, torch.Tensor) and v.ndim == 2:
            return v.shape[0]
    return None


def create_model(
        model_name: str,
        pretrained: Any = None,
        checkpoint: Optional[str] = None,
        num_classes: Optional[int] = None,
        **kwargs,
) -> torch.nn.Module:
    """ Build a registered model from scratch, a pretrained tag or a checkpoint file.

    Args:
        model_name: registered name, optionally with a pretrained tag ('dgmn2_tiny.in1k').
        pretrained: False/None for random weights, True for the default tag, or a tag string.
        checkpoint: a weights file in any format the model loads (ours, the authors', timm's,
            .safetensors or .pth). Loaded through timm's pretrained path, so a classifier
            whose size differs from ``num_classes`` is dropped and freshly initialised; one of
            the same size is kept.
        num_classes: classifier size (None: the model's default, 0: no classifier).
        kwargs: passed to ``timm.create_model``.
    """
    if pretrained and checkpoint:
        raise ValueError('Give either a pretrained tag or a checkpoint file, not both.')
    name = model_name
    if isinstance(pretrained, str) and pretrained.lower() not in ('', 'true', 'default'):
        name = f'{model_name.split(".")[0]}.{pretrained}'
    if num_classes is not None:
        kwargs['num_classes'] = num_classes
    if checkpoint:
        if not os.path.isfile(checkpoint):
            raise FileNotFoundError(f'Checkpoint file {checkpoint} does not exist.')
        overlay = dict(file=os.path.abspath(checkpoint))
        if num_classes:
            classifier = _classifier_key(name)
            if classifier and checkpoint_num_classes(checkpoint, classifier) == num_classes:
                overlay['num_classes'] = num_classes  # same head size: keep the trained head
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    return timm.create_model(name, pretrained=bool(pretrained), **kwargs)


# --------------------------------------------------------------------------------------------
# reproducibility


def seed_everything(seed: int):
    """ Seed Python, NumPy and torch (all devices). """
    seed = int(seed) % (2 ** 32)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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


def save_safetensors(state_dict: Dict[str, torch.Tensor], path: str, metadata: Optional[Dict[str, Any]] = None):
    """ Write a state dict as safetensors, atomically (temp file, then rename).

    Metadata values that are not strings are stored as JSON.
    """
    from safetensors.torch import save_file
    tensors = {k: v.detach().to('cpu', copy=True).contiguous() for k, v in state_dict.items()}
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    tmp = path + '.tmp'
    save_file(tensors, tmp, metadata=meta)
    os.replace(tmp, path)


def atomic_torch_save(obj: Any, path: str):
    tmp = path + '.tmp'
    torch.save(obj, tmp)
    os.replace(tmp, path)


def atomic_write_text(text: str, path: str):
    tmp = path + '.tmp'
    with open(tmp, 'w', encoding='utf-8') as f:
        f.write(text)
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------
# mixed precision


def resolve_amp_dtype(device: torch.device, amp_dtype: Optional[str] = None) -> torch.dtype:
    """ bfloat16 on CPU; float16 on GPU unless ``amp_dtype`` says otherwise. """
    if amp_dtype in (None, '', 'auto'):
        return torch.float16 if device.type == 'cuda' else torch.bfloat16
    dtypes = {'float16': torch.float16, 'fp16': torch.float16, 'half': torch.float16,
              'bfloat16': torch.bfloat16, 'bf16': torch.bfloat16}
    if amp_dtype not in dtypes:
        raise ValueError(f'Unknown AMP dtype {amp_dtype}; use float16 or bfloat16.')
    dtype = dtypes[amp_dtype]
    if device.type == 'cpu' and dtype == torch.float16:
        raise ValueError('float16 autocast is for GPUs; use --amp-dtype bfloat16 on CPU.')
    return dtype


def autocast(device: torch.device, dtype: Optional[torch.dtype]):
    """ torch.autocast for ``dtype``, or a no-op context when ``dtype`` is None (AMP off). """
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# --------------------------------------------------------------------------------------------
# toy data


def write_digits_imagefolder(
        root: str,
        img_size: int = 32,
        val_fraction: float = 0.2,
        per_class: Optional[int] = None,
        classes: Optional[Sequence[int]] = None,
        seed: int = 0,
) -> Dict[str, int]:
    """ Write scikit-learn's bundled 8x8 digits as ``root/{train,val}/<digit>/<n>.png`` RGB images.

    Needs scikit-learn (in the ``dev`` extra). Images are upscaled to ``img_size`` (bilinear).

    Args:
        root: output folder (created).
        img_size: side of the written images.
        val_fraction: share of each class that goes to val/ (stratified, shuffled with ``seed``).
        per_class: keep at most this many images per class (None: all, about 180).
        classes: digits to keep (None: all ten).

    Returns:
        number of images written per split, e.g. {'train': 1434, 'val': 363}.
    """
    from sklearn.datasets import load_digits
    digits = load_digits()
    rng = np.random.default_rng(seed)
    counts = {'train': 0, 'val': 0}
    for digit in (classes if classes is not None else range(10)):
        idx = np.flatnonzero(digits.target == digit)
        idx = rng.permutation(idx)
        if per_class is not None:
            idx = idx[:per_class]
        n_val = max(1, int(round(len(idx) * val_fraction)))
        for split, part in (('val', idx[:n_val]), ('train', idx[n_val:])):
            folder = os.path.join(root, split, str(digit))
            os.makedirs(folder, exist_ok=True)
            for i in part:
                pixels = (digits.images[i] * (255. / 16.)).clip(0, 255).astype(np.uint8)
                img = Image.fromarray(pixels).resize((img_size, img_size), Image.BILINEAR).convert('RGB')
                img.save(os.path.join(folder, f'{i:04d}.png'))
                counts[split] += 1
    return counts


def _main(argv=None):
    import argparse
    parser = argparse.ArgumentParser(
        prog='python -m dgmn_timm.train_utils',
        description='Write scikit-learn\'s 8x8 digits as an ImageFolder tree (train/ and val/).')
    parser.add_argument('root', help='output folder')
    parser.add_argument('--img-size', type=int, default=32)
    parser.add_argument('--val-fraction', type=float, default=0.2)
    parser.add_argument('--per-class', type=int, default=None)
    args = parser.parse_args(argv)
    counts = write_digits_imagefolder(args.root, args.img_size, args.val_fraction, args.per_class)
    print(f'wrote {counts["train"]} train and {counts["val"]} val images under {args.root}')


if __name__ == '__main__':
    _main()


def backward_step(
        loss: torch.Tensor,
        optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler,
        parameters,
        clip_grad: float = 0.,
) -> None:
    """ One optimiser update: zero grads, (scaled) backward, optional grad-norm clipping, step.

    ``scaler`` may be disabled (``GradScaler(enabled=False)``), which makes it a no-op wrapper.
    """
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if clip_grad > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(parameters, clip_grad)
    scaler.step(optimizer)
    scaler.update()
