""" Quick start: build a DGMN model and extract the feature pyramid of an image.

    python -m dgmn_timm                       # dgmn2_tiny, random weights, bundled sample image
    python -m dgmn_timm --model dgmn2_small --image my.jpg --pretrained
"""
import argparse
import sys
from importlib import resources

import torch
import timm
from PIL import Image
from timm.data import create_transform, resolve_data_config

import dgmn_timm  # noqa: F401  (registers the models)


def sample_image_path() -> str:
    return str(resources.files('dgmn_timm') / 'assets' / 'sample.png')


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog='python -m dgmn_timm', description=__doc__.strip().splitlines()[0])
    parser.add_argument('--model', default='dgmn2_tiny', help='registered model name (see timm.list_models("dgmn*"))')
    parser.add_argument('--image', default=None, help='image file (default: the bundled sample image)')
    parser.add_argument('--pretrained', action='store_true', help='load the pretrained weights (Hub or local cache)')
    parser.add_argument('--checkpoint', default=None, help='checkpoint file to load (ours or the authors\')')
    args = parser.parse_args(argv)

    kwargs = dict(pretrained=args.pretrained, features_only=True)
    if args.checkpoint:
        kwargs.update(pretrained=True, pretrained_cfg_overlay=dict(file=args.checkpoint))
    model = timm.create_model(args.model, **kwargs).eval()
    config = resolve_data_config({}, model=model)
    transform = create_transform(**config)
    path = args.image or sample_image_path()
    image = Image.open(path).convert('RGB')
    x = transform(image).unsqueeze(0)
    with torch.inference_mode():
        features = model(x)
    weights = 'pretrained' if kwargs['pretrained'] else 'random (untrained)'
    print(f'{args.model} with {weights} weights on {path} -> input {tuple(x.shape)}')
    for info, f in zip(model.feature_info.get_dicts(), features):
        print(f"  {info['module']:>10s}  stride {info['reduction']:>2d}  {tuple(f.shape)}")
    return 0


if __name__ == '__main__':
    sys.exit(main())
