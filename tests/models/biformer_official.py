"""An independent functional port of the official BiFormer forward (rayleizhu/BiFormer@1697bbb,
``models/biformer.py``, ``models/biformer_stl.py``, ``models/_common.py``, ``ops/bra_legacy.py`` and the
dense ``models_mm/biformer_mm.py``), operating directly on official-layout state dicts.

It shares no code with visionzoo: every step is written the way the official modules compute it
(NCHW between blocks, channels-last inside, the 5-d region layout of ``bra_legacy``, ``torch.gather`` on
an expanded view, explicit matmul/softmax), so parity with it checks visionzoo's ports of both the
model and the BRA op.
"""
from __future__ import annotations

from typing import Dict, List, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def _bn(sd: Dict[str, Tensor], p: str, x: Tensor) -> Tensor:
    return F.batch_norm(x, sd[p + ".running_mean"], sd[p + ".running_var"], sd[p + ".weight"], sd[p + ".bias"],
                        False, 0.0, 1e-5)


def _ln(sd: Dict[str, Tensor], p: str, x: Tensor, eps: float = 1e-6) -> Tensor:
    return F.layer_norm(x, (x.shape[-1],), sd[p + ".weight"], sd[p + ".bias"], eps)


def _lin(sd: Dict[str, Tensor], p: str, x: Tensor) -> Tensor:
    return F.linear(x, sd[p + ".weight"], sd.get(p + ".bias"))


def _dw(sd: Dict[str, Tensor], p: str, x: Tensor) -> Tensor:
    w = sd[p + ".weight"]
    return F.conv2d(x, w, sd[p + ".bias"], padding=w.shape[-1] // 2, groups=w.shape[0])


def bra_legacy(sd: Dict[str, Tensor], p: str, x: Tensor, num_heads: int, n_win: int, topk: int,
               auto_pad: bool) -> Tensor:
    """``BiLevelRoutingAttention.forward`` (identity kv downsampling, qkvo, no routing params). x: NHWC."""
    N, H_in, W_in, C = x.shape
    if auto_pad:
        pad_r = (n_win - W_in % n_win) % n_win
        pad_b = (n_win - H_in % n_win) % n_win
        x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
    else:
        assert H_in % n_win == 0 and W_in % n_win == 0
        pad_r = pad_b = 0
    _, H, W, _ = x.shape
    h, w = H // n_win, W // n_win
    # "n (j h) (i w) c -> n (j i) h w c"
    x = x.reshape(N, n_win, h, n_win, w, C).permute(0, 1, 3, 2, 4, 5).reshape(N, n_win * n_win, h, w, C)
    qkv = _lin(sd, p + ".qkv.qkv", x)
    qk_dim = C
    q, kv = qkv[..., :qk_dim], qkv[..., qk_dim:]
    scale = qk_dim ** -0.5
    p2, w2 = n_win * n_win, h * w
    q_pix = q.reshape(N, p2, w2, qk_dim)
    kv_pix = kv.reshape(N, p2, w2, 2 * C)
    q_win, k_win = q.mean([2, 3]), kv[..., :qk_dim].mean([2, 3])  # (N, p2, c)

    v_map = kv[..., qk_dim:].reshape(N, n_win, n_win, h, w, C).permute(0, 5, 1, 3, 2, 4).reshape(N, C, H, W)
    lepe = _dw(sd, p + ".lepe", v_map.contiguous()).permute(0, 2, 3, 1)  # (N, H, W, C)

    logit = (q_win.detach() * scale) @ k_win.detach().transpose(-2, -1)
    _, r_idx = torch.topk(logit, k=topk, dim=-1)  # (N, p2, topk)
    c_kv = kv_pix.shape[-1]
    kv_sel = torch.gather(kv_pix.view(N, 1, p2, w2, c_kv).expand(-1, p2, -1, -1, -1), 2,
                          r_idx.view(N, p2, topk, 1, 1).expand(-1, -1, -1, w2, c_kv))
    k_sel, v_sel = kv_sel[..., :qk_dim], kv_sel[..., qk_dim:]
    m = num_heads
    # 'n p2 k w2 (m c) -> (n p2) m c (k w2)' and 'n p2 k w2 (m c) -> (n p2) m (k w2) c'
    k_sel = k_sel.reshape(N, p2, topk, w2, m, qk_dim // m).permute(0, 1, 4, 5, 2, 3).reshape(N * p2, m, qk_dim // m, topk * w2)
    v_sel = v_sel.reshape(N, p2, topk, w2, m, C // m).permute(0, 1, 4, 2, 3, 5).reshape(N * p2, m, topk * w2, C // m)
    q_pix = q_pix.reshape(N, p2, w2, m, qk_dim // m).permute(0, 1, 3, 2, 4).reshape(N * p2, m, w2, qk_dim // m)
    attn = torch.softmax((q_pix * scale) @ k_sel, dim=-1)
    out = attn @ v_sel  # (N*p2, m, w2, c)
    # '(n j i) m (h w) c -> n (j h) (i w) (m c)'
    out = out.reshape(N, n_win, n_win, m, h, w, C // m).permute(0, 1, 4, 2, 5, 3, 6).reshape(N, H, W, C)
    out = _lin(sd, p + ".wo", out + lepe)
    if pad_r > 0 or pad_b > 0:
        out = out[:, :H_in, :W_in, :].contiguous()
    return out


def attention_lepe(sd: Dict[str, Tensor], p: str, x: Tensor, num_heads: int = 8) -> Tensor:
    """``AttentionLePE.forward``. x: NHWC."""
    _, H, W, _ = x.shape
    x = x.reshape(x.shape[0], H * W, -1)
    B, N, C = x.shape
    qkv = _lin(sd, p + ".qkv", x).reshape(B, N, 3, num_heads, C // num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    lepe = _dw(sd, p + ".lepe", x.transpose(1, 2).reshape(B, C, H, W)).flatten(2).transpose(1, 2)
    attn = ((q @ k.transpose(-2, -1)) * (C // num_heads) ** -0.5).softmax(dim=-1)
    x = (attn @ v).transpose(1, 2).reshape(B, N, C) + lepe
    return _lin(sd, p + ".proj", x).reshape(B, H, W, C)


def official_biformer_forward(
    sd: Dict[str, Tensor],
    x: Tensor,
    depths: Sequence[int],
    dims: Sequence[int],
    topks: Sequence[int] = (1, 4, 16, -2),
    n_win: int = 7,
    head_dim: int = 32,
    layout: str = "biformer",
    auto_pad: bool = False,
    dense: bool = False,
) -> Tensor | List[Tensor]:
    """Logits of ``BiFormer`` / ``BiFormerSTL`` (eval mode), or the four ``BiFormer_mm`` outputs if ``dense``."""
    fc2 = "2" if layout == "stl" else "3"
    outs = []
    for i in range(4):
        p = f"downsample_layers.{i}"
        if layout == "biformer":
            if i == 0:
                x = F.conv2d(x, sd[p + ".0.weight"], sd[p + ".0.bias"], stride=2, padding=1)
                x = F.gelu(_bn(sd, p + ".1", x))
                x = F.conv2d(x, sd[p + ".3.weight"], sd[p + ".3.bias"], stride=2, padding=1)
                x = _bn(sd, p + ".4", x)
            else:
                x = _bn(sd, p + ".1", F.conv2d(x, sd[p + ".0.weight"], sd[p + ".0.bias"], stride=2, padding=1))
        else:
            if i == 0:
                x = _bn(sd, p + ".1", F.conv2d(x, sd[p + ".0.weight"], sd[p + ".0.bias"], stride=4))
            else:
                x = F.conv2d(_bn(sd, p + ".0", x), sd[p + ".1.weight"], sd[p + ".1.bias"], stride=2)
        for b in range(depths[i]):
            bp = f"stages.{i}.blocks.{b}" if layout == "stl" else f"stages.{i}.{b}"
            if layout == "biformer":
                x = x + F.conv2d(x, sd[bp + ".pos_embed.weight"], sd[bp + ".pos_embed.bias"], padding=1, groups=dims[i])
            x = x.permute(0, 2, 3, 1)
            y = _ln(sd, bp + ".norm1", x)
            if topks[i] > 0:
                y = bra_legacy(sd, bp + ".attn", y, dims[i] // head_dim, n_win, topks[i], auto_pad)
            else:
                y = attention_lepe(sd, bp + ".attn", y)
            x = x + y
            y = _lin(sd, bp + ".mlp.0", _ln(sd, bp + ".norm2", x))
            x = x + _lin(sd, bp + f".mlp.{fc2}", F.gelu(y))
            x = x.permute(0, 3, 1, 2)
        if dense:  # timm LayerNorm2d (eps 1e-6) on the output only
            e = f"extra_norms.{i}"
            outs.append(F.layer_norm(x.permute(0, 2, 3, 1), (dims[i],), sd[e + ".weight"], sd[e + ".bias"], 1e-6)
                        .permute(0, 3, 1, 2))
    if dense:
        return outs
    x = _bn(sd, "norm", x)
    return F.linear(x.flatten(2).mean(-1), sd["head.weight"], sd["head.bias"])
