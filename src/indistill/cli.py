"""The ``indistill`` command line: a thin layer over the library.

Every command takes an optional YAML config and ``key=value`` overrides
(``indistill run configs/fashion_mnist.yaml kd.method=dkd warmup=none``).
Bad input prints one ``error:`` line and exits with status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from importlib import resources
from pathlib import Path

from .errors import UserError


def _exists(path: str) -> bool:
    """``Path(path).exists()``, False where the OS cannot even look it up (``name=<300 chars>`` is too long a file name)."""
    try:
        return Path(path).exists()
    except (OSError, ValueError):
        return False


def _split_config(path: str | None, overrides: list[str]) -> tuple[str | None, list[str]]:
    """A first argument with ``=`` that names no file is an override, not the CONFIG (``indistill train model.name=x``)."""
    if path is not None and "=" in path and not _exists(path):
        return None, [path, *overrides]
    return path, list(overrides)


def _config(path: str | None, overrides: list[str]):
    from .config import load_config

    return load_config(*_split_config(path, overrides))


def packaged_config(name: str) -> Path:
    """Path of a config shipped inside the package (``configs/`` in the repo points there)."""
    ref = resources.files("indistill") / "configs" / name
    with resources.as_file(ref) as p:
        return Path(p)


def _command(name: str, args) -> str:
    return " ".join(["indistill", name, *([args.config] if getattr(args, "config", None) else []), *args.overrides])


def _print_results(cfg, *lines: str) -> None:
    """On rank 0 (the only one that writes): the run's ``results.md``, then ``lines``."""
    from . import distributed as ddp

    if ddp.is_main():
        print((cfg.run_dir / "results.md").read_text())
        for line in lines:
            print(line)


def _run_config(args):
    """``indistill run``'s config: CONFIG, or the built-in defaults where ``--defaults`` asks for them."""
    config, overrides = _split_config(args.config, args.overrides)
    # A bare `indistill run` used to train the built-in defaults for minutes into runs/run/: ask for that.
    if config is None and not args.defaults:
        raise UserError("no config given; usage: indistill run CONFIG [key=value ...] (e.g. configs/demo_digits.yaml), "
                        "or indistill run --defaults [key=value ...] to run the built-in defaults")
    if config is not None and args.defaults:
        raise UserError(f"--defaults runs the built-in defaults, without a config; drop --defaults to run {config}")
    return _config(config, overrides)


def cmd_run(args) -> int:
    from .pipeline import Pipeline

    cfg = _run_config(args)
    results = Pipeline(cfg).run(command=_command("run --defaults" if args.defaults else "run", args))
    _print_results(cfg, f"run directory: {cfg.run_dir}  (results.json, results.md, plots/, export/)")
    return 0 if results else 1


def cmd_demo(args) -> int:
    from . import distributed as ddp
    from .config import load_config
    from .pipeline import Pipeline

    cfg = load_config(packaged_config("demo_digits.yaml"), args.overrides)
    ddp.init_from_env(cfg.device)
    if ddp.is_main():  # the other ranks train alongside rank 0 and print nothing
        print("indistill demo: digits (embedded, offline) - teacher, then student arms CE, PKT, InDistill+PKT "
              f"({cfg.student.train.epochs} epochs each, one LR schedule)")
    Pipeline(cfg).run(command=" ".join(["indistill", "demo", *args.overrides]))
    _print_results(cfg, f"plots: {cfg.run_dir / 'plots'}\nrun directory: {cfg.run_dir}",
                   "one seed: a difference between arms here is not evidence; `indistill grid` pairs arms over seeds")
    return 0


def cmd_train(args) -> int:
    from .pipeline import Pipeline

    cfg = _config(args.config, args.overrides)
    trained, _ = Pipeline(cfg).train_model(command=_command("train", args))
    _print_results(cfg, f"checkpoint: {trained.checkpoint}")
    return 0


def _evaluate_config(args):
    """``indistill evaluate``'s config, and whether the user named the model and the dataset (which then win
    over what a checkpoint records)."""
    # `evaluate CKPT data.test_subset=50`: an override, not the optional CONFIG (which would then build the
    # default model and refuse the checkpoint)
    config, overrides = _split_config(args.config, args.overrides)
    named_model = config is not None or any(o.startswith("model.") for o in overrides)
    named_data = config is not None or any(o.startswith("data.name=") for o in overrides)
    return _config(config, overrides), named_model, named_data


def cmd_evaluate(args) -> int:
    """Evaluate a run directory's checkpoints, or one checkpoint; results go to ``<run>/eval/<stem>/``."""
    from .api import evaluate_target, evaluation_summary

    cfg, named_model, named_data = _evaluate_config(args)
    command, target = _command(f"evaluate {args.target}", args), Path(args.target)
    evaluated = evaluate_target(target, cfg, command=command, model_from_config=named_model,
                                data_from_config=named_data)
    if target.is_dir():  # a run directory: one table of all its checkpoints, not one report per checkpoint
        print(evaluation_summary(target, evaluated, command))
    else:
        print((evaluated[0].out_dir / "results.md").read_text())
        print(f"written: {evaluated[0].out_dir}")
    return 0


def cmd_prune(args) -> int:
    """The channels the run's warmup distils from: the trained source if the run has one."""
    from .api import load_source, prune_report
    from .checkpoint import atomic_write_json

    cfg = _config(args.config, args.overrides)
    source = load_source(cfg)
    print(source.describe())
    report = prune_report(cfg, source)
    print(report.text())
    if args.out:  # only where asked: a finished run directory holds what its run wrote (prune_<arm>.json)
        atomic_write_json(Path(args.out), report.record())
        print(f"written: {Path(args.out)}")
    return 0


def cmd_validate(args) -> int:
    """Build everything and push one batch through every stage; no training, nothing written."""
    from .api import arm_summaries
    from .pipeline import Pipeline, schedule_warnings

    cfg = _config(args.config, args.overrides)
    p = Pipeline(cfg)
    p.validate(one_batch=True)  # loads every checkpoint the config names: a missing/corrupt/unfitting one is an error
    for line in arm_summaries(cfg):
        print(line)
    for note in schedule_warnings(cfg):
        print(f"warning: {note}", file=sys.stderr)
    name = args.config if args.config and _exists(args.config) else "config"
    print(f"ok: {name} is valid ({p.data.name}: {len(p.data.train)} train / {len(p.data.test)} test)")
    return 0


def cmd_schema(_args) -> int:
    from .config import config_reference

    print(config_reference(), end="")
    return 0


def cmd_methods(_args) -> int:
    from .methods import list_methods, method_params

    for name, cls in list_methods().items():
        params = ", ".join(f"{k}={v!r}" for k, v in method_params(cls).items())
        print(f"{name:8s} {cls.summary}  [{params}]")
    return 0


def cmd_models(_args) -> int:
    from .models import list_models, model_aliases

    aliases: dict[str, list[str]] = {}
    for alias, name in model_aliases().items():
        aliases.setdefault(name, []).append(alias)
    for name in list_models():
        also = aliases.get(name)
        print(f"{name}  (also: {', '.join(also)})" if also else name)
    print("and any timm:<model> (pip install 'indistill[timm]') or torchvision:<model> classifier, taps found")
    return 0


def cmd_datasets(_args) -> int:
    from .data import list_datasets

    print("\n".join(list_datasets()))
    return 0


def cmd_layers(args) -> int:
    from .models import create_model, model_taps

    size = args.image_size
    # a model without registered taps (timm:, torchvision:) has them found at this input size
    model = create_model(args.model, num_classes=args.num_classes, in_channels=args.in_channels,
                         input_shape=(args.in_channels, size, size) if size else None)
    print("taps:")
    for k, v in model_taps(model).items():
        print(f"  {k}: {v}")
    print("modules:")
    for name, m in model.named_modules():
        if name:
            print(f"  {name}  {type(m).__name__}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    ap = argparse.ArgumentParser(prog="indistill", description=__doc__.splitlines()[0])
    ap.add_argument("--version", action="version", version=f"indistill {__version__}")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, text: str, fn, config: bool = True):
        # argparse %-formats a subcommand's `help` (for `indistill --help`), not its description:
        # a literal % ("95% CIs") must be doubled there or the top-level help crashes.
        p = sub.add_parser(name, help=text.replace("%", "%%"), description=text)
        if config:
            p.add_argument("config", nargs="?", help="YAML config (see configs/)")
            p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. kd.method=dkd")
        p.set_defaults(fn=fn)
        return p

    p = add("run", "the pipeline: teacher -> auxiliary -> student arms (warmup + KD) -> evaluate", cmd_run)
    p.add_argument("--defaults", action="store_true",
                   help="run the built-in defaults (`indistill schema`) when no CONFIG is given")
    p = sub.add_parser("demo", help="offline demo on the embedded digits data (about a minute of training on 2 idle cores)",
                       description="offline demo on the embedded digits data (about a minute of training on 2 idle cores)")
    p.add_argument("overrides", nargs="*", help="key=value overrides")
    p.set_defaults(fn=cmd_demo)
    add("train", "supervised training of `model` on `data` (Adam 2e-3 + cosine by default)", cmd_train)
    p = sub.add_parser("evaluate", help="top-1 + retrieval of a run directory's checkpoints or one checkpoint",
                       description="top-1 + retrieval of a run directory's checkpoints or one checkpoint; "
                                   "results go to <run>/eval/<checkpoint>/, never into the run's own results")
    p.add_argument("target", help="run directory or checkpoint (.pt / .safetensors)")
    p.add_argument("config", nargs="?", help="YAML config (only for checkpoints that do not record their model)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. data.root=/data")
    p.set_defaults(fn=cmd_evaluate)
    p = add("prune", "print the source channels the warmup distils from (the trained source when the run has one)",
            cmd_prune)
    p.add_argument("--out", help="also write the table as JSON to this path (nothing is written without it)")
    add("validate", "build everything and push one batch through every stage (no training, nothing written)",
        cmd_validate)
    add("methods", "list the KD methods and their parameters", cmd_methods, config=False)
    add("models", "list the model zoo", cmd_models, config=False)
    add("datasets", "list the datasets", cmd_datasets, config=False)
    p = add("layers", "list a model's taps and module paths (zoo, timm:<model>, torchvision:<model>)", cmd_layers,
            config=False)
    p.add_argument("model")
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--in-channels", type=int, default=3)
    p.add_argument("--image-size", type=int, default=None,
                   help="input side the taps of a model without registered ones are found at (default 224)")
    _add_grid(add)
    _add_deploy(add)
    add("schema", "print the config reference (every key, type, default, meaning) as markdown", cmd_schema,
        config=False)
    return ap


def _add_grid(add) -> None:
    from .grid import add_grid_parser

    add_grid_parser(add)


def _add_deploy(add) -> None:
    from .cli_deploy import add_deploy_parsers

    add_deploy_parsers(add)


#: commands that train data-parallel under torchrun (validate just runs on every rank)
_DISTRIBUTED_COMMANDS = {"run", "train", "demo", "validate"}


def _torchrun_world() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args, extra = ap.parse_known_args(argv)
    # key=value overrides may follow options (`grid CONFIG --seeds 5 out_dir=x`): argparse leaves them over
    stray = [x for x in extra if "=" not in x or x.startswith("-") or not hasattr(args, "overrides")]
    if stray:
        ap.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    if args.command not in _DISTRIBUTED_COMMANDS and _torchrun_world() > 1:
        print(f"error: `indistill {args.command}` runs in one process; under torchrun use "
              f"{', '.join(sorted(_DISTRIBUTED_COMMANDS))}", file=sys.stderr)
        return 2
    threads = os.environ.get("INDISTILL_THREADS")
    if threads:  # a grid worker: its share of the cores
        import torch

        torch.set_num_threads(int(threads))
    try:
        return int(args.fn(args) or 0)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: re-run the same command to resume from the last finished epoch", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `indistill layers resnet20 | head`: the reader left; say nothing more
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
