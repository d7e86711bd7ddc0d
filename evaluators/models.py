"""The model registry: small models defined here and the task models of :mod:`evaluators.zoo`
(torchvision does not import on the CPU torch this project targets)."""
from __future__ import annotations

from typing import Callable

from torch import nn

from evaluators.zoo import ZOO_MODELS


class DigitsCNN(nn.Module):
    """A three-conv CNN for 8x8 single-channel digits (scikit-learn's ``load_digits``).

    >>> import torch
    >>> DigitsCNN()(torch.zeros(2, 1, 8, 8)).shape
    torch.Size([2, 10])
    """

    def __init__(self, num_classes: int = 10, width: int = 32) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, 2 * width, 3, padding=1, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(2 * width * 2 * 2, 4 * width),
            nn.ReLU(inplace=True),
            nn.Linear(4 * width, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.features(x))


class MLP(nn.Module):
    """A plain multi-layer perceptron over flattened inputs.

    >>> import torch
    >>> MLP(in_features=64, hidden=(32,), num_classes=10)(torch.zeros(2, 1, 8, 8)).shape
    torch.Size([2, 10])
    """

    def __init__(self, in_features: int = 64, hidden: tuple[int, ...] = (128, 64), num_classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(inplace=True)]
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


MODELS: dict[str, Callable[..., nn.Module]] = {"digits_cnn": DigitsCNN, "mlp": MLP, **ZOO_MODELS}


def build_model(name: str, **kwargs) -> nn.Module:
    """Build a registered model by name; an unknown name lists the valid ones."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid: {', '.join(sorted(MODELS))}")
    return MODELS[name](**kwargs)
