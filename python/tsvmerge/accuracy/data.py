"""Real data for the accuracy benchmark: scikit-learn's handwritten digits and the tasks built on them.

Every task sees the same digit images under a fixed transform of the pixels or a grouping of the
labels. Because each transform rewires which pixels carry which strokes, the tasks need different
features from one shared encoder: they compete for it, which is what makes merging non-trivial.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

SIDE = 8  # digits are 8x8, values 0..16
SPLIT_SEED = 0
SPLIT_FRACTIONS = (0.6, 0.15, 0.25)  # train / val / test


@dataclass(frozen=True)
class Task:
    name: str
    description: str
    transform: Callable[[torch.Tensor], torch.Tensor]  # (B, 1, 8, 8) -> (B, 1, 8, 8)
    labels: Callable[[torch.Tensor], torch.Tensor]  # digit 0..9 -> class index
    num_classes: int


def _permutation(seed: int) -> Callable[[torch.Tensor], torch.Tensor]:
    order = torch.from_numpy(np.random.default_rng(seed).permutation(SIDE * SIDE))
    return lambda x: x.flatten(1)[:, order].view_as(x)


def _digits(y):
    return y


def _parity(y):
    return y % 2


def _mod3(y):
    return y % 3


# The first eight form the 8-task benchmark; all of them form the full one.
TASKS: tuple[Task, ...] = (
    Task("rot90", "rotated 90 degrees", lambda x: torch.rot90(x, 1, (2, 3)), _digits, 10),
    Task("rot180", "rotated 180 degrees", lambda x: torch.rot90(x, 2, (2, 3)), _digits, 10),
    Task("rot270", "rotated 270 degrees", lambda x: torch.rot90(x, 3, (2, 3)), _digits, 10),
    Task("hflip", "mirrored left-right", lambda x: torch.flip(x, (3,)), _digits, 10),
    Task("vflip", "mirrored top-bottom", lambda x: torch.flip(x, (2,)), _digits, 10),
    Task("invert", "negative image", lambda x: 1.0 - x, _digits, 10),
    Task("permA", "fixed random pixel permutation A", _permutation(101), _digits, 10),
    Task("permB", "fixed random pixel permutation B", _permutation(102), _digits, 10),
    Task("transpose", "transposed (mirrored on the diagonal)", lambda x: x.transpose(2, 3), _digits, 10),
    Task("roll", "cyclic shift by 4 pixels both ways (halves swapped)",
         lambda x: torch.roll(x, (4, 4), (2, 3)), _digits, 10),
    Task("permC-parity", "fixed pixel permutation C, labels grouped even/odd", _permutation(103), _parity, 2),
    Task("invrot90-mod3", "negative rotated 90 degrees, labels grouped by digit mod 3",
         lambda x: 1.0 - torch.rot90(x, 1, (2, 3)), _mod3, 3),
)


@dataclass
class Split:
    images: torch.Tensor  # (N, 1, 8, 8) in [0, 1], untransformed
    digits: torch.Tensor  # (N,) 0..9
    index: torch.Tensor  # (N,) positions in load_digits()


def load_splits() -> dict[str, Split]:
    """Stratified train/val/test split of all 1797 digits with a fixed seed; test is never used to choose anything."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = data.images.astype(np.float32) / 16.0
    y = data.target.astype(np.int64)
    idx = np.arange(len(y))
    train_frac, val_frac, test_frac = SPLIT_FRACTIONS
    rest, test = train_test_split(idx, test_size=test_frac, stratify=y, random_state=SPLIT_SEED)
    train, val = train_test_split(rest, test_size=val_frac / (train_frac + val_frac),
                                  stratify=y[rest], random_state=SPLIT_SEED)
    return {name: Split(torch.from_numpy(x[i]).unsqueeze(1), torch.from_numpy(y[i]), torch.from_numpy(i))
            for name, i in (("train", train), ("val", val), ("test", test))}


def task_batch(task: Task, images: torch.Tensor, digits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets of `task` for untransformed images."""
    return task.transform(images), task.labels(digits)


def random_shift(images: torch.Tensor, generator: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Shift each image by up to `max_shift` pixels (zero fill): augmentation applied before a task's transform."""
    pad = max_shift
    padded = torch.nn.functional.pad(images, (pad, pad, pad, pad))
    span = 2 * pad + 1
    crops = torch.stack([padded[:, 0, dy:dy + SIDE, dx:dx + SIDE] for dy in range(span) for dx in range(span)], 1)
    pick = torch.randint(span * span, (len(images),), generator=generator)
    return crops[torch.arange(len(images)), pick].unsqueeze(1)


def broad_augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Pretraining's mixture of augmentations (none of them a task's transform): shifts up to 2 pixels, then per
    image a random contrast, additive noise and a 3x3 cutout, so the features learnt are generic, not tuned to
    clean upright strokes."""
    n = len(images)
    x = random_shift(images, generator, max_shift=2)
    contrast = 0.5 + 0.5 * torch.rand(n, 1, 1, 1, generator=generator)
    x = x * contrast + 0.1 * torch.randn(x.shape, generator=generator)
    rows, cols = (torch.randint(SIDE - 2, (n,), generator=generator) for _ in range(2))
    grid = torch.arange(SIDE)
    inside = lambda start: (grid >= start[:, None]) & (grid < start[:, None] + 3)  # noqa: E731
    cut = inside(rows)[:, :, None] & inside(cols)[:, None, :]
    return x.masked_fill(cut.unsqueeze(1), 0.0).clamp(0.0, 1.0)


def dihedral_augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Pretraining's other mixture: ±1 pixel shifts, then each image turned by a random one of the square's 8
    symmetries (rotations by 90°, mirrorings), so the features hold digits in every orientation."""
    x = random_shift(images, generator)
    pick = torch.randint(8, (len(x),), generator=generator)
    turned = [torch.rot90(x, r, (2, 3)) for r in range(4)]
    turned += [torch.flip(t, (3,)) for t in turned]
    return torch.stack(turned)[pick, torch.arange(len(x))]
