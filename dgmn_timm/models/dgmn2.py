""" DGMN2: Dynamic Graph Message Passing Networks for Visual Recognition

Paper: `Dynamic Graph Message Passing Networks for Visual Recognition`
    - Li Zhang, Mohan Chen, Anurag Arnab, Xiangyang Xue, Philip H.S. Torr (TPAMI), arXiv:2209.09760

A four-stage pyramid transformer whose attention lets every query attend to only K = 9
key/value nodes, sampled bilinearly at a 3x3 neighbourhood plus learned per-token walks
(a dynamic graph), with a relative-position term. Cost is linear in the number of pixels.

The implementation follows the facts in ``shared/spec/dgmn2.md`` (written from the paper
and the layout of the authors' released checkpoints) and the structure of timm's own
pyramid models. ``checkpoint_filter_fn`` maps the authors' released key names to ours.

@article{zhang2022dgmn2,
  title={Dynamic Graph Message Passing Networks for Visual Recognition},
  author={Zhang, Li and Chen, Mohan and Arnab, Anurag and Xue, Xiangyang and Torr, Philip HS},
  journal={IEEE Transactions on Pattern Analysis and Machine Intelligence},
  year={2022}
}
"""
import math
import re
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, register_notrace_function, trunc_normal_, use_fused_attn
from timm.models import adapt_input_conv, checkpoint_seq, generate_default_cfgs, register_model

from ..kernels import (
    attention_weights, chunked_mlp, sampled_attention, sampled_attention_cpu, sampled_attention_portable,
    use_chunked_mlp, uses_gather_path)
from ..state_dicts import mismatch_error, shape_mismatches
from ..sampling import NUM_NODES

__all__ = ['DGMN2', 'checkpoint_filter_fn', 'to_released_layout', 'rel_pos_term', 'MIN_INPUT_SIZE']

MIN_INPUT_SIZE = 32
# largest H + W for which the position term is fused into the CPU attention (see graph_attention)
FUSED_POSITION_MAX_SIDES = 128

# variant name -> depths, used to name the variant a checkpoint belongs to
_VARIANT_DEPTHS = {
    'dgmn2_tiny': (2, 2, 2, 2),
    'dgmn2_small': (3, 4, 6, 3),
    'dgmn2_medium': (3, 4, 18, 3),
    'dgmn2_large': (3, 8, 27, 3),
}


def _exporting() -> bool:
    """ True while tracing / exporting, where a shape-dependent Python branch would be baked in. """
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_exporting()


def _resize_table(table: torch.Tensor, rows: int, branch_free: bool = False) -> torch.Tensor:
    """ Resize a (L, c) position table along its rows, as a bilinear image resize.

    A bilinear resize to the same size is exactly the identity, so ``branch_free`` (used while
    exporting with dynamic sizes) always resizes instead of testing the size.
    """
    if not branch_free and table.shape[0] == rows:
        return table
    return F.interpolate(
        table[None, None], size=(rows, table.shape[1]), mode='bilinear', align_corners=False)[0, 0]


def _window_index(length: int, device: torch.device) -> torch.Tensor:
    """ (length, K) rows length - 1 - p + m of a resized table, for position p and node m. """
    p = torch.arange(length, device=device)
    m = torch.arange(9, device=device)
    return (length - 1 - p)[:, None] + m[None, :]


@register_notrace_function
def rel_pos_term(
        q: torch.Tensor,
        rel_height: torch.Tensor,
        rel_width: torch.Tensor,
        released: bool = True,
) -> torch.Tensor:
    """ Relative-position logits of the K nodes of every query (spec section 3).

    Args:
        q: (N, c, H, W) unscaled queries (N = batch * heads).
        rel_height: (Lh, c) height table, resized here to H + K - 1 rows.
        rel_width: (Lw, c) width table, resized here to W + K - 1 rows.
        released: compute the height term exactly as the released checkpoints were trained
            (on the transposed query grid, then resized from (W, H) to (H, W)). With False,
            the mathematically clean term <q[y, x], rel_height[H - 1 - y + m]> is used.

    Returns:
        (N, K, H, W) logits to add before the softmax over the K nodes.
    """
    out = rel_pos_logits(q.permute(0, 2, 3, 1).unsqueeze(3), rel_height, rel_width, released)  # (N, H, W, 1, K)
    return out.squeeze(3).permute(0, 3, 1, 2)


@register_notrace_function
def rel_pos_logits(
        q: torch.Tensor,
        rel_height: torch.Tensor,
        rel_width: torch.Tensor,
        released: bool = True,
) -> torch.Tensor:
    """ :func:`rel_pos_term` for token-major queries, the layout the attention works in.

    Args:
        q: (B, H, W, nh, c) unscaled queries (any strides, e.g. a view into the qkv output).
        rel_height, rel_width, released: as in :func:`rel_pos_term`.

    Returns:
        (B, H, W, nh, K) logits.

    Only small per-row / per-column tables are built, (H, K, c) and (W, K, c); the two
    terms are batched matrix products over the rows (height) and the columns (width),
    so the largest intermediate is the (B, H, W, nh, K) result itself.
    """
    B, H, W, nh, c = q.shape
    if torch.jit.is_scripting():
        branch_free = False
    else:
        branch_free = _exporting()
    table_h = _resize_table(rel_height, H + 8, branch_free)[_window_index(H, q.device)].to(q.dtype)  # (H, K, c)
    table_w = _resize_table(rel_width, W + 8, branch_free)[_window_index(W, q.device)].to(q.dtype)  # (W, K, c)
    # width term Rw[y, x, m] = <q[y, x], rel_width[W - 1 - x + m]>: a product per column x
    out = torch.einsum('byxhc,xmc->byxhm', q, table_w)
    # clean height term <q[y, x], rel_height[H - 1 - y + m]>: a product per row y
    height = torch.matmul(q.reshape(B, H, W * nh, c), table_h.transpose(1, 2)).view(B, H, W, nh, 9)
    if released:
        # Rh'[x, y] is the clean term at (y, x): a (W, H) grid that is read as (H, W)
        height = height.transpose(1, 2)
        if branch_free or H != W:  # (an identity resize for square maps)
            height = F.interpolate(
                height.reshape(B, W, H, nh * 9).permute(0, 3, 1, 2), size=(H, W), mode='bilinear',
                align_corners=False).permute(0, 2, 3, 1).reshape(B, H, W, nh, 9)
    return out + height


@register_notrace_function
def graph_attention(
        qkv: torch.Tensor,
        offset: torch.Tensor,
        rel_height: torch.Tensor,
        rel_width: torch.Tensor,
        scale: float,
        released: bool = True,
        attn_drop: float = 0.,
        training: bool = False,
        fused: bool = True,
) -> torch.Tensor:
    """ Position term (:func:`rel_pos_logits`) plus sampled attention, (B, H, W, nh, hd) out.

    On the gather path (CPU and other non-Triton devices, eager or compiled) the position term
    is computed inside the attention's autograd function: one GEMM of the queries against
    both tables, read through band views, and its gradient added straight into the queries'
    gradient. Elsewhere (Triton, ONNX export, attention dropout, the released height term on
    non-square maps) the logits are computed first and passed in, as they are on the meta
    device, so that MAC counts (``dgmn_timm.profiling``) see the definition's 9-column products
    rather than the full-table GEMM the fused path runs.

    The GEMM computes H + W + 16 products per query where 18 are used, and its (queries, H + W + 16)
    result would make memory grow faster than the pixel count, so it is used only for maps with
    H + W <= ``FUSED_POSITION_MAX_SIDES`` (up to 64 x 64, e.g. stage 1 of a 256 x 256 image), where
    one large GEMM beats the per-row products; larger maps use :func:`rel_pos_logits`.
    """
    H, W = qkv.shape[1], qkv.shape[2]
    if (uses_gather_path(qkv, attn_drop, training, fused) and not _exporting() and qkv.device.type != 'meta'
            and H + W <= FUSED_POSITION_MAX_SIDES and (H == W or not released)):
        table_h = _resize_table(rel_height, H + NUM_NODES - 1)
        table_w = _resize_table(rel_width, W + NUM_NODES - 1)
        return sampled_attention_cpu(qkv, offset, None, scale, table_h, table_w, released)
    rel = rel_pos_logits(qkv[:, :, :, 0], rel_height, rel_width, released)
    return sampled_attention(qkv, offset, rel, scale, attn_drop, training, fused)


@register_notrace_function
def check_image_input(x: torch.Tensor, in_chans: int, min_size: int):
    if x.dim() != 4:
        raise ValueError('DGMN2 expects a (B, C, H, W) image batch, got a tensor of shape ' + str(list(x.shape)))
    if x.shape[1] != in_chans:
        raise ValueError(
            'DGMN2 was built for ' + str(in_chans) + ' input channels but the input has ' + str(x.shape[1])
            + '; create the model with in_chans=' + str(x.shape[1]) + ' to adapt it.')
    if x.shape[2] < min_size or x.shape[3] < min_size:
        raise ValueError(
            'DGMN2 needs an input of at least ' + str(min_size) + 'x' + str(min_size)
            + ' pixels, got ' + str(x.shape[2]) + 'x' + str(x.shape[3]) + '.')


class DynamicGraphAttention(nn.Module):
    """ Attention over K = 9 nodes sampled at a 3x3 neighbourhood plus learned walks.

    Works on channels-last maps (B, H, W, C), token-major throughout: q, k and v stay in the
    layout the qkv Linear writes, and the sampled keys and values are never materialised
    (see ``dgmn_timm.kernels``: gather path on CPU, fused Triton kernel on CUDA, portable
    ``grid_sample`` path under TorchScript and ONNX export).
    """

    def __init__(
            self,
            dim: int,
            num_heads: int = 1,
            table_size: Tuple[int, int] = (56, 56),
            qkv_bias: bool = True,
            attn_drop: float = 0.,
            proj_drop: float = 0.,
            rel_pos_released: bool = True,
    ):
        super().__init__()
        assert dim % num_heads == 0, f'dim {dim} should be divisible by num_heads {num_heads}.'
        self.num_heads = num_heads
        self.num_nodes = NUM_NODES
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.rel_pos_released = rel_pos_released
        # timm's switch (timm.layers.set_fused_attn / TIMM_FUSED_ATTN): False runs the
        # autograd-native grid_sample path, e.g. for double backward (gradient penalties)
        self.fused_attn = use_fused_attn()

        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        # walks (dy, dx) of the K nodes, predicted per head slice, weights shared by all heads
        self.offset = nn.Linear(self.head_dim, 2 * NUM_NODES)
        self.rel_height = nn.Parameter(torch.randn(table_size[0] + NUM_NODES - 1, self.head_dim) * self.scale)
        self.rel_width = nn.Parameter(torch.randn(table_size[1] + NUM_NODES - 1, self.head_dim) * self.scale)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def reset_offsets(self):
        """ Start from the plain 3x3 neighbourhood (zero walks). """
        nn.init.zeros_(self.offset.weight)
        nn.init.zeros_(self.offset.bias)

    @torch.jit.ignore
    def sampling_graph(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """ The dynamic graph this layer builds for input ``x`` (B, H, W, C), after its norm.

        Returns:
            positions: (B, heads, K, H, W, 2) pixel coordinates (y, x) of the sampled nodes.
            weights: (B, heads, K, H, W) attention weight of each node (softmax over K).
        """
        B, H, W, C = x.shape
        K = self.num_nodes
        qkv, offset, rel = self.attention_inputs(x)
        weights = attention_weights(qkv, offset, rel, self.scale).permute(0, 3, 4, 1, 2)  # (B, nh, K, H, W)
        offset = offset.reshape(B, H, W, self.num_heads, K, 2).permute(0, 3, 4, 1, 2, 5)
        idx = torch.arange(K, device=x.device)
        base_y = (idx // 3 - 1).view(K, 1, 1) + torch.arange(H, device=x.device).view(1, H, 1)
        base_x = (idx % 3 - 1).view(K, 1, 1) + torch.arange(W, device=x.device).view(1, 1, W)
        base = torch.stack(torch.broadcast_tensors(base_y, base_x), dim=-1).to(offset.dtype)
        positions = base + offset
        return positions, weights

    def qkv_and_walks(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """ qkv (B, H, W, 3, nh, hd) and walks (B, H, W, nh, 2K). """
        B, H, W, C = x.shape
        nh, hd = self.num_heads, self.head_dim
        qkv = self.qkv(x).reshape(B, H, W, 3, nh, hd)
        # walks per head slice, weights shared by the heads; (dy, dx) of node k at 2k, 2k + 1
        offset = self.offset(x.reshape(B, H, W, nh, hd))
        return qkv, offset

    def attention_inputs(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """ qkv (B, H, W, 3, nh, hd), walks (B, H, W, nh, 2K) and position logits (B, H, W, nh, K). """
        qkv, offset = self.qkv_and_walks(x)
        rel = rel_pos_logits(qkv[:, :, :, 0], self.rel_height, self.rel_width, self.rel_pos_released)
        return qkv, offset, rel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        if torch.jit.is_scripting():
            qkv, offset, rel = self.attention_inputs(x)
            x = sampled_attention_portable(qkv, offset, rel, self.scale, self.attn_drop.p, self.training)
        else:
            qkv, offset = self.qkv_and_walks(x)
            x = graph_attention(
                qkv, offset, self.rel_height, self.rel_width, self.scale, self.rel_pos_released,
                self.attn_drop.p, self.training, self.fused_attn)
        x = self.proj(x.reshape(B, H, W, C))
        x = self.proj_drop(x)
        return x


@register_notrace_function
def residual_add(x: torch.Tensor, branch: torch.Tensor, inplace: bool = True) -> torch.Tensor:
    """ ``x + branch``, written into ``branch`` when ``inplace`` and that gives the same result.

    ``branch`` is the fresh output of a Linear (or of DropPath), which nothing saves for the
    backward, so adding in place is autograd-safe; it saves allocating (and, for large maps,
    page-faulting) a new activation-sized tensor. The caller passes ``inplace=False`` when a
    hook may hold ``branch`` (``Block._private_branches``). Falls back to ``x + branch`` where the
    in-place add would change the result dtype (autocast: a bfloat16 branch, a float32 stream).
    """
    if inplace and branch.dtype == x.dtype:
        return branch.add_(x)
    return x + branch


def _can_overwrite(grad: torch.Tensor, like: torch.Tensor) -> bool:
    """ Whether a backward may write its result into ``grad`` (the incoming gradient).

    Only called where the gradient is private (see ``Mlp._act``); then not
    under double backward (``create_graph=True``: the backward must stay differentiable) and
    only for a dense gradient of the tensor's own shape and dtype.
    """
    return (not torch.is_grad_enabled() and grad.is_contiguous() and grad.dtype == like.dtype
            and grad.shape == like.shape)


class _GeluInplaceGrad(torch.autograd.Function):
    """ Exact (erf) GELU whose backward writes d input into the incoming gradient's memory.

    Only for a gradient nobody else holds: the MLP uses it when its GELU output goes straight
    into a hook-free fc2 (``Mlp._act``), whose backward makes the gradient fresh.
    Overwriting it saves allocating (and page-faulting) an activation-sized tensor: a
    stage-1 MLP's forward + backward at batch 8 took 187 instead of 214 ms on a 2-core CPU.
    Falls back to the out-of-place ``gelu_backward`` for double backward (``create_graph=True``)
    and a non-contiguous or differently typed gradient.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return F.gelu(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        x, = ctx.saved_tensors
        if not _can_overwrite(grad, x):
            return torch.ops.aten.gelu_backward(grad, x)
        return torch.ops.aten.gelu_backward.grad_input(grad, x, grad_input=grad)


@register_notrace_function
def gelu_(x: torch.Tensor) -> torch.Tensor:
    """ Exact (erf) GELU, in place where autograd allows.

    Without autograd (inference) it runs in place, in the memory fc1 just wrote instead of a
    fresh (for stage 1 at batch 8, 51 MB) tensor: 5.7 ms instead of 28 ms on a 2-core CPU.
    With autograd it is ``F.gelu`` (the backward needs the input).
    """
    if torch.is_grad_enabled() and x.requires_grad:
        return F.gelu(x)
    return torch.ops.aten.gelu_(x)


@torch.jit.ignore
def _gelu_inplace_grad(x: torch.Tensor) -> torch.Tensor:
    return _GeluInplaceGrad.apply(x)


class Mlp(nn.Module):
    """ fc1 -> GELU -> fc2 on channels-last tokens (timm's ``Mlp`` layout and key names). """

    def __init__(self, in_features: int, hidden_features: int, drop: float = 0.):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            if self._blocked(x):
                return chunked_mlp(x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias)
            x = self._act(self.fc1(x))
        else:
            x = F.gelu(self.fc1(x))
        x = self.drop1(x)
        return self.drop2(self.fc2(x))

    @torch.jit.ignore
    def _blocked(self, x: torch.Tensor) -> bool:
        """ Whether to run the row-blocked MLP (``dgmn_timm.kernels.chunked_mlp``): large CPU maps,
        no active dropout, plain ``nn.Linear`` layers and no hooks on the four submodules (a wrapped
        or hooked module, e.g. LoRA or a feature hook, must see its own call). FX tracing records the plain layers. """
        if isinstance(x, torch.fx.Proxy):
            return False
        if self.training and (self.drop1.p > 0. or self.drop2.p > 0.):
            return False
        # it bypasses all four submodules: a hook on any of them must see its own call
        return (_linear_layers(self.fc1, self.fc2) and _hook_free(self.fc1, self.drop1, self.fc2, self.drop2)
                and use_chunked_mlp(x, self.fc1.out_features, self.fc1.weight))

    @torch.jit.ignore
    def _act(self, h: torch.Tensor) -> torch.Tensor:
        """ GELU of fc1's output ``h``, in place where nothing else can hold what it overwrites.

        With autograd: the backward in place (``_GeluInplaceGrad``) when the gradient reaching it
        is fc2's (or dropout's) fresh output, which only hooks on ``drop1`` or ``fc2`` could also
        see or keep. Without: the forward in place (``gelu_``) unless a hook on ``fc1`` may keep ``h``.
        FX tracing records ``gelu_``.
        """
        if isinstance(h, torch.fx.Proxy):
            return gelu_(h)
        if torch.is_grad_enabled() and h.requires_grad:
            if _linear_layers(self.fc2) and _hook_free(self.drop1, self.fc2):
                return _gelu_inplace_grad(h)
            return F.gelu(h)
        return gelu_(h) if _hook_free(self.fc1) else F.gelu(h)


_GLOBAL_HOOKS = tuple(getattr(nn.modules.module, name, {}) for name in (
    '_global_forward_hooks', '_global_forward_pre_hooks', '_global_backward_hooks', '_global_backward_pre_hooks'))


def _hook_free(*modules: nn.Module) -> bool:
    """ No forward / backward hooks on any of ``modules`` and no global module hooks
    (``nn.modules.module.register_module_forward_hook`` and friends see every call). """
    if any(_GLOBAL_HOOKS):
        return False
    return not any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
                   for m in modules)


def _linear_layers(*modules: nn.Module) -> bool:
    """ All plain ``nn.Linear`` (not a subclass or a wrapper such as LoRA, which must see its call). """
    return all(type(m) is nn.Linear for m in modules)


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
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = DynamicGraphAttention(
            dim,
            num_heads=num_heads,
            table_size=table_size,
            qkv_bias=qkv_bias,
            attn_drop=attn_drop,
            proj_drop=proj_drop,
            rel_pos_released=rel_pos_released,
        )
        self.drop_path1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=proj_drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            x = x + self.drop_path1(self.attn(self.norm1(x)))
            return x + self.drop_path2(self.mlp(self.norm2(x)))
        inplace = self._private_branches()
        x = residual_add(x, self.drop_path1(self.attn(self.norm1(x))), inplace)
        x = residual_add(x, self.drop_path2(self.mlp(self.norm2(x))), inplace)
        return x

    @torch.jit.ignore
    def _private_branches(self) -> bool:
        """ Whether the residual adds may write into the branch outputs: no hook on the modules
        whose output the branch tensor is (a forward hook may keep it, e.g. to read features). """
        return _hook_free(
            self.attn, self.attn.proj, self.attn.proj_drop, self.drop_path1,
            self.mlp, self.mlp.fc2, self.mlp.drop2, self.drop_path2)


class Stem(nn.Module):
    """ Stage-1 patch embedding: three 3x3 Conv-BN-ReLU, strides 2, 1, 2 (output stride 4). """

    def __init__(self, in_chans: int = 3, hidden_dim: int = 32, embed_dim: int = 64):
        super().__init__()
        self.in_chans = in_chans
        self.min_size = MIN_INPUT_SIZE
        self.conv1 = nn.Conv2d(in_chans, hidden_dim, 3, stride=2, padding=1, bias=False)
        self.norm1 = nn.BatchNorm2d(hidden_dim)
        self.conv2 = nn.Conv2d(hidden_dim, hidden_dim, 3, stride=1, padding=1, bias=False)
        self.norm2 = nn.BatchNorm2d(hidden_dim)
        self.conv3 = nn.Conv2d(hidden_dim, embed_dim, 3, stride=2, padding=1, bias=False)
        self.norm3 = nn.BatchNorm2d(embed_dim)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_image_input(x, self.in_chans, self.min_size)
        # channels-last convolutions: faster on CPU, and the stage's permute to (B, H, W, C) is then free
        x = x.contiguous(memory_format=torch.channels_last)
        x = self.act(self.norm1(self.conv1(x)))
        x = self.act(self.norm2(self.conv2(x)))
        x = self.act(self.norm3(self.conv3(x)))
        return x


class PatchEmbed(nn.Module):
    """ Stage 2-4 patch embedding: 3x3 Conv-BN-ReLU, stride 2 (1 for reduced output stride). """

    def __init__(self, in_chs: int, out_chs: int, stride: int = 2):
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, 3, stride=stride, padding=1, bias=False)
        self.norm = nn.BatchNorm2d(out_chs)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(x)))


class DGMN2Stage(nn.Module):
    """ Optional patch embedding, then blocks on channels-last tokens.

    NCHW in and out; the output is a (B, C, H, W) view of channels-last memory
    (``x.is_contiguous(memory_format=torch.channels_last)``), as timm's channels-last models give.
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
    ):
        super().__init__()
        self.grad_checkpointing = False
        if downsample:
            self.downsample = PatchEmbed(dim, dim_out, stride=stride)
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
        ) for i in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        x = x.permute(0, 2, 3, 1)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        # NCHW view of channels-last memory: the next patch embedding (a channels-last
        # convolution) reads it as is, so no layout copy between stages
        return x.permute(0, 3, 1, 2)


def _take_indices(num: int, indices: Optional[Union[int, Sequence[int]]]) -> Tuple[List[int], int]:
    """ Feature indices to take: the last ``indices`` if an int, all if None, else the given (negatives allowed). """
    if indices is None:
        take = list(range(num))
    elif isinstance(indices, int):
        if not 0 < indices <= num:
            raise ValueError(f'indices={indices} must be between 1 and {num}')
        take = list(range(num - indices, num))
    else:
        take = []
        for i in indices:
            idx = num + i if i < 0 else i
            if not 0 <= idx < num:
                raise ValueError(f'feature index {i} is out of range for {num} stages')
            take.append(idx)
    return take, max(take)


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
        self.grad_checkpointing = False

        self.stem = Stem(in_chans, stem_dim, embed_dims[0])
        # stochastic depth rising linearly over all blocks (plain Python: works on the meta device)
        total = sum(depths)
        rates = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        dpr = [rates[sum(depths[:i]):sum(depths[:i + 1])] for i in range(num_stages)]
        self.feature_info = []
        stages = []
        prev_dim = embed_dims[0]
        reduction = 4
        for i in range(num_stages):
            nominal = 4 * 2 ** i  # the stride the position tables were sized for
            stride = 1
            if i > 0:
                stride = 2 if reduction < output_stride else 1
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
            ))
            prev_dim = embed_dims[i]
            self.feature_info += [dict(num_chs=prev_dim, reduction=reduction, module=f'stages.{i}')]
        self.stages = nn.Sequential(*stages)

        self.num_features = self.head_hidden_size = embed_dims[-1]
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

        self.apply(self._init_weights)
        for m in self.modules():
            if isinstance(m, DynamicGraphAttention):
                m.reset_offsets()

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
        self.grad_checkpointing = enable
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
        ref = next(self.parameters())
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
        take_indices, max_index = _take_indices(len(self.stages), indices)
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
        take_indices, max_index = _take_indices(len(self.stages), indices)
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

    @torch.jit.ignore
    def variant_name(self) -> str:
        cfg = getattr(self, 'pretrained_cfg', None) or {}
        name = cfg.get('architecture')
        if name:
            return name
        return _variant_for_depths(self.depths)

    @torch.jit.ignore
    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        """ Load our own, the authors' released (any nesting or prefix) or a detector's state dict.

        Raises a RuntimeError naming the variant and the offending keys if the checkpoint
        does not fit this model.
        """
        state_dict = checkpoint_filter_fn(state_dict, self)
        own = self.state_dict()
        name = self.variant_name()
        ckpt_depths, own_depths = _depths_in(state_dict), _depths_in(own)
        if ckpt_depths is not None and own_depths is not None:
            common = min(len(ckpt_depths), len(own_depths))
            if ckpt_depths[:common] != own_depths[:common]:
                raise RuntimeError(
                    f'Checkpoint is for {_variant_for_depths(ckpt_depths)} (blocks per stage {ckpt_depths}) '
                    f'but the model is {name} (blocks per stage {own_depths}).')
        missing = [k for k in own if k not in state_dict]
        unexpected = [k for k in state_dict if k not in own]
        mismatched = shape_mismatches(state_dict, own)
        if mismatched or (strict and (missing or unexpected)):
            raise mismatch_error(f'Checkpoint does not match {name}.', missing, unexpected, mismatched)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


def _depths_in(state_dict: Mapping[str, Any]) -> Optional[Tuple[int, ...]]:
    """ Blocks per stage of a state dict in our layout, or None if it has no blocks. """
    counts: Dict[int, int] = {}
    for k in state_dict:
        m = re.match(r'^stages\.(\d+)\.blocks\.(\d+)\.', k)
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


_RELEASED_MARKERS = ('patch_embed1.conv1.weight', 'stem.conv1.weight')


def _unwrap(state_dict: Mapping[str, Any]) -> Mapping[str, Any]:
    """ Take the weights out of a training checkpoint ({'model': ...}, {'state_dict': ...}). """
    for key in ('model', 'state_dict', 'model_ema', 'state_dict_ema'):
        inner = state_dict.get(key) if isinstance(state_dict, Mapping) else None
        if isinstance(inner, Mapping):
            return inner
    return state_dict


def _strip_prefix(state_dict: Mapping[str, Any]) -> Dict[str, Any]:
    """ Keep only the backbone of a wrapped checkpoint ('backbone.', 'module.', ...), prefix removed. """
    prefix = None
    for k in state_dict:
        for marker in _RELEASED_MARKERS:
            if k.endswith(marker):
                prefix = k[:len(k) - len(marker)]
                break
        if prefix is not None:
            break
    if not prefix:
        return dict(state_dict)
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


# attention parameters: (the authors' released name, ours); used in both directions
_ATTN_RENAMES = (
    ('.attn.conv_offset.', '.attn.offset.'),
    ('.attn.pos_emb.rel_height', '.attn.rel_height'),
    ('.attn.pos_emb.rel_width', '.attn.rel_width'),
)


def checkpoint_filter_fn(state_dict: Mapping[str, Any], model: Optional[nn.Module] = None) -> Dict[str, Any]:
    """ Map the authors' released checkpoints (spec section 4) and wrapped ones to our key names.

    Accepts DeiT-style dicts ({'model': state_dict, 'args': ..., ...}), plain state dicts,
    and detection / segmentation checkpoints whose backbone carries a prefix such as
    'backbone.'. Our own state dicts pass through unchanged. When ``model`` is given and
    it has a different number of input channels, the first conv is adapted.
    """
    state_dict = _strip_prefix(_unwrap(state_dict))
    out = {}
    for k, v in state_dict.items():
        if k.startswith('patch_embed1.'):
            k = 'stem.' + k[len('patch_embed1.'):]
        k = re.sub(r'^patch_embed([2-4])\.', lambda m: f'stages.{int(m.group(1)) - 1}.downsample.', k)
        k = re.sub(r'^block([1-4])\.(\d+)\.', lambda m: f'stages.{int(m.group(1)) - 1}.blocks.{m.group(2)}.', k)
        for released, ours in _ATTN_RENAMES:
            k = k.replace(released, ours)
        out[k] = v
    if model is not None and 'stem.conv1.weight' in out:
        w = out['stem.conv1.weight']
        in_chans = model.stem.conv1.weight.shape[1]
        if isinstance(w, torch.Tensor) and w.ndim == 4 and w.shape[1] != in_chans:
            out['stem.conv1.weight'] = adapt_input_conv(in_chans, w)
    return out


def to_released_layout(state_dict: Mapping[str, Any]) -> Dict[str, Any]:
    """ Our key names -> the authors' released layout (the inverse of ``checkpoint_filter_fn``).

    Useful to hand weights back to the authors' code, and to test the loader.
    """
    out = {}
    for k, v in state_dict.items():
        if k.startswith('stem.'):
            k = 'patch_embed1.' + k[len('stem.'):]
        k = re.sub(r'^stages\.(\d+)\.downsample\.', lambda m: f'patch_embed{int(m.group(1)) + 1}.', k)
        k = re.sub(r'^stages\.(\d+)\.blocks\.(\d+)\.', lambda m: f'block{int(m.group(1)) + 1}.{m.group(2)}.', k)
        for released, ours in _ATTN_RENAMES:
            k = k.replace(ours, released)
        out[k] = v
    return out


def _create_dgmn2(variant: str, pretrained: bool = False, **kwargs) -> DGMN2:
    # build_model_with_cfg, with errors that name the Hub id / folder and say how to get the weights
    from ..hub import build_model_with_pretrained_checks
    out_indices = kwargs.pop('out_indices', (0, 1, 2, 3))
    return build_model_with_pretrained_checks(
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
