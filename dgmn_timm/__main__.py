""" Quick start: build a DGMN model and extract the feature pyramid of an image.

    python -m dgmn_timm                       # dgmn2_tiny, random weights, bundled sample image
    python -m dgmn_timm --model dgmn2_small --image my.jpg --pretrained
    dgmn-timm --checkpoint output/finetune/best.safetensors --image my.jpg
"""
import argparse
import sys
from importlib import resources
from typing import List, Optional

import torch
from timm.data import create_transform, resolve_data_config

import dgmn_timm  # noqa: F401  (registers the models)
from dgmn_timm.tools.cli import HelpFormatter, check_model_args, check_positive, \
    read_rgb_image, run_cli, set_threads
from dgmn_timm.tools.engine import create_model, resolve_device


def sample_image_path() -> str:
    return str(resources.files('dgmn_timm') / 'assets' / 'sample.png')


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='python -m dgmn_timm', description=__doc__.strip().splitlines()[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument('--model', default='dgmn2_tiny', help='registered model name (see timm.list_models("dgmn*"))')
    parser.add_argument('--image', default=None, help='image file (default: the bundled sample image)')
    parser.add_argument('--pretrained', nargs='?', const=True, default=None, metavar='TAG',
                        help='pretrained weights (the default tag, or the one given; Hub or local cache)')
    parser.add_argument('--checkpoint', default=None, metavar='FILE',
                        help='weights file or converted folder to load (ours, the authors\', timm\'s)')
    parser.add_argument('--img-size', type=int, default=None, help='input size (default: the model\'s, 224)')
    parser.add_argument('--device', default='auto', help='cpu, cuda, cuda:N, or auto (cuda if available)')
    parser.add_argument('--threads', type=int, default=None,
                        help='intra-op CPU threads (default: OMP_NUM_THREADS if set, else all cores)')
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    # every check before the model is built
    check_model_args(args)
    check_positive(args, 'threads')
    path = args.image or sample_image_path()
    image = read_rgb_image(path)
    device = resolve_device(args.device)
    set_threads(args.threads, 0)
    model = create_model(args.model, pretrained=args.pretrained, checkpoint=args.checkpoint, num_classes=0)
    model = model.to(device).eval()
    config = resolve_data_config(dict(img_size=args.img_size), model=model)
    x = create_transform(**config)(image).unsqueeze(0).to(device)
    with torch.inference_mode():
        features = model.forward_intermediates(x, intermediates_only=True)
    weights = args.checkpoint or (f'pretrained ({args.pretrained})' if isinstance(args.pretrained, str) else
                                  'pretrained' if args.pretrained else 'random (untrained)')
    print(f'{args.model} with {weights} weights on {path} -> input {tuple(x.shape)}')
    for info, f in zip(model.feature_info, features):
        print(f"  {info['module']:>10s}  stride {info['reduction']:>2d}  {tuple(f.shape)}")
    return 0


def cli() -> int:
    """ The console script ``dgmn-timm``. """
    return run_cli(main)


if __name__ == '__main__':
    sys.exit(cli())
