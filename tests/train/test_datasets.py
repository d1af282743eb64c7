"""The samples of a stage (rmt_peft/train/datasets.py): every input length of the stage from the
data registry with its own seed, failures named with the task and the stage that cannot be filled,
and the collator that keeps only what RMTModel.forward takes."""
import dataclasses

import pytest
import torch
from torch.utils.data import ConcatDataset

from rmt_peft.data.token_memory import TokenMemoryTask
from rmt_peft.errors import RecipeError
from rmt_peft.recipe import load_recipe
from rmt_peft.train import datasets
from rmt_peft.train.datasets import Collator, DataUnavailable, build_dataset, check_stage_data, final_segments


def test_a_stage_of_several_lengths_splits_its_samples_and_seeds_each_length(write_recipe):
    recipe = load_recipe(write_recipe())  # token_memory, segments of 8, vocabulary 64
    data = build_dataset(recipe, None, [1, 3], num_samples=7, seed=2)
    assert isinstance(data, ConcatDataset) and len(data) == 2 * 3  # 7 // 2 of each
    assert [len(data[i]["input_ids"]) for i in (0, 2, 3, 5)] == [8, 8, 24, 24]
    for i, (n, index) in enumerate([(1, 0), (3, 0)]):
        expected = TokenMemoryTask(3, n, 8, num_values=10, vocab_size=64, seed=2 * 1000 + n)[index]
        assert torch.equal(data[3 * i]["input_ids"], expected["input_ids"])
    one = build_dataset(recipe, None, [2], num_samples=1, seed=0)
    assert not isinstance(one, ConcatDataset) and len(one) == 1


def test_what_cannot_be_built_is_named_with_the_task(write_recipe, monkeypatch):
    recipe = load_recipe(write_recipe())
    small = dataclasses.replace(recipe, data=dataclasses.replace(recipe.data, options={"vocab_size": 12}))
    with pytest.raises(RecipeError, match=r"^data.task='token_memory' with 2 segments: vocab_size=12 leaves no noise"):
        build_dataset(small, None, [2], 1, 0)

    def offline(*args, **kwargs):
        raise OSError("the Hub is not reachable")

    monkeypatch.setattr(datasets, "registry_build", offline)
    with pytest.raises(DataUnavailable, match=r"^data.task='token_memory': the Hub is not reachable$"):
        build_dataset(recipe, None, [2], 1, 0)
    monkeypatch.setattr(datasets, "registry_build", lambda *args, **kwargs: [])
    with pytest.raises(RecipeError, match="with 2 segments produced no usable samples; check data.options"):
        build_dataset(recipe, None, [2], 1, 0)


def test_the_final_evaluation_reads_its_own_lengths_or_every_stages(write_recipe):
    assert final_segments(load_recipe(write_recipe())) == [2]  # eval.num_segments
    mixed = load_recipe(write_recipe({"eval.num_segments": [], "curriculum.segments": [1, 2, 4],
                                      "curriculum.mix_previous": True}))
    assert final_segments(mixed) == [1, 2, 4]


def test_the_first_length_a_source_cannot_fill_is_named_before_training(write_recipe, monkeypatch):
    recipe = load_recipe(write_recipe({"curriculum.segments": [1, 3], "eval.num_segments": [1, 5]}))
    asked = []

    def short_source(task, options, *, num_segments, **kwargs):
        asked.append(num_segments)
        if num_segments >= 3:
            raise IndexError("the document ends after 2 segments")
        return [{"input_ids": torch.zeros(8, dtype=torch.long)}]

    monkeypatch.setattr(datasets, "registry_build", short_source)
    with pytest.raises(RecipeError, match=r"^curriculum stage 1 \(3 segments\): data.task='token_memory' cannot fill "
                                          r"3 segments of 8 tokens: the document ends after 2 segments$"):
        check_stage_data(recipe, None)
    assert asked == [1, 3]  # in curriculum order, one sample of each length, stopping at the first failure
    asked.clear()
    with pytest.raises(RecipeError, match=r"^eval.num_segments \(5 segments\)"):
        check_stage_data(dataclasses.replace(recipe, curriculum=dataclasses.replace(
            recipe.curriculum, stages=recipe.curriculum.stages[:1])), None)
    assert asked == [1, 5]


def test_the_collator_pads_and_keeps_only_the_models_inputs():
    samples = [{"input_ids": torch.tensor([5, 6, 7]), "attention_mask": torch.ones(3, dtype=torch.long),
                "labels": torch.tensor([-100, -100, 7]), "answer_ids": torch.tensor([7])},
               {"input_ids": torch.tensor([8]), "attention_mask": torch.ones(1, dtype=torch.long),
                "labels": torch.tensor([8]), "answer_ids": torch.tensor([8])}]
    batch = Collator(pad_token_id=1, padding_side="left")(samples)
    assert sorted(batch) == ["attention_mask", "input_ids", "labels"]
    assert batch["input_ids"].tolist() == [[5, 6, 7], [1, 1, 8]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert batch["labels"].tolist() == [[-100, -100, 7], [-100, -100, 8]]
