"""`distill` command line: one subcommand per job, each a thin call into its module."""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys

from distill.errors import NonFiniteError, ServerError, UserError


def _recipe_job(args, rest):
    """train, finetune, generate, prune: a recipe (+ --key value overrides) into the job module's `run`."""
    if args.help_keys:
        from distill.recipe import describe

        print(describe(importlib.import_module(f"distill.{args.module}").ARGUMENTS))
        return
    # A job's first step is parsing its recipe (distill.recipe.parse): a bad key or value is refused
    # before anything loads, as soon as the job's imports (transformers: seconds) are done.
    importlib.import_module(f"distill.{args.module}").run(args.recipe, rest)


def end_process_group() -> None:
    """Destroy the process group of a launched job that finished on every process.

    Only after success: a rank that failed may leave the others inside a collective, and destroying the
    group under them deadlocks (torchtitan#1342); their launcher stops them instead. Left to
    finalisation, the group's worker threads can outlive the interpreter and abort the process after
    its work is saved ("terminate called without an active exception", pytorch#190489), and NCCL warns
    that the group was never destroyed."""
    dist = sys.modules.get("torch.distributed")  # a job that never imported it made no group
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return
    # No process tears the group down under another's last collective. On NCCL, on this process's own
    # GPU, as accelerate's wait_for_everyone does: unnamed, torch guesses it from the rank.
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[sys.modules["torch"].cuda.current_device()])
    else:
        dist.barrier()
    dist.destroy_process_group()


def _no_extra(rest):
    if rest:
        raise UserError(f"unrecognized arguments: {' '.join(rest)}")


def _cache_teacher(args, rest):
    from distill import cache_teacher

    print(cache_teacher.summary(*cache_teacher.build(args.recipe, rest), args.recipe, rest))


def _merge(args, rest):
    from distill import adapters

    _no_extra(rest)
    print(adapters.merge(args.adapter, args.output, args.base, args.dtype))


def _eval(args, rest):
    from distill import evaluate

    _no_extra(rest)
    evaluate.run(args)


def _cost(args, rest):
    from distill import planner

    _no_extra(rest)
    print(planner.command(args))


def _recipe_parser(sub, name: str, module: str, help: str) -> None:
    p = sub.add_parser(name, help=help)
    p.add_argument("recipe", nargs="?", help="recipe YAML; then any --key value overrides")
    p.add_argument("--help_keys", action="store_true", help="list every recipe key with its default and help")
    p.set_defaults(func=_recipe_job, module=module)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distill", description="Distill a teacher LM into a student, then adapt it.")
    sub = parser.add_subparsers(dest="command", required=True)

    _recipe_parser(sub, "train", "train", "distill a teacher into a student from a recipe")

    p = sub.add_parser("cache-teacher", help="run the teacher once and store its top-k targets for `teacher_cache`")
    p.add_argument(
        "recipe", nargs="?", help="the training recipe, with teacher_cache: PATH; then --key value overrides"
    )
    p.set_defaults(func=_cache_teacher)

    _recipe_parser(sub, "finetune", "finetune", "fine-tune a (distilled) model on domain data, with LoRA or in full")

    p = sub.add_parser("merge", help="fold a LoRA adapter into its base: a full model plain transformers loads")
    p.add_argument("adapter", help="folder with adapter_config.json + adapter_model.safetensors (a use_peft run)")
    p.add_argument("--output", required=True, help="folder for the merged model and tokenizer")
    p.add_argument("--base", help="base model path or hub id (default: the one named in adapter_config.json)")
    p.add_argument("--dtype", default="float32", help="dtype to merge and save in (float32)")
    p.set_defaults(func=_merge)

    _recipe_parser(
        sub, "generate", "generate", "write the teacher's completions for a prompt file (sequence-level KD data)"
    )

    _recipe_parser(sub, "prune", "prune", "cut a smaller student out of the teacher (depth and width), to distill")

    p = sub.add_parser("eval", help="teacher vs student on held-out data: quality, speed and cost, with plots")
    p.add_argument("--teacher", required=True, help="teacher: model dir, .gguf file or hub id")
    p.add_argument("--student", required=True, help="student: model dir, LoRA adapter dir, .gguf file or hub id")
    p.add_argument("--data", required=True, help="held-out data: a file, folder or hub dataset distill can train on")
    p.add_argument("--split", default="train", help="split of a hub dataset (train)")
    p.add_argument("--max_samples", type=int, help="use only the first N rows of --data")
    p.add_argument(
        "--max_length", type=int, default=512, help="tokens per sequence, and the context FLOPs assume (512)"
    )
    p.add_argument("--batch_size", type=int, default=8, help="sequences per forward pass (8)")
    p.add_argument("--dtype", default="auto", help="dtype both models run in: auto (as saved), float32, bfloat16")
    p.add_argument("--output_dir", help="where the report goes (default: RUN_DIR/eval, else STUDENT/eval)")
    p.add_argument("--run_dir", help="the student's training output_dir: adds its loss curves and training cost")
    p.add_argument("--compare", nargs="+", default=[], help="earlier eval_report.json files (or their folders) to plot")
    p.add_argument("--prompts", help="prompt file for the greedy generations (default: prompts from --data)")
    p.add_argument("--num_prompts", type=int, default=4, help="greedy generations side by side (4; 0 for none)")
    p.add_argument("--max_new_tokens", type=int, default=32, help="tokens per greedy generation (32)")
    p.add_argument("--accelerator", default="H100", help="accelerator whose dense bf16 peak prices a token (H100)")
    p.add_argument("--peak_tflops", type=float, help="dense bf16 peak TFLOP/s per device; overrides --accelerator")
    p.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOPs utilisation when serving, 0-1 (0.4)")
    p.add_argument(
        "--gpu_hour_price", "--price", dest="price_per_gpu_hour", type=float, help="$ per GPU-hour, for $ per 1M tokens"
    )
    p.set_defaults(func=_eval)

    p = sub.add_parser("cost", help="plan a run's compute, time and $ before launching it")
    p.add_argument("--student", required=True, help="student: model dir, config.json, hub id, or a count like 135M")
    p.add_argument("--teacher", help="teacher, same forms as --student (leave out for plain fine-tuning)")
    p.add_argument("--tokens", required=True, help="training tokens, e.g. 2B or 300e9")
    p.add_argument("--seq_len", type=int, default=2048, help="sequence length, for the attention term (2048)")
    p.add_argument(
        "--teacher_tokens_per_token", type=float, default=1.0,
        help="the teacher's tokens per student token for the same text (1; a teacher with another tokenizer: "
        "`distill eval` prints it as teacher_tokens_per_student_token)",
    )  # fmt: skip
    p.add_argument("--accelerator", default="H100", help="accelerator whose dense bf16 peak is assumed (H100)")
    p.add_argument("--peak_tflops", type=float, help="dense bf16 peak TFLOP/s per device; overrides --accelerator")
    p.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOPs utilisation, 0-1 (0.4)")
    p.add_argument("--gpu_hour_price", "--price", dest="price", type=float, help="$ per GPU-hour, for dollar figures")
    p.add_argument("--server_pflops", type=float, default=5.0, help="PFlop/s one server sustains (5)")
    p.add_argument("--days", type=float, nargs="+", default=[3, 5, 10], help="deadlines in days (3 5 10)")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.set_defaults(func=_cost)
    return parser


def underscored(argv: list[str]) -> list[str]:
    """``--max-length=8`` -> ``--max_length=8``: every flag is spelled with underscores, as the recipe
    keys are, and the dashed spelling is taken as the same flag."""
    return [re.sub(r"^--[A-Za-z][\w-]*", lambda m: m[0][:2] + m[0][2:].replace("-", "_"), a) for a in argv]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(underscored(sys.argv[1:] if argv is None else argv))
    if getattr(args, "recipe", "") is None and not getattr(args, "help_keys", False):
        parser.error(f"{args.command} needs a recipe file: distill {args.command} RECIPE.yaml [--key value ...]")
    try:
        args.func(args, rest)
        end_process_group()
    except BrokenPipeError:
        # `distill ... | head` closed the pipe: what was asked for was read. Python's own advice: point
        # stdout at devnull so that the flush at exit does not raise a second time.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except UserError as err:
        # The message says what to fix; a traceback would bury it. Anything else, ValueError included,
        # is a bug in distill and keeps its traceback, so that it is never shown as the user's mistake.
        print(f"distill {args.command}: error: {err}", file=sys.stderr)
        return 2
    except (NonFiniteError, ServerError) as err:
        print(f"distill {args.command}: stopped: {err}", file=sys.stderr)
        return 1
    finally:
        if "distill.teacher_server" in sys.modules:  # a run that talked to a server leaves no call half done
            sys.modules["distill.teacher_server"].finish_requests()
    return 0


if __name__ == "__main__":
    sys.exit(main())
