"""`distill` command line: one subcommand per job, each a thin call into its module."""

from __future__ import annotations

import argparse
import sys


def _train(args, rest):
    from distill import train

    if args.help_keys:
        from distill.recipe import describe

        print(describe(train.ARGUMENTS))
        return
    train.run(args.recipe, rest)


def _cost(args, rest):
    from distill import cost

    if rest:
        raise ValueError(f"unrecognized arguments: {' '.join(rest)}")
    print(cost.command(args))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distill", description="Distill a teacher LM into a student, then adapt it.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="distill a teacher into a student from a recipe")
    p.add_argument("recipe", nargs="?", help="recipe YAML; then any --key value overrides")
    p.add_argument("--help-keys", action="store_true", help="list every recipe key with its default and help")
    p.set_defaults(func=_train)

    p = sub.add_parser("cost", help="plan a run's compute, time and $ before launching it")
    p.add_argument("--student", required=True, help="student: model dir, config.json, hub id, or a count like 135M")
    p.add_argument("--teacher", help="teacher, same forms as --student (leave out for plain fine-tuning)")
    p.add_argument("--tokens", required=True, help="training tokens, e.g. 2B or 300e9")
    p.add_argument("--seq-len", type=int, default=2048, help="sequence length, for the attention term (2048)")
    p.add_argument("--accelerator", default="H100", help="accelerator whose dense bf16 peak is assumed (H100)")
    p.add_argument("--peak-tflops", type=float, help="dense bf16 peak TFLOP/s per device; overrides --accelerator")
    p.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOPs utilisation, 0-1 (0.4)")
    p.add_argument("--price", type=float, help="$ per GPU-hour, for dollar figures")
    p.add_argument("--server-pflops", type=float, default=5.0, help="PFlop/s one server sustains (5)")
    p.add_argument("--days", type=float, nargs="+", default=[3, 5, 10], help="deadlines in days (3 5 10)")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.set_defaults(func=_cost)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if getattr(args, "recipe", "") is None and not getattr(args, "help_keys", False):
        parser.error(f"{args.command} needs a recipe file: distill {args.command} RECIPE.yaml [--key value ...]")
    try:
        args.func(args, rest)
    except ValueError as err:
        # Errors a user can cause are ValueErrors with a message that says what to fix; a traceback
        # would bury it. Anything else is a bug and keeps its traceback.
        print(f"distill {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
