"""``python -m benchmarks [--quick] [--full] [--only NAME ...] [--label L] [--note TEXT]``: run benchmarks, write JSON,
regenerate the README."""

from __future__ import annotations

import argparse
import importlib
import sys
import time

from .common import HARNESS, README, RESULTS_DIR, load_average, machine_info, render_readme, write_result

BENCHMARKS = ("throughput", "throughput_kd", "memory", "end_to_end", "retrieval", "grid_profile", "engine_overhead")
# benchmark name -> (module, function): throughput_kd is the KD-step study in throughput.py
ENTRY = {"throughput_kd": ("throughput", "run_kd")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    ap.add_argument("--quick", action="store_true", help="smaller case matrix and fewer batches")
    ap.add_argument("--full", action="store_true", help="end_to_end also runs configs/fashion_mnist.yaml")
    ap.add_argument("--only", action="append", choices=BENCHMARKS, help="run only this benchmark (repeatable)")
    ap.add_argument("--label", help="write results/NAME_LABEL.json instead of NAME.json (e.g. engine_overhead "
                    "--label before / after: the same benchmark kept on both sides of a change)")
    ap.add_argument("--note", help="a sentence stored in the JSON and shown in the README (e.g. what else ran on the machine)")
    ap.add_argument("--readme-only", action="store_true", help="only regenerate README.md from the JSON files")
    args = ap.parse_args(argv)
    if args.label and not args.label.replace("-", "").replace("_", "").isalnum():
        ap.error(f"--label must be letters, digits, '-' or '_', got {args.label!r}")
    if not args.readme_only:
        for name in args.only or BENCHMARKS:
            module, fn = ENTRY.get(name, (name, "run"))
            try:
                mod = importlib.import_module(f"benchmarks.{module}")
            except ImportError as e:
                print(f"{name}: skipped ({e})", flush=True)
                continue
            print(f"{name}:", flush=True)
            before, t0 = load_average(), time.perf_counter()
            run = getattr(mod, fn)
            payload = run(args.quick, args.full) if name == "end_to_end" else run(args.quick)
            payload = dict(payload) if isinstance(payload, dict) else {"result": payload}
            payload.update({
                "benchmark": name, "harness": HARNESS, "quick": args.quick, "machine": machine_info(), "load_before": before,
                "load_after": load_average(), "wall_s": time.perf_counter() - t0,
                "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                "command": "python -m benchmarks " + " ".join(sys.argv[1:] if argv is None else argv),
            })
            if args.label:
                payload["label"] = args.label
            if args.note:
                payload["note"] = args.note
            if name == "retrieval":
                # benchmarks/retrieval.py writes its own retrieval[_quick].json; it is not ours to overwrite.
                print(f"  -> retrieval wrote its own JSON ({payload['wall_s']:.0f} s)", flush=True)
                continue
            out = f"{name}_{args.label}" if args.label else name
            print(f"  -> {write_result(out, payload)} ({payload['wall_s']:.0f} s)", flush=True)
    README.write_text(render_readme(RESULTS_DIR))
    print(f"wrote {README}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
