"""`distill cache-teacher` ends with the `distill train` command that reads its cache, runnable as it
is printed: the recipe and overrides the cache was built from (so k, temperature and data match),
and another output_dir when the recipe's holds a finished run, which `distill train` refuses."""

from distill.cache_teacher import train_command

OVERRIDES = ["--teacher_cache", "runs/cache", "--teacher_top_k", "8"]


def test_the_hint_repeats_the_recipe_and_the_overrides_the_cache_was_built_with(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"output_dir: {tmp_path / 'run'}\n")
    assert train_command(8, "runs/cache", str(recipe), OVERRIDES) == f"distill train {recipe} {' '.join(OVERRIDES)}"


def test_the_hint_trains_into_another_folder_when_the_recipes_holds_a_finished_run(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"output_dir: {tmp_path / 'run'}\n")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.json").write_text("{}")
    command = train_command(8, "runs/cache", str(recipe), OVERRIDES)
    assert command == f"distill train {recipe} {' '.join(OVERRIDES)} --output_dir {tmp_path / 'run'}_cached"


def test_without_the_recipe_the_hint_names_the_cache_and_its_k():
    assert train_command(8, "runs/cache") == "distill train RECIPE.yaml --teacher_cache runs/cache --teacher_top_k 8"
