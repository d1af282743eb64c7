"""Tiny random models built from configs (rmt_peft/tiny_models.py): the shapes asked for in every
architecture, the same weights for the same seed, and a saved copy that loads like a checkpoint."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from rmt_peft.tiny_models import ARCHITECTURES, save_tiny_model, tiny_config, tiny_model


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_every_architecture_has_the_shape_asked_for(architecture):
    config = tiny_config(architecture, vocab_size=96, hidden_size=32, num_layers=3, num_heads=2, max_positions=48)
    assert config.model_type == architecture
    assert (config.vocab_size, config.hidden_size, config.num_hidden_layers) == (96, 32, 3)
    assert (config.bos_token_id, config.eos_token_id) == (0, 1)
    model = tiny_model(architecture, vocab_size=96, hidden_size=32, num_layers=3, num_heads=2, max_positions=48)
    assert model.get_input_embeddings().weight.shape == (96, 32) and not model.training
    assert model(torch.tensor([[0, 5, 95]])).logits.shape == (1, 3, 96)


def test_gpt_neo_alternates_global_and_local_layers_when_it_can():
    assert tiny_config("gpt_neo", num_layers=4).attention_layers == ["global", "local", "global", "local"]
    assert tiny_config("gpt_neo", num_layers=3).attention_layers == ["global"] * 3
    with pytest.raises(ValueError, match=r"architecture='bert' is not known; allowed: \('gpt_neo'"):
        tiny_config("bert")


def test_the_seed_fixes_the_weights_and_a_saved_model_loads_them(tmp_path):
    a, b, c = tiny_model("opt", seed=3), tiny_model("opt", seed=3), tiny_model("opt", seed=4)
    weight = a.get_input_embeddings().weight
    assert torch.equal(weight, b.get_input_embeddings().weight)
    assert not torch.equal(weight, c.get_input_embeddings().weight)
    path = save_tiny_model(str(tmp_path / "opt"), "opt", seed=3)
    loaded = AutoModelForCausalLM.from_pretrained(path)
    assert all(torch.equal(p, q) for p, q in zip(loaded.state_dict().values(), a.state_dict().values()))
