"""The three VPT projectors against a direct computation of docs/vpt.md §4.

The reference below is written with explicit tensor operations in float64 (layer norm from
its mean/variance formula, matrix products, the 4x4 stride-4 convolution as a loop over
patches); it reads the projectors' parameters but never calls their submodules.
"""

from __future__ import annotations

import math

import pytest
import torch

from vpt_fast.projectors import ClipProjector, DetectionProjector, SegProjector

H = 64  # LLM hidden size
EPS = 1e-5  # torch.nn.LayerNorm's default epsilon, which the released projectors use
TOL = 1e-5


# ----------------------------------------------------------------------------- reference


def _d(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float64)


def ref_layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    x = _d(x)
    mean = x.sum(-1, keepdim=True) / x.shape[-1]
    var = ((x - mean) ** 2).sum(-1, keepdim=True) / x.shape[-1]
    return (x - mean) / torch.sqrt(var + EPS) * _d(weight) + _d(bias)


def ref_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return _d(x) @ _d(weight).T + _d(bias)


def ref_condition(p, c_raw: torch.Tensor) -> torch.Tensor:
    """c = linear_condition(layernorm_condition(c_raw)) for one (H,) vector."""
    n = ref_layer_norm(c_raw, p.layernorm_condition.weight, p.layernorm_condition.bias)
    return ref_linear(n, p.linear_condition.weight, p.linear_condition.bias)


def ref_mix(h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """One image: h (N, H), c (H,): a = h @ c; h + a[:, None] * c[None, :]."""
    a = h @ c
    return h + a[:, None] * c[None, :]


def ref_dino_tokens(p, d: torch.Tensor) -> torch.Tensor:
    """One image's DINOv2 tokens (N, D) -> (N, H)."""
    n = ref_layer_norm(d, p.layernorm_feature.weight, p.layernorm_feature.bias)
    return ref_linear(n, p.linear_feature.weight, p.linear_feature.bias)


def ref_sam_tokens(p, s: torch.Tensor) -> torch.Tensor:
    """One image's SAM embeddings (C, h, w) -> (h/4 * w/4, H), row-major over the 4x4 patches."""
    x = ref_layer_norm(s.permute(1, 2, 0), p.layernorm_feature.weight, p.layernorm_feature.bias)  # (h, w, C)
    w = _d(p.conv_feature.weight)  # (H, C, 4, 4)
    b = _d(p.conv_feature.bias)
    rows, cols = x.shape[0] // 4, x.shape[1] // 4
    tokens = []
    for i in range(rows):
        for j in range(cols):
            patch = x[4 * i : 4 * i + 4, 4 * j : 4 * j + 4, :]  # (kh, kw, C)
            tokens.append((w * patch.permute(2, 0, 1)[None]).sum(dim=(1, 2, 3)) + b)
    return torch.stack(tokens)


def ref_output(p, tokens: torch.Tensor, c_raw: torch.Tensor | None) -> torch.Tensor:
    tokens = _d(tokens)
    return tokens if c_raw is None else ref_mix(tokens, ref_condition(p, c_raw))


# ----------------------------------------------------------------------------- helpers


def randomize_(
    module: torch.nn.Module, seed: int, condition_scale: float = 0.25, feature_scale: float = 1.0
) -> torch.nn.Module:
    """Random weights far from the default init (gains != 1, biases != 0).

    The condition layer is scaled down so that h + (h.c) c stays of order 1 and an absolute
    fp32 tolerance of 1e-5 is meaningful.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=g)
            if name.startswith("layernorm") and name.endswith("weight"):
                param.copy_(1.0 + 0.3 * noise)
            elif name.endswith("bias"):
                param.copy_(0.3 * noise)
            else:
                scale = condition_scale if name.startswith("linear_condition") else feature_scale
                param.copy_(scale * noise / math.sqrt(param[0].numel()))
    return module.eval()


def poison_(*layers: torch.nn.Module) -> None:
    """Fill layers with NaN: any use of them shows in the output."""
    with torch.no_grad():
        for layer in layers:
            for param in layer.parameters():
                param.fill_(float("nan"))


def max_diff(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert out.dtype == torch.float32
    assert out.shape == ref.shape
    return (out.to(torch.float64) - ref).abs().max().item()


def randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- CLIP


def test_clip_without_control_is_identity_and_ignores_feature_layers():
    p = randomize_(ClipProjector(H), seed=1)
    features = [randn(n, H, seed=10 + n) for n in (5, 9, 1)]
    with torch.no_grad():
        out = p(features)
    assert len(out) == 3
    for o, f in zip(out, features):
        assert torch.equal(o, f)
    poison_(p.layernorm_feature, p.linear_feature)
    with torch.no_grad():
        out = p(features)
    for o, f in zip(out, features):
        assert torch.equal(o, f)


def test_clip_with_control():
    p = randomize_(ClipProjector(H), seed=2)
    features = [randn(n, H, seed=20 + n) for n in (5, 9, 1)]
    control = randn(3, H, seed=3) * 4.0
    refs = [ref_output(p, f, control[i]) for i, f in enumerate(features)]
    poison_(p.layernorm_feature, p.linear_feature)  # not used with control either
    with torch.no_grad():
        out = p(features, control)
    assert len(out) == 3
    for o, r, f in zip(out, refs, features):
        assert max_diff(o, r) <= TOL
        assert not torch.allclose(o, f)  # the control changed something
    # each image uses its own control vector: swapping controls changes the output
    with torch.no_grad():
        swapped = p(features, control[[1, 0, 2]])
    assert not torch.allclose(swapped[0], out[0])
    assert torch.equal(swapped[2], out[2])


# ----------------------------------------------------------------------------- DINO


@pytest.mark.parametrize("tokens", [7, 256])
@pytest.mark.parametrize("with_control", [False, True])
def test_dino(tokens, with_control):
    d_model = 48
    p = randomize_(DetectionProjector(d_model, H), seed=4)
    features = randn(3, tokens, d_model, seed=5) * 2.0 + 0.5
    control = randn(3, H, seed=6) * 3.0 if with_control else None
    with torch.no_grad():
        out = p(features, control)
    assert out.shape == (3, tokens, H)
    for i in range(3):
        ref = ref_output(p, ref_dino_tokens(p, features[i]), None if control is None else control[i])
        assert max_diff(out[i], ref) <= TOL


# ----------------------------------------------------------------------------- SAM


@pytest.mark.parametrize("with_control", [False, True])
def test_sam_small_grid(with_control):
    channels = 32
    p = randomize_(SegProjector(channels, H), seed=7)
    features = randn(2, channels, 8, 12, seed=8) * 2.0 - 0.3
    control = randn(2, H, seed=9) if with_control else None
    poison_(p.linear_feature)  # exists in the checkpoint, not used by SAM's projector
    with torch.no_grad():
        out = p(features, control)
    assert out.shape == (2, 2 * 3, H)
    for i in range(2):
        ref = ref_output(p, ref_sam_tokens(p, features[i]), None if control is None else control[i])
        assert max_diff(out[i], ref) <= TOL


def test_sam_token_order_is_row_major():
    """Token k comes from patch (k // cols, k % cols): changing one patch changes one token."""
    channels = 16
    p = randomize_(SegProjector(channels, H), seed=11)
    base = randn(1, channels, 8, 12, seed=12)
    changed = base.clone()
    changed[:, :, 4:8, 8:12] += 1.0  # patch (row 1, col 2) -> token 1 * 3 + 2 = 5
    with torch.no_grad():
        a, b = p(base)[0], p(changed)[0]
    differs = [k for k in range(6) if not torch.equal(a[k], b[k])]
    assert differs == [5]


def test_sam_released_shape():
    """256 channels on a 64x64 grid -> 256 tokens."""
    channels = 256
    # 4096-term fp32 sums per token: smaller conv weights keep the outputs (and rounding) of order 1
    p = randomize_(SegProjector(channels, H), seed=13, feature_scale=0.5)
    features = randn(1, channels, 64, 64, seed=14)
    control = randn(1, H, seed=15)
    with torch.no_grad():
        out = p(features, control)
    assert out.shape == (1, 256, H)
    ref = ref_output(p, ref_sam_tokens(p, features[0]), control[0])
    assert max_diff(out[0], ref) <= TOL


# ----------------------------------------------------------------------------- bad input


def test_wrong_control_shape():
    clip = ClipProjector(H)
    with pytest.raises(ValueError, match=r"control must be \(images, 64\), got \(2, 65\)"):
        clip([torch.zeros(3, H), torch.zeros(4, H)], torch.zeros(2, H + 1))
    dino = DetectionProjector(32, H)
    with pytest.raises(ValueError, match=r"control must be \(images, 64\), got \(2, 32\)"):
        dino(torch.zeros(2, 7, 32), torch.zeros(2, 32))
    sam = SegProjector(16, H)
    with pytest.raises(ValueError, match=r"control must be \(images, 64\), got \(1, 2, 64\)"):
        sam(torch.zeros(1, 16, 4, 4), torch.zeros(1, 2, H))


def test_control_count_differs_from_image_count():
    clip = ClipProjector(H)
    with pytest.raises(ValueError, match="one control vector per image expected: 2 images, 3 controls"):
        clip([torch.zeros(3, H), torch.zeros(4, H)], torch.zeros(3, H))
    dino = DetectionProjector(32, H)
    with pytest.raises(ValueError, match="one control vector per image expected: 2 images, 1 controls"):
        dino(torch.zeros(2, 7, 32), torch.zeros(1, H))
    sam = SegProjector(16, H)
    with pytest.raises(ValueError, match="one control vector per image expected: 1 images, 2 controls"):
        sam(torch.zeros(1, 16, 4, 4), torch.zeros(2, H))


@pytest.mark.parametrize("grid", [(8, 10), (6, 8), (5, 5)])
def test_sam_grid_not_multiple_of_4(grid):
    sam = SegProjector(16, H)
    with pytest.raises(ValueError, match="SAM embedding grid must be a multiple of 4"):
        sam(torch.zeros(1, 16, *grid))


def test_wrong_feature_shapes():
    with pytest.raises(ValueError, match=r"DINOv2 features must be \(images, tokens, 32\)"):
        DetectionProjector(32, H)(torch.zeros(2, 7, 33))
    with pytest.raises(ValueError, match=r"DINOv2 features must be \(images, tokens, 32\)"):
        DetectionProjector(32, H)(torch.zeros(7, 32))
    with pytest.raises(ValueError, match=r"SAM embeddings must be \(images, 16, h, w\)"):
        SegProjector(16, H)(torch.zeros(1, 8, 4, 4))


@pytest.mark.parametrize(
    "build",
    [lambda: ClipProjector(H, 2), lambda: DetectionProjector(32, H, 2), lambda: SegProjector(16, H, 2)],
    ids=["clip", "dino", "sam"],
)
def test_projector_scale_2_is_refused(build):
    with pytest.raises(ValueError, match="projector_scale must be 1 .*got 2"):
        build()
