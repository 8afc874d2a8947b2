""" Where a DGMN2 query looks: the nodes its last block per stage samples, with their weights.

``sampling_points(model, image, point)`` runs one forward pass with a pre-hook on the
attention of the last block of every stage, asks that attention for its dynamic graph
(``DynamicGraphAttention.sampling_graph``) and returns, per stage, the K = 9 sampled nodes of
every head for the query at ``point``, in image pixel coordinates, with their attention weights.

Coordinates are (y, x) pixel centres: a stage with stride s maps its position p to the image
pixel (p + 0.5) * s - 0.5, and an image pixel q to the stage position (q + 0.5) / s - 0.5
(rounded to the nearest query). ``plot_sampling`` draws the result paper-Fig.-11 style with
matplotlib's Agg canvas (no display needed).
"""
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn

__all__ = ['stage_strides', 'image_to_stage', 'stage_to_image', 'sampling_graphs', 'sampling_points',
           'sampling_points_many', 'grid_points', 'plot_sampling', 'repgraph_nodes', 'plot_repgraph_nodes']

Point = Tuple[float, float]


def _last_attentions(model: nn.Module) -> List[nn.Module]:
    stages = getattr(model, 'stages', None)
    attns = []
    if stages is not None:
        for stage in stages:
            blocks = getattr(stage, 'blocks', None)
            attn = getattr(blocks[-1], 'attn', None) if blocks is not None and len(blocks) else None
            if attn is not None and hasattr(attn, 'sampling_graph'):
                attns.append(attn)
    if not attns or len(attns) != len(stages):
        raise TypeError(
            f'{type(model).__name__} has no stages[i].blocks[-1].attn.sampling_graph; the sampling '
            f'visualisation needs a DGMN2 classifier model (timm.create_model("dgmn2_tiny"), not features_only).')
    return attns


def stage_strides(model: nn.Module) -> List[int]:
    """ Output stride of every stage (from ``feature_info``: 4, 8, 16, 32 or dilated variants). """
    info = model.feature_info
    if hasattr(info, 'reduction'):
        return list(info.reduction())
    return [int(d['reduction']) for d in info]


def image_to_stage(coord: float, stride: int, size: int) -> int:
    """ The stage position (0..size-1) whose receptive centre is nearest image pixel ``coord``. """
    return int(min(max(round((coord + 0.5) / stride - 0.5), 0), size - 1))


def stage_to_image(coord: Union[float, np.ndarray, torch.Tensor], stride: int):
    """ Image pixel centre of stage position ``coord`` (works on arrays). """
    return (coord + 0.5) * stride - 0.5


@torch.no_grad()
def sampling_graphs(model: nn.Module, image: torch.Tensor) -> List[Dict[str, torch.Tensor]]:
    """ The dynamic graph of the last block of every stage for one image.

    Args:
        model: a DGMN2 model (any weights); put in eval mode here.
        image: (3, H, W) or (1, 3, H, W) normalised image tensor.

    Returns:
        per stage: dict(positions=(heads, K, h, w, 2) stage (y, x) coordinates,
        weights=(heads, K, h, w), stride=int).
    """
    if image.dim() == 3:
        image = image.unsqueeze(0)
    if image.dim() != 4 or image.shape[0] != 1:
        raise ValueError(f'Expected one (3, H, W) image, got shape {tuple(image.shape)}.')
    attns = _last_attentions(model)
    strides = stage_strides(model)
    captured: Dict[int, torch.Tensor] = {}
    handles = [
        attn.register_forward_pre_hook(lambda mod, inputs, i=i: captured.__setitem__(i, inputs[0].detach()))
        for i, attn in enumerate(attns)
    ]
    was_training = model.training
    model.eval()
    try:
        param = next(model.parameters())
        model(image.to(device=param.device, dtype=param.dtype))
        graphs = []
        for i, attn in enumerate(attns):
            positions, weights = attn.sampling_graph(captured[i])
            graphs.append(dict(positions=positions[0].float().cpu(), weights=weights[0].float().cpu(),
                               stride=strides[i]))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return graphs


def _query(graph: Dict[str, torch.Tensor], point: Point, stage: int) -> Dict[str, object]:
    positions, weights, stride = graph['positions'], graph['weights'], graph['stride']
    h, w = weights.shape[-2:]
    qy, qx = image_to_stage(point[0], stride, h), image_to_stage(point[1], stride, w)
    pos = positions[:, :, qy, qx]  # (heads, K, 2) stage coordinates
    return dict(
        stage=stage,
        stride=stride,
        map_size=(h, w),
        query=(qy, qx),
        query_px=(float(stage_to_image(qy, stride)), float(stage_to_image(qx, stride))),
        positions=stage_to_image(pos, stride).numpy(),  # (heads, K, 2) image (y, x)
        stage_positions=pos.numpy(),
        weights=weights[:, :, qy, qx].numpy(),  # (heads, K)
    )


def sampling_points_many(
        model: nn.Module,
        image: torch.Tensor,
        points: Sequence[Point],
        stages: Optional[Sequence[int]] = None,
) -> List[List[Dict[str, object]]]:
    """ ``sampling_points`` for several query points with one forward pass: [point][stage] -> dict.

    Raises:
        ValueError: a point lies outside the image (beyond the outer pixel edges).
    """
    height, width = image.shape[-2:]
    for py, px in points:
        if not (-0.5 <= py <= height - 0.5 and -0.5 <= px <= width - 0.5):
            raise ValueError(
                f'Point (y={py:g}, x={px:g}) is outside the {height}x{width} image; pixel centres run from 0 to '
                f'{height - 1} in y and 0 to {width - 1} in x (edges at -0.5 and size - 0.5).')
    graphs = sampling_graphs(model, image)
    stages = range(len(graphs)) if stages is None else stages
    return [[_query(graphs[s], p, s) for s in stages] for p in points]


def sampling_points(
        model: nn.Module,
        image: torch.Tensor,
        point: Point,
        stages: Optional[Sequence[int]] = None,
) -> List[Dict[str, object]]:
    """ The nodes the query at image pixel ``point`` = (y, x) samples in the last block of each stage.

    Args:
        model: a DGMN2 model with any weights (random included).
        image: (3, H, W) or (1, 3, H, W) normalised input tensor; ``point`` is in its pixels.
        point: (y, x) query location in image pixels, inside the image (ValueError otherwise).
        stages: stage indices to report (default: all).

    Returns:
        one dict per stage with ``positions`` (heads, K, 2) image pixel (y, x) of the sampled
        node centres, ``weights`` (heads, K) attention weights (each head sums to 1),
        ``stage_positions`` the same nodes in stage coordinates, ``query`` the query's stage
        position, ``query_px`` its image pixel centre, ``stride`` and ``map_size``.
    """
    return sampling_points_many(model, image, [point], stages)[0]


def grid_points(height: int, width: int, n: int) -> List[Point]:
    """ n x n query points at the centres of an n x n grid of cells over a height x width image. """
    ys = (np.arange(n) + 0.5) * height / n - 0.5
    xs = (np.arange(n) + 0.5) * width / n - 0.5
    return [(float(y), float(x)) for y in ys for x in xs]


def plot_sampling(
        image: np.ndarray,
        results: Sequence[Sequence[Dict[str, object]]],
        path: str,
        scale: Tuple[float, float] = (1., 1.),
        title: Optional[str] = None,
        cmap: str = 'jet',
        dpi: int = 120,
):
    """ Draw the sampled nodes on the image, one panel per stage, coloured by attention weight.

    Every head's nodes are drawn (colour and size follow the weight, on one scale from 0 to
    the largest weight drawn); a black cross marks each query's pixel centre in that stage.

    Args:
        image: (H, W, 3) uint8 image to draw on.
        results: [point][stage] dicts from ``sampling_points_many`` (positions in the pixels
            of the network input).
        path: PNG file to write.
        scale: (sy, sx) from network-input pixels to ``image`` pixels (for a resized input);
            a pixel centre p maps to (p + 0.5) * s - 0.5.
        title: figure title.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure  # no pyplot: the Agg canvas, whatever the session's backend

    num_stages = len(results[0])
    sy, sx = scale
    panel_in = 3.6
    fig = Figure(figsize=(panel_in * num_stages + 0.8, 3.8))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, num_stages, squeeze=False)
    # one colour scale for all panels: 0 to the largest weight drawn
    w_max = max(float(np.max(r['weights'])) for per_point in results for r in per_point)
    norm = Normalize(vmin=0., vmax=max(w_max, 1e-6))
    points_per_px = panel_in * 72. / max(image.shape[0], image.shape[1])  # marker size units per image pixel
    mappable = None
    for s in range(num_stages):
        ax = axes[0, s]
        ax.imshow(image)
        info = results[0][s]
        # markers about 0.7 node spacing across, so the nodes of small strides stay apart
        spacing = info['stride'] * max(sx, sy) * points_per_px
        diameter = float(np.clip(0.7 * spacing, 2.5, 9.))
        for per_point in results:
            r = per_point[s]
            qy, qx = r['query_px']
            ax.plot([(qx + 0.5) * sx - 0.5], [(qy + 0.5) * sy - 0.5], marker='+', markersize=2.2 * diameter,
                    markeredgewidth=1.2, color='black', zorder=2, linestyle='none')
            pos = np.asarray(r['positions']).reshape(-1, 2)
            wts = np.asarray(r['weights']).reshape(-1)
            order = np.argsort(wts)  # heaviest on top
            ys = (pos[order, 0] + 0.5) * sy - 0.5
            xs = (pos[order, 1] + 0.5) * sx - 0.5
            sizes = diameter ** 2 * (0.4 + 0.6 * wts[order] / norm.vmax)
            mappable = ax.scatter(xs, ys, c=wts[order], cmap=cmap, norm=norm, s=sizes,
                                  edgecolors='white', linewidths=0.3, zorder=3)
        ax.set_title(f'stage {s + 1} (stride {info["stride"]}, {info["map_size"][0]}x{info["map_size"][1]})',
                     fontsize=9)
        ax.set_xlim(-0.5, image.shape[1] - 0.5)
        ax.set_ylim(image.shape[0] - 0.5, -0.5)
        ax.set_xticks([])
        ax.set_yticks([])
    if mappable is not None:
        fig.colorbar(mappable, ax=list(axes[0]), fraction=0.02, pad=0.01, label='attention weight')
    if title:
        fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=dpi, bbox_inches='tight', format='png')


# --------------------------------------------------------------------------------------------
# RepGraph: the S representative nodes of a query (paper Fig. 6 style)
# --------------------------------------------------------------------------------------------

@torch.no_grad()
def repgraph_nodes(
        model: nn.Module,
        image: torch.Tensor,
        points: Sequence[Point],
        layer: int = -1,
) -> List[Dict[str, object]]:
    """ The S nodes that a RepGraph layer of ``model`` reads for query points, with their weights.

    Args:
        model: any module containing ``dgmn_timm.layers.RepGraph`` layers (a ``resnet50_repgraph``
            classifier, an RGNet, the layer itself); put in eval mode here.
        image: (3, H, W) or (1, 3, H, W) normalised image tensor; ``points`` are in its pixels.
        points: (y, x) query locations in image pixels.
        layer: which RepGraph layer, in ``model.modules()`` order.

    Returns:
        per point: dict with ``positions`` (S, 2) image pixel (y, x) of the node centres,
        ``weights`` (S,) attention weights averaged over the channel groups (sums to 1),
        ``group_weights`` (G, S), ``query`` the query's map position, ``query_px`` its image
        pixel centre, ``map_size`` and ``stride`` (sy, sx) = image size / map size.
    """
    from ..layers.repgraph import RepGraph
    layers = [m for m in model.modules() if isinstance(m, RepGraph)]
    if not layers:
        raise TypeError(f'{type(model).__name__} contains no RepGraph layer')
    target = layers[layer]
    if image.dim() == 3:
        image = image.unsqueeze(0)
    if image.dim() != 4 or image.shape[0] != 1:
        raise ValueError(f'Expected one (3, H, W) image, got shape {tuple(image.shape)}.')
    captured: List[torch.Tensor] = []
    handle = target.register_forward_pre_hook(lambda mod, inputs: captured.append(inputs[0].detach()))
    was_training = model.training
    model.eval()
    try:
        param = next(model.parameters())
        model(image.to(device=param.device, dtype=param.dtype))
        positions, weights = target.nodes(captured[0])
    finally:
        handle.remove()
        model.train(was_training)
    positions, weights = positions[0].float().cpu(), weights[0].float().cpu()  # (S, h, w, 2), (G, S, h, w)
    h, w = weights.shape[-2:]
    sy, sx = image.shape[-2] / h, image.shape[-1] / w
    out = []
    for py, px in points:
        qy, qx = image_to_stage(py, sy, h), image_to_stage(px, sx, w)
        pos = positions[:, qy, qx]
        gw = weights[:, :, qy, qx]
        out.append(dict(
            query=(qy, qx),
            query_px=(float(stage_to_image(qy, sy)), float(stage_to_image(qx, sx))),
            positions=torch.stack((stage_to_image(pos[:, 0], sy), stage_to_image(pos[:, 1], sx)), -1).numpy(),
            weights=gw.mean(0).numpy(),
            group_weights=gw.numpy(),
            map_size=(h, w),
            stride=(sy, sx),
        ))
    return out


def plot_repgraph_nodes(
        image: np.ndarray,
        results: Sequence[Dict[str, object]],
        path: str,
        title: Optional[str] = None,
        dpi: int = 120,
        scale: Tuple[float, float] = (1., 1.),
):
    """ Draw each query (cross) and its S nodes (discs whose area follows the weight) on ``image``.

    Args:
        image: (H, W, 3) uint8 image to draw on.
        results: ``repgraph_nodes`` output (positions in the pixels of the network input), one
            colour per query point.
        path: PNG file to write.
        scale: (sy, sx) from network-input pixels to ``image`` pixels (for a resized input);
            a pixel centre p maps to (p + 0.5) * s - 0.5.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.0, 6.0 * image.shape[0] / max(image.shape[1], 1) + 0.4))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.imshow(image)
    w_max = max(float(np.max(r['weights'])) for r in results)
    colours = ['#e6194b', '#3cb44b', '#4363d8', '#f58231', '#911eb4', '#42d4f4', '#f032e6', '#bfef45']
    sy, sx = scale
    for i, r in enumerate(results):
        colour = colours[i % len(colours)]
        qy, qx = (r['query_px'][0] + 0.5) * sy - 0.5, (r['query_px'][1] + 0.5) * sx - 0.5
        pos, wts = np.asarray(r['positions']), np.asarray(r['weights'])
        pos = np.stack([(pos[:, 0] + 0.5) * sy - 0.5, (pos[:, 1] + 0.5) * sx - 0.5], -1)
        for (ny, nx) in pos:
            ax.plot([qx, nx], [qy, ny], color=colour, linewidth=0.5, alpha=0.5, zorder=2)
        ax.scatter(pos[:, 1], pos[:, 0], s=10 + 290 * wts / max(w_max, 1e-6), color=colour, alpha=0.75,
                   edgecolors='white', linewidths=0.5, zorder=3)
        ax.plot([qx], [qy], marker='+', markersize=12, markeredgewidth=2, color='black', zorder=4)
    ax.set_xlim(-0.5, image.shape[1] - 0.5)
    ax.set_ylim(image.shape[0] - 0.5, -0.5)
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=10)
    fig.savefig(path, dpi=dpi, bbox_inches='tight', format='png')
