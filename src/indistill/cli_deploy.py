"""``indistill pair`` (the stage pairs a config distils, and the YAML that pins them) and ``indistill export``
(a trained student as safetensors, ONNX or TorchScript)."""

from __future__ import annotations

from typing import Any


def cmd_pair(args: Any) -> int:
    """Build the config's source (teacher or auxiliary) and student, pair their stage taps, print the table."""
    from .api import pair_report
    from .cli import _config

    report = pair_report(_config(args.config, args.overrides))
    print(report.text())
    report.check()  # a pair pruning cannot align: its one-line error, after the table that shows it
    return 0


def cmd_export(args: Any) -> int:
    from .export import export_target

    for e in export_target(args.target, args.format, out=args.out, only=args.arm):
        check = "" if e.max_abs_diff is None else f" (logits within {e.max_abs_diff:.1e} of PyTorch's on the check batch)"
        print(f"written: {e.path}  [{e.name}, {e.format}]{check}")
    return 0


def add_deploy_parsers(add: Any) -> None:
    """Register ``pair`` and ``export`` with the CLI's ``add(name, help, fn, config=...)``."""
    from .export import FORMATS

    p = add("pair", "print the stage pairs the warmup and KD method distil (tap, module, C x H x W, channels pruned) "
                    "and the YAML block that pins them", cmd_pair)
    p = add("export", "write a trained student as safetensors, ONNX (checked with onnxruntime) or TorchScript",
            cmd_export, config=False)
    p.add_argument("target", help="run directory (its students) or a finished checkpoint (checkpoints/<stage>.pt)")
    p.add_argument("--format", choices=FORMATS, default="safetensors", help="what to write (default safetensors)")
    p.add_argument("--out", help="the file to write (one model only; default <run>/export/<stage>.<format>)")
    p.add_argument("--arm", help="export only this stage of a run directory (an arm, or teacher)")
