"""DependencyViT: a plain ViT whose attention is reversed, so dependency trees emerge without labels.

Paper: "Visual Dependency Transformers: Dependency Tree Emerges from Reversed Attention", Ding, Shen,
Fan, Chen, Chen, Luo, Tenenbaum, Gan, CVPR 2023, arXiv 2304.03282.
Official code: https://github.com/dingmyu/DependencyViT holds only an MIT LICENSE. **No official code
or weights were ever released**; the only other implementation is the unmerged timm draft PR
huggingface/pytorch-image-models#2062, which trained Tiny to about 73% (about 2% below the paper).
Every model here is untrained: ``pretrained=True`` only works with your own file
(``pretrained_cfg_overlay=dict(file=...)``).

Architecture (a timm ViT with these changes; parameter names follow that PR, so its files load):

* No class token; 196 patch tokens with a learned absolute position embedding; global average
  pooling of ``LayerNorm(x) * m`` (``m`` the message controller after the last block, applied after
  the final norm as in the PR); ``qkv_bias=False``; LayerScale initialised to 1e-6; Inception
  mean / std (0.5), bicubic, crop 0.9.
* **Reversed attention** (:func:`visionzoo.ops.reversed_attention.reversed_attention`): child tokens
  are the queries; each child holds a softmax distribution over parents and sends its value along
  it, ``out = (A^T * p * m) V``. The head selector ``p = softmax_h(W x / tau)`` (``W`` D -> heads, no
  bias, ``tau = 0.1``) and the message controller ``m_l = m_{l-1} * sigmoid(MLP(x))`` (MLP D -> D/2 -> 1,
  GELU, no biases; cumulative over layers, ``m_0 = 1``) are computed from the normalised block input.
* **DependencyViT-Lite** drops, after the attention residual of the pruning blocks, the tokens that
  receive the least message mass ``sum_{h,i} A^T p m`` (leaves of the dependency tree). The ``k``-th
  pruning block keeps ``floor(N (1 - k r) / (1 - (k - 1) r))`` of its ``N`` tokens, so with ``r = 0.16``
  at blocks 2, 5, 8, 11 (1-based; ``prune_layers=(1, 4, 7, 10)`` here, 0-based) 196 tokens become
  164, 132, 100 and 69. Tokens are really removed (gathered), so MACs and time fall; ``m`` is
  gathered with them, and kept tokens stay in raster order.

Choices where the paper is open (each is an argument):

* ``num_heads=12`` for both Tiny and Small (head dim 16 / 32), which gives the reference parameter
  counts 5,964,712 / 22,987,624; DeiT's 3 / 6 heads would give 5,943,976 / 22,959,976.
* ``head_selector_temperature=0.1`` (the PR cites the paper's appendix D.1; ``tau = 1`` was unstable).
* ``prune_score='mass'`` (what each token receives; leaves receive nothing). ``'message'`` ranks by
  ``m`` instead (tokens whose outgoing messages are gated off).
* ``forward_intermediates`` of a pruned model returns full token grids: a pruned token keeps the
  features it had at the end of the last block it went through, so dense heads see every position.

Dependency trees (parent of each token = the parent it sends most to, ``argmax_j sum_h A^T p m``) and
part segmentation from subtrees live in :mod:`visionzoo.utils.dependency_tree`, built on
:meth:`DependencyViT.forward_dependencies`.

Expect after training (paper, ImageNet-1k, 300 epochs, DeiT recipe): Tiny about 75% top-1 and Lite-Tiny
somewhat lower at about two thirds of the MACs; the paper's tables were not verifiable from here, so
treat these numbers as approximate. No weights exist to check them against.
"""
from __future__ import annotations

import math
from functools import partial
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple, Union

import torch
from torch import nn

from timm.data import IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD
from timm.layers import DropPath, LayerScale, Mlp, resample_abs_pos_embed, trunc_normal_
from timm.models import generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models._features_fx import register_notrace_function, register_notrace_module

from ..layers import PatchEmbed, plain_feature_indices
from ..ops.reversed_attention import reversed_attention
from ._input import record_input_size
from ._loading import load_checkpoint_strict
from ._registry import ModelMeta, register_meta
from ._shared import TimmApi, build_family_model, check_pool, family_cfg, run_block

__all__ = ["DependencyViT", "ReversedAttention", "TokenPruner"]


@register_notrace_function
def add_pos_embed(x: torch.Tensor, pos_embed: torch.Tensor, base_grid: Tuple[int, int]) -> torch.Tensor:
    """(B, H, W, D) patch tokens -> (B, H*W, D) plus the position embedding (1, base_h*base_w, D),
    resampled (bicubic) when the grid differs from ``base_grid``.

    A public name on purpose: torch.fx only autowraps global functions whose names lack a leading "_".
    """
    B, H, W, D = x.shape
    if (H, W) != tuple(base_grid):
        pos_embed = resample_abs_pos_embed(pos_embed, (H, W), base_grid, num_prefix_tokens=0)
    return x.reshape(B, H * W, D) + pos_embed


@register_notrace_module
class ReversedAttention(nn.Module):
    """Multi-head reversed attention with head selector and message controller.

    Shapes: x (B, N, D) normalised tokens; ``m`` (B, N) cumulative message controller of the previous
    blocks (None before the first). Returns ``(out (B, N, D), m (B, N), dependency, mass)``, where
    ``dependency`` (B, N_parent, N_child) and ``mass`` (B, N) are None unless asked for (detached).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 12,
        qkv_bias: bool = False,
        head_selector_temperature: float = 0.1,
        message_hidden_ratio: float = 0.5,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        backend: str = "auto",
        device=None,
        dtype=None,
    ):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"DependencyViT: embed_dim {dim} is not divisible by num_heads {num_heads}")
        if head_selector_temperature <= 0:
            raise ValueError(f"DependencyViT: head_selector_temperature must be > 0, "
                             f"got {head_selector_temperature}")
        dd = dict(device=device, dtype=dtype)
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.temperature = head_selector_temperature
        self.attn_drop = attn_drop
        self.backend = backend
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias, **dd)
        self.head_selector = nn.Linear(dim, num_heads, bias=False, **dd)
        self.message_controller = Mlp(dim, int(dim * message_hidden_ratio), 1, act_layer=nn.GELU, bias=False,
                                      **dd)
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(
        self,
        x: torch.Tensor,
        m: Optional[torch.Tensor] = None,
        return_dependency: bool = False,
        return_mass: bool = False,
    ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, H, N, Dh) each
        p = (self.head_selector(x) / self.temperature).softmax(dim=-1).transpose(1, 2)  # (B, H, N)
        gate = self.message_controller(x).squeeze(-1).sigmoid()  # (B, N)
        m = gate if m is None else m * gate
        dropout_p = self.attn_drop if self.training else 0.0
        if return_dependency or return_mass:
            out, dependency, mass = reversed_attention(
                q, k, v, p, m, scale=self.scale, dropout_p=dropout_p, return_dependency=return_dependency,
                return_mass=return_mass, backend=self.backend)
        else:
            out = reversed_attention(q, k, v, p, m, scale=self.scale, dropout_p=dropout_p, backend=self.backend)
            dependency = mass = None
        out = self.proj(out.transpose(1, 2).reshape(B, N, C))  # (B, H, N, Dh) -> (B, N, D)
        return self.proj_drop(out), m, dependency, mass


@register_notrace_module
class TokenPruner(nn.Module):
    """Keep the ``floor(N * keep_ratio)`` highest-scoring tokens (DependencyViT-Lite), in raster order.

    ``score='mass'`` ranks by the message mass each token receives in this block's reversed attention;
    ``'message'`` by the cumulative message controller ``m``. ``token_index`` (B, N) maps the current
    tokens to positions of the full patch grid (None = identity) and is gathered along.
    """

    def __init__(self, keep_ratio: float, score: str = "mass"):
        super().__init__()
        if not 0.0 < keep_ratio <= 1.0:
            raise ValueError(f"DependencyViT: keep ratio must be in (0, 1], got {keep_ratio}")
        if score not in ("mass", "message"):
            raise ValueError(f"DependencyViT: prune_score must be 'mass' or 'message', got {score!r}")
        self.keep_ratio = keep_ratio
        self.score = score

    def num_kept(self, num_tokens: int) -> int:
        # The epsilon keeps exact products (164 * 0.68 / 0.84 = 132.76..., 196 * 0.84 = 164.64) from
        # flooring one too low through rounding error.
        return max(1, math.floor(num_tokens * self.keep_ratio + 1e-6))

    def forward(
        self,
        x: torch.Tensor,
        m: torch.Tensor,
        mass: torch.Tensor,
        token_index: Optional[torch.Tensor],
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, N, D = x.shape
        if token_index is None:
            token_index = torch.arange(N, device=x.device).expand(B, N)
        n_keep = self.num_kept(N)
        if n_keep >= N:
            return x, m, token_index
        score = mass if self.score == "mass" else m.detach()
        keep = score.topk(n_keep, dim=1, sorted=False).indices.sort(dim=1).values  # (B, n_keep)
        x = x.gather(1, keep[..., None].expand(-1, -1, D))
        return x, m.gather(1, keep), token_index.gather(1, keep)


class DependencyViTBlock(nn.Module):
    """``x += ls1(RevAttn(LN x))`` -> [prune tokens] -> ``x += ls2(MLP(LN x))``, carrying ``m`` and the token index."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        init_values: Optional[float] = 1e-6,
        head_selector_temperature: float = 0.1,
        message_hidden_ratio: float = 0.5,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        drop_path: float = 0.0,
        keep_ratio: Optional[float] = None,
        prune_score: str = "mass",
        norm_layer: Callable[..., nn.Module] = partial(nn.LayerNorm, eps=1e-6),
        attn_backend: str = "auto",
        device=None,
        dtype=None,
    ):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.norm1 = norm_layer(dim, **dd)
        self.attn = ReversedAttention(
            dim, num_heads=num_heads, qkv_bias=qkv_bias, head_selector_temperature=head_selector_temperature,
            message_hidden_ratio=message_hidden_ratio, attn_drop=attn_drop, proj_drop=proj_drop,
            backend=attn_backend, **dd,
        )
        self.ls1 = LayerScale(dim, init_values, **dd) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.pruner = TokenPruner(keep_ratio, prune_score) if keep_ratio is not None else None
        self.norm2 = norm_layer(dim, **dd)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=proj_drop, **dd)
        self.ls2 = LayerScale(dim, init_values, **dd) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(
        self,
        x: torch.Tensor,
        m: Optional[torch.Tensor] = None,
        token_index: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        x, m, token_index, _ = self.forward_with_dependency(x, m, token_index, return_dependency=False)
        return x, m, token_index

    def forward_with_dependency(
        self,
        x: torch.Tensor,
        m: Optional[torch.Tensor] = None,
        token_index: Optional[torch.Tensor] = None,
        return_dependency: bool = True,
    ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
        """Also returns this block's dependency map (B, N, N) over the tokens that entered it."""
        out, m, dependency, mass = self.attn(
            self.norm1(x), m, return_dependency=return_dependency, return_mass=self.pruner is not None)
        x = x + self.drop_path1(self.ls1(out))
        if self.pruner is not None:
            x, m, token_index = self.pruner(x, m, mass, token_index)
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x, m, token_index, dependency


@register_notrace_function
def scatter_tokens(canvas: torch.Tensor, x: torch.Tensor, token_index: Optional[torch.Tensor]) -> torch.Tensor:
    """Write tokens x (B, n, D) into the full grid ``canvas`` (B, N, D) at ``token_index`` (B, n); None = all."""
    if token_index is None:
        return x
    return canvas.scatter(1, token_index[..., None].expand(-1, -1, x.shape[-1]), x)


class DependencyViT(TimmApi, nn.Module):
    """DependencyViT (and DependencyViT-Lite with ``prune_layers``).

    Args:
        img_size, patch_size, in_chans: input layout; the position embedding is laid out for ``img_size``.
        num_classes, global_pool: timm conventions; ``global_pool`` is ``'avg'`` (mean of
            ``LN(x) * m`` over the tokens, the paper's head) or ``''``.
        embed_dim, depth, num_heads, mlp_ratio, qkv_bias: ViT sizes.
        init_values: LayerScale init (1e-6; None disables LayerScale).
        head_selector_temperature: ``tau`` of the head-selector softmax over heads.
        message_hidden_ratio: hidden width of the message-controller MLP relative to ``embed_dim``.
        prune_layers: 0-based blocks after whose attention residual tokens are pruned (Lite:
            ``(1, 4, 7, 10)``); empty for DependencyViT.
        prune_ratio: ``r``; the ``k``-th pruning block keeps ``(1 - k r) / (1 - (k - 1) r)`` of its tokens,
            so ``1 - len(prune_layers) * r`` of the patches survive. Needs ``len(prune_layers) * r < 1``.
        prune_score: ``'mass'`` (received message mass, default) or ``'message'`` (the controller ``m``).
        drop_rate, pos_drop_rate, attn_drop_rate, proj_drop_rate, drop_path_rate: regularisation;
            attention dropout forces the dense ``reference`` backend while training.
        dynamic_img_size: accept any multiple of the patch size, resampling the position embedding.
        attn_backend: reversed-attention backend (``'auto'``, ``'chunked'``, ``'reference'``).
    """

    def __init__(
        self,
        img_size: Union[int, Tuple[int, int]] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        embed_dim: int = 192,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        init_values: Optional[float] = 1e-6,
        head_selector_temperature: float = 0.1,
        message_hidden_ratio: float = 0.5,
        prune_layers: Sequence[int] = (),
        prune_ratio: float = 0.16,
        prune_score: str = "mass",
        drop_rate: float = 0.0,
        pos_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        dynamic_img_size: bool = False,
        attn_backend: str = "auto",
        device=None,
        dtype=None,
    ):
        super().__init__()
        check_pool("DependencyViT", global_pool, ("avg", ""))
        if depth < 1:
            raise ValueError(f"DependencyViT: depth must be >= 1, got {depth}")
        prune_layers = sorted(set(int(i) for i in prune_layers))
        if prune_layers and not (0 <= prune_layers[0] and prune_layers[-1] < depth):
            raise ValueError(f"DependencyViT: prune_layers {prune_layers} must be 0-based block indices "
                             f"< depth={depth}")
        if prune_layers and not 0.0 < prune_ratio * len(prune_layers) < 1.0:
            raise ValueError(f"DependencyViT: need 0 < len(prune_layers) * prune_ratio < 1, got "
                             f"{len(prune_layers)} * {prune_ratio}")
        dd = dict(device=device, dtype=dtype)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_prefix_tokens = 0
        self.prune_layers = tuple(prune_layers)
        self.prune_ratio = prune_ratio
        self.grad_checkpointing = False

        self.patch_embed = PatchEmbed(img_size, patch_size, None, in_chans, embed_dim,
                                      dynamic_img_size=dynamic_img_size, model_name="DependencyViT", **dd)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches, embed_dim, **dd))
        self.pos_drop = nn.Dropout(pos_drop_rate)
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # linspace(0, rate, depth)
        keep = {layer: (1 - k * prune_ratio) / (1 - (k - 1) * prune_ratio)
                for k, layer in enumerate(prune_layers, start=1)}
        self.blocks = nn.Sequential(*[
            DependencyViTBlock(
                embed_dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, init_values=init_values,
                head_selector_temperature=head_selector_temperature, message_hidden_ratio=message_hidden_ratio,
                attn_drop=attn_drop_rate, proj_drop=proj_drop_rate, drop_path=dpr[i], keep_ratio=keep.get(i),
                prune_score=prune_score, attn_backend=attn_backend, **dd,
            )
            for i in range(depth)
        ])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6, **dd)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes, **dd) if num_classes > 0 else nn.Identity()

        reduction = self.patch_embed.patch_size[0]
        self.feature_info = [
            dict(module=f"blocks.{i}", num_chs=embed_dim, reduction=reduction) for i in range(depth)
        ]
        self.init_weights()

    # --- init -------------------------------------------------------------------------------
    def init_weights(self) -> None:
        """timm ViT init: position embedding and every Linear trunc-normal(0.02), biases zero."""
        trunc_normal_(self.pos_embed, std=0.02)
        self.apply(_init_weights)

    # --- timm API ---------------------------------------------------------------------------
    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        return {"pos_embed"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(
            stem=r"^pos_embed|^patch_embed",
            blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))],
        )

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            check_pool("DependencyViT", global_pool, ("avg", ""))
            self.global_pool = global_pool
        device, dtype = self.pos_embed.device, self.pos_embed.dtype
        self.head = (nn.Linear(self.embed_dim, num_classes, device=device, dtype=dtype) if num_classes > 0
                     else nn.Identity())

    def set_input_size(self, img_size: Optional[Union[int, Tuple[int, int]]] = None,
                       patch_size: Optional[int] = None) -> None:
        """Change the native input size, resampling ``pos_embed`` (bicubic)."""
        if patch_size is not None:
            raise ValueError("DependencyViT: changing patch_size is not supported")
        if img_size is None:
            return
        old_grid = self.patch_embed.grid_size
        self.patch_embed.set_img_size(img_size)
        with torch.no_grad():
            pos = resample_abs_pos_embed(self.pos_embed.data, self.patch_embed.grid_size, old_grid, num_prefix_tokens=0)
        self.pos_embed = nn.Parameter(pos)
        record_input_size(self, self.patch_embed.img_size)

    def load_pretrained(self, checkpoint_path: str) -> None:
        """Load a visionzoo (or timm PR #2062 layout) file strictly, training-state containers included;
        integer tensors for float weights and NaN / inf values are refused (``load_checkpoint_strict``)."""
        load_checkpoint_strict(self, checkpoint_path, checkpoint_filter_fn)

    def set_attn_backend(self, backend: str) -> None:
        """Reversed-attention backend of every block (``'auto'``, ``'chunked'``, ``'reference'``)."""
        for block in self.blocks:
            block.attn.backend = backend

    # --- forward ----------------------------------------------------------------------------
    def _embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        x = self.patch_embed(x)  # (B, H, W, D)
        grid = (x.shape[1], x.shape[2])
        x = add_pos_embed(x, self.pos_embed, self.patch_embed.grid_size)
        return self.pos_drop(x), grid  # x: (B, H*W, D)

    output_fmts = ("NCHW", "NLC")

    def _intermediates(self, x: torch.Tensor, indices, norm: bool, stop_early: bool, output_fmt: str):
        """Block outputs on the full patch grid (stride ``patch_size``), through the final LayerNorm with
        ``norm``: ``'NCHW'`` (B, D, H, W) maps or ``'NLC'`` (B, H*W, D) tokens.

        With token pruning, positions pruned earlier hold the features those tokens had at the end of
        the last block they went through. The final output is :meth:`forward_features`' (kept tokens only).
        """
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        x, (H, W) = self._embed(x)
        B = x.shape[0]
        blocks = self.blocks[:max_index + 1] if stop_early else self.blocks
        m, token_index, full = None, None, x
        intermediates = []
        for i, block in enumerate(blocks):
            x, m, token_index = run_block(self, block, x, m, token_index)
            full = scatter_tokens(full, x, token_index)  # (B, H*W, D)
            if i in take_indices:
                y = self.norm(full) if norm else full
                if output_fmt == "NCHW":
                    y = y.reshape(B, H, W, y.shape[-1]).permute(0, 3, 1, 2).contiguous()
                intermediates.append(y)
        return self.norm(x) * m[..., None], intermediates

    def _prune(self, indices: Union[int, List[int]], prune_norm: bool, prune_head: bool) -> List[int]:
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[:max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices

    @torch.no_grad()
    def forward_dependencies(
        self,
        x: torch.Tensor,
        indices: Optional[Union[int, List[int]]] = None,
    ) -> Dict[str, Any]:
        """Dependency maps of the chosen blocks (all by default; an int means the last n).

        Returns a dict with
            ``dependency``: list of (B, N_l, N_l) maps, ``[b, j, i]`` = what token ``i`` sends to parent
                ``j`` summed over heads (``sum_h A^T p m``), over the N_l tokens that entered block l;
            ``token_index``: list of (B, N_l) positions of those tokens in the (H*W) patch grid;
            ``grid_size``: (H, W); ``layers``: the block indices.
        """
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        x, grid = self._embed(x)
        B, N, _ = x.shape
        all_tokens = torch.arange(N, device=x.device).expand(B, N)
        m, token_index = None, None
        dependency, token_indices = [], []
        for i, block in enumerate(self.blocks[:max_index + 1]):
            entering = all_tokens if token_index is None else token_index
            x, m, token_index, dep = block.forward_with_dependency(
                x, m, token_index, return_dependency=i in take_indices)
            if i in take_indices:
                dependency.append(dep)
                token_indices.append(entering)
        return dict(dependency=dependency, token_index=token_indices, grid_size=grid, layers=list(take_indices))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> ``LN(x) * m`` (B, N', D) over the tokens left after pruning (N' = H*W/p^2 without)."""
        x, _ = self._embed(x)
        m, token_index = None, None
        for block in self.blocks:
            x, m, token_index = run_block(self, block, x, m, token_index)
        return self.norm(x) * m[..., None]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "avg":
            x = x.mean(dim=1)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: DependencyViT) -> Dict[str, torch.Tensor]:
    """Adapt a DependencyViT state dict (visionzoo, or the timm PR #2062 layout, which uses the same keys).

    Unwraps ``{"model": ...}`` / ``{"state_dict": ...}`` training files and ``module.`` prefixes, and
    resamples the position embedding when the grid differs. There are no official weights.
    """
    for key in ("model", "state_dict"):
        if key in state_dict and isinstance(state_dict[key], dict):
            state_dict = state_dict[key]
            break
    out = {}
    for k, v in state_dict.items():
        k = k[len("module."):] if k.startswith("module.") else k
        if k == "pos_embed" and v.shape != model.pos_embed.shape:
            num_old = v.shape[1]
            side = math.isqrt(num_old)
            if side * side != num_old:
                raise ValueError(f"DependencyViT: cannot infer the grid of a pos_embed with {num_old} rows")
            v = resample_abs_pos_embed(v, model.patch_embed.grid_size, (side, side), num_prefix_tokens=0)
        out[k] = v
    return out


def _create_dependencyvit(variant: str, pretrained: bool = False, **kwargs) -> DependencyViT:
    out_indices = plain_feature_indices(kwargs.get("depth", 12))
    return build_family_model(DependencyViT, variant, pretrained, checkpoint_filter_fn, out_indices, **kwargs)


def _cfg(url: str = "", **kwargs) -> Dict[str, Any]:
    return family_cfg(url, dict(
        pool_size=None, crop_pct=0.9, fixed_input_size=True, mean=IMAGENET_INCEPTION_MEAN,
        std=IMAGENET_INCEPTION_STD, license="mit", paper_ids="arXiv:2304.03282",
        paper_name="Visual Dependency Transformers: Dependency Tree Emerges from Reversed Attention",
        origin_url="https://github.com/dingmyu/DependencyViT"), **kwargs)


default_cfgs = generate_default_cfgs({
    "dependencyvit_tiny.untrained": _cfg(),
    "dependencyvit_small.untrained": _cfg(),
    "dependencyvit_lite_tiny.untrained": _cfg(),
    "test_dependencyvit.untrained": _cfg(input_size=(3, 64, 64), license=None),
    "test_dependencyvit_lite.untrained": _cfg(input_size=(3, 64, 64), license=None),
})


@register_model
def dependencyvit_tiny(pretrained: bool = False, **kwargs) -> DependencyViT:
    """DependencyViT-Tiny (D=192, 12 blocks, 12 heads, patch 16). No official weights."""
    model_args = dict(embed_dim=192, depth=12, num_heads=12)
    return _create_dependencyvit("dependencyvit_tiny", pretrained, **dict(model_args, **kwargs))


@register_model
def dependencyvit_small(pretrained: bool = False, **kwargs) -> DependencyViT:
    """DependencyViT-Small (D=384, 12 blocks, 12 heads, patch 16). No official weights."""
    model_args = dict(embed_dim=384, depth=12, num_heads=12)
    return _create_dependencyvit("dependencyvit_small", pretrained, **dict(model_args, **kwargs))


@register_model
def dependencyvit_lite_tiny(pretrained: bool = False, **kwargs) -> DependencyViT:
    """DependencyViT-Lite-Tiny: Tiny pruning 16% of the patches at blocks 2, 5, 8, 11 (196 -> 69 tokens)."""
    model_args = dict(embed_dim=192, depth=12, num_heads=12, prune_layers=(1, 4, 7, 10), prune_ratio=0.16)
    return _create_dependencyvit("dependencyvit_lite_tiny", pretrained, **dict(model_args, **kwargs))


@register_model
def test_dependencyvit(pretrained: bool = False, **kwargs) -> DependencyViT:
    """A tiny DependencyViT for tests: D=32, 3 blocks, 4 heads, 64x64 inputs."""
    model_args = dict(img_size=64, embed_dim=32, depth=3, num_heads=4)
    return _create_dependencyvit("test_dependencyvit", pretrained, **dict(model_args, **kwargs))


@register_model
def test_dependencyvit_lite(pretrained: bool = False, **kwargs) -> DependencyViT:
    """A tiny DependencyViT-Lite for tests: as ``test_dependencyvit``, pruning 25% at blocks 1 and 2 (16 -> 12 -> 8)."""
    model_args = dict(img_size=64, embed_dim=32, depth=3, num_heads=4, prune_layers=(1, 2), prune_ratio=0.25)
    return _create_dependencyvit("test_dependencyvit_lite", pretrained, **dict(model_args, **kwargs))


_ORIGIN = "https://github.com/dingmyu/DependencyViT"
for _name, _params, _gmacs in (
    ("dependencyvit_tiny", 5_964_712, 1.296),
    ("dependencyvit_small", 22_987_624, 4.759),
    ("dependencyvit_lite_tiny", 5_964_712, 0.849),
):
    register_meta(_name, ModelMeta("dependencyvit", _params, _gmacs, None, _ORIGIN, "mit", None))
register_meta("test_dependencyvit", ModelMeta("dependencyvit"))
register_meta("test_dependencyvit_lite", ModelMeta("dependencyvit"))
