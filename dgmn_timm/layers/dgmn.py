""" DGMN: the dynamic-graph message-passing module of CVPR 2020, and a segmentation head

Paper: `Dynamic Graph Message Passing Networks` - Li Zhang, Dan Xu, Anurag Arnab,
    Philip H.S. Torr (CVPR 2020), arXiv:1908.06955

For every position of a (B, C, H, W) map and every sampling rate d, the module reads
K = 9 nodes on a 3x3 grid of dilation d, moved by predicted walks (a dynamic graph),
predicts from these nodes per-group dynamic filters and per-node affinities, and sends
each channel the message

    m_c = sum_k filter[g(c), k] * affinity[k] * node[c, k],   affinity = softmax over k,

which is then fused with the input ('sum': x + sum_q beta_q m_q, or 'concat': a 1x1 conv
over [x, m_1, ..., m_S]). docs/ARCHITECTURE.md gives the node layout, the order of the walks
and the parameter counts. Every rate reads its affinities from its own affinity
channels (the released code read the 4th rate's affinity from filter channels; not here).

The predictor of filters and affinities is a linear map of the (C * K) vector of sampled
nodes, i.e. a 3x3 deformable convolution sharing the walks. It is stored in deformable
convolution layout, weight (K * G + K, C, 3, 3), and applied as one matmul over the
(B, C * K, H * W) node tensor that the message needs anyway.

@inproceedings{zhang2020dgmn,
  title={Dynamic Graph Message Passing Networks},
  author={Zhang, Li and Xu, Dan and Arnab, Anurag and Torr, Philip HS},
  booktitle={CVPR},
  year={2020}
}
"""
import math
from typing import Dict, List, Optional, Sequence, Tuple, Type

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops.sampling import NUM_NODES, node_displacements, sample_nodes

__all__ = ['DGMN', 'DGMNHead', 'NodeLinear', 'DGMN_MODES', 'DGMN_FUSIONS']

# ablation setting -> (dynamic filters, walks)
DGMN_MODES: Dict[str, Tuple[bool, bool]] = {
    'DA': (False, False),  # affinities only, regular dilated grid
    'DA+DW': (True, False),  # + dynamic filters, regular dilated grid
    'full': (True, True),  # + walks (the paper's DA+DW+DS)
}
DGMN_FUSIONS = ('sum', 'concat')


@torch.no_grad()
def identity_fuse_(fuse: nn.Conv2d, dim: int) -> None:
    """ Make a bias-free 1x1 conv over [x, other maps...] start as the identity on x: weight [I, 0]. """
    fuse.weight.zero_()
    fuse.weight[:, :dim, 0, 0].copy_(torch.eye(dim))


class NodeLinear(nn.Module):
    """ A linear map of the (C * K) sampled nodes of every position, no bias.

    The weight has the layout of a 3x3 (deformable) convolution, (out, C, 3, 3), so that
    input index c * K + k is channel c of node k; on nodes read at the regular grid of
    dilation ``dilation`` the result equals ``F.conv2d(x, weight, dilation=d, padding=d)``.
    """

    def __init__(self, in_chs: int, out_chs: int, dilation: int = 1, device=None, dtype=None):
        super().__init__()
        self.in_chs = in_chs
        self.out_chs = out_chs
        self.dilation = dilation
        self.weight = nn.Parameter(torch.empty(out_chs, in_chs, 3, 3, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self):
        # nn.Conv2d's default
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, nodes: torch.Tensor) -> torch.Tensor:
        """ (B, C * K, N) nodes -> (B, out, N). """
        return torch.matmul(self.weight.reshape(self.out_chs, -1), nodes)

    def extra_repr(self) -> str:
        return f'{self.in_chs} x {NUM_NODES} -> {self.out_chs}, dilation={self.dilation}, bias=False'


class DGMN(nn.Module):
    """ Dynamic graph message passing over S sampling rates; (B, C, H, W) -> (B, C, H, W).

    Args:
        dim: channels C.
        rates: the sampling rates (dilations of the 3x3 node grid), any number S >= 1.
        groups: G, the dynamic filters are shared by the C / G channels of a group.
        mode: the paper's ablation: 'DA' (affinities only), 'DA+DW' (affinities and dynamic
            filters on the regular dilated grid) or 'full' (plus walks, 'DA+DW+DS').
        fusion: 'sum' (out = x + sum_q beta_q m_q, the COCO module; one learnable scale per
            rate, initialised to ``beta_init``) or 'concat' (1x1 conv without bias over
            [x, m_1, ..., m_S], the Cityscapes module; initialised to pass x through).
        beta_init: initial value of the 'sum' scales.

    Initialisation: the walk convs are zero, so the module starts on the regular dilated
    grid; the filter/affinity predictors use nn.Conv2d's default.
    """

    def __init__(
            self,
            dim: int,
            rates: Sequence[int] = (1, 4, 8, 12),
            groups: int = 4,
            mode: str = 'full',
            fusion: str = 'sum',
            beta_init: float = 1.0,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        rates = tuple(int(r) for r in rates)
        if not rates or any(r < 1 for r in rates):
            raise ValueError(f'rates must be one or more positive integers, got {rates}')
        if mode not in DGMN_MODES:
            raise ValueError(f"mode must be one of {tuple(DGMN_MODES)}, got '{mode}'")
        if fusion not in DGMN_FUSIONS:
            raise ValueError(f"fusion must be one of {DGMN_FUSIONS}, got '{fusion}'")
        use_filters, use_walks = DGMN_MODES[mode]
        if use_filters and (groups < 1 or dim % groups):
            raise ValueError(f'groups ({groups}) must divide the channels ({dim})')
        self.dim = dim
        self.rates = rates
        self.groups = groups if use_filters else 1
        self.mode = mode
        self.fusion = fusion
        self.beta_init = beta_init
        self.use_filters = use_filters
        self.num_nodes = NUM_NODES
        K = NUM_NODES
        num_out = K * groups + K if use_filters else K
        if use_walks:
            self.walk = nn.ModuleList([
                nn.Conv2d(dim, 2 * K, 3, padding=d, dilation=d, bias=False, **dd) for d in rates])
        else:
            self.walk = None
        self.pred = nn.ModuleList([NodeLinear(dim, num_out, dilation=d, **dd) for d in rates])
        if fusion == 'sum':
            self.beta = nn.Parameter(torch.empty(len(rates), **dd))
            self.fuse = None
        else:
            self.beta = None
            self.fuse = nn.Conv2d((len(rates) + 1) * dim, dim, 1, bias=False, **dd)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        if self.walk is not None:
            for conv in self.walk:
                nn.init.zeros_(conv.weight)
        for p in self.pred:
            p.reset_parameters()
        if self.beta is not None:
            self.beta.fill_(self.beta_init)
        if self.fuse is not None:
            identity_fuse_(self.fuse, self.dim)

    def _sampled(self, x: torch.Tensor, offset: Optional[torch.Tensor], dilation: int) -> torch.Tensor:
        """ (B, C * K, H * W) nodes (index c * K + k) on the grid of ``dilation``, moved by ``offset`` if given. """
        B, C, H, W = x.shape
        if offset is None:
            return F.unfold(x, 3, dilation=dilation, padding=dilation)
        return sample_nodes(x, offset, dilation).reshape(B, -1, H * W)

    def _weights(self, pred: torch.Tensor) -> Tuple[Optional[torch.Tensor], torch.Tensor]:
        """ Filters (B, G, K, N) (None in 'DA') and affinities (B, K, N) from the predictor's (B, *, N) output. """
        K = self.num_nodes
        B, _, N = pred.shape
        if self.use_filters:
            filters = pred[:, :self.groups * K].reshape(B, self.groups, K, N)
            affinity = pred[:, self.groups * K:].softmax(dim=1)
            return filters, affinity
        return None, pred.softmax(dim=1)

    def _message(self, nodes: torch.Tensor, filters: Optional[torch.Tensor], affinity: torch.Tensor) -> torch.Tensor:
        """ (B, C, N) messages from (B, C * K, N) nodes. """
        B, _, N = nodes.shape
        K = self.num_nodes
        w = affinity.unsqueeze(1) if filters is None else filters * affinity.unsqueeze(1)  # (B, G or 1, K, N)
        g = w.shape[1]
        msg = (nodes.reshape(B, g, self.dim // g, K, N) * w.unsqueeze(2)).sum(dim=3)
        return msg.reshape(B, self.dim, N)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        msgs: List[torch.Tensor] = []
        if self.walk is None:
            for pred in self.pred:
                nodes = self._sampled(x, None, pred.dilation)
                filters, affinity = self._weights(pred(nodes))
                msgs.append(self._message(nodes, filters, affinity).reshape(B, C, H, W))
        else:
            for walk, pred in zip(self.walk, self.pred):
                nodes = self._sampled(x, walk(x), pred.dilation)
                filters, affinity = self._weights(pred(nodes))
                msgs.append(self._message(nodes, filters, affinity).reshape(B, C, H, W))
        if self.fuse is not None:
            return self.fuse(torch.cat([x] + msgs, dim=1))
        out = x
        for idx, msg in enumerate(msgs):
            out = out + self.beta[idx] * msg
        return out

    @torch.jit.ignore
    def graph_info(self, x: torch.Tensor) -> List[Dict[str, Optional[torch.Tensor]]]:
        """ The dynamic graph built for ``x``, one dict per rate, for inspection and tests.

        Keys: 'rate'; 'offset' (B, 2K, H, W) walks, (dy, dx) per node, or None without
        walks; 'positions' (B, K, H, W, 2) pixel coordinates (y, x) of the nodes;
        'filters' (B, G, K, H, W) or None in 'DA'; 'affinity' (B, K, H, W), sums to 1 over K;
        'message' (B, C, H, W).
        """
        B, C, H, W = x.shape
        K = NUM_NODES
        out = []
        ys = torch.arange(H, device=x.device, dtype=x.dtype).view(1, H, 1).expand(1, H, W)
        xs = torch.arange(W, device=x.device, dtype=x.dtype).view(1, 1, W).expand(1, H, W)
        pixels = torch.stack((ys, xs), dim=-1)  # (1, H, W, 2)
        for idx, d in enumerate(self.rates):
            offset = None if self.walk is None else self.walk[idx](x)
            nodes = self._sampled(x, offset, d)
            filters, affinity = self._weights(self.pred[idx](nodes))
            msg = self._message(nodes, filters, affinity).reshape(B, C, H, W)
            positions = (pixels + node_displacements(d, x.device, x.dtype).view(K, 1, 1, 2)).expand(B, K, H, W, 2)
            if offset is not None:
                positions = positions + offset.reshape(B, K, 2, H, W).permute(0, 1, 3, 4, 2)
            out.append(dict(
                rate=d,
                offset=offset,
                positions=positions,
                filters=None if filters is None else filters.reshape(B, self.groups, K, H, W),
                affinity=affinity.reshape(B, K, H, W),
                message=msg,
            ))
        return out

    def macs(self, height: int, width: int, walks: bool = True, messages: bool = True) -> int:
        """ Analytic multiply-accumulates on a ``height`` x ``width`` map (batch 1).

        Counts the walk convs (``walks``), the filter/affinity predictors, the fusion conv
        (or the S beta scalings) and, with ``messages``, the C * K products of the
        filter * affinity weighted sums (plus G * K filter * affinity products). Bilinear
        sampling and the softmax are not counted (as in the paper's numbers).
        """
        n = height * width
        K = NUM_NODES
        S = len(self.rates)
        total = 0
        if walks and self.walk is not None:
            total += S * self.dim * K * 2 * K * n
        total += S * self.pred[0].weight.numel() * n
        if self.fuse is not None:
            total += self.fuse.weight.numel() * n
        elif messages:
            total += S * self.dim * n
        if messages:
            total += S * (self.dim * K + (self.groups * K if self.use_filters else 0)) * n
        return total

    def extra_repr(self) -> str:
        return f'dim={self.dim}, rates={self.rates}, groups={self.groups}, mode={self.mode}, fusion={self.fusion}'


class DGMNHead(nn.Module):
    """ Cityscapes-style context head: 3x3 conv + norm + act, DGMN ('concat'), 1x1 classifier.

    Meant for an output-stride-8 backbone, e.g.
    ``timm.create_model('resnet101', features_only=True, output_stride=8, out_indices=(4,))``.

    Args:
        in_chs: channels of the backbone feature map.
        num_classes: classifier outputs.
        channels: width of the DGMN (512 in the paper).
        rates, groups, mode, fusion: the DGMN settings (paper: (1, 6, 12, 24, 36), 4, 'full', 'concat').
        drop_rate: dropout before the classifier.
        norm_layer, act_layer: of the 3x3 conv.
    """

    def __init__(
            self,
            in_chs: int,
            num_classes: int,
            channels: int = 512,
            rates: Sequence[int] = (1, 6, 12, 24, 36),
            groups: int = 4,
            mode: str = 'full',
            fusion: str = 'concat',
            drop_rate: float = 0.,
            norm_layer: Type[nn.Module] = nn.BatchNorm2d,
            act_layer: Type[nn.Module] = nn.ReLU,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.num_classes = num_classes
        self.conv = nn.Conv2d(in_chs, channels, 3, padding=1, bias=False, **dd)
        self.norm = norm_layer(channels, **dd)
        self.act = act_layer(inplace=True)
        self.dgmn = DGMN(channels, rates=rates, groups=groups, mode=mode, fusion=fusion, **dd)
        self.drop = nn.Dropout2d(drop_rate) if drop_rate > 0. else nn.Identity()
        self.classifier = nn.Conv2d(channels, num_classes, 1, **dd)
        nn.init.kaiming_normal_(self.conv.weight, mode='fan_out', nonlinearity='relu')

    def forward(self, x: torch.Tensor, output_size: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        """ Logits at the feature resolution, or bilinearly upsampled to ``output_size``
        (e.g. the input image's ``img.shape[-2:]``). """
        if isinstance(x, (list, tuple)):  # the output of a features_only backbone
            x = x[-1]
        x = self.act(self.norm(self.conv(x)))
        x = self.dgmn(x)
        x = self.classifier(self.drop(x))
        if output_size is not None:
            x = F.interpolate(x, size=tuple(output_size), mode='bilinear', align_corners=False)
        return x
