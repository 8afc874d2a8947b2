#!/usr/bin/env python
""" Parameters and GMACs of DGMN models next to the paper's figures.

    python -m dgmn_timm.count_macs                       # all dgmn2 variants at 224
    python -m dgmn_timm.count_macs --models dgmn2_tiny --img-size 512

GMACs are the total of PyTorch's FlopCounterMode / 2 (the op registers its own cost).
"""
import argparse

import timm
import torch

from dgmn_timm.tools.profiling import count_model_macs

PAPER = {  # params (M), GMACs @224, ImageNet-1k top-1, as the paper reports them
    'dgmn2_tiny': (12.1, 2.3, 78.7),
    'dgmn2_small': (21.0, 4.3, 81.7),
    'dgmn2_medium': (35.8, 7.1, 82.5),
    'dgmn2_large': (48.3, 10.4, 83.3),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument('--models', default=','.join(PAPER), help='comma-separated model names')
    parser.add_argument('--img-size', type=int, nargs='+', default=[224], help='H [W]')
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    h = args.img_size[0]
    w = args.img_size[-1]
    print('| model | params | GMACs @%dx%d | paper GMACs @224 | diff |' % (h, w))
    print('|---|---|---|---|---|')
    for name in args.models.split(','):
        with torch.device('meta'):
            params = sum(p.numel() for p in timm.create_model(name).parameters())
        macs = count_model_macs(name, (1, 3, h, w))['total'] / 1e9
        paper = PAPER.get(name, (None, None, None))[1]
        diff = f'{100 * (macs / paper - 1):+.1f}%' if paper and (h, w) == (224, 224) else ''
        print(f'| {name} | {params:,} | {macs:.3f} | {paper or ""} | {diff} |')


if __name__ == '__main__':
    main()
