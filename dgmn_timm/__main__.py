""" Quick start: build a DGMN model and extract the feature pyramid of an image.

    python -m dgmn_timm                       # dgmn2_tiny, random weights, bundled sample image
    python -m dgmn_timm --model dgmn2_small --image my.jpg --pretrained
    python -m dgmn_timm --checkpoint runs/digits/best.safetensors --image my.jpg
"""
import argparse
import sys
from importlib import resources
from typing import List, Optional

import torch
from timm.data import create_transform, resolve_data_config

import dgmn_timm  # noqa: F401  (registers the models)
from dgmn_timm.tools.cli import HelpFormatter, UsageError, check_model_name, read_rgb_image, run_cli
from dgmn_timm.tools.engine import create_model


def sample_image_path() -> str:
    return str(resources.files('dgmn_timm') / 'assets' / 'sample.png')


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='python -m dgmn_timm', description=__doc__.strip().splitlines()[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument('--model', default='dgmn2_tiny', help='registered model name (see timm.list_models("dgmn*"))')
    parser.add_argument('--image', default=None, help='image file (default: the bundled sample image)')
    parser.add_argument('--pretrained', action='store_true', help='load the pretrained weights (Hub or local cache)')
    parser.add_argument('--checkpoint', default=None, metavar='FILE',
                        help='weights file or converted folder to load (ours, the authors\', timm\'s)')
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = get_parser().parse_args(argv)
    # every check before the model is built
    if args.pretrained and args.checkpoint:
        raise UsageError('give --pretrained or --checkpoint, not both')
    check_model_name(args.model)
    path = args.image or sample_image_path()
    image = read_rgb_image(path)
    model = create_model(args.model, pretrained=args.pretrained, checkpoint=args.checkpoint, num_classes=0).eval()
    config = resolve_data_config({}, model=model)
    x = create_transform(**config)(image).unsqueeze(0)
    with torch.inference_mode():
        features = model.forward_intermediates(x, intermediates_only=True)
    weights = args.checkpoint or ('pretrained' if args.pretrained else 'random (untrained)')
    print(f'{args.model} with {weights} weights on {path} -> input {tuple(x.shape)}')
    for info, f in zip(model.feature_info, features):
        print(f"  {info['module']:>10s}  stride {info['reduction']:>2d}  {tuple(f.shape)}")
    return 0


if __name__ == '__main__':
    sys.exit(run_cli(main))
