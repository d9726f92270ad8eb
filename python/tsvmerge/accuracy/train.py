"""Pretraining, task heads and full fine-tuning of the zoo, on CPU.

Recipe, after Ilharco et al. (task arithmetic) as the TSV paper uses it: the encoder is pretrained
once; each task gets a head built from the *pretrained* features (our stand-in for CLIP's zero-shot
text head) that stays frozen while every encoder weight is fine-tuned, so all heads read the same
feature space and merged encoders can be scored with each task's own head.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .data import Split, Task, broad_augment, dihedral_augment, random_shift, task_batch
from .model import Encoder, ViTConfig


# Fine-tuning scopes: the part of an encoder weight's name that marks it trainable ("" matches every weight).
SCOPES = {"all": "", "blocks": ".resblocks.", "attn": ".attn.", "mlp": ".mlp."}
AUGMENTS = {"shift": random_shift, "broad": broad_augment, "dihedral": dihedral_augment}
OPTIMIZERS = ("adamw", "sgd")


@dataclass(frozen=True)
class TrainConfig:
    pretrain_epochs: int = 40
    pretrain_lr: float = 2e-3
    finetune_epochs: int = 20
    finetune_lr: float = 1e-3
    finetune_scope: str = "all"  # which encoder weights fine-tuning moves: a key of SCOPES
    finetune_optimizer: str = "adamw"  # or "sgd" (momentum 0.9): its updates keep the gradients' low rank
    pretrain_augment: str = "shift"  # a key of AUGMENTS: ±1 px shifts, or a mixture (broad, dihedral)
    batch_size: int = 64
    seed: int = 0

    def __post_init__(self):
        for field, allowed in (("finetune_scope", SCOPES), ("finetune_optimizer", OPTIMIZERS),
                               ("pretrain_augment", AUGMENTS)):
            if getattr(self, field) not in allowed:
                raise ValueError(f"TrainConfig.{field} must be one of {', '.join(allowed)}, got {getattr(self, field)!r}")

    def to_dict(self) -> dict:
        return asdict(self)


def _cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total_steps - warmup)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _fit(encoder: Encoder, head: nn.Module, task: Task, train: Split, *, epochs: int, lr: float,
         batch_size: int, seed: int, train_head: bool, augment=random_shift, scope: str = "all",
         optimizer: str = "adamw", on_epoch=None) -> None:
    """Minimise cross-entropy over `epochs` passes with `augment`, `optimizer` and a cosine schedule, moving only the
    encoder weights whose names contain SCOPES[scope]; `on_epoch()` is called after each pass."""
    generator = torch.Generator().manual_seed(seed)
    params = [p for n, p in encoder.named_parameters() if SCOPES[scope] in n]
    params += list(head.parameters()) if train_head else []
    # no weight decay: it would pull every task toward 0 alike
    optimizer = (torch.optim.SGD(params, lr=lr, momentum=0.9) if optimizer == "sgd" else
                 torch.optim.AdamW(params, lr=lr, weight_decay=0.0))
    steps_per_epoch = math.ceil(len(train.digits) / batch_size)
    scheduler = _cosine(optimizer, epochs * steps_per_epoch, warmup=steps_per_epoch)
    encoder.train()
    for _ in range(epochs):
        order = torch.randperm(len(train.digits), generator=generator)
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            images = augment(train.images[idx], generator)
            x, y = task_batch(task, images, train.digits[idx])
            loss = F.cross_entropy(head(encoder(x)), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
        if on_epoch:
            on_epoch()
    encoder.eval()


def pretrain(cfg: ViTConfig, train_cfg: TrainConfig, pretrain_task: Task, train: Split, on_epoch=None) -> Encoder:
    """The 'foundation model': digit recognition on upright images under `pretrain_augment`; its head is thrown
    away."""
    torch.manual_seed(train_cfg.seed)
    encoder = Encoder(cfg)
    head = nn.Linear(cfg.embed_dim, pretrain_task.num_classes)
    _fit(encoder, head, pretrain_task, train, epochs=train_cfg.pretrain_epochs, lr=train_cfg.pretrain_lr,
         batch_size=train_cfg.batch_size, seed=train_cfg.seed, train_head=True,
         augment=AUGMENTS[train_cfg.pretrain_augment], on_epoch=on_epoch)
    return encoder


class PrototypeHead(nn.Module):
    """CLIP-style head: cosine similarity of the normalised feature to one fixed vector per class, times a scale.

    CLIP's zero-shot head holds text embeddings of the class names; ours holds the mean pretrained
    feature of each class over the training split. It is built once and never trained.
    """

    def __init__(self, prototypes: torch.Tensor, logit_scale: float = 20.0):
        super().__init__()
        self.register_buffer("weight", F.normalize(prototypes, dim=1))
        self.logit_scale = logit_scale

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.logit_scale * F.normalize(features, dim=1) @ self.weight.T


@torch.no_grad()
def build_head(encoder: Encoder, task: Task, train: Split) -> PrototypeHead:
    x, y = task_batch(task, train.images, train.digits)
    features = F.normalize(encoder(x), dim=1)
    prototypes = torch.stack([features[y == c].mean(0) for c in range(task.num_classes)])
    return PrototypeHead(prototypes)


def finetune(pretrained: Encoder, head: nn.Module, task: Task, train: Split, train_cfg: TrainConfig,
             task_seed: int) -> Encoder:
    """Fine-tuning of the encoder weights in `finetune_scope` (all of them by default) with the task's head
    frozen."""
    torch.manual_seed(train_cfg.seed + task_seed)
    encoder = Encoder(pretrained.cfg)
    encoder.load_state_dict(pretrained.state_dict())
    _fit(encoder, head, task, train, epochs=train_cfg.finetune_epochs, lr=train_cfg.finetune_lr,
         batch_size=train_cfg.batch_size, seed=train_cfg.seed + task_seed, train_head=False,
         scope=train_cfg.finetune_scope, optimizer=train_cfg.finetune_optimizer)
    return encoder
