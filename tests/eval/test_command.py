"""`rmt-peft eval` end to end on saved tiny adapters: files, baseline, numbers = direct forward."""
import json

import pytest
import torch
from peft import LoraConfig

from rmt_peft.backbones import load_backbone
from rmt_peft.cli import main
from rmt_peft.data.token_memory import TokenMemoryTask
from rmt_peft.errors import UserError
from rmt_peft.eval.command import parse_segments
from rmt_peft.loading import locate
from rmt_peft.metrics import exact_match
from rmt_peft.memory import MemoryConfig
from rmt_peft.recurrent import RMTModel
from rmt_peft.tiny_models import tiny_model


def save_adapter(tmp_path, name, memory):
    base = tiny_model("gpt2", seed=1)
    with torch.no_grad():  # make the value tokens (4..13) the likely predictions: accuracy is not always 0
        base.get_input_embeddings().weight[4:14] *= 6
    base.save_pretrained(tmp_path / "base")
    rmt = RMTModel.from_backbone(load_backbone(str(tmp_path / "base")),
                                 MemoryConfig(num_memory_tokens=memory, segment_size=8),
                                 lora=LoraConfig(r=4, target_modules=["c_attn"], init_lora_weights=False))
    folder = tmp_path / name / "final"
    rmt.save_pretrained(str(folder))
    return str(folder)


def test_parse_segments_and_locate(tmp_path):
    assert parse_segments("1,2,4,...,64") == [1, 2, 4, 8, 16, 32, 64]
    assert parse_segments("4,1,2") == [1, 2, 4]
    with pytest.raises(UserError, match="neither a training run"):
        locate(str(tmp_path))
    (tmp_path / "final").mkdir()
    (tmp_path / "recipe.yaml").write_text("{}")
    assert locate(str(tmp_path)) == (str(tmp_path / "final"), str(tmp_path / "recipe.yaml"))


@pytest.mark.slow
@torch.no_grad()
def test_eval_adapter_with_baseline(tmp_path, capsys):
    run = save_adapter(tmp_path, "rmt-run", memory=2)
    baseline = save_adapter(tmp_path, "nomem-run", memory=0)
    out = tmp_path / "out"
    code = main(["eval", run, "--task", "token_memory", "--segments", "1,2", "--samples", "8",
                 "--seed", "7", "--baseline", baseline, "--out", str(out), "--no-progress", "--device", "cpu"])
    assert code == 0
    printed = capsys.readouterr().out
    assert json.loads(printed[printed.index("{\n"):])["curve"] == "accuracy"
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics["results"]) == ["rmt-run", "nomem-run"]
    assert metrics["models"]["nomem-run"]["num_memory_tokens"] == 0
    accuracies = []
    for name, folder in (("rmt-run", run), ("nomem-run", baseline)):
        rmt = RMTModel.from_pretrained(folder)
        for point in metrics["results"][name]:
            task = TokenMemoryTask(8, point["num_segments"], 8, seed=7)
            ids = torch.stack([task[i]["input_ids"] for i in range(8)])
            labels = torch.stack([task[i]["labels"] for i in range(8)])
            accuracies.append(point["accuracy"])
            assert point["accuracy"] == pytest.approx(float(exact_match(rmt(ids).logits, labels).mean()))
    assert max(accuracies) > 0
    for name in ("accuracy_vs_length.csv", "accuracy_vs_length.png", "time_vs_length.png", "memory_vs_length.png"):
        assert (out / name).stat().st_size > 0


@torch.no_grad()
def test_eval_run_folder_takes_the_recipe_and_overrides(tmp_path, capsys):
    import yaml

    save_adapter(tmp_path, "run", memory=2)
    recipe = {"model": {"name_or_path": str(tmp_path / "base")},
              "memory": {"num_memory_tokens": 2, "segment_size": 8}, "lora": None,
              "data": {"task": "token_memory", "options": {"num_values": 4}, "seed": 3},
              "training": {"output_dir": str(tmp_path / "run"), "max_steps": 1},
              "eval": {"num_segments": [1, 2], "num_samples": 5, "baseline": True}}
    (tmp_path / "run" / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    # Training with eval.baseline leaves the 0-memory run in RUN/baseline: eval picks it up.
    save_adapter(tmp_path / "run", "baseline", memory=0)
    (tmp_path / "run" / "baseline" / "recipe.yaml").write_text(yaml.safe_dump(
        {**recipe, "memory": {"num_memory_tokens": 0, "segment_size": 8}, "eval": {"baseline": False}}))
    assert main(["eval", str(tmp_path / "run"), "eval.num_samples=3", "memory.segment_alignment=right",
                 "--no-progress", "--device", "cpu"]) == 0
    metrics = json.loads((tmp_path / "run" / "eval" / "metrics.json").read_text())
    assert metrics["segments"] == [1, 2] and metrics["num_samples"] == 3
    assert metrics["task_options"] == {"num_values": 4} and metrics["seed"] == 1003
    assert [p["num_samples"] for p in metrics["results"]["run"]] == [3, 3]
    assert metrics["models"]["baseline"]["num_memory_tokens"] == 0
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "run"), "memory.num_memory_tokens=4", "--no-progress", "--device", "cpu"]) == 2
    assert "num_memory_tokens cannot be overridden" in capsys.readouterr().err


@pytest.mark.slow
@torch.no_grad()
def test_fig8_memory_against_plain_context_baselines(tmp_path):
    """One eval call draws the paper's Fig. 8: loss by position in the target for the memory run and
    for no-memory runs with 0 / 8 / 16 history tokens in their window (arxiv_gpt2_context.yaml)."""
    import csv

    import yaml

    from rmt_peft.data.registry import build_dataset
    from rmt_peft.data.tokenizer import offline_tokenizer
    from rmt_peft.tiny_models import save_tiny_model

    base = save_tiny_model(str(tmp_path / "base"), "gpt2", seed=1, vocab_size=640)

    def run(name, memory, segment_size, options):
        recipe = {"model": {"name_or_path": base, "tokenizer": "offline"},
                  "memory": {"num_memory_tokens": memory, "segment_size": segment_size}, "lora": None,
                  "data": {"task": "arxiv_lm", "options": {"documents": "generated", **options}},
                  "training": {"output_dir": str(tmp_path / name), "max_steps": 1}, "eval": {"num_segments": [1]}}
        torch.manual_seed(len(name))
        rmt = RMTModel.from_backbone(load_backbone(base), MemoryConfig(num_memory_tokens=memory,
                                                                        segment_size=segment_size), verbose=False)
        rmt.save_pretrained(str(tmp_path / name / "final"))
        (tmp_path / name / "recipe.yaml").write_text(yaml.safe_dump(recipe))
        return str(tmp_path / name)

    memory_run = run("rmt", 2, 8, {})
    contexts = {f"context{h}": h for h in (0, 8, 16)}
    baselines = [run(name, 0, 8 + h, {"history_tokens": h}) for name, h in contexts.items()]
    out = tmp_path / "fig8"
    args = ["eval", memory_run, "--segments", "1,2,3", "--samples", "3", "--seed", "5", "--out", str(out),
            "--no-progress", "--device", "cpu"]
    assert main(args + [a for b in baselines for a in ("--baseline", b)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["plain_context"] == contexts
    assert (out / "loss_by_position.png").stat().st_size > 0
    rows = list(csv.DictReader(open(out / "loss_by_position.csv")))
    assert {r["model"] for r in rows} == {"rmt", *contexts}

    # Independently: each baseline's backbone on its window (h tokens before the target + the target).
    samples = build_dataset("arxiv_lm", {"documents": "generated"}, tokenizer=offline_tokenizer(), segment_size=8,
                            num_segments=3, num_samples=3, seed=5)
    for name, h in contexts.items():
        backbone = RMTModel.from_pretrained(str(tmp_path / name / "final")).causal_lm
        losses = []
        for i in range(3):
            window = samples[i]["input_ids"][-(8 + h):].unsqueeze(0)
            logits = backbone(window).logits[0, h:-1]
            losses.append(torch.nn.functional.cross_entropy(logits, window[0, h + 1:], reduction="none"))
        expected = torch.stack(losses).double().mean(0)
        for history in ("0", "1", "2"):  # the window is fixed: the same line whatever the history
            got = [float(r["loss"]) for r in rows if r["model"] == name and r["history"] == history]
            torch.testing.assert_close(torch.tensor(got, dtype=torch.double), expected, rtol=1e-4, atol=1e-4)
    # and the memory run's losses do depend on the history it reads
    memory_rows = {h: [float(r["loss"]) for r in rows if r["model"] == "rmt" and r["history"] == h] for h in "02"}
    assert memory_rows["0"] != memory_rows["2"]
