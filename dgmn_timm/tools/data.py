""" Data for the scripts: ImageFolder trees, image lists, image / mask pairs, the toy digits set.

- checking an ImageFolder tree (``train/<class>/*``, ``val/<class>/*``) and failing with a
  message that says what is wrong (``DataDirError``); listing the images of a folder or list
  file; pairing images with segmentation masks by name;
- a timm ``ImageDataset`` that skips images it cannot decode, and a collate function that
  drops them and reports which (the scripts print the report outside their progress bars);
- ``ShardSampler`` for exact sharded evaluation under ``torchrun``;
- ``write_digits_imagefolder``: scikit-learn's bundled 8x8 digits as a small ImageFolder tree
  (``python -m dgmn_timm.data digits`` writes it to ``./digits``).
"""
import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.utils.data as data
from PIL import Image

import timm
from timm.data import ImageDataset
from timm.data.readers.reader import Reader
from timm.utils import natural_key

from ..errors import DataDirError
from .cli import UsageError, run_cli

__all__ = [
    'DataDirError', 'IMAGE_EXTENSIONS', 'scan_class_folder', 'scan_image_folder_tree', 'list_images', 'find_pairs',
    'FolderReader', 'SafeImageDataset', 'open_image_dataset', 'collate_pairs', 'Skipped', 'collate_skip', 'ShardSampler', 'patch_timm_posterize',
    'write_digits_imagefolder',
]

# timm's image extensions (.png, .jpg, .jpeg) and the other common ones Pillow reads
IMAGE_EXTENSIONS = tuple(sorted(set(timm.data.get_img_extensions(as_set=True)) | {'.bmp', '.webp', '.tif', '.tiff'}))
VAL_SPLIT_NAMES = ('val', 'validation')


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


def _index_by_name(root: str, extensions: Sequence[str], suffix: str) -> Dict[str, Path]:
    """ Files of ``root`` (recursive) with one of ``extensions`` whose stem ends in ``suffix``,
    keyed by their relative path without the suffix and extension. """
    root_path = Path(root)
    found = {}
    for path in sorted(root_path.rglob('*')):
        if path.suffix.lower() not in extensions or not path.stem.endswith(suffix):
            continue
        stem = path.stem[:len(path.stem) - len(suffix)] if suffix else path.stem
        found[str(path.relative_to(root_path).with_name(stem))] = path
    return found


def find_pairs(image_dir: str, mask_dir: str, image_suffix: str = '', mask_suffix: str = ''
               ) -> Tuple[List[Tuple[Path, Path]], int]:
    """ (image, mask) pairs matched by name: ``<name><image_suffix>.<image ext>`` with ``<name><mask_suffix>.png``.

    Both folders are searched recursively. Returns the pairs (sorted by name) and the number of
    images that have no mask.

    Raises:
        DataDirError: a folder is missing, or no image has a mask.
    """
    for folder, what in ((image_dir, 'image'), (mask_dir, 'mask')):
        if not os.path.isdir(folder):
            raise DataDirError(f'The {what} folder {folder} does not exist.' if not os.path.exists(folder)
                               else f'The {what} folder {folder} is not a directory.')
    images = _index_by_name(image_dir, IMAGE_EXTENSIONS, image_suffix)
    masks = _index_by_name(mask_dir, ('.png',), mask_suffix)
    pairs = [(images[k], masks[k]) for k in sorted(images) if k in masks]
    if not pairs:
        raise DataDirError(
            f'No image / mask pairs in {image_dir} ({len(images)} images) and {mask_dir} ({len(masks)} masks); '
            f'an image <name>{image_suffix}.<ext> pairs with the mask <name>{mask_suffix}.png '
            f'(--image-suffix, --mask-suffix).')
    return pairs, len(images) - len(pairs)


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
    """ timm ImageDataset over a reader (``FolderReader`` or one of timm's) that returns a ``Skipped``
    record for an image it cannot read or decode.

    ``collate_skip`` drops those samples and reports them, so a broken file costs one sample,
    not the epoch. Returns (image, target, index).
    """

    def __init__(self, samples: Union[Reader, Sequence[Tuple[str, int]]], root: Optional[str] = None, transform=None,
                 input_img_mode: str = 'RGB'):
        reader = samples if isinstance(samples, Reader) else FolderReader(samples, root)
        super().__init__(getattr(reader, 'root', root), reader=reader, transform=transform,
                         input_img_mode=input_img_mode)

    def __getitem__(self, index):
        source, target = self.reader[index]
        try:
            with Image.open(source) as img:
                img = img.convert(self.input_img_mode)  # decodes, so broken files fail here
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            return Skipped(self.reader._filename(index) or f'sample {index}', str(e))
        finally:
            if hasattr(source, 'close'):
                source.close()
        if self.transform is not None:
            img = self.transform(img)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return img, target, index


def open_image_dataset(dataset: str, data_dir: Optional[str], train_split: str = 'train',
                       val_split: str = 'validation', batch_size: int = 1, seed: int = 0) -> Dict[str, Any]:
    """ The training and validation readers and the class names of an image classification dataset.

    Args:
        dataset: '' for an ImageFolder tree under ``data_dir`` (``scan_image_folder_tree``),
            ``hfds/NAME`` for a Hugging Face dataset (a Hub name, or a local folder of parquet files:
            ``datasets.load_dataset(NAME)``; ``data_dir`` is its cache folder), or ``wds/NAME`` for
            webdataset shards in ``data_dir`` described by its ``_info.json`` (timm's splits, plus
            ``classes``: the class names, index = label).
        train_split, val_split: the splits of ``dataset``.
        batch_size, seed: for the shuffling of an iterable (``wds/``) training reader.

    Returns:
        dict with ``classes`` (index = label), ``train`` and ``val`` readers (for ``SafeImageDataset``,
        or, with ``iterable`` True, for timm's ``IterableImageDataset``).

    Raises:
        DataDirError: the data is missing or malformed, or the dataset kind is not one of these.
    """
    if not dataset:
        tree = scan_image_folder_tree(data_dir)
        return dict(classes=tree['classes'], train=FolderReader(tree['train'], tree['train_dir']),
                    val=FolderReader(tree['val'], tree['val_dir']))
    prefix, _, name = dataset.partition('/')
    if prefix.lower() == 'wds' and name:
        return _open_wds(dataset, data_dir, train_split, val_split, batch_size, seed)
    if prefix.lower() != 'hfds' or not name:
        raise DataDirError(f'--dataset {dataset}: give hfds/NAME (a Hugging Face dataset), wds/NAME (webdataset '
                           f'shards in --data-dir), or no --dataset for an ImageFolder tree in --data-dir')
    try:
        from timm.data.readers.reader_hfds import ReaderHfds
    except ImportError as e:
        raise DataDirError(f'--dataset {dataset} needs the Hugging Face datasets package ({e}); '
                           f'pip install datasets') from None
    readers = {}
    for split in (train_split, val_split):
        try:
            readers[split] = ReaderHfds(name, root=data_dir, split=split)
        except Exception as e:  # datasets raises many kinds (FileNotFoundError, ValueError, DatasetNotFoundError)
            text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DataDirError(f'cannot read split {split!r} of {dataset}: {text}') from None
    train = readers[train_split]
    index = train.class_to_idx
    if index:
        classes = [n for n, _ in sorted(index.items(), key=lambda kv: kv[1])]
    else:  # integer labels without names
        labels = list(train.iter_targets())
        if not labels or min(labels) < 0:
            raise DataDirError(f'split {train_split!r} of {dataset} has no labels 0..N-1 in its label column')
        classes = [str(i) for i in range(max(labels) + 1)]
    return dict(classes=classes, train=train, val=readers[val_split])


def _open_wds(dataset: str, data_dir: Optional[str], train_split: str, val_split: str, batch_size: int, seed: int
              ) -> Dict[str, Any]:
    try:
        import webdataset  # noqa: F401
        from timm.data.readers.reader_wds import ReaderWds
    except ImportError as e:
        raise DataDirError(f'--dataset {dataset} needs the webdataset package ({e}); pip install webdataset') from None
    info_path = os.path.join(data_dir or '', '_info.json')
    if not data_dir or not os.path.isfile(info_path):
        raise DataDirError(f'--dataset {dataset} reads its shards and their _info.json from --data-dir; '
                           f'{info_path} does not exist')
    try:
        with open(info_path, encoding='utf-8') as f:
            info = json.load(f)
    except ValueError as e:
        raise DataDirError(f'{info_path} is not JSON ({e})') from None
    classes = info.get('classes') if isinstance(info, dict) else None
    if not isinstance(classes, list) or not classes:
        raise DataDirError(f'{info_path} names no "classes" (the class names, index = label)')
    readers = {}
    for split, training in ((train_split, True), (val_split, False)):
        try:
            readers[split] = ReaderWds(data_dir, name=dataset, split=split, is_training=training,
                                       batch_size=batch_size, seed=seed)
        except (RuntimeError, KeyError, ValueError) as e:
            raise DataDirError(f'cannot read split {split!r} of {dataset} in {info_path}: {e}') from None
        missing = [f for f in readers[split].split_info.filenames if not os.path.isfile(os.path.join(data_dir, f))]
        if missing:
            raise DataDirError(f'split {split!r} of {info_path}: shard {os.path.join(data_dir, missing[0])} '
                               f'does not exist')
    return dict(classes=[str(c) for c in classes], train=readers[train_split], val=readers[val_split],
                iterable=True)


def collate_pairs(batch):
    """ Collate the (image, target) samples of an iterable dataset in ``collate_skip``'s form (no
    indices; an undecodable sample never arrives: timm's webdataset pipeline drops it with a warning). """
    images, targets = zip(*batch)
    return torch.stack(images), torch.as_tensor(targets), None, []


class Skipped(NamedTuple):
    """ An image ``SafeImageDataset`` could not decode, and why. """
    path: str
    reason: str


def collate_skip(batch):
    """ Collate (image, target, index) samples, dropping the ``Skipped`` records of unreadable images.

    Returns:
        (images, targets, indices, skipped) with ``skipped`` the list of ``Skipped`` records;
        images, targets and indices are None if every sample was skipped.
    """
    skipped = [b for b in batch if isinstance(b, Skipped)]
    kept = [b for b in batch if not isinstance(b, Skipped)]
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='python -m dgmn_timm.data',
        description='Write scikit-learn\'s 8x8 digits as an ImageFolder tree (DIR/train/<digit>/*.png, '
                    'DIR/val/<digit>/*.png).',
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('--output-dir', default='output/data', metavar='DIR', help='folder to write')
    parser.add_argument('--overwrite', action='store_true', help='replace the train/ and val/ folders already there')
    parser.add_argument('--img-size', type=int, default=32, help='side of the written images')
    parser.add_argument('--val-fraction', type=float, default=0.2, help='share of each class written to val/')
    parser.add_argument('--per-class', type=int, default=None, help='at most this many images per class (all: ~180)')
    return parser


def main(argv=None):
    """ ``python -m dgmn_timm.data --output-dir DIR``: write the digits set under DIR. """
    args = build_parser().parse_args(argv)
    found = [d for d in ('train', 'val') if os.path.isdir(os.path.join(args.output_dir, d))]
    if found and not args.overwrite:
        raise UsageError(f'{args.output_dir} already holds {" and ".join(d + "/" for d in found)}; replace them with '
                         f'--overwrite, or give another --output-dir')
    for d in found:
        shutil.rmtree(os.path.join(args.output_dir, d))
    counts = write_digits_imagefolder(args.output_dir, args.img_size, args.val_fraction, args.per_class)
    print(f'wrote {counts["train"]} train and {counts["val"]} val images under {args.output_dir}')


if __name__ == '__main__':
    sys.exit(run_cli(main))
