"""Building what a recipe trains (rmt_peft/train/build.py): the tokenizer a recipe needs, a
missing model or tokenizer as one line naming the key, the backbone built from a config, and the
RMTModel with the speed-ups, compiled blocks and weight cache the recipe asks for."""
import pytest
import torch

from rmt_peft.errors import UserError
from rmt_peft.recipe import load_recipe
from rmt_peft.tiny_models import save_tiny_model, tiny_model
from rmt_peft.train.build import build_backbone, build_model, build_tokenizer, embedding_std, not_found_is_user_error


def test_a_token_task_on_a_tiny_model_needs_no_tokenizer_and_a_text_task_gets_the_offline_one(write_recipe):
    from rmt_peft.data.tokenizer import offline_vocabulary

    assert build_tokenizer(load_recipe(write_recipe())) is None  # token_memory reads raw ids
    text = {"data": {"task": "babilong_memorize", "options": {}}, "model.config.vocab_size": 640}
    tokenizer = build_tokenizer(load_recipe(write_recipe(text)))
    assert tokenizer.convert_ids_to_tokens([0, 1, 2]) == ["<pad>", "<eos>", "<unk>"]
    assert len(tokenizer) == len(offline_vocabulary())
    # asked for by name, a token task gets it too
    assert build_tokenizer(load_recipe(write_recipe({"model.tokenizer": "offline"}))) is not None


def test_a_model_or_tokenizer_that_cannot_be_found_is_one_line_naming_the_key(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError) as err:
        with not_found_is_user_error("model.tokenizer", "someone/missing"):
            raise OSError("We couldn't connect to the Hub\nsecond line")
    assert str(err.value) == ("model.tokenizer='someone/missing' could not be loaded (offline: HF_HUB_OFFLINE is set "
                              "and it is not in the cache): We couldn't connect to the Hub")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    with pytest.raises(UserError, match=r"^model.name_or_path='x' could not be loaded: OSError$"):
        with not_found_is_user_error("model.name_or_path", "x"):
            raise OSError()
    with pytest.raises(KeyError):  # anything else passes through
        with not_found_is_user_error("model.name_or_path", "x"):
            raise KeyError("x")


def test_a_tiny_backbone_is_built_from_its_config_with_the_run_seed_in_its_dtype(write_recipe):
    recipe = load_recipe(write_recipe({"model.dtype": "bfloat16"}))
    backbone = build_backbone(recipe, seed=7)
    expected = tiny_model("gpt_neo", seed=7, vocab_size=64, max_positions=64)
    assert {p.dtype for p in backbone.parameters()} == {torch.bfloat16}
    weight, want = backbone.get_input_embeddings().weight, expected.get_input_embeddings().weight
    assert torch.equal(weight, want.to(torch.bfloat16))
    assert not torch.equal(build_backbone(recipe, seed=8).get_input_embeddings().weight, weight)
    assert embedding_std(expected) == pytest.approx(float(want.detach().std()))


def test_the_memory_starts_at_the_embeddings_scale_unless_the_recipe_sets_it(write_recipe):
    recipe = load_recipe(write_recipe())
    assert recipe.memory.memory_init_std is None
    model = build_model(recipe, seed=0)
    assert model.training
    std = float(model.causal_lm.get_input_embeddings().weight.detach().std())  # taken whole, even under ZeRO-3
    assert model.memory_config.memory_init_std == pytest.approx(std)
    assert all(p.requires_grad for p in model.parameters())  # lora null: the whole small model trains
    assert build_model(load_recipe(write_recipe({"memory.memory_init_std": 0.5})), seed=0).memory_config \
        .memory_init_std == 0.5


def test_speedups_are_applied_and_can_be_turned_off(write_recipe):
    """model.speedups (default true): fused GELU and GPT-Neo's SDPA attention, with the same loss as
    the model without them; model.attention=eager keeps eager attention."""
    from transformers.activations import NewGELUActivation

    from rmt_peft.attention import GPTNeoSdpaSelfAttention
    from rmt_peft.speedups import FusedTanhGelu

    def kinds(model):
        return [sum(type(m) is kind for m in model.modules())
                for kind in (FusedTanhGelu, NewGELUActivation, GPTNeoSdpaSelfAttention)]

    on, off = (build_model(load_recipe(write_recipe(changes)), seed=0) for changes in ({}, {"model.speedups": False}))
    assert kinds(on) == [2, 0, 2] and on.pad_lm_head  # two tiny GPT-Neo layers
    assert kinds(off) == [0, 2, 0] and not off.pad_lm_head
    eager = build_model(load_recipe(write_recipe({"model.attention": "eager"})), seed=0)
    assert kinds(eager) == [2, 0, 0]
    ids = torch.randint(0, 64, (2, 24))
    torch.testing.assert_close(on(ids, labels=ids).loss, off(ids, labels=ids).loss, rtol=1e-5, atol=1e-6)


def test_compile_mode_reaches_compile_blocks(write_recipe, monkeypatch):
    import rmt_peft.speedups

    calls = []
    monkeypatch.setattr(rmt_peft.speedups, "compile_blocks", lambda model, **kwargs: calls.append(kwargs))
    build_model(load_recipe(write_recipe({"model.compile_blocks": True})), seed=0)
    build_model(load_recipe(write_recipe({"model.compile_blocks": True, "model.compile_mode": "reduce-overhead"})),
                seed=0)
    build_model(load_recipe(write_recipe()), seed=0)  # compile_blocks: null, and no GPU here
    assert calls == [{}, {"mode": "reduce-overhead"}]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # null means: on where a GPU is
    build_model(load_recipe(write_recipe()), seed=0)
    build_model(load_recipe(write_recipe({"model.compile_blocks": False})), seed=0)
    assert calls == [{}, {"mode": "reduce-overhead"}, {}]


def test_compile_scope_and_memory_budget_reach_the_compile(write_recipe, monkeypatch):
    import rmt_peft.speedups

    calls = []
    monkeypatch.setattr(rmt_peft.speedups, "compile_body", lambda model, **kwargs: calls.append(("body", kwargs)))
    monkeypatch.setattr(rmt_peft.speedups, "compile_blocks", lambda model, **kwargs: calls.append(("blocks", kwargs)))
    build_model(load_recipe(write_recipe({"model.compile_blocks": True, "model.compile_scope": "body",
                                          "model.compile_mode": "reduce-overhead"})), seed=0)
    build_model(load_recipe(write_recipe({"model.compile_blocks": True, "model.compile_memory_budget": 0.5})), seed=0)
    assert calls == [("body", {"mode": "reduce-overhead"}), ("blocks", {"memory_budget": 0.5})]


def test_no_blocks_are_compiled_under_zero3_and_one_line_says_why(write_recipe, monkeypatch, caplog):
    """ZeRO-3's per-module hooks make torch.compile recompile until its limit: compile_blocks null
    resolves to off there (the recipe's rule: tests/test_recipe.py), with one log line saying why."""
    import rmt_peft.speedups

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    calls = []
    monkeypatch.setattr(rmt_peft.speedups, "compile_blocks", lambda model, **kwargs: calls.append(kwargs))
    with caplog.at_level("INFO", logger="rmt_peft"):
        build_model(load_recipe(write_recipe(), ["training.deepspeed=zero3"]), seed=0)
    assert calls == []
    said = [r.getMessage() for r in caplog.records if "compile_blocks" in r.getMessage()]
    assert len(said) == 1 and "off under ZeRO-3" in said[0] and "recompile" in said[0], said


def test_a_half_precision_backbone_under_zero3_without_training_bf16_is_warned_about(write_recipe, caplog):
    """ZeRO-3 partitions in the DeepSpeed config's dtype: fp32 unless training.bf16 (or fp16) is set."""

    def warnings_of(overrides):
        caplog.clear()
        with caplog.at_level("WARNING", logger="rmt_peft"):
            build_model(load_recipe(write_recipe(), overrides), seed=0)
        return [r.getMessage() for r in caplog.records if "training.bf16" in r.getMessage()]

    said = warnings_of(["training.deepspeed=zero3", "model.dtype=bfloat16"])
    assert len(said) == 1 and "model.dtype=bfloat16 under ZeRO-3" in said[0] and "fp32" in said[0], said
    assert warnings_of(["training.deepspeed=zero2", "model.dtype=bfloat16"]) == []
    assert warnings_of(["training.deepspeed=zero3", "model.dtype=float32"]) == []


def test_dequantized_weight_cache_reaches_the_4bit_backbone(write_recipe, tmp_path):
    path = save_tiny_model(str(tmp_path / "neo"), "gpt_neo", vocab_size=64, max_positions=64)
    changes = {"model": {"name_or_path": path, "quantization": "4bit", "cache_dequantized_weights": True},
               "lora": "attention"}  # a quantized backbone does not train: lora null is refused
    model = build_model(load_recipe(write_recipe(changes)), seed=0)
    assert sum(hasattr(m, "dequantized_weight") for m in model.modules()) == 12  # 6 linear layers x 2 blocks
