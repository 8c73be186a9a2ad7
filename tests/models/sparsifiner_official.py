"""An independent functional port of the official Sparsifiner forward (lim142857/Sparsifiner@9a11e26,
``src/models/sparsifiner.py`` and ``sparsifiner_lvvit.py``, eval mode, released config: keep rate 0.25,
basis threshold 0.02, top-8 coefficients, ``REDUCE_N_FACTOR`` 6, no token pruning), written on
official-layout state dicts for parity tests. It computes what the official code computes: the full
score matrix, the ``-inf`` mask with a dense class row, softmax, ``nan_to_num``, ``@ v``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _ln(x, sd, prefix, eps):
    return F.layer_norm(x, x.shape[-1:], sd[prefix + ".weight"], sd[prefix + ".bias"], eps)


def _linear(x, sd, prefix):
    return F.linear(x, sd[prefix + ".weight"], sd.get(prefix + ".bias"))


def _mask(sd, p, q, k, num_heads, keep_rate=0.25, basis_threshold=0.02, coef_topk=8):
    B, H, N, _ = q.shape
    proj_n, proj_back_n = sd[p + "proj_n"], sd[p + "proj_back_n"]
    assert proj_n.shape[0] == N  # the official model fixes N
    qc, kc = _linear(q, sd, p + "proj_c_q"), _linear(k, sd, p + "proj_c_k")
    kc = kc.permute(0, 1, 3, 2) @ proj_n  # (B, H, c, K)
    basis = F.threshold(proj_back_n.permute(1, 0).abs(), basis_threshold, 0.0)
    cheap = ((qc @ kc) * num_heads ** -0.5)[..., 1:, :]
    coef = cheap.softmax(-1)
    top, ti = coef.topk(coef_topk, sorted=False)
    coef = torch.zeros_like(coef).scatter_(-1, ti, top)
    score = coef @ basis  # (B, H, N-1, N)
    idx = torch.topk(score, math.ceil(keep_rate * N), sorted=False)[1]
    mask = torch.zeros_like(score).scatter_(-1, idx, True)
    return torch.cat([torch.ones(B, H, 1, N, dtype=mask.dtype), mask], dim=2)


def _block(x, sd, i, num_heads, eps, skip_lam, q_first_scale):
    p = f"blocks.{i}."
    B, N, C = x.shape
    d = C // num_heads
    h = _ln(x, sd, p + "norm1", eps)
    qkv = _linear(h, sd, p + "attn.qkv").reshape(B, N, 3, num_heads, d).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    mask = _mask(sd, p + "attn.mask_predictor.", q, k, num_heads)
    # DeiT: (q @ k^T) * scale; LV-ViT: (q * scale) @ k^T ("trick to make q@k.t more stable")
    attn = ((q * d ** -0.5) @ k.transpose(-2, -1)) if q_first_scale else (q @ k.transpose(-2, -1)) * d ** -0.5
    attn = attn.masked_fill(~mask.bool(), float("-inf")).softmax(-1)
    attn = torch.nan_to_num(attn)
    h = (attn @ v).transpose(1, 2).reshape(B, N, C)
    x = x + _linear(h, sd, p + "attn.proj") / skip_lam
    h = _linear(F.gelu(_linear(_ln(x, sd, p + "norm2", eps), sd, p + "mlp.fc1")), sd, p + "mlp.fc2")
    return x + h / skip_lam


def official_sparsifiner_deit_forward(sd, x, num_heads=6):
    """Official ``Sparsifiner`` (DeiT base) eval logits."""
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    x = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=16).flatten(2).transpose(1, 2)
    x = torch.cat([sd["cls_token"].expand(x.shape[0], -1, -1), x], dim=1) + sd["pos_embed"]
    for i in range(depth):
        x = _block(x, sd, i, num_heads, 1e-6, 1.0, False)
    return _linear(_ln(x, sd, "norm", 1e-6)[:, 0], sd, "head")


def official_sparsifiner_lvvit_forward(sd, x, num_heads=6):
    """Official ``SparsifinerLVViT`` eval logits: ``head(cls) + 0.5 * max_tokens(aux_head(tokens))``."""
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))

    def bn(x, name):
        return F.batch_norm(x, sd[name + ".running_mean"], sd[name + ".running_var"], sd[name + ".weight"],
                            sd[name + ".bias"], False, 0.0, 1e-5)

    x = F.relu(bn(F.conv2d(x, sd["patch_embed.conv1.weight"], stride=2, padding=3), "patch_embed.bn1"))
    x = F.relu(bn(F.conv2d(x, sd["patch_embed.conv2.weight"], padding=1), "patch_embed.bn2"))
    x = F.relu(bn(F.conv2d(x, sd["patch_embed.conv3.weight"], padding=1), "patch_embed.bn3"))
    x = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=8).flatten(2).transpose(1, 2)
    x = torch.cat([sd["cls_token"].expand(x.shape[0], -1, -1), x], dim=1) + sd["pos_embed"]
    for i in range(depth):
        x = _block(x, sd, i, num_heads, 1e-5, 2.0, True)
    x = _ln(x, sd, "norm", 1e-5)
    return _linear(x[:, 0], sd, "head") + 0.5 * _linear(x[:, 1:], sd, "aux_head").max(1)[0]
