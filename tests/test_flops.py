"""The FLOPs estimator: a hand count for one small config, the paper's ratios, configs, CLI."""
import json
import math

import pytest

from rmt_peft.cli import main
from rmt_peft.flops import OPT_FAMILY, TransformerShape, estimate, forward_flops, resolve_shape
from rmt_peft.tiny_models import tiny_config


def test_forward_flops_matches_a_hand_count():
    # d=8, 2 heads (d_head 4), ffn 32, V=10, 3 layers, n=k=5, written out term by term:
    # qkv 2*3*5*8*8=1920, logits 2*5*5*8=400, softmax 3*2*5*5=150, values 400, out 2*5*8*8=640,
    # mlp 2*5*(8*32+8*32)=5120 -> layer 8630; x3 = 25890; final logits 2*5*8*10=800.
    shape = TransformerShape("toy", vocab_size=10, hidden_size=8, num_layers=3, num_heads=2, ffn_size=32)
    assert forward_flops(shape, 5) == 25890 + 800
    assert forward_flops(shape, 5, count_embeddings=True) == 25890 + 800 + 800


def test_rmt_counts_padded_segments_with_read_and_write_memory():
    shape = TransformerShape("toy", vocab_size=10, hidden_size=8, num_layers=3, num_heads=2, ffn_size=32)
    result = estimate(shape, total_tokens=25, segment_size=10, num_memory_tokens=2)
    assert result.num_segments == 3
    assert result.rmt_flops == 3 * forward_flops(shape, 14)
    assert result.full_attention_flops == forward_flops(shape, 25)


@pytest.mark.parametrize("memory", [0, 10])
def test_paper_ratios_at_two_million_tokens(memory):
    # The paper: ~295x fewer FLOPs than OPT-125M and ~29x fewer than OPT-175B.
    small = estimate("opt-125m", 2_048_000, 512, memory)
    large = estimate("opt-175b", 2_048_000, 512, memory)
    assert abs(small.ratio / 295 - 1) < 0.10
    assert abs(large.ratio / 29 - 1) < 0.10


def test_quadratic_vs_linear_scaling():
    # Doubling the length: RMT doubles, full attention grows by more than 2x (towards 4x).
    a, b = estimate("opt-1.3b", 256_000, 512, 10), estimate("opt-1.3b", 512_000, 512, 10)
    assert b.rmt_flops == 2 * a.rmt_flops
    assert 3.5 < b.full_attention_flops / a.full_attention_flops < 4.0


def test_opt_configs_and_transformers_configs():
    assert len(OPT_FAMILY) == 9
    assert resolve_shape("facebook/opt-175b").hidden_size == 12288
    gpt2 = resolve_shape(tiny_config("gpt2", hidden_size=64, num_layers=2, num_heads=4, vocab_size=128))
    assert (gpt2.hidden_size, gpt2.num_layers, gpt2.ffn_size, gpt2.mlp_matrices) == (64, 2, 256, 2)
    llama = resolve_shape(tiny_config("llama", hidden_size=64, num_heads=4))
    # grouped KV (2 of 4 heads) and a 3-matrix MLP of 128
    n, d = 7, 64
    expected_layer = (2 * n * d * 16 * (4 + 2 * 2) + 2 * n * n * 64 + 3 * 4 * n * n + 2 * n * n * 64
                      + 2 * n * 64 * d + 2 * n * 3 * d * 128)
    assert forward_flops(llama, n) == 2 * expected_layer + 2 * n * d * 128


def test_config_path(tmp_path):
    tiny_config("opt", hidden_size=64).save_pretrained(tmp_path)
    assert resolve_shape(str(tmp_path)).ffn_size == 256
    with pytest.raises(ValueError, match="built-in"):
        resolve_shape(str(tmp_path / "missing"))


def test_cli_json_and_plot(tmp_path, capsys):
    out = tmp_path / "flops.png"
    code = main(["flops", "--model", "opt-175b", "--total-tokens", "2048000", "--segment-size", "512",
                 "--memory-tokens", "10", "--json", "--plot", str(out), "--models", "opt-125m,opt-175b"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["ratio"] == pytest.approx(result["full_attention_flops"] / result["rmt_flops"])
    assert result["num_segments"] == math.ceil(2_048_000 / 512)
    assert out.stat().st_size > 10_000


def test_cli_bad_model_or_count_is_one_line(tmp_path, capsys):
    for args in (["--model", str(tmp_path / "no-such-model")], ["--total-tokens", "0"], ["--segment-size", "-5"]):
        assert main(["flops", *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith("rmt-peft flops: error: ") and err.count("\n") == 1, err
