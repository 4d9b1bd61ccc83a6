"""timm and torchvision models by name: ``timm:<model>`` and ``torchvision:<model>`` in any model spec.

Built with random weights (``timm.create_model(name, pretrained=False, num_classes=, in_chans=)``,
``torchvision.models.get_model(name, weights=None, num_classes=)``); trained weights come from a local
file through the spec's ``checkpoint:`` (``torch.load(weights_only=True)`` or safetensors; ``reset_head``
for another class count). Nothing is ever downloaded: ``pretrained: true`` / ``weights:`` are refused
with a one-line error (timm's ``pretrained_cfg_overlay: {file: PATH}`` names a local file and is
allowed). These models register no taps: :mod:`indistill.models.auto` finds them at the data's input
size. timm is an optional extra (``pip install 'indistill[timm]'``).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..errors import UserError, brief, suggest

PREFIXES = ("timm:", "torchvision:")

__all__ = ["PREFIXES", "build_external", "is_external"]


def is_external(name: str) -> bool:
    """Whether ``name`` is a ``timm:`` / ``torchvision:`` model name."""
    return isinstance(name, str) and name.startswith(PREFIXES)


def _timm(arch: str, name: str, num_classes: int, in_channels: int, kw: dict[str, Any]) -> nn.Module:
    try:
        import timm
    except ImportError:
        raise UserError(f"model '{name}' needs timm, which is not installed: pip install 'indistill[timm]'") from None
    if not timm.is_model(arch):
        raise UserError(f"timm has no model {brief(arch)}{suggest(arch, timm.list_models())}; "
                        f"list them with python -c \"import timm; print(timm.list_models('*{arch[:8]}*'))\"")
    overlay = kw.get("pretrained_cfg_overlay") or {}
    if kw.pop("pretrained", False) and not (isinstance(overlay, dict) and overlay.get("file")):
        raise UserError(f"model '{name}': indistill never downloads weights; save them locally and give the file as "
                        f"checkpoint: PATH (or kwargs.pretrained_cfg_overlay: {{file: PATH}} with pretrained: true)")
    pretrained = bool(overlay.get("file")) if isinstance(overlay, dict) else False
    try:
        return timm.create_model(arch, pretrained=pretrained, num_classes=num_classes, in_chans=in_channels, **kw)
    except TypeError as e:
        raise UserError(f"bad kwargs for timm model '{arch}': {str(e).splitlines()[0][:200]}") from None


def _replace_first_conv(model: nn.Module, in_channels: int, name: str) -> None:
    """Swap the first 3-channel ``Conv2d`` (the stem) for one taking ``in_channels`` (fresh weights).

    A step of building ``model``, not a patch of someone's model: torchvision's constructors take no
    input-channel count (timm's take ``in_chans``), and ``model`` is the one :func:`_torchvision` has just
    built with random weights, never a model a user passed in. The stem is replaced as a child module
    (``nn.Module.add_module``, the documented call; no attribute is set on the model), so its state
    dict keeps torchvision's keys and shapes but for the stem's input channels.
    """
    for path, m in model.named_modules():
        if isinstance(m, nn.Conv2d) and m.in_channels == 3 and m.groups == 1:
            new = nn.Conv2d(in_channels, m.out_channels, m.kernel_size, stride=m.stride, padding=m.padding,
                            dilation=m.dilation, bias=m.bias is not None, padding_mode=m.padding_mode)
            nn.init.kaiming_normal_(new.weight, mode="fan_out", nonlinearity="relu")
            if new.bias is not None:
                nn.init.zeros_(new.bias)
            parent_path, _, attr = path.rpartition(".")
            parent = model.get_submodule(parent_path) if parent_path else model
            parent.add_module(attr, new)  # replaces the child of that name
            return
    raise UserError(f"model '{name}' has no 3-channel first convolution to adapt to in_channels={in_channels}; "
                    f"use 3-channel images or a timm model (in_chans)")


def _torchvision(arch: str, name: str, num_classes: int, in_channels: int, kw: dict[str, Any]) -> nn.Module:
    import torchvision.models as tvm

    known = tvm.list_models(module=tvm)  # the classification models
    if arch not in known:
        raise UserError(f"torchvision has no classification model {brief(arch)}{suggest(arch, known)}; "
                        f"list them with python -c \"import torchvision; print(torchvision.models.list_models())\"")
    if kw.get("weights") is not None or kw.get("pretrained"):
        raise UserError(f"model '{name}': indistill never downloads weights; save them locally (e.g. torchvision's "
                        f"ImageNet .pth) and give the file as checkpoint: PATH")
    kw = {k: v for k, v in kw.items() if k not in ("weights", "pretrained")}
    if arch in ("googlenet", "inception_v3"):
        kw.setdefault("aux_logits", False)  # auxiliary heads make training-mode outputs tuples, not logits
        kw.setdefault("init_weights", True)
    try:
        model = tvm.get_model(arch, weights=None, num_classes=num_classes, **kw)
    except TypeError as e:
        raise UserError(f"bad kwargs for torchvision model '{arch}': {str(e).splitlines()[0][:200]}") from None
    if in_channels != 3:
        _replace_first_conv(model, in_channels, name)
    return model


def build_external(name: str, num_classes: int, in_channels: int = 3, **kw: Any) -> nn.Module:
    """Build ``timm:<arch>`` or ``torchvision:<arch>`` with random weights for ``num_classes`` and ``in_channels``."""
    prefix, _, arch = name.partition(":")
    if not arch:
        raise UserError(f"model '{name}' names no architecture; write {prefix}:<model>, e.g. {prefix}:resnet18")
    if not isinstance(num_classes, int) or num_classes < 1 or not isinstance(in_channels, int) or in_channels < 1:
        raise UserError(f"model '{name}': num_classes and in_channels must be positive integers")
    build = _timm if prefix == "timm" else _torchvision
    return build(arch, name, num_classes, in_channels, dict(kw))
