"""An independent functional port of the official PartialNet/PATNet forward pass (haiduo/PartialNet,
``models/partialnet.py`` + ``models/irpe.py``, ``auto_div=False``), written from its semantics.

It works on an *official-format* state dict (``stages.{0..6}``, ``avgpool_pre_head.1``, ``head``,
``norm{0,2,4,6}``) and keeps the official structure literally: ``Partial_conv3.forward_atten``
(PAT_ch: SRM then BN; PAT_sf: LayerNorm2d then attention), SRM on ``reshape(b, c, -1).mean/std``,
attention as ``(q * scale) @ k^T + rpe_k`` followed by softmax, iRPE buckets from the official
``piecewise_index`` with boolean masking, PAT_sp's split into ``[dim - int(0.5 * dim), int(0.5 * dim)]``,
and the two block shapes (``split_shortcut`` only for the attention stage). It is the yardstick for
the parity tests.
"""
import math

import torch
import torch.nn.functional as F

_EPS_BN = 1e-5
_EPS_LN = 1e-6


def _bn(sd, prefix, x):
    return F.batch_norm(x, sd[prefix + "running_mean"], sd[prefix + "running_var"], sd[prefix + "weight"],
                        sd[prefix + "bias"], False, 0.0, _EPS_BN)


def _act(name, x):
    return F.gelu(x) if name == "gelu" else F.relu(x)


def _piecewise_index(rp, alpha, beta, gamma):
    """iRPE's ``piecewise_index`` (official irpe.py), float input -> long buckets (before the offset)."""
    rp_abs = rp.abs()
    mask = rp_abs <= alpha
    not_mask = ~mask
    rp_out = rp[not_mask]
    rp_abs_out = rp_abs[not_mask]
    y_out = (torch.sign(rp_out) * (alpha + torch.log(rp_abs_out / alpha) / math.log(gamma / alpha)
                                   * (beta - alpha)).round().clip(max=beta)).to(torch.long)
    idx = rp.clone().round().to(torch.long)
    idx[not_mask] = y_out
    return idx


def official_bucket_ids(height, width, ratio=20):
    """``get_bucket_ids_2d(METHOD.EUCLIDEAN, ...)`` for an iRPE config built with ``ratio``: (L, L) long."""
    alpha, beta, gamma = 1 * ratio, 2 * ratio, 8 * ratio
    rows = torch.arange(height).view(height, 1).repeat(1, width)
    cols = torch.arange(width).view(1, width).repeat(height, 1)
    pos = torch.stack([rows, cols], 2)
    L = height * width
    diff = pos.view(L, 1, 2) - pos.view(1, L, 2)
    dis = diff.square().sum(2).float().sqrt().round()
    return _piecewise_index(dis, alpha, beta, gamma) + int(beta)


def _layer_norm_2d(sd, prefix, x):
    x = x.permute(0, 2, 3, 1)
    x = F.layer_norm(x, (x.shape[-1],), sd[prefix + "weight"], sd[prefix + "bias"], _EPS_LN)
    return x.permute(0, 3, 1, 2)


def _rpe_attention(sd, prefix, x, num_heads):
    B, C, h, w = x.shape
    x = x.reshape(B, C, h * w).transpose(1, 2)
    N = h * w
    qkv = F.linear(x, sd[prefix + "qkv.weight"], sd.get(prefix + "qkv.bias"))
    qkv = qkv.reshape(B, N, 3, num_heads, C // num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    q = q * (C // num_heads) ** -0.5
    attn = q @ k.transpose(-2, -1)
    table = sd[prefix + "rpe_k.lookup_table_bias"]  # (heads, buckets)
    bucket = official_bucket_ids(h, w)
    attn = attn + table[:, bucket.flatten()].view(1, num_heads, N, N)
    attn = attn.softmax(dim=-1)
    out = (attn @ v).transpose(1, 2).reshape(B, N, C)
    out = F.linear(out, sd[prefix + "proj.weight"], sd[prefix + "proj.bias"])
    return out.transpose(1, 2).reshape(B, C, h, w)


def _partial_conv3(sd, prefix, x, channel_type, num_heads):
    dim_conv = sd[prefix + "partial_conv3.weight"].shape[0]
    x1, x2 = torch.split(x, [dim_conv, x.shape[1] - dim_conv], dim=1)
    x1 = F.conv2d(x1, sd[prefix + "partial_conv3.weight"], padding=1)
    if channel_type == "se":
        b, c = x2.shape[:2]
        mean = x2.reshape(b, c, -1).mean(-1).view(b, c, 1, 1)
        std = x2.reshape(b, c, -1).std(-1).view(b, c, 1, 1)
        z = F.conv2d(torch.cat([mean, std], dim=-1), sd[prefix + "attn.cfc1.weight"])
        z = _bn(sd, prefix + "attn.bn.", z)
        x2 = x2 * F.hardsigmoid(z).reshape(b, c, 1, 1)
        x2 = _bn(sd, prefix + "norm.", x2)
    else:
        x2 = _layer_norm_2d(sd, prefix + "norm.", x2)
        x2 = _rpe_attention(sd, prefix + "attn.", x2, num_heads)
    return torch.cat((x1, x2), 1)


def _mlp(sd, prefix, x, act):
    x = F.conv2d(x, sd[prefix + "0.weight"])
    x = _act(act, _bn(sd, prefix + "1.", x))
    x = F.conv2d(x, sd[prefix + "3.weight"])
    if prefix + "4.conv.weight" in sd:  # partial_spatial_attn_layer_reverse
        dim = x.shape[1]
        dim_conv = int(0.5 * dim)
        x1, x2 = torch.split(x, [dim - dim_conv, dim_conv], 1)
        weight = F.hardsigmoid(F.conv2d(x1, sd[prefix + "4.conv_attn.weight"]))
        x1 = _bn(sd, prefix + "4.norm.", x1 * weight)
        x2 = F.conv2d(_bn(sd, prefix + "4.norm2.", x2), sd[prefix + "4.conv.weight"])
        x = torch.cat((x1, x2), 1)
    return x


def official_partialnet_forward(sd, x, act="gelu", num_heads=4, fork_feat=False):
    """Official ``PartialNet.forward_cls`` (or ``forward_det`` with ``fork_feat``) on an official state dict."""
    x = F.conv2d(x, sd["patch_embed.proj.weight"], stride=sd["patch_embed.proj.weight"].shape[-1])
    x = _bn(sd, "patch_embed.norm.", x)
    num_stage_entries = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("stages."))
    outs = []
    for idx in range(num_stage_entries):
        if idx % 2 == 1:  # PatchMerging
            w = sd[f"stages.{idx}.reduction.weight"]
            x = _bn(sd, f"stages.{idx}.norm.", F.conv2d(x, w, stride=w.shape[-1]))
        else:
            channel_type = "se" if idx // 2 <= 2 else "self"
            depth = 1 + max(int(k.split(".")[3]) for k in sd if k.startswith(f"stages.{idx}.blocks."))
            for j in range(depth):
                p = f"stages.{idx}.blocks.{j}."
                if channel_type == "self":  # split_shortcut
                    x = x + _partial_conv3(sd, p + "spatial_mixing.", x, channel_type, num_heads)
                    x = x + _mlp(sd, p + "mlp.", x, act)
                else:
                    shortcut = x
                    x = _partial_conv3(sd, p + "spatial_mixing.", x, channel_type, num_heads)
                    x = shortcut + _mlp(sd, p + "mlp.", x, act)
        if fork_feat and idx in (0, 2, 4, 6):
            outs.append(_bn(sd, f"norm{idx}.", x))
    if fork_feat:
        return outs
    x = F.adaptive_avg_pool2d(x, 1)
    x = _act(act, F.conv2d(x, sd["avgpool_pre_head.1.weight"]))
    return F.linear(torch.flatten(x, 1), sd["head.weight"], sd["head.bias"])
