"""An independent port of the official Vim forward pass (hustvl/Vim, v2 middle-class-token models),
written from the paper and REFERENCE.md's description of ``vim/models_mamba.py`` and the forked
``mamba_ssm`` (``mamba_inner_fn_no_out_proj`` + ``selective_scan_ref``).

It works on an *official-format* state dict (``layers.{i}.*``, ``norm_f``) and keeps the official
structure: fused add + RMSNorm carrying ``residual`` between layers, one sequential scan per
direction on the flipped sequence, ``(y + flip(y_b)) / 2`` before ``out_proj``. It is the yardstick
for the parity tests and for the CPU speed comparison (this is the only path the official code
has on a CPU: the sequential reference scan).
"""
import torch
import torch.nn.functional as F


def selective_scan_ref(u, delta, A, B, C, D, z, delta_bias):
    """mamba's sequential reference: u, delta, z (b, d, l); A (d, n); B, C (b, n, l)."""
    u, delta = u.float(), delta.float()
    delta = F.softplus(delta + delta_bias[:, None])
    deltaA = torch.exp(torch.einsum("bdl,dn->bdln", delta, A))
    deltaB_u = torch.einsum("bdl,bnl,bdl->bdln", delta, B.float(), u)
    x = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    ys = []
    for i in range(u.shape[2]):
        x = deltaA[:, :, i] * x + deltaB_u[:, :, i]
        ys.append(torch.einsum("bdn,bn->bd", x, C[:, :, i].float()))
    y = torch.stack(ys, dim=2) + u * D[:, None]
    return y * F.silu(z.float())


def _rms_norm(x, weight, eps=1e-5):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _mixer(sd, prefix, hidden):
    L = hidden.shape[1]
    xz = (hidden @ sd[prefix + "in_proj.weight"].T).transpose(1, 2)  # (b, 2E, l)

    def one_direction(xz, sfx):
        x, z = xz.chunk(2, dim=1)
        w = sd[f"{prefix}conv1d{sfx}.weight"]
        x = F.silu(F.conv1d(x, w, sd[f"{prefix}conv1d{sfx}.bias"], padding=w.shape[-1] - 1, groups=w.shape[0])[..., :L])
        x_dbl = x.transpose(1, 2) @ sd[f"{prefix}x_proj{sfx}.weight"].T  # (b, l, R+2N)
        dt_w = sd[f"{prefix}dt_proj{sfx}.weight"]
        R, N = dt_w.shape[1], sd[f"{prefix}A{sfx}_log"].shape[1]
        dt, B, C = x_dbl.split([R, N, N], dim=-1)
        delta = (dt @ dt_w.T).transpose(1, 2)
        A = -torch.exp(sd[f"{prefix}A{sfx}_log"].float())
        return selective_scan_ref(x, delta, A, B.transpose(1, 2), C.transpose(1, 2),
                                  sd[f"{prefix}D{sfx}"].float(), z, sd[f"{prefix}dt_proj{sfx}.bias"].float())

    y = one_direction(xz, "")
    y_b = one_direction(xz.flip(-1), "_b")
    return ((y + y_b.flip(-1)) / 2).transpose(1, 2) @ sd[prefix + "out_proj.weight"].T


@torch.no_grad()
def official_vim_forward(sd, img, stride=16):
    """Logits of an official-format Vim state dict ``sd`` for images ``img`` (b, 3, H, W)."""
    x = F.conv2d(img, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=stride)
    x = x.flatten(2).transpose(1, 2)  # (b, M, D)
    token_position = x.shape[1] // 2
    cls = sd["cls_token"].expand(x.shape[0], -1, -1)
    x = torch.cat([x[:, :token_position], cls, x[:, token_position:]], dim=1) + sd["pos_embed"]
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("layers."))
    residual, hidden = None, x
    for i in range(depth):
        residual = hidden if residual is None else residual + hidden
        hidden = _mixer(sd, f"layers.{i}.mixer.", _rms_norm(residual, sd[f"layers.{i}.norm.weight"]))
    out = _rms_norm(residual + hidden, sd["norm_f.weight"])
    return out[:, token_position] @ sd["head.weight"].T + sd["head.bias"]
