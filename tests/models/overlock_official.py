"""An independent functional port of the official OverLoCK forward (LMMMEng/OverLoCK ``models/overlock.py``
and the dense backbones' ``forward_features``), evaluated on an **official-layout** state dict.

It follows the official op order literally: ``(q . k)`` then the ``weight_proj`` 1x1 conv over the region
axis, the official ``apply_rpb`` (repeat_interleave + flip), ``scale_factor=2`` context upsampling, the
small-map resize, and a pure-PyTorch stand-in for NATTEN 0.17's ``na2d_av`` (``contmix.py``'s fallback:
unfold the valid windows, replicate-pad them to every pixel). Train-form (dilated branches present) and
``_reparam`` state dicts both run. Used for parity tests and as the CPU benchmark baseline.
"""
from __future__ import annotations

from typing import Dict, List

import torch
import torch.nn.functional as F

_BRANCHES = {17: ((5, 7, 9, 3, 3, 3), (1, 1, 2, 4, 5, 7)), 15: ((5, 7, 7, 3, 3, 3), (1, 1, 2, 3, 5, 7)),
             13: ((5, 7, 7, 3, 3, 3), (1, 1, 2, 3, 4, 5)), 7: ((5, 3, 3, 3), (1, 1, 2, 3)), 5: ((3, 3), (1, 2))}

OFFICIAL_CFGS = {
    "overlock_xt": dict(depth=[2, 2, 3, 2], sub_depth=[6, 2], dims=[56, 112, 256, 336], heads=[4, 6],
                        kernels=[17, 15, 13, 7], smk=5),
    "test_overlock": dict(depth=[1, 1, 1, 1], sub_depth=[1, 1], dims=[16, 24, 32, 48], heads=[2, 2],
                          kernels=[7, 5, 7, 5], smk=3),
}


def na2d_av_standin(attn: torch.Tensor, value: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """attn (B, G, H, W, K*K), value (B, G, H, W, c): unfold valid windows, replicate-pad to every pixel."""
    B, G, H, W, c = value.shape
    K = kernel_size
    v = value.permute(0, 1, 4, 2, 3).reshape(B * G, c, H, W)
    win = F.unfold(v, K).reshape(B * G, c * K * K, H - K + 1, W - K + 1)
    win = F.pad(win, [K // 2] * 4, mode="replicate").reshape(B, G, c, K * K, H, W)
    return torch.einsum("bghwk,bgckhw->bghwc", attn, win)


def _bn(x, sd, p):
    return F.batch_norm(x, sd[p + "running_mean"], sd[p + "running_var"], sd[p + "weight"], sd[p + "bias"],
                        False, 0.0, 1e-5)


def _conv(x, sd, p, stride=1, padding=0, groups=1, dilation=1):
    return F.conv2d(x, sd[p + "weight"], sd.get(p + "bias"), stride, padding, dilation, groups)


def _ln(x, sd, p):
    y = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), sd[p + "weight"], sd[p + "bias"], 1e-6)
    return y.permute(0, 3, 1, 2).contiguous()


def _grn(x, sd, p):
    gx = torch.norm(x, p=2, dim=(-1, -2), keepdim=True)
    nx = gx / (gx.mean(dim=1, keepdim=True) + 1e-6)
    return (sd[p + "gamma"] * nx + 1) * x + sd[p + "beta"]


def _se(x, sd, p):
    y = F.adaptive_avg_pool2d(x, 1)
    y = torch.sigmoid(_conv(F.gelu(_conv(y, sd, p + "proj.1.")), sd, p + "proj.3."))
    return x * y


def _ls(x, sd, p):
    return F.conv2d(x, sd[p + "weight"], sd[p + "bias"], groups=x.shape[1])


def _resdw(x, sd, p):
    k = sd[p + "weight"].shape[-1]
    return x + _conv(x, sd, p, padding=k // 2, groups=x.shape[1])


def _dilated(x, sd, p, K):
    C = x.shape[1]
    if p + "origin_bn.weight" not in sd:  # _reparam file
        return _conv(x, sd, p + "lk_origin.", padding=K // 2, groups=C)
    out = _bn(_conv(x, sd, p + "lk_origin.", padding=K // 2, groups=C), sd, p + "origin_bn.")
    for k, r in zip(*_BRANCHES[K]):
        y = _conv(x, sd, f"{p}dil_conv_k{k}_{r}.", padding=(r * (k - 1) + 1) // 2, groups=C, dilation=r)
        out = out + _bn(y, sd, f"{p}dil_bn_k{k}_{r}.")
    return out


def _repconv(x, sd, p, K, has_ls):
    x = _resdw(x, sd, p + "dwconv.")
    y = _bn(_dilated(_ln(x, sd, p + "proj.0."), sd, p + "proj.1.", K), sd, p + "proj.2.")
    y = F.gelu(_conv(_se(y, sd, p + "proj.3."), sd, p + "proj.4."))
    y = _conv(_grn(_resdw(y, sd, p + "proj.6."), sd, p + "proj.7."), sd, p + "proj.8.")
    return (_ls(x, sd, p + "ls.") if has_ls else x) + y


def _apply_rpb(attn, rpb, H, W, K, G):
    idx = torch.arange(K)
    idx_k = ((idx.unsqueeze(-1) * (2 * K - 1)) + idx).view(-1)
    rep_h, rep_w = torch.ones(K, dtype=torch.long), torch.ones(K, dtype=torch.long)
    rep_h[K // 2], rep_w[K // 2] = H - (K - 1), W - (K - 1)
    bias_hw = idx.repeat_interleave(rep_h).unsqueeze(-1) * (2 * K - 1) + idx.repeat_interleave(rep_w)
    bias_idx = torch.flip((bias_hw.unsqueeze(-1) + idx_k).reshape(-1, K * K), [0])
    return attn + torch.flatten(rpb, 1, 2)[:, bias_idx].reshape(1, G, H, W, K * K)


def _contmix(x, h_x, h_r, sd, p, K, smk, heads, is_first, is_last, na2d_av):
    B, C, H, W = x.shape
    C_h = h_x.shape[1]
    G = heads * 2
    in_res = (H, W)
    if not is_first:
        h_x = _ls(h_x, sd, p + "x_scale.") + _ls(h_r, sd, p + "h_scale.")
    x_f = _resdw(torch.cat([x, h_x], 1), sd, p + "dwconv1.")
    identity = x_f
    x_f = _ln(x_f, sd, p + "norm1.")
    x = _conv(x_f, sd, p + "fusion.0.", padding=1, groups=x_f.shape[1])
    x = _grn(_conv(F.gelu(_bn(x, sd, p + "fusion.1.")), sd, p + "fusion.3."), sd, p + "fusion.4.")
    gate = F.silu(_bn(_conv(x, sd, p + "gate.0."), sd, p + "gate.1."))
    lepe = _bn(_dilated(x, sd, p + "lepe.0.", K), sd, p + "lepe.1.")
    is_pad = False
    if min(H, W) < K:
        is_pad = True
        size = (K, int(K / H * W)) if H < W else (int(K / W * H), K)
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        x_f = F.interpolate(x_f, size=size, mode="bilinear", align_corners=False)
        H, W = size
    query, key = torch.split(x_f, [C, C_h], dim=1)
    query = _bn(_conv(query, sd, p + "weight_query.0."), sd, p + "weight_query.1.") * (C // G) ** -0.5
    key = _bn(_conv(F.adaptive_avg_pool2d(key, 7), sd, p + "weight_key.1."), sd, p + "weight_key.2.")
    query = query.reshape(B, G, -1, H * W)
    key = key.reshape(B, G, -1, 49)
    weight = torch.einsum("bgcn,bgcl->bgnl", query, key).permute(0, 3, 1, 2).contiguous()  # b l g n
    weight = _conv(weight, sd, p + "weight_proj.")  # (B, smk^2 + K^2, G, HW)
    weight = weight.permute(0, 2, 3, 1).reshape(B, G, H, W, -1)
    attn1, attn2 = torch.split(weight, [smk ** 2, K ** 2], dim=-1)
    attn1 = torch.softmax(_apply_rpb(attn1, sd[p + "rpb1"], H, W, smk, G), -1)
    attn2 = torch.softmax(_apply_rpb(attn2, sd[p + "rpb2"], H, W, K, G), -1)
    value = x.reshape(B, 2, G, -1, H, W).permute(1, 0, 2, 4, 5, 3)
    x = torch.cat([na2d_av(attn1, value[0], smk), na2d_av(attn2, value[1], K)], dim=1)
    x = x.permute(0, 1, 4, 2, 3).reshape(B, C, H, W)
    if is_pad:
        x = F.adaptive_avg_pool2d(x, in_res)
    x = _bn(_conv(x, sd, p + "dyconv_proj.0."), sd, p + "dyconv_proj.1.")
    x = _se(x + lepe, sd, p + "se_layer.")
    x = _conv(_bn(gate * x, sd, p + "proj.0."), sd, p + "proj.1.")
    x = _ls(identity, sd, p + "ls1.") + x
    x = _resdw(x, sd, p + "dwconv2.")
    y = _ln(x, sd, p + "norm2.")
    y = _resdw(F.gelu(_conv(y, sd, p + "mlp.0.")), sd, p + "mlp.2.")
    x = _ls(x, sd, p + "ls2.") + _conv(_grn(y, sd, p + "mlp.3."), sd, p + "mlp.4.")
    if is_last:
        return x, None
    return torch.split(x, [C, C_h], dim=1)


@torch.no_grad()
def official_overlock_forward(sd: Dict[str, torch.Tensor], x: torch.Tensor, cfg: dict, dense: bool = False,
                              det: bool = False, na2d_av=na2d_av_standin):
    """Logits and aux logits (classification) or the four dense outputs (``dense=True``; ``det`` adds h_proj)."""
    sd = {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}
    depth, sub_depth, K, smk, heads = cfg["depth"], cfg["sub_depth"], cfg["kernels"], cfg["smk"], cfg["heads"]
    ls_stage = [False, False, True, True]
    outs: List[torch.Tensor] = []
    for i, (conv, bn, act) in enumerate(zip((0, 3, 6, 9), (1, 4, 7, 10), (True, True, True, False))):
        x = _bn(_conv(x, sd, f"patch_embed1.{conv}.", stride=2 if i in (0, 2) else 1, padding=1), sd,
                f"patch_embed1.{bn}.")
        x = F.gelu(x) if act else x
    for s in range(4):
        if s > 0:
            x_in = x
            x = _bn(_conv(x_in, sd, f"patch_embed{s + 1}.0.", stride=2, padding=1), sd, f"patch_embed{s + 1}.1.")
        for j in range(depth[s]):
            x = _repconv(x, sd, f"blocks{s + 1}.{j}.", K[s], ls_stage[s])
        if s < 2 and dense:
            outs.append(_ln(x, sd, f"extra_norm.{s}."))
        if s == 2:
            x3 = x
    ctx = x
    ctx_cls = ctx
    x = x3
    ctx_ori = _conv(ctx, sd, "high_level_proj.")
    if dense:
        ctx_up = F.interpolate(ctx_ori, size=x.shape[2:], mode="bilinear", align_corners=False)
    else:
        ctx_up = F.interpolate(ctx_ori, scale_factor=2, mode="bilinear", align_corners=False)
    h = ctx_up
    for j in range(sub_depth[0]):
        x, h = _contmix(x, h, ctx_up, sd, f"sub_blocks3.{j}.", K[2], smk, heads[0], j == 0, False, na2d_av)
    if dense:
        outs.append(_ln(torch.cat([x, h], 1), sd, "extra_norm.2."))
    x = _bn(_conv(x, sd, "patch_embedx.x_proj.0.", stride=2, padding=1), sd, "patch_embedx.x_proj.1.")
    h = _bn(_conv(h, sd, "patch_embedx.h_proj.0.", stride=2, padding=1), sd, "patch_embedx.h_proj.1.")
    for j in range(sub_depth[1]):
        x, h = _contmix(x, h, ctx_ori, sd, f"sub_blocks4.{j}.", K[3], smk, heads[1], False,
                        j == sub_depth[1] - 1, na2d_av)
    if dense:
        out = _ln(x, sd, "extra_norm.3.")
        if det:
            out = out + _ls(_conv(_ln(ctx_cls, sd, "extra_norm.4."), sd, "h_proj.0."), sd, "h_proj.1.")
        return outs + [out]
    y = F.silu(_bn(_conv(x, sd, "head.0."), sd, "head.1."))
    logits = _conv(F.adaptive_avg_pool2d(y, 1), sd, "head.4.").flatten(1)
    aux = None
    if "aux_head.0.weight" in sd:
        aux = _conv(F.adaptive_avg_pool2d(_bn(ctx_cls, sd, "aux_head.0."), 1), sd, "aux_head.2.").flatten(1)
    return logits, aux


def to_official(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """visionzoo keys -> the official layout (head.{0,1,4}, aux_head.{0,2} as 1x1 convs, extra_norm)."""
    out = {}
    for k, v in state_dict.items():
        v = v.clone()
        if k.startswith("conv_head."):
            k = "head.0." + k[len("conv_head."):]
        elif k.startswith("norm_head."):
            k = "head.1." + k[len("norm_head."):]
        elif k.startswith("head."):
            k, v = "head.4." + k[len("head."):], (v[:, :, None, None] if v.ndim == 2 else v)
        elif k.startswith("aux_head.norm."):
            k = "aux_head.0." + k[len("aux_head.norm."):]
        elif k.startswith("aux_head.fc."):
            k, v = "aux_head.2." + k[len("aux_head.fc."):], (v[:, :, None, None] if v.ndim == 2 else v)
        elif k.startswith("feature_norms."):
            k = "extra_norm." + k[len("feature_norms."):]
        out[k] = v
    return out
