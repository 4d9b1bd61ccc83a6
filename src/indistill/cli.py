"""The ``indistill`` command line: a thin layer over the library.

Every command takes an optional YAML config and ``key=value`` overrides
(``indistill run configs/fashion_mnist.yaml kd.method=dkd warmup=none``).
Bad input prints one ``error:`` line and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from importlib import resources
from pathlib import Path

from .errors import UserError


def _config(path: str | None, overrides: list[str]):
    from .config import load_config

    if path is not None and "=" in path and not Path(path).exists():
        overrides = [path, *overrides]  # `indistill train model.name=x` without a config file
        path = None
    return load_config(path, overrides)


def packaged_config(name: str) -> Path:
    """Path of a config shipped inside the package (``configs/`` in the repo points there)."""
    ref = resources.files("indistill") / "configs" / name
    with resources.as_file(ref) as p:
        return Path(p)


def cmd_run(args) -> int:
    from .pipeline import Pipeline

    cfg = _config(args.config, args.overrides)
    command = " ".join(["indistill", "run", *([args.config] if args.config else []), *args.overrides])
    results = Pipeline(cfg).run(command=command)
    print((cfg.run_dir / "results.md").read_text())
    print(f"run directory: {cfg.run_dir}  (results.json, results.md, plots/, export/)")
    return 0 if results else 1


def cmd_demo(args) -> int:
    from .config import load_config
    from .pipeline import Pipeline

    cfg = load_config(packaged_config("demo_digits.yaml"), args.overrides)
    print("indistill demo: digits (embedded, offline) - teacher, student CE, student PKT, student InDistill+PKT")
    Pipeline(cfg).run(command=" ".join(["indistill", "demo", *args.overrides]))
    print((cfg.run_dir / "results.md").read_text())
    print(f"plots: {cfg.run_dir / 'plots'}\nrun directory: {cfg.run_dir}")
    return 0


def cmd_train(args) -> int:
    from .pipeline import Pipeline, Trained
    from .report import write_report

    cfg = _config(args.config, args.overrides)
    p = Pipeline(cfg)
    model = p.build_model(cfg.model)
    p.supervised("model", model, cfg.train)
    results = p.evaluate([Trained("model", model, "model", p.engine.checkpoint_path("model"))])
    write_report(cfg.run_dir, results, cfg=cfg, command="indistill train " + " ".join(
        [*([args.config] if args.config else []), *args.overrides]))
    print((cfg.run_dir / "results.md").read_text())
    print(f"checkpoint: {p.engine.checkpoint_path('model')}")
    return 0


def cmd_evaluate(args) -> int:
    from .checkpoint import load_weights
    from .pipeline import Pipeline, Trained
    from .report import write_report

    cfg = _config(args.config, args.overrides)
    p = Pipeline(cfg, check_config=False)
    model = p.build_model(cfg.model)
    load_weights(model, args.checkpoint)
    name = Path(args.checkpoint).stem
    results = p.evaluate([Trained(name, model, "model", Path(args.checkpoint))], cache=False)
    write_report(cfg.run_dir, results, cfg=cfg, command="indistill evaluate " + " ".join(sys.argv[2:]))
    print((cfg.run_dir / "results.md").read_text())
    return 0


def cmd_prune(args) -> int:
    from .checkpoint import load_weights
    from .pipeline import Pipeline, default_pairs
    from .prune import prune_to_student

    cfg = _config(args.config, args.overrides)
    p = Pipeline(cfg, check_config=False)
    teacher = p.build_model(cfg.teacher)
    if cfg.teacher.checkpoint:
        load_weights(teacher, cfg.teacher.checkpoint)
    student = p.build_model(cfg.student)
    pairs = default_pairs(teacher, student, cfg.warmup.pairs)
    pruned = prune_to_student(
        teacher, student, pairs, importance=cfg.warmup.importance, producers=cfg.warmup.producers or None,
        input_shape=p.input_shape, resize=cfg.warmup.resize,
    )
    rows = pruned.table()
    cols = list(rows[0].keys()) if rows else []
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(str(r[c]) for c in cols))
    for tap, kept in pruned.kept.items():
        print(f"kept[{tap}] = {kept.tolist()}")
    out = cfg.run_dir / "prune.json"
    out.write_text(json.dumps({"rows": rows, "kept": {k: v.tolist() for k, v in pruned.kept.items()}},
                              indent=1, default=str))
    print(f"written: {out}")
    return 0


def cmd_methods(_args) -> int:
    from .methods import list_methods, method_params

    for name, cls in list_methods().items():
        params = ", ".join(f"{k}={v!r}" for k, v in method_params(cls).items())
        print(f"{name:8s} {cls.summary}  [{params}]")
    print(f"{'ce':8s} cross-entropy on labels only (no teacher): the baseline arm")
    return 0


def cmd_models(_args) -> int:
    from .models import list_models

    print("\n".join(list_models()))
    return 0


def cmd_datasets(_args) -> int:
    from .data import list_datasets

    print("\n".join(list_datasets()))
    return 0


def cmd_layers(args) -> int:
    from .models import create_model, model_taps

    model = create_model(args.model, num_classes=args.num_classes, in_channels=args.in_channels)
    print("taps:")
    for k, v in model_taps(model).items():
        print(f"  {k}: {v}")
    print("modules:")
    for name, m in model.named_modules():
        if name:
            print(f"  {name}  {type(m).__name__}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="indistill", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)

    def with_config(p):
        p.add_argument("config", nargs="?", help="YAML config (see configs/)")
        p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. kd.method=dkd")
        return p

    p = with_config(sub.add_parser("run", help="the pipeline: teacher -> auxiliary -> warmup -> KD -> evaluate"))
    p.set_defaults(fn=cmd_run)
    p = sub.add_parser("demo", help="offline demo on the embedded digits data (< 5 min on 2 cores)")
    p.add_argument("overrides", nargs="*")
    p.set_defaults(fn=cmd_demo)
    p = with_config(sub.add_parser("train", help="supervised training of `model` on `data`"))
    p.set_defaults(fn=cmd_train)
    p = sub.add_parser("evaluate", help="top-1 + retrieval of a checkpoint")
    p.add_argument("checkpoint")
    with_config(p).set_defaults(fn=cmd_evaluate)
    p = with_config(sub.add_parser("prune", help="print the teacher channels kept for the student's widths"))
    p.set_defaults(fn=cmd_prune)
    sub.add_parser("methods", help="list the KD methods and their parameters").set_defaults(fn=cmd_methods)
    sub.add_parser("models", help="list the model zoo").set_defaults(fn=cmd_models)
    sub.add_parser("datasets", help="list the datasets").set_defaults(fn=cmd_datasets)
    p = sub.add_parser("layers", help="list a zoo model's taps and module paths")
    p.add_argument("model")
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--in-channels", type=int, default=3)
    p.set_defaults(fn=cmd_layers)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.fn(args) or 0)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: re-run the same command to resume from the last finished epoch", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
