""" What dgmn_timm adds to timm's Hugging Face Hub support.

timm writes and reads Hub folders (``save_for_hf``, ``local-dir:``, ``hf-hub:``) and generates model
cards (``generate_readme``); this module adds what it lacks for weights that are not on the Hub yet:

    * ``pretrained_file``: the local weights file of a model's pretrained tag, for this package's own
      routes (torch.hub's ``pretrained=True``, the scripts' ``--pretrained``): from the local cache or
      one Hub request without retries, with an error that names the repo and the command that produces it;
    * ``hub_file`` / ``hub_weights_file``: the same for any file of a Hub repo;
    * ``write_model_card``: the card of a converted folder (timm's ``generate_readme``);
    * ``place_in_cache``: a converted folder -> the local Hugging Face cache under a Hub id, so that
      ``timm.create_model('dgmn2_tiny.in1k', pretrained=True)`` works offline;
    * ``push_folder``: a converted folder -> a Hub repo (``HfApi.upload_folder``), with a dry run
      (``python -m dgmn_timm.push_to_hub FOLDER --repo-id ORG/NAME [--dry-run]``);
    * ``hub_entrypoint`` / ``package_models``: the torch.hub entry points of ``hubconf.py``.

Conversion of checkpoints lives in ``dgmn_timm.weights.convert`` (``python -m dgmn_timm.convert``).
"""
import argparse
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch.nn as nn

import timm
from timm.models import get_pretrained_cfg, list_models, model_entrypoint, split_model_name_tag

from ..errors import CheckpointError, CheckpointMismatchError, CheckpointNotFoundError
from .checkpoints import CONFIG_NAME, PACKAGE, convert_command, create_with_weights

__all__ = [
    'PAPER_METRICS', 'hf_cache_dir', 'pretrained_file', 'hub_file', 'hub_weights_file', 'is_package_architecture',
    'is_package_repo', 'registered_architecture', 'write_model_card', 'read_config', 'place_in_cache',
    'hub_folder_files', 'verify_hub_folder', 'push_folder', 'package_models', 'hub_entrypoint', 'create_hub_model',
]

WEIGHTS_NAME = 'model.safetensors'
README_NAME = 'README.md'
# weight files the Hub stores with git LFS (their cache etag is the sha256 of the content)
_LFS_SUFFIXES = ('.safetensors', '.bin', '.pth', '.pt', '.ckpt', '.npz', '.onnx', '.h5', '.msgpack')

# Numbers reported in the papers, for the model cards.
PAPER_METRICS: Dict[str, Dict[str, float]] = {
    'dgmn2_tiny': dict(params_m=12.1, gmacs=2.3, top1=78.7),
    'dgmn2_small': dict(params_m=21.0, gmacs=4.3, top1=81.7),
    'dgmn2_medium': dict(params_m=35.8, gmacs=7.1, top1=82.5),
    'dgmn2_large': dict(params_m=48.3, gmacs=10.4, top1=83.3),
}

_PAPERS: Dict[str, Dict[str, str]] = {
    'dgmn2': dict(
        name='DGMN2',
        title='Dynamic Graph Message Passing Networks for Visual Recognition',
        arxiv='2209.09760',
        description=(
            'a four-stage pyramid vision transformer whose attention lets every query attend to '
            'K = 9 key/value nodes sampled at a 3x3 neighbourhood plus learned per-token walks '
            '(a dynamic graph), with cost linear in the number of pixels'),
        citation=(
            '@article{zhang2022dgmn2,\n'
            '  title={Dynamic Graph Message Passing Networks for Visual Recognition},\n'
            '  author={Zhang, Li and Chen, Mohan and Arnab, Anurag and Xue, Xiangyang and Torr, Philip HS},\n'
            '  journal={IEEE Transactions on Pattern Analysis and Machine Intelligence},\n'
            '  year={2022}\n'
            '}'),
    ),
}


# ---------------------------------------------------------------------------------------------
# Files of Hub repos, from the cache or the Hub


def hf_cache_dir(cache_dir: Optional[Union[str, Path]] = None) -> Path:
    """ The Hugging Face cache ``hf_hub_download`` uses for this call (``cache_dir``, else HF_HUB_CACHE / HF_HOME). """
    from huggingface_hub import constants
    return Path(cache_dir) if cache_dir else Path(constants.HF_HUB_CACHE)


def _hf_offline() -> bool:
    from huggingface_hub import constants
    is_offline = getattr(constants, 'is_offline_mode', None)
    return bool(is_offline() if callable(is_offline) else constants.HF_HUB_OFFLINE)


def _split_revision(hub_id: str) -> Tuple[str, Optional[str]]:
    repo_id, _, revision = hub_id.partition('@')
    return repo_id, revision or None


def is_package_architecture(arch: Optional[str]) -> bool:
    """ Whether ``arch`` (optionally with a tag) is registered by a module of this package. """
    name = (arch or '').split('.')[0]
    if not name or not timm.is_model(name):
        return False
    module = model_entrypoint(name).__module__
    return module == PACKAGE or module.startswith(PACKAGE + '.')


def registered_architecture(repo_id: str) -> Optional[Tuple[str, Any]]:
    """ (model name with tag, pretrained cfg) of this package's registered cfg that uses this Hub id, if any. """
    for name in list_models(pretrained=True):
        if not is_package_architecture(name):
            continue
        cfg = get_pretrained_cfg(name)
        if cfg is not None and cfg.hf_hub_id == repo_id:
            return name, cfg
    return None


def is_package_repo(hub_id: str) -> bool:
    """ Whether a Hub repo holds weights of this package's models (named after one: 'ORG/dgmn2_tiny.in1k'). """
    return is_package_architecture(_split_revision(hub_id)[0].split('/')[-1])


def _not_found_message(hub_id: str, model_name: Optional[str], cache_dir, why: str) -> str:
    """ One line: which weights are missing, why, and the command that provides them. """
    repo_id = _split_revision(hub_id)[0]
    where = f"the Hugging Face Hub repo '{repo_id}' is not in the local cache ({hf_cache_dir(cache_dir)}) and {why}."
    offline = '' if _hf_offline() else 'Without network access set HF_HUB_OFFLINE=1 so that nothing waits for the Hub.'
    if is_package_repo(hub_id):
        name = model_name or repo_id.split('/')[-1]
        cmd = convert_command(name) + (f' --cache-dir {cache_dir}' if cache_dir else '')
        return (f"No pretrained weights for {name}: {where} Convert the authors' released checkpoint into the "
                f"local cache once with `{cmd}`; then timm.create_model('{name}', pretrained=True) works, offline "
                f"too (a converted folder elsewhere loads with timm.create_model('local-dir:FOLDER', "
                f'pretrained=True)). {offline}').strip()
    timm_name = repo_id.split('/')[-1]
    return (f"No pretrained weights for {model_name or timm_name}: they are timm's {timm_name} weights, and {where} "
            f"Fetch them into the cache once, with network access: `python -c \"import timm; "
            f"timm.create_model('{timm_name}', pretrained=True)\"`; after that they load offline. {offline}").strip()


def hub_file(
        hub_id: str,
        filenames: Sequence[str],
        cache_dir: Optional[Union[str, Path]] = None,
        model_name: Optional[str] = None,
) -> str:
    """ The local path of the first of ``filenames`` that a Hub repo has, from the cache or downloaded.

    Offline (HF_HUB_OFFLINE=1) only the cache is read. Online, each name is asked from the Hub once,
    without huggingface_hub's retries (one wait of at most HF_HUB_ETAG_TIMEOUT seconds), and a cached
    copy is used when the Hub cannot be reached.

    Raises:
        CheckpointNotFoundError: naming the repo, the cache and the command that produces the files.
    """
    from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url, try_to_load_from_cache, constants
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError
    repo_id, revision = _split_revision(hub_id)
    cached = [try_to_load_from_cache(repo_id, f, cache_dir=cache_dir, revision=revision) for f in filenames]
    cached = [c for c in cached if isinstance(c, str)]
    if _hf_offline():
        if cached:
            return cached[0]
        raise CheckpointNotFoundError(_not_found_message(
            hub_id, model_name, cache_dir, 'HF_HUB_OFFLINE is set, so the Hub was not asked'))
    for name in filenames:
        try:
            get_hf_file_metadata(hf_hub_url(repo_id, name, revision=revision), timeout=constants.HF_HUB_ETAG_TIMEOUT)
        except EntryNotFoundError:
            continue
        except (RepositoryNotFoundError, RevisionNotFoundError) as e:
            raise CheckpointNotFoundError(_not_found_message(
                hub_id, model_name, cache_dir, 'the Hub does not have it (or it is private and no token has access)'
            )) from e
        except Exception as e:  # no connection, a timeout, a server error
            if cached:
                return cached[0]
            raise CheckpointNotFoundError(_not_found_message(
                hub_id, model_name, cache_dir, f'the Hub could not be reached ({type(e).__name__})')) from e
        return hf_hub_download(repo_id, name, revision=revision, cache_dir=cache_dir)
    raise CheckpointNotFoundError(_not_found_message(
        hub_id, model_name, cache_dir, f'the Hub repo has none of {", ".join(filenames)}'))


def hub_weights_file(
        hub_id: str,
        filename: Optional[str] = None,
        cache_dir: Optional[Union[str, Path]] = None,
        model_name: Optional[str] = None,
) -> str:
    """ The weights file of a Hub repo (``filename``, else model.safetensors before pytorch_model.bin, as timm). """
    names = (filename,) if filename else (WEIGHTS_NAME, 'pytorch_model.bin')
    return hub_file(hub_id, names, cache_dir=cache_dir, model_name=model_name)


def pretrained_file(model_name: str, cache_dir: Optional[Union[str, Path]] = None) -> str:
    """ The local weights file that ``timm.create_model(model_name, pretrained=True)`` would load.

    For this package's own routes (torch.hub's ``pretrained=True``, the scripts' ``--pretrained``): the
    model's registered pretrained tag (default tag without one) or an ``hf-hub:ORG/NAME`` id, taken from the
    local Hugging Face cache, else asked from the Hub once, without retries (``hub_file``). The result is a
    path every reader of this package takes (``create_with_weights``, ``pretrained_file=``, ``--checkpoint``).

    Raises:
        CheckpointNotFoundError: one line naming the model, the Hub repo, the cache and the command that
            produces the weights, within one Hub request (at once with HF_HUB_OFFLINE=1 or no network).
    """
    if model_name.startswith('hf-hub:'):
        return hub_weights_file(model_name[len('hf-hub:'):], cache_dir=cache_dir)
    arch, tag = split_model_name_tag(model_name)
    if not timm.is_model(arch):
        raise CheckpointNotFoundError(f'Unknown model {arch!r}: no pretrained weights to load.')
    cfg = get_pretrained_cfg(model_name if tag else arch)
    name = f'{arch}.{cfg.tag}' if cfg is not None and cfg.tag else arch
    if cfg is None or not cfg.hf_hub_id:
        raise CheckpointNotFoundError(
            f'No pretrained weights are registered for {name}. Give a weights file instead (--checkpoint PATH, '
            f'checkpoint_path=PATH), or a converted folder.')
    return hub_weights_file(cfg.hf_hub_id, cfg.hf_hub_filename, cache_dir=cache_dir, model_name=name)


# ---------------------------------------------------------------------------------------------
# Converted folders


def read_config(folder: Union[str, Path]) -> Dict[str, Any]:
    """ The ``config.json`` of a timm Hub folder. """
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        raise CheckpointNotFoundError(f'{path} does not exist; a timm Hub folder needs a {CONFIG_NAME}.')
    try:
        cfg = json.loads(path.read_text(encoding='utf-8'))
    except (OSError, ValueError) as e:
        raise CheckpointError(f'{path} is not a valid JSON config ({e}).') from e
    if not isinstance(cfg, dict) or not isinstance(cfg.get('architecture'), str):
        raise CheckpointError(f'{path} is not a timm config (a JSON object naming an architecture).')
    return cfg


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            h.update(chunk)
    return h.hexdigest()


_SAMPLE_IMAGE_URL = (
    'https://huggingface.co/datasets/huggingface/documentation-images/resolve/main/beignets-task-guide.png')
_IMPORT_LINE = f'import {PACKAGE}  # registers the DGMN models with timm: import it before create_model'


def write_model_card(
        folder: Union[str, Path],
        repo_id: Optional[str] = None,
        source: Optional[Mapping[str, Any]] = None,
        ignored_keys: Optional[List[str]] = None,
        folder_name: Optional[str] = None,
        authors: bool = False,
        run: Optional[Mapping[str, Any]] = None,
) -> Path:
    """ Write the ``README.md`` model card of a converted folder from its ``config.json`` (timm's generate_readme).

    The card says what the weights are: the paper's provenance, numbers and dataset only for the authors'
    released checkpoints (``authors``); a run of ours (``run``) is described by its classes, input size and
    metrics; other weights only by their file.

    Args:
        folder: the folder (with ``config.json`` and ``model.safetensors``).
        repo_id: the Hub id the card refers to (default: the registered name, else the folder).
        source: provenance of the converted file (file, sha256, epoch, args).
        ignored_keys: released tensors that are not part of the converted model.
        folder_name: the folder's name in the card's ``local-dir:`` example (default: its name now).
        authors: the weights are the authors' released checkpoint (recognised by the converter).
        run: the record of a fine-tuning run of ours (classes, input_size, epoch, val_top1, val_top5, weights).
    """
    from timm.models._hub import generate_readme
    folder = Path(folder)
    cfg = read_config(folder)
    arch = cfg['architecture']
    pcfg = cfg.get('pretrained_cfg') or {}
    tag = pcfg.get('tag') or ''
    num_classes = int(cfg.get('num_classes') or 0)
    name = f'{arch}.{tag}' if tag else arch
    if repo_id:
        hub_name = f'hf-hub:{repo_id}'
    elif tag and name in list_models(pretrained=True):
        hub_name = name
    else:
        hub_name = f'local-dir:{folder_name or folder.name}'
    family = arch.split('_')[0]
    paper = _PAPERS.get(family, {})
    metrics = PAPER_METRICS.get(arch, {}) if authors and num_classes == 1000 else {}
    variant = arch.split('_', 1)[-1].capitalize() if '_' in arch else arch
    classifier = num_classes > 0
    size = tuple(pcfg.get('input_size') or (3, 224, 224))
    crop_pct = pcfg.get('crop_pct', 0.875)
    interp = pcfg.get('interpolation', 'bicubic')

    num_params = None
    if (folder / WEIGHTS_NAME).is_file():
        from safetensors import safe_open
        with safe_open(str(folder / WEIGHTS_NAME), framework='pt') as f:
            num_params = 0
            for k in f.keys():
                if not k.endswith(('running_mean', 'running_var', 'num_batches_tracked')):
                    n = 1
                    for s in f.get_slice(k).get_shape():
                        n *= int(s)
                    num_params += n

    desc = (f'{paper.get("name", family.upper())}-{variant} '
            f'{"image classification model" if classifier else "backbone"} from the paper "{paper.get("title", "")}"'
            + (f': {paper["description"]}.' if paper.get('description') else '.'))
    if run is not None:
        names = [str(c) for c in run.get('classes') or ()]
        desc += (f' Fine-tuned with {PACKAGE} (`python -m {PACKAGE}.finetune`) on {num_classes} classes'
                 + (f' ({", ".join(names[:10])}{", ..." if len(names) > 10 else ""})' if names else '') + '.')
    elif authors and classifier:
        desc += (' Trained on ImageNet-1k by the paper authors; the weights were converted from their released '
                 f'checkpoint to timm format with {PACKAGE} (no retraining, no fine-tuning).')
    elif authors:
        desc += (' Backbone only (no classifier, num_classes=0), converted from a detection / segmentation '
                 f"checkpoint of the authors' release with {PACKAGE}; use it as a feature extractor or to "
                 'initialise a dense-prediction model.')
    else:
        desc += (f' Weights converted to timm format with {PACKAGE} from `{(source or {}).get("file", "a file")}`'
                 + (f' ({num_classes} classes).' if classifier else ' (backbone only, num_classes=0).'))
    stats = {}
    if num_params is not None:
        stats['Params (M)'] = f'{num_params / 1e6:.2f} (this checkpoint, {num_params:,} parameters)' + (
            f'; paper: {metrics["params_m"]}' if metrics else '')
    if metrics:
        stats['GMACs'] = f'{metrics["gmacs"]} (paper, {size[-2]}x{size[-1]})'
    stats['Image size'] = f'{size[-2]} x {size[-1]} (any size of at least 32 x 32 works)'
    details: Dict[str, Any] = {
        'Model Type': 'Image classification / backbone' if classifier else 'Feature backbone',
        'Model Stats': stats,
    }
    if metrics.get('top1') is not None:
        details['ImageNet-1k top-1 (paper)'] = (
            f'{metrics["top1"]}% (reported by the authors at {size[-1]}x{size[-1]}; not re-evaluated here)')
    if paper:
        details['Papers'] = [f'{paper["title"]}: https://arxiv.org/abs/{paper["arxiv"]} (arXiv:{paper["arxiv"]})']
    if authors and classifier and num_classes == 1000:
        details['Dataset'] = 'ImageNet-1k'
    if run is not None:
        if run.get('classes'):
            details['Classes'] = ', '.join(str(c) for c in run['classes'])
        for key, label in (('val_top1', 'Validation top-1 (this run)'), ('val_top5', 'Validation top-5 (this run)')):
            if run.get(key) is not None:
                details[label] = f'{float(run[key]):.2f}%'
        if run.get('epoch') is not None:
            details['Epochs'] = str(run['epoch']) + (f' ({run["weights"]} weights)' if run.get('weights') else '')
    if source:
        original = f'`{source.get("file")}`'
        if source.get('sha256'):
            original += f' (sha256 `{source["sha256"][:16]}...`' + (
                f', epoch {source["epoch"]})' if 'epoch' in source else ')')
        details['Original'] = (f"the authors' release (Apache-2.0), converted from {original}" if authors
                               else f'converted from {original}')
    if ignored_keys:
        groups = sorted({k.split('.')[0] for k in ignored_keys})
        details['Not converted'] = f'{len(ignored_keys)} tensors outside the backbone ({", ".join(groups)})'

    usage = [
        '',
        f'Resize the shorter side to {int(round(size[-1] / crop_pct))} ({interp}), center crop '
        f'{size[-2]}x{size[-1]} (crop_pct {crop_pct}), scale to [0, 1] and normalise with mean '
        f'{tuple(pcfg.get("mean", ()))} and std {tuple(pcfg.get("std", ()))}; '
        '`timm.data.resolve_model_data_config(model)` returns exactly this.', '',
    ]
    if classifier:
        usage += [
            '### Image Classification', '```python', 'from urllib.request import urlopen', 'from PIL import Image',
            'import timm', 'import torch', _IMPORT_LINE, '',
            f"img = Image.open(urlopen('{_SAMPLE_IMAGE_URL}'))",
            f"model = timm.create_model('{hub_name}', pretrained=True).eval()",
            'data_config = timm.data.resolve_model_data_config(model)',
            'transforms = timm.data.create_transform(**data_config, is_training=False)',
            'with torch.inference_mode():',
            '    output = model(transforms(img).unsqueeze(0))  # (1, num_classes) logits',
            'top5_probabilities, top5_class_indices = torch.topk(output.softmax(dim=1) * 100, k=5)',
            '```', '',
            'The folder also loads in Hugging Face transformers (after `import dgmn_timm`): '
            '`AutoModelForImageClassification.from_pretrained(...)` and `pipeline("image-classification", ...)`.',
            '',
        ]
    usage += [
        '### Feature Map Extraction', '```python', 'import timm', 'import torch', _IMPORT_LINE, '',
        f"model = timm.create_model('{hub_name}', pretrained=True, features_only=True).eval()",
        'with torch.inference_mode():',
        f'    features = model(torch.randn(1, 3, {size[-2]}, {size[-1]}))  # strides 4, 8, 16, 32',
        '```', '',
        '### Offline use', '',
        'The weights live in the local Hugging Face cache after the first download (or after '
        f'`python -m {PACKAGE}.convert ... --to-cache`); with `HF_HUB_OFFLINE=1` they load from there. '
        "A copy of this folder loads with `timm.create_model('local-dir:PATH', pretrained=True)`.",
    ]
    task = 'image-classification' if classifier else 'image-feature-extraction'
    card = dict(
        tags=[task, 'timm', 'transformers', PACKAGE], license=pcfg.get('license', 'apache-2.0'),
        description=desc, details=details, usage='\n'.join(usage))
    if paper.get('citation'):
        card['citation'] = paper['citation']
    path = folder / README_NAME
    path.write_text(generate_readme(card, name, task_name=task), encoding='utf-8')
    return path


def hub_folder_files(folder: Union[str, Path]) -> List[Path]:
    """ The files of a Hub folder that belong in the repo (relative paths, sorted; hidden entries skipped). """
    folder = Path(folder)
    return [p.relative_to(folder) for p in sorted(folder.rglob('*'))
            if p.is_file() and not any(part.startswith('.') for part in p.relative_to(folder).parts)]


def _file_etag(path: Path) -> str:
    """ The etag the Hub gives a file: sha256 for LFS weight files, the git blob sha1 otherwise. """
    if path.suffix in _LFS_SUFFIXES:
        return _sha256(path)
    data = path.read_bytes()
    return hashlib.sha1(b'blob %d\0' % len(data) + data).hexdigest()


def check_repo_for(what: str, architecture: str, num_classes: Optional[int], repo_id: str) -> None:
    """ A Hub id registered by this package only takes its own architecture and number of classes. """
    registered = registered_architecture(repo_id)
    if registered is None:
        return
    reg_name, reg_cfg = registered
    reg_arch = split_model_name_tag(reg_name)[0]
    if reg_arch != split_model_name_tag(architecture)[0]:
        raise CheckpointMismatchError(
            f"{what} holds {architecture} but the Hub id '{repo_id}' belongs to {reg_name}; convert the "
            f'{reg_arch} checkpoint for that id, or use another repo id.')
    if reg_cfg.num_classes and num_classes != reg_cfg.num_classes:
        raise CheckpointMismatchError(
            f"{what} holds {architecture} with num_classes={num_classes} but the Hub id '{repo_id}' belongs to "
            f'{reg_name} with num_classes={reg_cfg.num_classes} (a backbone-only folder cannot stand in '
            f'for the classifier); use another repo id.')


def place_in_cache(
        folder: Union[str, Path],
        repo_id: str,
        cache_dir: Optional[Union[str, Path]] = None,
        revision: str = 'main',
) -> Path:
    """ Place a Hub-ready folder into the local Hugging Face cache as if downloaded from ``repo_id``.

    Writes the documented cache layout (``models--ORG--NAME/{blobs,snapshots,refs}``) that
    ``hf_hub_download`` reads, so the weights load with ``HF_HUB_OFFLINE=1`` through the model's
    pretrained tag and ``hf-hub:``. The snapshot gets a commit id derived from the file contents
    (not a Hub commit). A folder whose architecture or number of classes contradicts the model
    registered for ``repo_id`` is refused. Returns the snapshot folder.
    """
    from huggingface_hub.utils import validate_repo_id
    folder = Path(folder)
    validate_repo_id(repo_id)
    cfg = read_config(folder)
    check_repo_for(f'{folder} (by its {CONFIG_NAME})', cfg['architecture'], cfg.get('num_classes'), repo_id)
    files = hub_folder_files(folder)
    if Path(WEIGHTS_NAME) not in files:
        raise CheckpointNotFoundError(f'{folder} has no {WEIGHTS_NAME}.')

    storage = hf_cache_dir(cache_dir) / ('models--' + repo_id.replace('/', '--'))
    etags = {rel: _file_etag(folder / rel) for rel in files}
    commit = hashlib.sha1('\n'.join(f'{rel.as_posix()} {etags[rel]}' for rel in files).encode()).hexdigest()
    blobs, snapshot = storage / 'blobs', storage / 'snapshots' / commit
    blobs.mkdir(parents=True, exist_ok=True)
    for rel in files:
        blob = blobs / etags[rel]
        if not blob.is_file():
            tmp = blob.with_name(blob.name + '.incomplete')
            shutil.copyfile(folder / rel, tmp)
            os.replace(tmp, blob)
        pointer = snapshot / rel
        pointer.parent.mkdir(parents=True, exist_ok=True)
        if pointer.is_symlink() or pointer.exists():
            pointer.unlink()
        try:
            pointer.symlink_to(os.path.relpath(blob, pointer.parent))
        except OSError:  # no symlinks (e.g. Windows without developer mode): copy, as huggingface_hub does
            shutil.copyfile(blob, pointer)
    (storage / 'refs').mkdir(parents=True, exist_ok=True)
    (storage / 'refs' / revision).write_text(commit)
    return snapshot


def verify_hub_folder(folder: Union[str, Path], repo_id: Optional[str] = None) -> nn.Module:
    """ Check that a folder loads as a timm model (and may take ``repo_id``); returns the model in eval mode. """
    folder = Path(folder)
    cfg = read_config(folder)
    arch = split_model_name_tag(cfg['architecture'])[0]
    if repo_id:
        check_repo_for(f'{folder} (by its {CONFIG_NAME})', arch, cfg.get('num_classes'), repo_id)
    if not timm.is_model(arch):
        raise CheckpointError(
            f'{folder / CONFIG_NAME} names architecture {arch!r}, which is not a registered timm model '
            f'(import {PACKAGE} first; registered here: {", ".join(package_models())}).')
    return timm.create_model(f'local-dir:{folder.resolve()}', pretrained=True).eval()


def push_folder(
        folder: Union[str, Path],
        repo_id: str,
        private: bool = False,
        revision: Optional[str] = None,
        commit_message: Optional[str] = None,
        dry_run: bool = False,
        verify: bool = True,
        print_fn: Callable[[str], None] = print,
) -> Optional[Any]:
    """ Upload a converted folder to a Hub model repo (created if missing), or with ``dry_run`` print the plan.

    The token comes from the usual huggingface_hub places (``HF_TOKEN``, ``hf auth login``). Exactly the
    files of ``hub_folder_files(folder)`` are committed. Returns the ``CommitInfo`` (None for a dry run).
    """
    from huggingface_hub.utils import validate_repo_id
    folder = Path(folder)
    validate_repo_id(repo_id)
    if not folder.is_dir():
        raise CheckpointNotFoundError(f'{folder} is not a folder.')
    if verify:
        verify_hub_folder(folder, repo_id)
    files = hub_folder_files(folder)
    commit_message = commit_message or f'Add {read_config(folder)["architecture"]} weights (converted with {PACKAGE})'
    plan = [
        f"{'[dry run] would upload' if dry_run else 'Uploading'} {len(files)} files from {folder} to "
        f"https://huggingface.co/{repo_id} (model repo, {'private' if private else 'public'} if created, "
        f"revision {revision or 'main'}, commit message {commit_message!r}):",
    ]
    for rel in files:
        plan.append(f'  {rel.as_posix()}  {(folder / rel).stat().st_size:,} bytes  sha256 {_sha256(folder / rel)}')
    print_fn('\n'.join(plan))
    if dry_run:
        return None

    from huggingface_hub import HfApi
    api = HfApi(library_name='timm', library_version=timm.__version__)
    repo_url = api.create_repo(repo_id, repo_type='model', private=private, exist_ok=True)
    info = api.upload_folder(
        repo_id=repo_url.repo_id, folder_path=folder, repo_type='model', revision=revision,
        commit_message=commit_message, allow_patterns=[rel.as_posix() for rel in files])
    print_fn(f'Uploaded: {getattr(info, "commit_url", info)}')
    return info


# ---------------------------------------------------------------------------------------------
# torch.hub entry points


def package_models(package: str = PACKAGE) -> List[str]:
    """ All registered timm models whose entrypoint is defined inside ``package`` (any module of it). """
    def inside(name: str) -> bool:
        module = model_entrypoint(name).__module__
        return module == package or module.startswith(package + '.')
    return [name for name in list_models() if inside(name)]


_HUB_DOC = """

Pretrained weights: {weights}

Args:
    pretrained: load the pretrained weights (Hub or local Hugging Face cache; offline with HF_HUB_OFFLINE=1
        once cached). Without them this raises an error naming the command that converts the authors'
        release (python -m dgmn_timm.convert ... --to-cache).
    checkpoint_path: load these weights instead: a converted folder (model.safetensors + config.json),
        a timm checkpoint or one of the authors' released .pth files (DeiT-style or 'backbone.'-prefixed).
    num_classes: classes of the classifier; a pretrained head of another size is dropped (new head).
    features_only: return a feature-pyramid backbone (timm FeatureListNet, strides 4/8/16/32).
    **kwargs: any other timm.create_model argument (in_chans, out_indices, drop_path_rate, cache_dir, ...).

Example:
    model = torch.hub.load('PATH/TO/dgmn-timm', '{name}', source='local', pretrained=True)
"""


def create_hub_model(model_name: str, pretrained: bool = False, checkpoint_path=None, **kwargs) -> nn.Module:
    """ The torch.hub entry points' model: random, the pretrained weights (``pretrained_file``) or a file's,
    read by ``dgmn_timm.weights.checkpoints`` (``create_with_weights``). """
    if pretrained and checkpoint_path is not None:
        raise ValueError('give pretrained=True or checkpoint_path, not both')
    if pretrained:
        checkpoint_path = pretrained_file(model_name, cache_dir=kwargs.pop('cache_dir', None))
    if checkpoint_path is None:
        return timm.create_model(model_name, **kwargs)
    return create_with_weights(model_name, checkpoint_path, **kwargs)


def hub_entrypoint(model_name: str) -> Callable[..., nn.Module]:
    """ A torch.hub entry point for a registered model, documented for ``torch.hub.help``. """
    cfg = get_pretrained_cfg(model_name)
    weights = (f"Hugging Face Hub '{cfg.hf_hub_id}' (timm format, tag {cfg.tag})." if cfg is not None and cfg.hf_hub_id
               else 'none registered; pass checkpoint_path.')

    def entry(pretrained: bool = False, checkpoint_path=None, num_classes: Optional[int] = None,
              features_only: bool = False, **kwargs) -> nn.Module:
        if num_classes is not None:
            kwargs['num_classes'] = num_classes
        return create_hub_model(model_name, pretrained, checkpoint_path, features_only=features_only, **kwargs)

    entry.__name__ = entry.__qualname__ = model_name
    entry.__doc__ = (model_entrypoint(model_name).__doc__ or model_name).strip() + _HUB_DOC.format(
        weights=weights, name=model_name)
    return entry


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='python -m dgmn_timm.push_to_hub',
        description='Upload a converted folder (python -m dgmn_timm.convert) to a Hugging Face Hub model repo. The '
                    'folder is verified first (it loads in timm, and a registered Hub id only takes its own '
                    'architecture); the token comes from HF_TOKEN or `hf auth login`.')
    parser.add_argument('folder', help='converted folder (model.safetensors, config.json, README.md)')
    parser.add_argument('--repo-id', required=True, help='Hub repo, ORG/NAME')
    parser.add_argument('--private', action='store_true', help='create the repo as private (if it does not exist)')
    parser.add_argument('--revision', default=None, help='branch to commit to (default: main)')
    parser.add_argument('--commit-message', default=None, help='commit message (default: names the architecture)')
    parser.add_argument('--dry-run', action='store_true', help='print what would be uploaded; no network')
    parser.add_argument('--no-verify', action='store_true', help='skip loading the folder before the upload')
    return parser


def main(argv=None) -> int:
    """ ``python -m dgmn_timm.push_to_hub FOLDER --repo-id ORG/NAME [--dry-run]``: upload a converted folder. """
    args = build_parser().parse_args(argv)
    try:
        push_folder(args.folder, args.repo_id, private=args.private, revision=args.revision,
                    commit_message=args.commit_message, dry_run=args.dry_run, verify=not args.no_verify)
    except (CheckpointError, ValueError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
