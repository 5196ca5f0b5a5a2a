"""The `distill finetune` job: supervised fine-tuning of a (distilled) student on domain data, with
LoRA adapters (`use_peft: true`) or in full.

Same shape as `distill train` without a teacher: checks cheapest-first, then data, then the model,
then a `MeteredTrainer`, the `transformers.Trainer` that measures the training FLOPs as `distill
train` does (cost_report.json and the cost summary). The data pipeline masks prompts and
non-assistant turns with -100, so the model's own cross-entropy (normalised by the Trainer's token
count across gradient accumulation) is the loss on completion / assistant tokens only, and
`eval_loss` is the same loss on the held-out split.
"""

from __future__ import annotations

from distill import adapters
from distill.config import DataArguments, FinetuneConfig, ModelArguments
from distill.console import quiet_libraries
from distill.data import Collator, build_datasets
from distill.models import check_max_length, load_tokenizer, resolve, vocab_sizes_fit
from distill.recipe import load_recipe, parse
from distill.train import resume_checkpoint, train_and_save
from distill.trainer import MeteredTrainer

ARGUMENTS = (ModelArguments, DataArguments, FinetuneConfig)


def run(recipe_path: str, overrides: list[str] | None = None) -> dict:
    recipe = load_recipe(recipe_path, overrides)
    model_args, data_args, config = parse(recipe, ARGUMENTS)
    resume = resume_checkpoint(config)
    config.check_output_dir(resuming=resume is not None)
    quiet_libraries(data_args.dataset, data_args.eval_dataset)
    adapters.check(model_args, config)
    resolve(model_args.model_name_or_path)
    check_max_length(model_args.model_name_or_path, data_args.max_length, "model")

    tokenizer = load_tokenizer(model_args.model_name_or_path)
    with config.main_process_first(desc="tokenizing"):
        train_data, eval_data = build_datasets(data_args, tokenizer, seed=config.seed)

    model = adapters.load_student(model_args, config)
    vocab_sizes_fit(tokenizer, model)
    if config.process_index == 0:
        print(adapters.trainable_parameters(model), flush=True)

    # The "before" evaluation runs inside train(), once the engine has prepared the model: called
    # before train(), evaluate() would prepare it for evaluation only, and under DDP each process
    # would then train on its own gradients (see distill.train).
    config.eval_on_start = eval_data is not None and not resume
    trainer = MeteredTrainer(
        model=model,
        args=config,
        train_dataset=train_data,
        eval_dataset=eval_data,
        processing_class=tokenizer,
        data_collator=Collator(tokenizer.pad_token_id),
    )
    return train_and_save(trainer, recipe, resume, summary)


def summary(trainer, metrics: dict, output_dir: str) -> str:
    def fmt(x):
        return "n/a" if x is None else f"{x:.4f}"

    lines = ["", "distill finetune: done", f"  steps            {metrics['global_step']}"]
    if metrics["eval"]:
        lines.append(
            f"  held-out loss    before {fmt(metrics['eval_before'].get('eval_before_loss'))}"
            f"  after {fmt(metrics['eval']['eval_loss'])}"
        )
    lines.append(f"  {adapters.saved_to(trainer.model, output_dir, 'model')}")
    return "\n".join(lines)
