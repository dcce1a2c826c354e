"""Models, built from ``ModelConfig`` for a dataset's channels, image size and classes.

- ``mlp``: fully connected, hidden sizes ``model.widths``.
- ``lenet``: LeNet-5-style CNN, conv(``channels[0]``)-pool-conv(``channels[1]``)-pool,
  then fully connected layers ``model.hidden``.
- ``resnet20/44/56``: the CIFAR ResNets of He et al. 2016 (sec. 4.2): 3 stages of
  n basic blocks (n = 3, 7, 9) with 16/32/64 channels and identity shortcuts that
  subsample and zero-pad channels (option A).
- ``resnet18``, ``mobilenet_v3_small``, ``alexnet``: torchvision's, with the input
  channels and classes of the dataset; on small images (< 64 px) their stems are
  adapted so the feature maps do not collapse (as in the CIFAR literature).

Example::

    model = build_model(ModelConfig(name="resnet20"), in_channels=3, image_size=32,
                        num_classes=10)
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trainables.config import ModelConfig, TrialConfig

__all__ = ["build_model", "model_for_trial", "model_for_packed", "data_shape_of",
           "example_input", "macs_of", "MLP", "LeNet", "CifarResNet"]

SMALL_IMAGE = 64


class MLP(nn.Module):
    def __init__(self, in_features: int, widths: tuple[int, ...], num_classes: int,
                 dropout: float = 0.0) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        for width in widths:
            layers += [nn.Linear(in_features, width), nn.ReLU(inplace=True)]
            if dropout:
                layers.append(nn.Dropout(dropout))
            in_features = width
        layers.append(nn.Linear(in_features, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class LeNet(nn.Module):
    def __init__(self, in_channels: int, image_size: int, num_classes: int,
                 channels: tuple[int, ...], hidden: tuple[int, ...], kernel_size: int,
                 batch_norm: bool = False, dropout: float = 0.0) -> None:
        super().__init__()
        pad = kernel_size // 2  # "same" convolutions: only the pools shrink the map
        layers: list[nn.Module] = []
        for out in channels:
            layers.append(nn.Conv2d(in_channels, out, kernel_size, padding=pad,
                                    bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm2d(out))
            # Pool, then ReLU: the same numbers as ReLU, then pool (max commutes with a
            # non-decreasing function, forward and gradient), with the ReLU on a quarter
            # of the map: a LeNet step is ~1.2x faster on this CPU (bench/layout.py).
            layers += [nn.MaxPool2d(2), nn.ReLU(inplace=True)]
            in_channels = out
        self.features = nn.Sequential(*layers)
        side = image_size // 2 // 2
        self.classifier = MLP(in_channels * side * side, hidden, num_classes, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class _BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.stride, self.extra = stride, planes - in_planes

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        # Option A: parameter-free; subsample, then zero-pad the new channels.
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.extra:
            x = F.pad(x, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs (He et al. 2016, sec. 4.2)."""

    def __init__(self, depth: int, in_channels: int, num_classes: int) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"depth={depth} is invalid: allowed 6n+2 (20, 32, 44, 56, 110)")
        n = (depth - 2) // 6
        self.conv = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        blocks, planes = [], 16
        for stage, width in enumerate((16, 32, 64)):
            for i in range(n):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(_BasicBlock(planes, width, stride))
                planes = width
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.blocks(F.relu(self.bn(self.conv(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


def _resnet18(in_channels: int, image_size: int, num_classes: int) -> nn.Module:
    from torchvision.models import resnet18

    model = resnet18(num_classes=num_classes)
    if image_size < SMALL_IMAGE:  # CIFAR stem: 3x3 stride-1 conv, no max-pool
        model.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        model.maxpool = nn.Identity()
    elif in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
    return model


def _mobilenet_v3_small(in_channels: int, image_size: int, num_classes: int) -> nn.Module:
    from torchvision.models import mobilenet_v3_small

    model = mobilenet_v3_small(num_classes=num_classes)
    stem = model.features[0][0]
    # On small images a stride-1 stem keeps 2x more resolution through the network.
    stride = 1 if image_size < SMALL_IMAGE else 2
    model.features[0][0] = nn.Conv2d(in_channels, stem.out_channels, 3, stride, 1, bias=False)
    return model


def _alexnet(in_channels: int, image_size: int, num_classes: int) -> nn.Module:
    from torchvision.models import alexnet

    model = alexnet(num_classes=num_classes)
    if image_size < SMALL_IMAGE:
        # The 11x11 stride-4 stem and three max-pools would shrink 32 px to nothing.
        model.features[0] = nn.Conv2d(in_channels, 64, 3, 1, 1)
    elif in_channels != 3:
        model.features[0] = nn.Conv2d(in_channels, 64, 11, 4, 2)
    return model


def build_model(cfg: ModelConfig, in_channels: int, image_size: int,
                num_classes: int) -> nn.Module:
    """The model named by ``cfg.name`` for inputs ``in_channels x image_size^2``."""
    if cfg.name == "mlp":
        return MLP(in_channels * image_size * image_size, cfg.widths, num_classes, cfg.dropout)
    if cfg.name == "lenet":
        return LeNet(in_channels, image_size, num_classes, cfg.channels, cfg.hidden,
                     cfg.kernel_size, cfg.batch_norm, cfg.dropout)
    if cfg.name.startswith("resnet") and cfg.name != "resnet18":
        return CifarResNet(int(cfg.name[len("resnet"):]), in_channels, num_classes)
    builders = {"resnet18": _resnet18, "mobilenet_v3_small": _mobilenet_v3_small,
                "alexnet": _alexnet}
    return builders[cfg.name](in_channels, image_size, num_classes)


def model_for_trial(cfg: TrialConfig, data_shape: tuple[int, int, int] | None = None
                    ) -> nn.Module:
    """The untrained model a trial of ``cfg`` trains: ``cfg.model`` shaped by
    ``data_shape`` (input channels, image size, classes), or by the dataset when not given
    (read, or decoded once into the cache). The one place a config becomes a model."""
    return build_model(cfg.model, *(data_shape or data_shape_of(cfg)))


def model_for_packed(cfg: TrialConfig, data_shape: tuple[int, int, int], path: Any
                     ) -> nn.Module:
    """The model a trial's packed file (``model.qsw``) holds, in eval mode: ``cfg``'s
    architecture rebuilt, cut to the file's shapes where channels were pruned
    (``prune.granularity=channel``), factorized where layers were (LC's low-rank: the
    ranks are the factors' shapes), its weights loaded."""
    import quant
    from compress.channels import shrink_to_shapes_
    from compress.lowrank import factorize_to_shapes_

    model = model_for_trial(cfg, data_shape)
    shapes = quant.packed_shapes(path)
    shrink_to_shapes_(model, shapes, example_input(data_shape))
    factorize_to_shapes_(model, shapes)
    return quant.load_packed(path, model).eval()


def example_input(data_shape: tuple[int, int, int], device: torch.device | str = "cpu"
                  ) -> torch.Tensor:
    """One zero image of ``data_shape`` (input channels, image size, classes), batch 1:
    what traces a model (its dependency graph, its MACs)."""
    channels, size, _ = data_shape
    return torch.zeros(1, channels, size, size, device=device)


def data_shape_of(cfg: TrialConfig) -> tuple[int, int, int]:
    """(input channels, image size, classes) of ``cfg``'s dataset (read, or decoded once
    into the cache)."""
    from trainables.data import load_splits

    splits = load_splits(cfg.data, seed=cfg.train.seed)
    return (splits.in_channels, splits.image_size, splits.num_classes)


def macs_of(model: nn.Module, example: torch.Tensor) -> int:
    """Multiply-accumulates of one forward pass at batch 1 (torch.utils.flop_counter:
    FLOPs / 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False) as counter:
            model(example)
    finally:
        model.train(training)
    return counter.get_total_flops() // 2
