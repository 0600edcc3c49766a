"""Position-embedding resizing (`interpolate_offset`, `interpolate_antialias`) against an explicit computation: the
bicubic weights written out per output position (Keys' cubic convolution, a = -0.75; with antialias the widened
kernel with a = -0.5 that PIL and torch use, normalised per position), not F.interpolate."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from training.vision_transformer import DinoVisionTransformer


def cubic(x: float, a: float) -> float:
    x = abs(x)
    if x < 1:
        return ((a + 2) * x - (a + 3)) * x * x + 1
    if x < 2:
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return 0.0


def weights(n_in: int, n_out: int, offset: float, antialias: bool) -> np.ndarray:
    """(n_out, n_in) resampling matrix of one axis. The reference's offset passes a scale factor (n_out + offset) /
    n_in instead of a size, so source positions step by n_in / (n_out + offset)."""
    step = n_in / (n_out + offset) if offset else n_in / n_out
    w = np.zeros((n_out, n_in))
    for i in range(n_out):
        if antialias:  # support widened by the step when shrinking, weights normalised (PIL)
            support, inv = 2.0 * max(step, 1.0), 1.0 / max(step, 1.0)
            center = step * (i + 0.5)
            lo, hi = max(int(center - support + 0.5), 0), min(int(center + support + 0.5), n_in)
            taps = np.array([cubic((j - center + 0.5) * inv, -0.5) for j in range(lo, hi)])
            w[i, lo:hi] = taps / taps.sum()
        else:  # four taps around the source position, indices clamped at the border
            src = step * (i + 0.5) - 0.5
            x0 = math.floor(src)
            for k in range(-1, 3):
                w[i, min(max(x0 + k, 0), n_in - 1)] += cubic(src - (x0 + k), -0.75)
    return w


@pytest.mark.parametrize("offset", [0.0, 0.1])
@pytest.mark.parametrize("antialias", [False, True])
@pytest.mark.parametrize(("grid", "h", "w"), [(5, 9, 7), (9, 4, 6)])  # larger and smaller, not square
def test_position_embeddings_resized_as_the_explicit_computation(offset, antialias, grid, h, w):
    torch.manual_seed(0)
    model = DinoVisionTransformer(img_size=grid * 4, patch_size=4, embed_dim=8, depth=1, num_heads=2,
                                  interpolate_offset=offset, interpolate_antialias=antialias)
    with torch.no_grad():
        model.pos_embed.normal_()
    tokens = torch.zeros(1, 1 + h * w, 8)
    got = model.interpolate_pos_encoding(tokens, h * 4, w * 4).detach()[0]  # 1 + h*w, D
    table = model.pos_embed.detach()[0, 1:].reshape(grid, grid, 8).double().numpy()  # rows, cols, D
    want = np.einsum("ia,jb,abd->ijd", weights(grid, h, offset, antialias), weights(grid, w, offset, antialias), table)
    torch.testing.assert_close(got[0], model.pos_embed.detach()[0, 0])  # the class token's is never resized
    torch.testing.assert_close(got[1:], torch.from_numpy(want.reshape(h * w, 8)).float(), atol=2e-5, rtol=1e-5)


def test_the_four_conventions_differ():
    """The options matter: each of the four gives other position embeddings at 6 x 6 from a 9 x 9 grid."""
    torch.manual_seed(0)
    out = {}
    for offset in (0.0, 0.1):
        for antialias in (False, True):
            model = DinoVisionTransformer(img_size=36, patch_size=4, embed_dim=8, depth=1, num_heads=2,
                                          interpolate_offset=offset, interpolate_antialias=antialias)
            with torch.no_grad():
                model.pos_embed.copy_(torch.randn(1, 82, 8, generator=torch.Generator().manual_seed(1)))
            out[offset, antialias] = model.interpolate_pos_encoding(torch.zeros(1, 37, 8), 24, 24).detach()
    keys = list(out)
    for i, a in enumerate(keys):
        for b in keys[i + 1:]:
            assert (out[a] - out[b]).abs().max() > 1e-2, (a, b)
