"""The shipped recipes and DeepSpeed configs (rmt_peft/resources.py): named by file name, with or
without the suffix or recipes/, read from the checkout here (the installed wheel's copies are
tests/test_packaging.py's), and a recipe's description taken from its leading comment."""
import os

from rmt_peft import resources

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def listed(folder, suffix):
    return sorted(n[:-len(suffix)] for n in os.listdir(os.path.join(ROOT, folder)) if n.endswith(suffix))


def test_the_names_are_the_repositorys_files():
    assert resources.names(resources.RECIPES) == listed("recipes", ".yaml")
    assert resources.names(resources.DEEPSPEED_CONFIGS) == listed("deepspeed_configs", ".json")
    assert {"quickstart", "babilong_memorize"} <= set(resources.names(resources.RECIPES))
    assert resources.names(resources.DEEPSPEED_CONFIGS) == ["zero2", "zero3", "zero3_offload"]


def test_a_name_with_or_without_its_suffix_or_folder_is_the_shipped_file(tmp_path, monkeypatch):
    expected = os.path.join(ROOT, "recipes", "quickstart.yaml")
    monkeypatch.chdir(tmp_path)  # from any folder
    for value in ("quickstart", "quickstart.yaml", "recipes/quickstart.yaml", "recipes/./quickstart.yaml"):
        assert os.path.samefile(resources.recipe_path(value), expected), value
    assert os.path.samefile(resources.path(resources.DEEPSPEED_CONFIGS, "zero3.json"),
                            os.path.join(ROOT, "deepspeed_configs", "zero3.json"))
    for value in ("my/quickstart.yaml", "no_such_recipe", "recipes/no_such_recipe.yaml", "./other/quickstart"):
        assert resources.recipe_path(value) is None, value  # a path of the user's
    assert resources.path(resources.DEEPSPEED_CONFIGS, "zero9") is None


def test_a_recipes_description_is_the_first_whole_sentence_of_its_leading_comment(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("# Trains a tiny model (v1.2 of the task) on\n# two lines. More text.\n#  rmt-peft train r.yaml\n"
                    "model: {}\n# not part of it.\n")
    assert resources.describe_recipe(str(path)) == "Trains a tiny model (v1.2 of the task) on two lines."
    path.write_text("# No full stop\n#\n# at all\nmodel: {}\n")
    assert resources.describe_recipe(str(path)) == "No full stop at all"
    path.write_text("model: {}\n")
    assert resources.describe_recipe(str(path)) == ""
    assert resources.describe_recipe(resources.recipe_path("quickstart")).startswith("Quickstart (offline, on CPU")
