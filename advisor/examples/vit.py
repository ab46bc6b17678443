"""A small vision transformer on scikit-learn's bundled digits: the workload for GPUs.

Patch embedding, ``depth`` pre-norm encoder blocks (the stages checkpointing picks), a
class token and a linear head. Its attention and MLP layers are ``nn.Linear``, so torchao's
quantization modes apply. Two sizes, as two build functions (``--model`` takes no
arguments): ``build`` is CPU-friendly, ``build_gpu`` upsamples the images and widens the
model until a GPU has real work to do.

    advisor run --model advisor.examples.vit:build
    advisor run --model advisor.examples.vit:build_gpu --device cuda
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

import advisor
from advisor.examples.digits import datasets


class Attention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """``keep`` ([batch, tokens], True for a token) masks padding as a key, so no token
        attends to it (every row must keep one)."""
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        mask = None if keep is None else keep[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    """Pre-norm encoder block: x + attention(norm(x)), then x + MLP(norm(x))."""

    def __init__(self, width: int, heads: int, mlp_ratio: int = 4) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(width), Attention(width, heads)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_ratio * width), nn.GELU(),
                                 nn.Linear(mlp_ratio * width, width))

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), keep)
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    def __init__(self, image: int = 8, patch: int = 2, width: int = 64, depth: int = 4, heads: int = 4,
                 classes: int = 10) -> None:
        super().__init__()
        if image % patch or width % heads:
            raise ValueError(f"image {image} must be a multiple of patch {patch}, width {width} of heads {heads}")
        self.patch = nn.Conv2d(1, width, patch, stride=patch)
        tokens = (image // patch) ** 2
        self.cls = nn.Parameter(torch.zeros(1, 1, width))
        self.pos = nn.Parameter(torch.randn(1, tokens + 1, width) * 0.02)
        self.blocks = nn.Sequential(*(Block(width, heads) for _ in range(depth)))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        return self.head(self.norm(self.blocks(x))[:, 0])


def _resized(split: TensorDataset, image: int) -> TensorDataset:
    images, labels = split.tensors
    if images.shape[-1] != image:
        images = F.interpolate(images, size=(image, image), mode="bilinear", align_corners=False)
    return TensorDataset(images.contiguous(), labels)


def _workload(image: int, patch: int, width: int, depth: int, heads: int, batch_size: int,
              name: str) -> advisor.Workload:
    torch.manual_seed(0)
    train, val = datasets()
    return advisor.Workload(model=ViT(image, patch, width, depth, heads), train=_resized(train, image),
                            val=_resized(val, image), batch_size=batch_size, name=name)


def build() -> advisor.Workload:
    """CPU-friendly: 8x8 images in 2x2 patches (17 tokens), width 64, 4 blocks (0.2M parameters)."""
    return _workload(image=8, patch=2, width=64, depth=4, heads=4, batch_size=64, name="digits-vit")


def build_gpu() -> advisor.Workload:
    """Sized for one GPU: images upsampled to 32x32 in 4x4 patches (65 tokens), width 384,
    8 blocks (14M parameters), batch 256."""
    return _workload(image=32, patch=4, width=384, depth=8, heads=6, batch_size=256, name="digits-vit-gpu")
