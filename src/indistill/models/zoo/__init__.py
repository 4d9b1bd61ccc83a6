"""The model zoo: importing this package registers every model with :mod:`indistill.models.registry`.

Names (see ``indistill.models.list_models()``): the paper's ``cnn32`` and
``cnn32_small``; CIFAR ``resnet{8,14,20,32,44,56,110}``, ``resnet8x4``,
``resnet32x4``; ``wrn_{depth}_{k}``; ``vgg8``/``vgg11``/``vgg13``;
``preact_resnet18``; torchvision ``resnet18``/``resnet34``/``resnet50`` and
``mobilenet_v2``.
"""

from . import cnn, preact_resnet, resnet_cifar, torchvision_models, vgg, wrn
from .cnn import Cnn32
from .preact_resnet import PreActResNet
from .resnet_cifar import CifarResNet
from .vgg import CifarVGG
from .wrn import WideResNet

__all__ = [
    "cnn",
    "preact_resnet",
    "resnet_cifar",
    "torchvision_models",
    "vgg",
    "wrn",
    "Cnn32",
    "CifarResNet",
    "CifarVGG",
    "PreActResNet",
    "WideResNet",
]
