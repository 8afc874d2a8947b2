""" DGMN2: Dynamic Graph Message Passing Networks for Visual Recognition

Paper: `Dynamic Graph Message Passing Networks for Visual Recognition`
    - Li Zhang, Mohan Chen, Anurag Arnab, Xiangyang Xue, Philip H.S. Torr (TPAMI), arXiv:2209.09760

A four-stage pyramid transformer whose attention lets every query attend to only K = 9
key/value nodes, sampled bilinearly at a 3x3 neighbourhood plus learned per-token walks
(a dynamic graph), with a relative-position term. Cost is linear in the number of pixels.
docs/ARCHITECTURE.md describes the sampling convention, the position term and the layout of
the authors' released checkpoints, which ``checkpoint_filter_fn`` maps to ours.

@article{zhang2022dgmn2,
  title={Dynamic Graph Message Passing Networks for Visual Recognition},
  author={Zhang, Li and Chen, Mohan and Arnab, Anurag and Xue, Xiangyang and Torr, Philip HS},
  journal={IEEE Transactions on Pattern Analysis and Machine Intelligence},
  year={2022}
}
"""
import math
import re
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, Mlp, calculate_drop_path_rates, trunc_normal_
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices

from ..layers import use_fused_sampled_attention
from ..ops import attention_weights, position_logits, sampled_attention, sampled_attention_portable
from ..ops.sampling import NUM_NODES, node_displacements
from ..errors import CheckpointMismatchError

__all__ = ['DGMN2', 'checkpoint_filter_fn', 'rel_pos_logits', 'MIN_INPUT_SIZE']

MIN_INPUT_SIZE = 32

# variant name -> depths, used to name the variant a checkpoint belongs to
_VARIANT_DEPTHS = {
    'dgmn2_tiny': (2, 2, 2, 2),
    'dgmn2_small': (3, 4, 6, 3),
    'dgmn2_medium': (3, 4, 18, 3),
    'dgmn2_large': (3, 8, 27, 3),
}


def rel_pos_windows(table: torch.Tensor, length: int) -> torch.Tensor:
    """ (length, K, c): rows length - 1 - p + m of ``table`` resized to length + K - 1 rows, for position p, node m. """
    table = F.interpolate(table[None, None], size=(length + 8, table.shape[1]), mode='bilinear', align_corners=False)
    p = torch.arange(length, device=table.device)
    m = torch.arange(9, device=table.device)
    return table[0, 0][(length - 1 - p)[:, None] + m[None, :]]


def rel_pos_logits(
        q: torch.Tensor, rel_height: torch.Tensor, rel_width: torch.Tensor, released: bool = True) -> torch.Tensor:
    """ Relative-position logits of the K nodes of every query, (B, H, W, nh, K).

    Args:
        q: (B, H, W, nh, c) unscaled queries (any strides).
        rel_height, rel_width: (L, c) tables, bilinearly resized to H + K - 1 / W + K - 1 rows.
        released: the height term as the released checkpoints were trained: computed on the
            transposed query grid, that (W, H) grid read back as (H, W) by a bilinear resize.
            False gives the clean term <q[y, x], rel_height[H - 1 - y + m]>.
    """
    H, W = q.shape[1], q.shape[2]
    # width term <q[y, x], rel_width[W - 1 - x + m]>, clean height term <q[y, x], rel_height[H - 1 - y + m]>;
    # released: the (H, W) grid of height terms read as a (W, H) image, resized to (H, W) (transposed if square)
    return position_logits(q, rel_pos_windows(rel_height, H), rel_pos_windows(rel_width, W), released)


class DynamicGraphAttention(nn.Module):
    """ Attention of every token over K = 9 nodes sampled at its 3x3 neighbourhood plus learned walks.

    Channels-last maps (B, H, W, C). ``walk``, a Linear on each head's slice (weights shared by
    the heads), predicts the walks (dy, dx) of the K nodes; added to the 3x3 grid they are the
    op's ``offset``. ``fused_attn`` (``dgmn_timm.layers.use_fused_sampled_attention``, decided at
    construction) selects the fused op or the portable path
    (corner gathers and batched products, ``dgmn_timm.ops.sampled_attention_portable``).
    """
    fused_attn: torch.jit.Final[bool]

    def __init__(
            self,
            dim: int,
            num_heads: int = 1,
            table_size: Tuple[int, int] = (56, 56),
            qkv_bias: bool = True,
            attn_drop: float = 0.,
            proj_drop: float = 0.,
            rel_pos_released: bool = True,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        assert dim % num_heads == 0, f'dim {dim} should be divisible by num_heads {num_heads}.'
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.rel_pos_released = rel_pos_released
        self.fused_attn = use_fused_sampled_attention(attn_drop)

        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias, **dd)
        self.walk = nn.Linear(self.head_dim, 2 * NUM_NODES, **dd)
        self.rel_height = nn.Parameter(torch.randn(table_size[0] + NUM_NODES - 1, self.head_dim, **dd) * self.scale)
        self.rel_width = nn.Parameter(torch.randn(table_size[1] + NUM_NODES - 1, self.head_dim, **dd) * self.scale)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    def reset_walks(self):
        """ Start from the plain 3x3 neighbourhood (zero walks). """
        nn.init.zeros_(self.walk.weight)
        nn.init.zeros_(self.walk.bias)

    def attention_inputs(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """ qkv (B, H, W, 3, nh, hd), node displacements (B, H, W, nh, 2K) and the position tables
        of this map's rows (H, K, hd) and columns (W, K, hd). """
        B, H, W, C = x.shape
        qkv = self.qkv(x).reshape(B, H, W, 3, self.num_heads, self.head_dim)
        # on (B * H * W, heads, head_dim): torch.export proves these reshapes for named size ranges
        walks = self.walk(x.reshape(B * H * W, self.num_heads, self.head_dim))
        walks = walks.reshape(B, H, W, self.num_heads, self.walk.out_features)
        offset = walks + node_displacements(1, x.device, walks.dtype).reshape(-1)
        return qkv, offset, rel_pos_windows(self.rel_height, H), rel_pos_windows(self.rel_width, W)

    @torch.jit.ignore
    def sampling_graph(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """ The dynamic graph this layer builds for its input ``x`` (B, H, W, C).

        Returns:
            positions: (B, heads, K, H, W, 2) pixel coordinates (y, x) of the sampled nodes.
            weights: (B, heads, K, H, W) attention weight of each node (softmax over K).
        """
        B, H, W, C = x.shape
        qkv, offset, pos_h, pos_w = self.attention_inputs(x)
        weights = attention_weights(qkv, offset, None, self.scale, pos_h, pos_w, self.rel_pos_released)
        weights = weights.permute(0, 3, 4, 1, 2)
        offset = offset.reshape(B, H, W, self.num_heads, NUM_NODES, 2).permute(0, 3, 4, 1, 2, 5)
        ys = torch.arange(H, device=x.device, dtype=offset.dtype).view(H, 1).expand(H, W)
        xs = torch.arange(W, device=x.device, dtype=offset.dtype).view(1, W).expand(H, W)
        return offset + torch.stack((ys, xs), dim=-1), weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        qkv, offset, pos_h, pos_w = self.attention_inputs(x)
        if self.fused_attn:
            x = sampled_attention(qkv, offset, None, self.scale, pos_h, pos_w, self.rel_pos_released)
        else:
            bias = position_logits(qkv[:, :, :, 0], pos_h, pos_w, self.rel_pos_released)
            x = sampled_attention_portable(qkv, offset, bias, self.scale, self.attn_drop.p, self.training)
        x = self.proj(x.reshape(B, H, W, C))
        x = self.proj_drop(x)
        return x


class Block(nn.Module):
    """ Pre-norm transformer layer with dynamic graph attention, channels-last (B, H, W, C). """

    def __init__(
            self,
            dim: int,
            num_heads: int,
            mlp_ratio: float = 4.,
            table_size: Tuple[int, int] = (56, 56),
            qkv_bias: bool = True,
            proj_drop: float = 0.,
            attn_drop: float = 0.,
            drop_path: float = 0.,
            rel_pos_released: bool = True,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.norm1 = nn.LayerNorm(dim, eps=1e-6, **dd)
        self.attn = DynamicGraphAttention(
            dim,
            num_heads=num_heads,
            table_size=table_size,
            qkv_bias=qkv_bias,
            attn_drop=attn_drop,
            proj_drop=proj_drop,
            rel_pos_released=rel_pos_released,
            **dd,
        )
        self.drop_path1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6, **dd)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), drop=proj_drop, **dd)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x)))
        x = x + self.drop_path2(self.mlp(self.norm2(x)))
        return x


class ConvBnReluStem(nn.Module):
    """ Stage-1 patch embedding: three 3x3 Conv-BN-ReLU, strides 2, 1, 2 (output stride 4). """

    def __init__(self, in_chans: int = 3, hidden_dim: int = 32, embed_dim: int = 64, device=None, dtype=None):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.in_chans = in_chans
        self.min_size = MIN_INPUT_SIZE
        self.chans_msg = f'DGMN2 was built for {in_chans} input channels; for C channels create it with in_chans=C.'
        self.size_msg = f'DGMN2 needs images of at least {MIN_INPUT_SIZE}x{MIN_INPUT_SIZE} pixels.'
        self.conv1 = nn.Conv2d(in_chans, hidden_dim, 3, stride=2, padding=1, bias=False, **dd)
        self.norm1 = nn.BatchNorm2d(hidden_dim, **dd)
        self.conv2 = nn.Conv2d(hidden_dim, hidden_dim, 3, stride=1, padding=1, bias=False, **dd)
        self.norm2 = nn.BatchNorm2d(hidden_dim, **dd)
        self.conv3 = nn.Conv2d(hidden_dim, embed_dim, 3, stride=2, padding=1, bias=False, **dd)
        self.norm3 = nn.BatchNorm2d(embed_dim, **dd)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch._assert(x.dim() == 4, 'DGMN2 expects a (B, C, H, W) image batch.')
        torch._assert(x.shape[1] == self.in_chans, self.chans_msg)
        torch._assert(x.shape[2] >= self.min_size, self.size_msg)
        torch._assert(x.shape[3] >= self.min_size, self.size_msg)
        # channels-last convolutions: the stages' permute to (B, H, W, C) is then free
        x = x.contiguous(memory_format=torch.channels_last)
        x = self.act(self.norm1(self.conv1(x)))
        x = self.act(self.norm2(self.conv2(x)))
        x = self.act(self.norm3(self.conv3(x)))
        return x


class ConvBnRelu(nn.Module):
    """ Stage 2-4 patch embedding: 3x3 Conv-BN-ReLU, stride 2 (1 for reduced output stride). """

    def __init__(self, in_chs: int, out_chs: int, stride: int = 2, device=None, dtype=None):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.conv = nn.Conv2d(in_chs, out_chs, 3, stride=stride, padding=1, bias=False, **dd)
        self.norm = nn.BatchNorm2d(out_chs, **dd)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(x)))


class DGMN2Stage(nn.Module):
    """ Optional patch embedding, then blocks on channels-last tokens.

    NCHW in and out; the output is a (B, C, H, W) view of channels-last memory, which the next
    patch embedding (a channels-last convolution) reads without a layout copy.
    """

    def __init__(
            self,
            dim: int,
            dim_out: int,
            depth: int,
            downsample: bool = True,
            stride: int = 2,
            num_heads: int = 1,
            mlp_ratio: float = 4.,
            table_size: Tuple[int, int] = (56, 56),
            qkv_bias: bool = True,
            proj_drop: float = 0.,
            attn_drop: float = 0.,
            drop_path: Union[List[float], float] = 0.,
            rel_pos_released: bool = True,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.grad_checkpointing = False
        if downsample:
            self.downsample = ConvBnRelu(dim, dim_out, stride=stride, **dd)
        else:
            assert dim == dim_out
            self.downsample = nn.Identity()
        self.blocks = nn.Sequential(*[Block(
            dim=dim_out,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            table_size=table_size,
            qkv_bias=qkv_bias,
            proj_drop=proj_drop,
            attn_drop=attn_drop,
            drop_path=drop_path[i] if isinstance(drop_path, list) else drop_path,
            rel_pos_released=rel_pos_released,
            **dd,
        ) for i in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        x = x.permute(0, 2, 3, 1)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        return x.permute(0, 3, 1, 2)


class DGMN2(nn.Module):
    """ DGMN2 pyramid vision transformer. """

    def __init__(
            self,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            depths: Tuple[int, ...] = (2, 2, 2, 2),
            embed_dims: Tuple[int, ...] = (64, 128, 320, 512),
            num_heads: Tuple[int, ...] = (1, 2, 5, 8),
            mlp_ratios: Tuple[float, ...] = (8., 8., 4., 4.),
            stem_dim: int = 32,
            img_size: Union[int, Tuple[int, int]] = 224,
            output_stride: int = 32,
            qkv_bias: bool = True,
            drop_rate: float = 0.,
            proj_drop_rate: float = 0.,
            attn_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            rel_pos_released: bool = True,
            device=None,
            dtype=None,
    ):
        """
        Args:
            in_chans: input image channels.
            num_classes: classifier classes (0 for no classifier).
            global_pool: 'avg' or '' (no pooling).
            depths, embed_dims, num_heads, mlp_ratios: per-stage architecture.
            stem_dim: hidden width of the three-conv stem.
            img_size: image size the relative-position tables are sized for (they are
                resized to any other input size at run time).
            output_stride: 32, 16 or 8; 16 and 8 set the stride of the stage-4 (and stage-3)
                patch embedding to 1, keeping the same parameters.
            drop_rate: dropout before the classifier.
            proj_drop_rate, attn_drop_rate: dropout in the blocks.
            drop_path_rate: stochastic depth, rising linearly over all blocks.
            rel_pos_released: the height position term exactly as the released checkpoints
                were trained (default); False gives the clean transposition.
        """
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        num_stages = len(depths)
        assert num_stages == 4 and len(embed_dims) == len(num_heads) == len(mlp_ratios) == num_stages
        if output_stride not in (8, 16, 32):
            raise ValueError(f'output_stride must be 8, 16 or 32, got {output_stride}')
        img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.num_classes = num_classes
        self.in_chans = in_chans
        assert global_pool in ('avg', ''), 'Only avg pooling (or none) is supported.'
        self.global_pool = global_pool
        self.depths = tuple(depths)
        self.output_stride = output_stride
        self.feature_info = []

        self.stem = ConvBnReluStem(in_chans, stem_dim, embed_dims[0], **dd)

        dpr = calculate_drop_path_rates(drop_path_rate, list(depths), stagewise=True)
        stages = []
        prev_dim = embed_dims[0]
        reduction = 4
        for i in range(num_stages):
            nominal = 4 * 2 ** i  # the stride the position tables were sized for
            stride = 2 if i > 0 and reduction < output_stride else 1
            reduction *= stride
            stages.append(DGMN2Stage(
                dim=prev_dim,
                dim_out=embed_dims[i],
                depth=depths[i],
                downsample=i > 0,
                stride=stride,
                num_heads=num_heads[i],
                mlp_ratio=mlp_ratios[i],
                table_size=(math.ceil(img_size[0] / nominal), math.ceil(img_size[1] / nominal)),
                qkv_bias=qkv_bias,
                proj_drop=proj_drop_rate,
                attn_drop=attn_drop_rate,
                drop_path=dpr[i],
                rel_pos_released=rel_pos_released,
                **dd,
            ))
            prev_dim = embed_dims[i]
            self.feature_info += [dict(num_chs=prev_dim, reduction=reduction, module=f'stages.{i}')]
        self.stages = nn.Sequential(*stages)

        self.num_features = self.head_hidden_size = embed_dims[-1]
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes, **dd) if num_classes > 0 else nn.Identity()

        self.apply(self._init_weights)
        for m in self.modules():
            if isinstance(m, DynamicGraphAttention):
                m.reset_walks()

    def _init_weights(self, m: nn.Module):
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')

    @torch.jit.ignore
    def no_weight_decay(self):
        return {n for n, _ in self.named_parameters() if n.endswith(('rel_height', 'rel_width'))}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(
            stem=r'^stem',
            blocks=r'^stages\.(\d+)' if coarse else [
                (r'^stages\.(\d+)\.downsample', (0,)),
                (r'^stages\.(\d+)\.blocks\.(\d+)', None),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True):
        for s in self.stages:
            s.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None):
        self.num_classes = num_classes
        if global_pool is not None:
            assert global_pool in ('avg', ''), 'Only avg pooling (or none) is supported.'
            self.global_pool = global_pool
        ref = self.stem.conv1.weight
        self.head = nn.Linear(self.num_features, num_classes, device=ref.device, dtype=ref.dtype) \
            if num_classes > 0 else nn.Identity()
        self.head.train(self.training)

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """ Forward features that returns intermediates.

        Args:
            x: input image tensor.
            indices: take the last n stages if an int, all if None, those listed if a sequence.
            norm: unused, DGMN2 has no norm after its stages.
            stop_early: stop after the last stage taken.
            output_fmt: only 'NCHW'.
            intermediates_only: only return the intermediate features.
        """
        assert output_fmt in ('NCHW',), 'Output shape must be NCHW.'
        intermediates = []
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        x = self.stem(x)
        if torch.jit.is_scripting() or not stop_early:
            stages = self.stages
        else:
            stages = self.stages[:max_index + 1]
        for feat_idx, stage in enumerate(stages):
            x = stage(x)
            if feat_idx in take_indices:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """ Drop stages (and the head) not needed for the given intermediates. """
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        prune_end = max_index < len(self.stages) - 1
        self.stages = self.stages[:max_index + 1]
        if prune_end:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]['num_chs']
        if prune_head or prune_end:
            self.reset_classifier(0, '')
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.stages(x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool:
            x = x.mean(dim=(-1, -2))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(x)
        x = self.forward_head(x)
        return x


def _depths_in(state_dict: Mapping[str, Any]) -> Optional[Tuple[int, ...]]:
    """ Blocks per stage of a state dict in our layout (or a feature wrapper's 'stages_i.'), None without blocks. """
    counts: Dict[int, int] = {}
    for k in state_dict:
        m = re.match(r'^stages[._](\d+)\.blocks\.(\d+)\.', k)
        if m:
            s, b = int(m.group(1)), int(m.group(2))
            counts[s] = max(counts.get(s, 0), b + 1)
    if not counts:
        return None
    return tuple(counts.get(s, 0) for s in range(max(counts) + 1))


def _variant_for_depths(depths: Tuple[int, ...]) -> str:
    for name, d in _VARIANT_DEPTHS.items():
        if tuple(depths) == d:
            return name
    return f'a DGMN2 with depths {tuple(depths)}'


def _model_name(model: nn.Module) -> str:
    """ The architecture a model (or its timm feature wrapper) was built as. """
    name = (getattr(model, 'pretrained_cfg', None) or {}).get('architecture')
    return name or _variant_for_depths(_depths_in(model.state_dict()) or ())


_RELEASED_MARKERS = ('patch_embed1.conv1.weight', 'stem.conv1.weight')


def _strip_prefix(state_dict: Mapping[str, Any]) -> Dict[str, Any]:
    """ Keep only the backbone of a wrapped state dict ('backbone.', 'module.', ...), prefix removed. """
    prefixes = [k[:len(k) - len(marker)] for k in state_dict for marker in _RELEASED_MARKERS if k.endswith(marker)]
    prefix = prefixes[0] if prefixes else ''
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


# attention parameters: (the authors' released name, ours)
_ATTN_RENAMES = (
    ('.attn.conv_offset.', '.attn.walk.'),
    ('.attn.pos_emb.rel_height', '.attn.rel_height'),
    ('.attn.pos_emb.rel_width', '.attn.rel_width'),
)


def checkpoint_filter_fn(state_dict: Mapping[str, Any], model: Optional[nn.Module] = None) -> Dict[str, Any]:
    """ Map the authors' released state dicts and prefixed ones to our key names.

    The released layout is described in docs/ARCHITECTURE.md, "Released checkpoint layout".

    Takes a state dict (``dgmn_timm.weights.checkpoints.read_state_dict`` takes it out of a training
    checkpoint): the released layout, ours (unchanged), or a detector's backbone with a prefix such as
    'backbone.'. With ``model`` (the model or its feature wrapper) weights of another variant are
    refused, naming it. timm's ``load_pretrained`` adapts the first conv to another ``in_chans`` after this.
    """
    out = {}
    for k, v in _strip_prefix(state_dict).items():
        if k.startswith('patch_embed1.'):
            k = 'stem.' + k[len('patch_embed1.'):]
        k = re.sub(r'^patch_embed([2-4])\.', lambda m: f'stages.{int(m.group(1)) - 1}.downsample.', k)
        k = re.sub(r'^block([1-4])\.(\d+)\.', lambda m: f'stages.{int(m.group(1)) - 1}.blocks.{m.group(2)}.', k)
        for released, ours in _ATTN_RENAMES:
            k = k.replace(released, ours)
        out[k] = v
    if model is None:
        return out
    ckpt_depths, own_depths = _depths_in(out), _depths_in(model.state_dict())
    if ckpt_depths and own_depths and ckpt_depths[:len(own_depths)] != own_depths[:len(ckpt_depths)]:
        raise CheckpointMismatchError(
            f'The weights are for {_variant_for_depths(ckpt_depths)} (blocks per stage {ckpt_depths}) '
            f'but the model is {_model_name(model)} (blocks per stage {own_depths}).')
    return out


def _create_dgmn2(variant: str, pretrained: bool = False, **kwargs) -> DGMN2:
    out_indices = kwargs.pop('out_indices', (0, 1, 2, 3))
    return build_model_with_cfg(
        DGMN2,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(flatten_sequential=True, out_indices=out_indices),
        **kwargs,
    )


def _cfg(url: str = '', **kwargs) -> Dict[str, Any]:
    return {
        'url': url,
        'num_classes': 1000,
        'input_size': (3, 224, 224),
        'pool_size': (7, 7),
        'min_input_size': (3, MIN_INPUT_SIZE, MIN_INPUT_SIZE),
        'crop_pct': 0.875,
        'interpolation': 'bicubic',
        'mean': IMAGENET_DEFAULT_MEAN,
        'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'stem.conv1',
        'classifier': 'head',
        'fixed_input_size': False,
        'license': 'apache-2.0',
        'paper_ids': 'arXiv:2209.09760',
        'paper_name': 'Dynamic Graph Message Passing Networks for Visual Recognition',
        'origin_url': 'https://arxiv.org/abs/2209.09760',
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    'dgmn2_tiny.in1k': _cfg(hf_hub_id='dgmn-timm/dgmn2_tiny.in1k'),
    'dgmn2_small.in1k': _cfg(hf_hub_id='dgmn-timm/dgmn2_small.in1k'),
    'dgmn2_medium.in1k': _cfg(hf_hub_id='dgmn-timm/dgmn2_medium.in1k'),
    'dgmn2_large.in1k': _cfg(hf_hub_id='dgmn-timm/dgmn2_large.in1k'),
})


@register_model
def dgmn2_tiny(pretrained: bool = False, **kwargs) -> DGMN2:
    """ DGMN2-Tiny: depths (2, 2, 2, 2), 12.1M params, 2.3 GMACs, 78.7% ImageNet-1k top-1 (paper). """
    model_args = dict(depths=_VARIANT_DEPTHS['dgmn2_tiny'])
    return _create_dgmn2('dgmn2_tiny', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def dgmn2_small(pretrained: bool = False, **kwargs) -> DGMN2:
    """ DGMN2-Small: depths (3, 4, 6, 3), 21.0M params, 4.3 GMACs, 81.7% ImageNet-1k top-1 (paper). """
    model_args = dict(depths=_VARIANT_DEPTHS['dgmn2_small'])
    return _create_dgmn2('dgmn2_small', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def dgmn2_medium(pretrained: bool = False, **kwargs) -> DGMN2:
    """ DGMN2-Medium: depths (3, 4, 18, 3), 35.8M params, 7.1 GMACs, 82.5% ImageNet-1k top-1 (paper). """
    model_args = dict(depths=_VARIANT_DEPTHS['dgmn2_medium'])
    return _create_dgmn2('dgmn2_medium', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def dgmn2_large(pretrained: bool = False, **kwargs) -> DGMN2:
    """ DGMN2-Large: depths (3, 8, 27, 3), 48.3M params, 10.4 GMACs, 83.3% ImageNet-1k top-1 (paper). """
    model_args = dict(depths=_VARIANT_DEPTHS['dgmn2_large'])
    return _create_dgmn2('dgmn2_large', pretrained=pretrained, **dict(model_args, **kwargs))
