"""The three VPT projectors (docs/vpt.md §4), with the released weight names.

Each projector maps the features of one re-encoded image to (N, H) LLM input
embeddings. With a control vector c_raw (the first-pass hidden state at
`<|X_action_start|>`, one per image), c = linear_condition(layernorm_condition(c_raw))
and every token gets c added, scaled by its own dot product with c:
    out = h + (h @ c)[:, None] * c[None, :]
"""

from __future__ import annotations

import torch
from torch import nn


def _mix_control(h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """h (B, N, H), c (B, H) -> h + (h.c) c, per image."""
    attention = torch.einsum("bnh,bh->bn", h, c)
    return h + attention[:, :, None] * c[:, None, :]


class _ControlProjector(nn.Module):
    """Holds the four released layers shared by every projector."""

    def __init__(self, feature_dim: int, hidden_size: int, projector_scale: int = 1):
        super().__init__()
        if projector_scale != 1:
            raise ValueError(
                f"projector_scale must be 1 (every released VPT checkpoint uses 1), got {projector_scale}"
            )
        self.hidden_size = hidden_size
        self.feature_dim = feature_dim
        self.layernorm_feature = nn.LayerNorm(feature_dim)
        self.linear_feature = nn.Linear(feature_dim, hidden_size)
        self.layernorm_condition = nn.LayerNorm(hidden_size)
        self.linear_condition = nn.Linear(hidden_size, hidden_size)

    def condition(self, control: torch.Tensor) -> torch.Tensor:
        """c_raw (B, H) -> c (B, H)."""
        if control.dim() != 2 or control.shape[-1] != self.hidden_size:
            raise ValueError(f"control must be (images, {self.hidden_size}), got {tuple(control.shape)}")
        return self.linear_condition(self.layernorm_condition(control))

    def _finish(self, h: torch.Tensor, control: torch.Tensor | None) -> torch.Tensor:
        if control is None:
            return h
        if control.shape[0] != h.shape[0]:
            raise ValueError(f"one control vector per image expected: {h.shape[0]} images, {control.shape[0]} controls")
        return _mix_control(h, self.condition(control.to(h.dtype)))


class ClipProjector(_ControlProjector):
    """`clip_projector`: features are Qwen2-VL's own merged vision features (N, H).

    Without control the features pass through unchanged: the released class builds
    layernorm_feature / linear_feature but never applies them.
    """

    def __init__(self, hidden_size: int, projector_scale: int = 1):
        super().__init__(hidden_size, hidden_size, projector_scale)

    def forward(self, features: list[torch.Tensor], control: torch.Tensor | None = None) -> list[torch.Tensor]:
        """features: one (N_i, H) tensor per image; control (images, H) or None."""
        if control is None:
            return list(features)
        if control.shape[0] != len(features):
            raise ValueError(f"one control vector per image expected: {len(features)} images, {control.shape[0]} controls")
        c = self.condition(control.to(features[0].dtype))
        return [_mix_control(f[None], c[i : i + 1])[0] for i, f in enumerate(features)]


class DetectionProjector(_ControlProjector):
    """`detection_projector`: DINOv2 patch tokens (B, 256, D) -> (B, 256, H)."""

    def forward(self, features: torch.Tensor, control: torch.Tensor | None = None) -> torch.Tensor:
        if features.dim() != 3 or features.shape[-1] != self.feature_dim:
            raise ValueError(f"DINOv2 features must be (images, tokens, {self.feature_dim}), got {tuple(features.shape)}")
        h = self.linear_feature(self.layernorm_feature(features))
        return self._finish(h, control)


class SegProjector(_ControlProjector):
    """`seg_projector`: SAM image embeddings (B, C, 64, 64) -> (B, 256, H).

    LayerNorm over channels (channels-last), a 4x4 stride-4 convolution to (H, 16, 16),
    tokens in row-major (h, w) order. `linear_feature` exists in the checkpoint but is
    not used by the released model.
    """

    def __init__(self, feature_dim: int, hidden_size: int, projector_scale: int = 1):
        super().__init__(feature_dim, hidden_size, projector_scale)
        self.conv_feature = nn.Conv2d(feature_dim, hidden_size, kernel_size=4, stride=4)

    def forward(self, features: torch.Tensor, control: torch.Tensor | None = None) -> torch.Tensor:
        if features.dim() != 4 or features.shape[1] != self.feature_dim:
            raise ValueError(f"SAM embeddings must be (images, {self.feature_dim}, h, w), got {tuple(features.shape)}")
        if features.shape[2] % 4 or features.shape[3] % 4:
            raise ValueError(f"SAM embedding grid must be a multiple of 4, got {tuple(features.shape[2:])}")
        x = self.layernorm_feature(features.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        x = self.conv_feature(x)  # (B, H, h/4, w/4)
        h = x.flatten(2).transpose(1, 2)  # (B, tokens, H), row-major (h, w)
        return self._finish(h, control)
