#!/usr/bin/env python3
""" Draw the nodes a query samples: DGMN2 (last block of each stage, paper Fig. 11 style) or RepGraph (Fig. 6).

    dgmn-visualize-sampling --image cat.jpg --point 120,200 --pretrained --output sampling.png
    python -m dgmn_timm.visualize_sampling --grid 4 --checkpoint OUT/best.safetensors --output grid.png
    python -m dgmn_timm.visualize_sampling --model resnet50_repgraph_3l --layer 2 --grid 3 --output nodes.png

DGMN2 models: one panel per stage; every head's K = 9 nodes are drawn at their image positions,
coloured (and sized) by attention weight; the cross marks the query. RepGraph ResNets: one panel
for the chosen RepGraph layer (--layer); the S nodes of every query are discs whose area follows
the weight, one colour per query. The image is resized so that its shorter side is --img-size
(no crop), and --point is given in the original image's pixels. Any weights work, random included
(random DGMN2 weights start with zero offsets, so their nodes form the plain 3x3 neighbourhood of
the query; a random RepGraph layer's offsets are small, so its nodes sit near the query).
An existing --output or --save-points file is replaced only with --overwrite.
"""
import argparse
import json
import os
import sys
from importlib import resources

import numpy as np
from torchvision import transforms

import timm
from timm.data import resolve_data_config
from timm.data.transforms import str_to_interp_mode
from timm.utils import random_seed

from dgmn_timm.layers import RepGraph
from dgmn_timm.tools.cli import HelpFormatter, UsageError, check_model_args, check_positive, \
    read_rgb_image, run_cli, set_threads
from dgmn_timm.tools.engine import atomic_path, atomic_write_text, create_model, resolve_device
from dgmn_timm.tools.visualize import grid_points, plot_repgraph_nodes, plot_sampling, repgraph_nodes, sampling_points_many

# the RepGraph ResNets and the stage of each of their RepGraph layers, in network order
# (tests/test_tools.py checks this against the registered models)
REPGRAPH_LAYERS = {
    'resnet50_repgraph': ('res4',),
    'resnet50_repgraph_3l': ('res3', 'res4', 'res5'),
    'resnet50_repgraph_5l': ('res3', 'res4', 'res4', 'res5', 'res5'),
    'resnet101_repgraph': ('res4',),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0], formatter_class=HelpFormatter)
    p.add_argument('--image', default=None, help='image file (default: the bundled sample image)')
    q = p.add_mutually_exclusive_group()
    q.add_argument('--point', default=None, metavar='Y,X', help='query point in image pixels (default: the centre)')
    q.add_argument('--grid', type=int, default=None, metavar='N', help='an N x N grid of query points')
    p.add_argument('--model', default='dgmn2_tiny', help='a DGMN2 model or a RepGraph ResNet (' +
                   ', '.join(REPGRAPH_LAYERS) + ')')
    p.add_argument('--pretrained', nargs='?', const=True, default=None, metavar='TAG',
                   help='pretrained weights (default tag or the one given)')
    p.add_argument('--checkpoint', default=None, metavar='FILE', help='weights file (any format the model loads)')
    p.add_argument('--img-size', type=int, default=None, help='shorter side of the network input (default: the '
                                                              'model\'s, 224)')
    p.add_argument('--stages', default=None, help='DGMN2: stages to draw, 1-based, e.g. 3,4 (default: all)')
    p.add_argument('--layer', type=int, default=None, metavar='N',
                   help='RepGraph: which RepGraph layer to draw, 1-based in network order (default: the last)')
    p.add_argument('--output', default='output/visualize_sampling/sampling.png', metavar='FILE',
                   help='PNG file to write')
    p.add_argument('--save-points', default=None, metavar='JSON', help='also write the points and weights as JSON')
    p.add_argument('--overwrite', action='store_true', help='replace an existing --output / --save-points file')
    p.add_argument('--seed', type=int, default=0, help='seed for random weights')
    p.add_argument('--device', default='auto', help='cpu, cuda, cuda:N, or auto (cuda if available)')
    p.add_argument('--threads', type=int, default=None,
                   help='intra-op CPU threads (default: OMP_NUM_THREADS if set, else all cores)')
    return p


def parse_point(text: str):
    try:
        y, x = (float(v) for v in text.split(','))
    except ValueError:
        raise UsageError(f'--point takes "y,x" in pixels, got {text!r}') from None
    return y, x


def parse_stages(text: str, num_stages: int = 4):
    try:
        stages = [int(v) - 1 for v in text.split(',') if v.strip()]
    except ValueError:
        raise UsageError(f'--stages takes comma-separated stage numbers (1-based), got {text!r}') from None
    if not stages or any(not 0 <= s < num_stages for s in stages):
        raise UsageError(f'--stages {text}: DGMN2 has stages 1..{num_stages}')
    return stages


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    # every check before the model is built
    check_model_args(args)
    check_positive(args, 'threads')
    outputs = [f for f in (args.output, args.save_points) if f]
    if not args.output.lower().endswith('.png'):
        raise UsageError(f'--output must end in .png, got {args.output}')
    if args.save_points and os.path.abspath(args.save_points) == os.path.abspath(args.output):
        raise UsageError('--save-points must name another file than --output')
    for f in outputs:
        if os.path.isdir(f):
            raise UsageError(f'{f} is a folder; give a file name')
    existing = [f for f in outputs if os.path.lexists(f)]
    if existing and not args.overwrite:
        raise UsageError(f'{", ".join(existing)} already exist(s); replace with --overwrite or give another --output')
    arch = timm.models.split_model_name_tag(args.model)[0]
    dgmn2 = timm.list_models('dgmn2*')
    if arch not in dgmn2 and arch not in REPGRAPH_LAYERS:
        raise UsageError(f'--model {args.model}: the drawing reads the sampling graph of DGMN2 attention or of a '
                         f'RepGraph layer, which {arch} does not have; use one of '
                         f'{", ".join(dgmn2 + list(REPGRAPH_LAYERS))}')
    repgraph = arch in REPGRAPH_LAYERS
    if args.grid is not None and args.grid < 1:
        raise UsageError(f'--grid must be at least 1, got {args.grid}')
    if repgraph and args.stages:
        raise UsageError(f'--stages is for DGMN2 models; {arch} draws one RepGraph layer, chosen with --layer')
    if not repgraph and args.layer is not None:
        raise UsageError(f'--layer is for RepGraph models; {arch} draws its stages, chosen with --stages')
    stages = parse_stages(args.stages) if args.stages else None
    layer = None
    if repgraph:
        where = REPGRAPH_LAYERS[arch]
        layer = len(where) if args.layer is None else args.layer
        if not 1 <= layer <= len(where):
            raise UsageError(f'--layer {args.layer}: {arch} has RepGraph layers 1..{len(where)} '
                             f'({", ".join(where)})')
    path = args.image or str(resources.files('dgmn_timm') / 'assets' / 'sample.png')
    image = read_rgb_image(path)
    H, W = image.height, image.width
    if args.grid:
        points = grid_points(H, W, args.grid)
    else:
        points = [parse_point(args.point) if args.point else ((H - 1) / 2, (W - 1) / 2)]
    for py, px in points:
        if not (-0.5 <= py <= H - 0.5 and -0.5 <= px <= W - 0.5):
            raise UsageError(f'point ({py:g}, {px:g}) is outside the {H}x{W} image')
    device = resolve_device(args.device)
    set_threads(args.threads, 0)

    random_seed(args.seed)
    model = create_model(args.model, pretrained=args.pretrained, checkpoint=args.checkpoint, num_classes=0)
    model = model.to(device).eval()
    cfg = resolve_data_config(dict(img_size=args.img_size) if args.img_size else {}, model=model)
    side = cfg['input_size'][-1]
    tf = transforms.Compose([
        transforms.Resize(side, interpolation=str_to_interp_mode(cfg['interpolation'])),
        transforms.ToTensor(),
        transforms.Normalize(cfg['mean'], cfg['std']),
    ])
    x = tf(image)
    h, w = x.shape[-2:]
    sy, sx = H / h, W / w  # network-input pixel -> original pixel

    # the same points in network-input pixels (min / max: only float rounding at the image edges)
    input_points = [(min(max((py + 0.5) / sy - 0.5, -0.5), h - 0.5), min(max((px + 0.5) / sx - 0.5, -0.5), w - 0.5))
                    for py, px in points]
    weights = 'random' if not (args.pretrained or args.checkpoint) else (args.checkpoint or 'pretrained')
    title = f'{args.model} ({weights} weights), input {h}x{w}'
    if repgraph:
        return draw_repgraph(args, model, x, image, path, points, input_points, layer, title)

    results = sampling_points_many(model, x, input_points, stages)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with atomic_path(args.output) as tmp:
        plot_sampling(np.asarray(image), results, tmp, scale=(sy, sx), title=title)

    report = dict(image=path, model=args.model, input_size=[h, w], image_size=[H, W], points=[])
    for (py, px), per_stage in zip(points, results):
        entry = dict(point=[py, px], stages=[])
        for r in per_stage:
            pos = np.asarray(r['positions'])
            entry['stages'].append(dict(
                stage=r['stage'] + 1, stride=r['stride'], query=list(r['query']),
                positions=(np.stack([(pos[..., 0] + 0.5) * sy - 0.5, (pos[..., 1] + 0.5) * sx - 0.5], -1)).tolist(),
                weights=np.asarray(r['weights']).tolist()))
        report['points'].append(entry)
    if args.save_points:
        atomic_write_text(json.dumps(report), args.save_points)
    print(f'wrote {args.output} ({len(points)} query point(s), {len(results[0])} stage(s))')
    return report


def draw_repgraph(args, model, x, image, path, points, input_points, layer, title) -> dict:
    """ The S nodes of RepGraph layer ``layer`` (1-based) for every point: PNG and report. """
    h, w = x.shape[-2:]
    H, W = image.height, image.width
    sy, sx = H / h, W / w
    names = [n for n, m in model.named_modules() if isinstance(m, RepGraph)]
    where = REPGRAPH_LAYERS[timm.models.split_model_name_tag(args.model)[0]][layer - 1]
    results = repgraph_nodes(model, x, input_points, layer=layer - 1)
    title = f'{title}\nRepGraph layer {layer}/{len(names)} ({where}, {names[layer - 1]}), ' \
            f'{results[0]["map_size"][0]}x{results[0]["map_size"][1]} map'
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with atomic_path(args.output) as tmp:
        plot_repgraph_nodes(np.asarray(image), results, tmp, title=title, scale=(sy, sx))

    def to_image(p):  # network-input pixel centres -> original image pixels
        p = np.asarray(p, dtype=np.float64)
        return np.stack([(p[..., 0] + 0.5) * sy - 0.5, (p[..., 1] + 0.5) * sx - 0.5], -1)

    map_stride = [results[0]['stride'][0] * sy, results[0]['stride'][1] * sx]  # image pixels per map pixel
    report = dict(image=path, model=args.model, input_size=[h, w], image_size=[H, W],
                  layer=dict(index=layer, num_layers=len(names), stage=where, module=names[layer - 1],
                             map_size=list(results[0]['map_size']), stride=map_stride),
                  points=[])
    for (py, px), r in zip(points, results):
        report['points'].append(dict(
            point=[py, px], query=list(r['query']), query_px=to_image(r['query_px']).tolist(),
            positions=to_image(r['positions']).tolist(), weights=np.asarray(r['weights']).tolist()))
    if args.save_points:
        atomic_write_text(json.dumps(report), args.save_points)
    print(f'wrote {args.output} ({len(points)} query point(s), RepGraph layer {layer} of {len(names)})')
    return report


if __name__ == '__main__':
    sys.exit(run_cli(main))
