"""An independent, deliberately naive DINOv2 ViT forward over an official-format state dict (plain torch ops).

Written from the reference description (dinov2_reference.md §1.5), not from training/: patch embedding as an
explicit unfold + matmul, LayerNorm from mean/variance, attention as softmax(q k^T / sqrt(d)) v per head.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def layer_norm(x, w, b, eps=1e-6):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def gelu(x):
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def patch_embed(img, w, b):
    bsz, c, h, wd = img.shape
    p = w.shape[-1]
    patches = img.reshape(bsz, c, h // p, p, wd // p, p).permute(0, 2, 4, 1, 3, 5).reshape(bsz, -1, c * p * p)
    return patches @ w.reshape(w.shape[0], -1).T + b


def pos_embed_for(pe, h0, w0, offset, antialias):
    n = pe.shape[1] - 1
    m = round(math.sqrt(n))
    if m == h0 == w0:
        return pe
    dtype, pe = pe.dtype, pe.float()  # the reference interpolates in fp32
    grid = pe[:, 1:].reshape(1, m, m, -1).permute(0, 3, 1, 2)
    if offset:
        grid = F.interpolate(grid, scale_factor=((h0 + offset) / m, (w0 + offset) / m), mode="bicubic",
                             antialias=antialias)
    else:
        grid = F.interpolate(grid, size=(h0, w0), mode="bicubic", antialias=antialias)
    return torch.cat([pe[:, :1], grid.permute(0, 2, 3, 1).reshape(1, h0 * w0, -1)], dim=1).to(dtype)


def attention(x, sd, pre, heads):
    bsz, n, d = x.shape
    qkv = x @ sd[pre + "qkv.weight"].T + sd[pre + "qkv.bias"]
    q, k, v = (t.reshape(bsz, n, heads, d // heads).transpose(1, 2) for t in qkv.split(d, dim=-1))
    attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // heads), dim=-1)
    o = (attn @ v).transpose(1, 2).reshape(bsz, n, d)
    return o @ sd[pre + "proj.weight"].T + sd[pre + "proj.bias"]


def ffn(x, sd, pre):
    if pre + "w12.weight" in sd:
        x1, x2 = (x @ sd[pre + "w12.weight"].T + sd[pre + "w12.bias"]).chunk(2, dim=-1)
        return (x1 * torch.sigmoid(x1) * x2) @ sd[pre + "w3.weight"].T + sd[pre + "w3.bias"]
    h = gelu(x @ sd[pre + "fc1.weight"].T + sd[pre + "fc1.bias"])
    return h @ sd[pre + "fc2.weight"].T + sd[pre + "fc2.bias"]


def forward(sd, img, heads, masks=None, offset=0.1, antialias=False):
    """Returns (output dict like forward_features, list of every block's output)."""
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    p = sd["patch_embed.proj.weight"].shape[-1]
    x = patch_embed(img, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"])
    if masks is not None:
        x = x.clone()
        x[masks] = sd["mask_token"][0]
    x = torch.cat([sd["cls_token"].expand(x.shape[0], -1, -1), x], dim=1)
    x = x + pos_embed_for(sd["pos_embed"], img.shape[2] // p, img.shape[3] // p, offset, antialias)
    r = sd["register_tokens"].shape[1] if "register_tokens" in sd else 0
    if r:
        x = torch.cat([x[:, :1], sd["register_tokens"].expand(x.shape[0], -1, -1), x[:, 1:]], dim=1)
    per_block = []
    for i in range(depth):
        b = f"blocks.{i}."
        h = layer_norm(x, sd[b + "norm1.weight"], sd[b + "norm1.bias"])
        x = x + sd[b + "ls1.gamma"] * attention(h, sd, b + "attn.", heads)
        h = layer_norm(x, sd[b + "norm2.weight"], sd[b + "norm2.bias"])
        x = x + sd[b + "ls2.gamma"] * ffn(h, sd, b + "mlp.")
        per_block.append(x)
    xn = layer_norm(x, sd["norm.weight"], sd["norm.bias"])
    out = {"x_norm_clstoken": xn[:, 0], "x_norm_regtokens": xn[:, 1:r + 1], "x_norm_patchtokens": xn[:, r + 1:],
           "x_prenorm": x}
    return out, per_block


def released_shapes(dim, depth, patch=14, grid=37, registers=0, swiglu_hidden=None):
    """Key -> shape of a released `dinov2_vit*14[_reg4]_pretrain.pth` (reference §1.5)."""
    shapes = {"cls_token": (1, 1, dim), "pos_embed": (1, grid * grid + 1, dim), "mask_token": (1, dim),
              "patch_embed.proj.weight": (dim, 3, patch, patch), "patch_embed.proj.bias": (dim,)}
    if registers:
        shapes["register_tokens"] = (1, registers, dim)
    for i in range(depth):
        b = f"blocks.{i}."
        shapes.update({b + "norm1.weight": (dim,), b + "norm1.bias": (dim,),
                       b + "attn.qkv.weight": (3 * dim, dim), b + "attn.qkv.bias": (3 * dim,),
                       b + "attn.proj.weight": (dim, dim), b + "attn.proj.bias": (dim,), b + "ls1.gamma": (dim,),
                       b + "norm2.weight": (dim,), b + "norm2.bias": (dim,), b + "ls2.gamma": (dim,)})
        if swiglu_hidden:
            shapes.update({b + "mlp.w12.weight": (2 * swiglu_hidden, dim), b + "mlp.w12.bias": (2 * swiglu_hidden,),
                           b + "mlp.w3.weight": (dim, swiglu_hidden), b + "mlp.w3.bias": (dim,)})
        else:
            shapes.update({b + "mlp.fc1.weight": (4 * dim, dim), b + "mlp.fc1.bias": (4 * dim,),
                           b + "mlp.fc2.weight": (dim, 4 * dim), b + "mlp.fc2.bias": (dim,)})
    shapes.update({"norm.weight": (dim,), "norm.bias": (dim,)})
    return shapes


def random_state(shapes, seed=0, dtype=torch.float64):
    """Random tensors with released shapes; gains near 1 so that every block matters."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, shape in shapes.items():
        t = torch.randn(shape, generator=g, dtype=dtype)
        if k.endswith(("norm1.weight", "norm2.weight", "norm.weight")):
            t = 1.0 + 0.1 * t
        elif k.endswith("gamma"):
            t = 0.5 + 0.1 * t
        elif k.endswith("weight") and len(shape) >= 2:
            t = t * (1.0 / math.sqrt(math.prod(shape[1:])))
        else:
            t = 0.1 * t
        out[k] = t
    return out
