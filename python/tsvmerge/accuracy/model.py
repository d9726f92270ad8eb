"""A small vision transformer whose state dict uses open_clip's names, so CLIP presets and key rules apply.

`Encoder().state_dict()` has exactly the `visual.*` names of open_clip's VisionTransformer
(conv1, class_embedding, positional_embedding, ln_pre, transformer.resblocks.N.{ln_1, attn.in_proj_*,
attn.out_proj.*, ln_2, mlp.c_fc.*, mlp.c_proj.*}, ln_post, proj). Classification heads live
outside the encoder: they are never merged.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import asdict, dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ViTConfig:
    image_size: int = 8
    patch_size: int = 2
    width: int = 64
    layers: int = 4
    heads: int = 4
    mlp_ratio: int = 4
    embed_dim: int = 64

    def to_dict(self) -> dict:
        return asdict(self)


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(width, width * mlp_ratio)),
            ("gelu", nn.GELU()),
            ("c_proj", nn.Linear(width * mlp_ratio, width)),
        ]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(width, heads, mlp_ratio) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x)
        return x


class VisionTransformer(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        grid = cfg.image_size // cfg.patch_size
        scale = cfg.width ** -0.5
        self.conv1 = nn.Conv2d(1, cfg.width, cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(cfg.width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(grid * grid + 1, cfg.width))
        self.ln_pre = nn.LayerNorm(cfg.width)
        self.transformer = Transformer(cfg.width, cfg.layers, cfg.heads, cfg.mlp_ratio)
        self.ln_post = nn.LayerNorm(cfg.width)
        self.proj = nn.Parameter(scale * torch.randn(cfg.width, cfg.embed_dim))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.conv1(images).flatten(2).transpose(1, 2)  # (B, grid*grid, width)
        cls = self.class_embedding.expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], 1) + self.positional_embedding
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(x[:, 0]) @ self.proj


class Encoder(nn.Module):
    """Holds the ViT under `visual` so state-dict names start with `visual.` as in open_clip."""

    def __init__(self, cfg: ViTConfig = ViTConfig()):
        super().__init__()
        self.cfg = cfg
        self.visual = VisionTransformer(cfg)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.visual(images)


def open_clip_names(layers: int) -> list[str]:
    """The open_clip visual state-dict names of a ViT with `layers` blocks (no bias on conv1, as open_clip)."""
    names = ["visual.class_embedding", "visual.positional_embedding", "visual.proj", "visual.conv1.weight",
             "visual.ln_pre.weight", "visual.ln_pre.bias"]
    for i in range(layers):
        p = f"visual.transformer.resblocks.{i}."
        names += [p + s for s in ("ln_1.weight", "ln_1.bias", "attn.in_proj_weight", "attn.in_proj_bias",
                                  "attn.out_proj.weight", "attn.out_proj.bias", "ln_2.weight", "ln_2.bias",
                                  "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias")]
    return names + ["visual.ln_post.weight", "visual.ln_post.bias"]


def encoder_from_state(cfg: ViTConfig, state: dict[str, torch.Tensor]) -> Encoder:
    model = Encoder(cfg)
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return model.eval()
