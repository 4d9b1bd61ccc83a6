"""The model zoo: importing this package registers every model with :mod:`indistill.models.registry`.

Names (see ``indistill.models.list_models()``): the paper's ``cnn32`` and
``cnn32_small``; CIFAR ``resnet{8,14,20,32,44,56,110}``, ``resnet8x4``,
``resnet32x4``; ``wrn_{depth}_{k}``; ``vgg8``/``vgg11``/``vgg13``/``vgg16``/
``vgg19``; ``resnet18_cifar``/``resnet50_cifar``; ``mobilenetv2_cifar``;
``shufflenet_v1``/``shufflenet_v2``; ``preact_resnet18``; torchvision
``resnet18``/``resnet34``/``resnet50`` and ``mobilenet_v2``.

The CIFAR models keep the state-dict keys of CRD (RepDistiller) and
mdistiller, so their published CIFAR-100 checkpoints load with
``strict=True``; their model names are aliases (``mobile_half``,
``ShuffleV1``, ``ShuffleV2``, ``ResNet50``, ``vgg13_bn``, ...; see
``indistill.models.model_aliases()``).
"""

from . import (
    cnn,
    mobilenetv2_cifar,
    preact_resnet,
    resnet_cifar,
    resnet_v2_cifar,
    shufflenet,
    torchvision_models,
    vgg,
    wrn,
)
from .cnn import Cnn32
from .mobilenetv2_cifar import MobileNetV2Cifar
from .preact_resnet import PreActResNet
from .resnet_cifar import CifarResNet
from .resnet_v2_cifar import CifarResNetV2
from .shufflenet import ShuffleNetV1, ShuffleNetV2
from .vgg import CifarVGG
from .wrn import WideResNet

__all__ = [
    "cnn",
    "mobilenetv2_cifar",
    "preact_resnet",
    "resnet_cifar",
    "resnet_v2_cifar",
    "shufflenet",
    "torchvision_models",
    "vgg",
    "wrn",
    "Cnn32",
    "CifarResNet",
    "CifarResNetV2",
    "CifarVGG",
    "MobileNetV2Cifar",
    "PreActResNet",
    "ShuffleNetV1",
    "ShuffleNetV2",
    "WideResNet",
]
