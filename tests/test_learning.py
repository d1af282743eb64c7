"""It learns, and the memory lasts: recall a token seen only in the first segment, through the
memory alone, far beyond the 3 segments trained on (benchmarks/learning.py's CPU preset)."""
import pytest
import torch

from benchmarks.learning import PRESETS, VARIANTS, RunConfig, run_one


def run(variant: str, eval_segments: list[int]) -> dict[str, float]:
    cfg = RunConfig(**{**PRESETS["cpu"], **VARIANTS[variant], "task": "token", "variant": variant,
                       "eval_segments": eval_segments})
    result = run_one(cfg)
    assert result["status"] == "ok", result
    # every optimizer step's gradient norm is recorded: 3 stages of steps_per_stage
    assert sum(len(point["grad_norms"]) for point in result["curve"]) == 3 * cfg.steps_per_stage
    return result["accuracy"]


@pytest.mark.slow
def test_stable_memory_keeps_a_fact_far_beyond_training_while_no_memory_stays_at_chance():
    stable = run("stable10_noise", [3, 64])  # trained on at most 3 segments
    assert stable["3"] >= 0.95 and stable["64"] >= 0.95
    without = run("baseline", [3])
    assert without["3"] <= 0.25  # 10 values: chance is 0.1


def test_the_benchmark_records_where_the_training_guard_would_stop():
    """A stage whose gradient norm jumps 100-fold and stays there: the replay names the 100th
    step of the jump (the guard's default: 100 steps above 20 x the running level)."""
    from benchmarks.learning import guard_stop
    from rmt_peft.train.guard import DivergenceGuard

    guard = DivergenceGuard()
    assert guard_stop(guard, [1.0] * 50, 0) is None
    assert guard_stop(guard, [100.0] * 60, 50) is None  # 60 steps of it: not yet
    stop = guard_stop(guard, [100.0] * 60, 110)
    assert stop.startswith("training diverged at step 149:") and "100 steps" in stop
    assert guard_stop(DivergenceGuard(), [1.0, float("nan")], 0) == "training diverged at step 1: the gradient norm is nan"


def test_a_diverged_run_keeps_its_curve_up_to_the_non_finite_loss():
    """A learning rate that blows the weights up: the run is marked diverged at the first check
    after it, and keeps every step's gradient norm up to there (the trajectory to diagnose)."""
    import math

    cfg = RunConfig(**{**PRESETS["cpu"], "task": "token", "variant": "paper", "learning_rate": 1e4,
                       "max_grad_norm": 1e30, "warmup_steps": 0, "eval_segments": [1]})
    result = run_one(cfg)
    assert result["status"] == "diverged" and result["error"].startswith("non-finite loss at step ")
    step = int(result["error"].split()[4])
    curve = result["curve"]
    assert curve[-1]["step"] == step and not math.isfinite(curve[-1]["loss"])
    assert sum(len(point["grad_norms"]) for point in curve) == step
    assert "accuracy" not in result


def test_the_summary_says_which_runs_its_means_leave_out():
    from benchmarks.learning import format_left_out, format_table, summarize

    def run(seed, accuracy=None, status="ok"):
        return {"config": {"task": "detect", "variant": "v", "seed": seed}, "status": status,
                **({"accuracy": accuracy} if accuracy else {})}

    runs = [run(1, {"16": 1.0}), run(2, status="diverged"), run(3, {"16": 0.5}), run(4, status="diverged")]
    assert "0.75 0.50-1.00" in format_table(summarize(runs))  # the two that finished
    assert format_left_out(runs) == "detect/v: 2 of 4 runs not in the means (seed 2 diverged, seed 4 diverged)"
    assert format_left_out(runs[:1]) == ""
    # the maximum printed whole: cells cut at 11 characters read a maximum of 0.98 as "0"
    assert "0.74 0.50-0.98" in format_table(summarize(runs[1:] + [run(5, {"16": 0.98})]))


def test_the_plan_adds_longer_stages_and_gives_the_lever_stages_their_own_steps_and_rate():
    """Curriculum 1..3 then 8 and 16 segments, levers in the last two: those two run 5 steps at
    their own rate; every stage's rate decays by stage_lr_decay per stage before it."""
    from benchmarks.learning import stage_plan
    from rmt_peft.train.curriculum import StagePlan

    cfg = RunConfig(max_train_segments=3, extra_stages=[8, 16], steps_per_stage=2, learning_rate=1e-3,
                    stage_lr_decay=0.5, lever_stages=2, lever_stage_steps=5, lever_stage_lr=4e-4, lever_ramp_steps=3)
    assert stage_plan(cfg) == [StagePlan(1, 2, 1e-3, False), StagePlan(2, 2, 5e-4, False),
                               StagePlan(3, 2, 2.5e-4, False), StagePlan(8, 5, 4e-4 * 0.125, True, 3),
                               StagePlan(16, 5, 4e-4 * 0.0625, True)]
    # the paper's setting: levers (if any) in every stage, every stage alike
    assert stage_plan(RunConfig(max_train_segments=2, steps_per_stage=4)) == [StagePlan(1, 4, 5e-4, True),
                                                                            StagePlan(2, 4, 5e-4, True)]


@pytest.mark.parametrize("variant,lever_stages", [("late_sparse_noise", [6]), ("late2_sparse_noise", [5, 6]),
                                                   ("late3_sparse_noise", [4, 5, 6]), ("paper", list(range(7))),
                                                   ("associative_late2_write_cost0.1_ramp", [5, 6]),
                                                   ("associative_late2_write_cost0.1_floor_ramp", [5, 6]),
                                                   ("associative_late2_write_cost0.1_floor_reset", [5, 6])])
def test_the_late_variants_put_the_levers_in_their_last_stages(variant, lever_stages):
    """The published late variants (BENCHMARKS.md) on the default curriculum of 7 stages:
    late2_sparse_noise has the levers in stages 6 and 7 (0-based 5 and 6), the paper's setting in all."""
    from benchmarks.learning import stage_plan

    plan = stage_plan(RunConfig(**VARIANTS[variant]))
    assert [p.segments for p in plan] == [1, 2, 3, 4, 5, 6, 7]
    assert [i for i, p in enumerate(plan) if p.levers] == lever_stages


def test_the_to16_variant_pays_the_write_cost_in_the_last_trained_stage_and_the_stage_of_16():
    from benchmarks.learning import stage_plan

    plan = stage_plan(RunConfig(**VARIANTS["associative_late2_write_cost0.1_floor_to16"]))
    assert [p.segments for p in plan] == [1, 2, 3, 4, 5, 6, 7, 16]
    assert [p.segments for p in plan if p.levers] == [7, 16]


def test_the_ramp_raises_the_write_cost_step_by_step_in_the_first_lever_stage(monkeypatch):
    """lever_ramp_steps=3 on the write cost (levers in the last of two stages): stage 1 trains
    without it, the first three steps of stage 2 at 1/3, 2/3 and 3/3 of it, the rest at all of it."""
    from benchmarks.learning import build_model, train
    from rmt_peft.recurrent import RMTModel

    seen = []
    forward = RMTModel.forward

    def spy(self, *args, **kwargs):
        if self.training:
            seen.append(round(self.memory_config.associative_write_cost, 6))
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(RMTModel, "forward", spy)
    cfg = RunConfig(**{**PRESETS["cpu"], "task": "token", "memory_kind": "associative", "associative_key_size": 8,
                       "associative_write_cost": 0.3, "lever_stages": 1, "lever_ramp_steps": 3,
                       "max_train_segments": 2, "steps_per_stage": 4, "batch_size": 4})
    train(cfg, build_model(cfg, torch.device("cpu")), torch.device("cpu"), None)
    assert seen == [0.0] * 4 + [0.1, 0.2, 0.3, 0.3]


@pytest.mark.parametrize("reset", [True, False])
def test_adam_starts_afresh_at_the_first_lever_stage_only_when_asked(monkeypatch, reset):
    """Three stages of 2 steps, levers in the last two: with lever_adam_reset the first step of
    stage 2 is a first Adam step (each weight moves by lr * g / (|g| + eps), by hand from the
    clipped gradient), and stage 3 is not (its first step moves otherwise); without it, neither is."""
    from benchmarks.learning import build_model, train

    moves = []
    step = torch.optim.AdamW.step

    def spy(self, *args, **kwargs):
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        before = [(p.detach().clone(), p.grad.detach().clone()) for p in params]
        out = step(self, *args, **kwargs)
        lr, eps = self.param_groups[0]["lr"], self.param_groups[0]["eps"]
        moves.append(all(torch.allclose(p.detach() - w, -lr * g / (g.abs() + eps), rtol=1e-4, atol=1e-9)
                         for p, (w, g) in zip(params, before)))
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    cfg = RunConfig(**{**PRESETS["cpu"], "task": "token", "memory_kind": "associative", "associative_key_size": 8,
                       "associative_write_cost": 0.1, "lever_stages": 2, "lever_adam_reset": reset,
                       "max_train_segments": 3, "steps_per_stage": 2, "batch_size": 4})
    train(cfg, build_model(cfg, torch.device("cpu")), torch.device("cpu"), None)
    assert moves == [True, False, reset, False, False, False]


def test_the_cooldown_brings_the_rate_down_linearly_over_the_last_steps_across_stages(monkeypatch):
    """Two stages of 4 steps, warmup 2, cooldown 3: each stage warms up (half the peak, then the
    peak), and the run's last three steps train at 3/3, 2/3 and 1/3 of it, whatever stage they fall in."""
    import dataclasses

    from benchmarks.learning import build_model, train

    seen = []
    step = torch.optim.AdamW.step

    def spy(self, *args, **kwargs):
        seen.append(self.param_groups[0]["lr"])
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    cfg = RunConfig(**{**PRESETS["cpu"], "task": "token", "max_train_segments": 2, "steps_per_stage": 4,
                       "batch_size": 4, "learning_rate": 6e-3, "warmup_steps": 2, "cooldown_steps": 3})
    train(cfg, build_model(cfg, torch.device("cpu")), torch.device("cpu"), None)
    p = 6e-3
    assert seen == pytest.approx([p / 2, p, p, p, p / 2, p, p * 2 / 3, p / 3])
    # a cooldown longer than the last stage reaches into the stage before it
    seen.clear()
    cfg = dataclasses.replace(cfg, warmup_steps=0, cooldown_steps=6)
    train(cfg, build_model(cfg, torch.device("cpu")), torch.device("cpu"), None)
    assert seen == pytest.approx([p, p, p * 6 / 6, p * 5 / 6, p * 4 / 6, p * 3 / 6, p * 2 / 6, p / 6])


def test_relative_clip_caps_a_lone_spike_at_the_factor_times_the_running_level():
    """Norms 2, 2, 200, 2 with factor 5: the first sets the level, the second is under 5 x 2 and
    passes, the spike is scaled to 5 x the level (the level by hand: 0.9 x 2 + 0.1 x 2 = 2, so
    10), and the level then moves by a tenth of the clipped norm, not of the spike."""
    from benchmarks.learning import relative_clip_

    param = torch.nn.Parameter(torch.zeros(4))
    level, seen = None, []
    for norm in (2.0, 2.0, 200.0, 2.0):
        param.grad = torch.tensor([norm, 0.0, 0.0, 0.0])
        level = relative_clip_([param], param.grad.norm(), level, 5.0)
        seen += [param.grad.norm().item(), level.item()]
    assert seen == pytest.approx([2, 2, 2, 2, 10, 0.9 * 2 + 0.1 * 10, 2, 0.9 * 2.8 + 0.1 * 2])


def test_averaging_tests_the_mean_of_the_last_steps_weights_and_leaves_training_unchanged(monkeypatch):
    """Two stages of 4 steps, the last 3 averaged: the model ends on the mean of the weights after
    steps 6, 7 and 8, computed here from copies taken after every step, and the loss curve is the
    one the same run has without averaging."""
    from benchmarks.learning import Average, build_model, train

    cfg = RunConfig(**{**PRESETS["cpu"], "task": "token", "max_train_segments": 2, "steps_per_stage": 4,
                       "batch_size": 4, "average_steps": 3})
    plain = train(cfg, build_model(cfg, "cpu"), "cpu", None)
    after = []
    step = torch.optim.AdamW.step

    def spy(self, *args, **kwargs):
        out = step(self, *args, **kwargs)
        after.append([p.detach().clone() for group in self.param_groups for p in group["params"]])
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    model = build_model(cfg, "cpu")
    average = Average(model)
    curve = train(cfg, model, "cpu", None, average)
    assert [point["loss"] for point in curve] == [point["loss"] for point in plain]
    assert len(after) == 8
    last = [p.detach().clone() for p in model.parameters()]
    assert average.restore() == 3
    for i, p in enumerate(model.parameters()):
        mean = (after[5][i] + after[6][i] + after[7][i]) / 3
        torch.testing.assert_close(p, mean)
    # the mean differs from the last weights wherever the last steps moved them
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), last))


def test_averaging_and_selection_are_not_both_allowed():
    cfg = RunConfig(**{**PRESETS["cpu"], "task": "token", "select_stages": 1, "average_steps": 10})
    with pytest.raises(ValueError, match="select_stages and average_steps"):
        run_one(cfg)


def test_memory_drift_reads_the_memory_that_one_forward_over_the_whole_input_leaves():
    """The drift rows: the norm after 1, 2 and 4 segments read one at a time equals the norm of
    the memory RMTModel.forward leaves after the same 1, 2 and 4 segments at once, and the change
    is the relative step from the segment before."""
    import torch

    from benchmarks.learning import Samples, build_model, memory_drift

    cfg = RunConfig(**{**PRESETS["cpu"], "task": "token"})
    model = build_model(cfg, "cpu").eval()
    rows = memory_drift(cfg, model, 4, "cpu", samples=3)
    ids, _ = Samples(cfg, "test").batch(4, [0, 1, 2], 3, "cpu")
    seg = cfg.segment_size
    with torch.no_grad():
        after = {n: model(ids[:, :n * seg], return_logits=False).memory.float() for n in (1, 2, 3, 4)}
    assert [r["segments"] for r in rows] == [1, 2, 4]
    for row in rows:
        assert row["norm"] == pytest.approx(after[row["segments"]].norm(dim=-1).mean().item(), rel=1e-4)
    step = (after[4] - after[3]).norm(dim=-1) / after[3].norm(dim=-1)
    assert rows[0]["change"] is None and rows[2]["change"] == pytest.approx(step.mean().item(), rel=1e-3)


def test_selection_keeps_the_best_scored_checkpoint_and_the_run_ends_on_it():
    """Scored every 5 steps of the last stage at 8 segments on held-out samples: the model the run
    ends with scores the chosen checkpoint's accuracy when scored again from scratch, the chosen
    one is the best (the latest among ties), and the last weights are tested too."""
    import torch

    from benchmarks.learning import Samples, Selection, accuracy, build_model, train

    cfg = RunConfig(**{**PRESETS["cpu"], "task": "token", "max_train_segments": 2, "steps_per_stage": 15,
                       "select_stages": 1, "select_every": 5, "select_segments": 8, "select_samples": 64})
    model = build_model(cfg, "cpu")
    selection = Selection(cfg, model, "cpu")
    train(cfg, model, "cpu", selection)
    scores = selection.scores
    assert [(s["step"], s["stage"]) for s in scores] == [(20, 2), (25, 2), (30, 2)]
    with torch.no_grad():  # whatever the last weights were, the chosen ones must come back
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    chosen = selection.restore()
    best = max(s["accuracy"] for s in scores)
    assert chosen["select_accuracy"] == best
    assert chosen["step"] == max(s["step"] for s in scores if s["accuracy"] == best)
    again = accuracy(cfg, model, 8, "cpu", Samples(cfg, "select"), 64)
    assert again == best


def test_retrieval_curriculum_doubles_the_pairs_and_starts_in_context_when_a_segment_has_room():
    """K = 8, one pair a segment: stages of 1, 2, 4, 8 pairs are 2, 3, 5, 9 segments; a 16-token
    segment also holds a pair (5 tokens) and the question (4) for an in-context first stage, an
    8-token one does not. Two pairs a segment: 1, 2, 4, 8 pairs fill 1, 1, 2, 4 segments + the
    question. Tested at 9 segments and the longer eval lengths."""
    from benchmarks.learning import eval_lengths, stage_plan, train_lengths

    base = {"task": "retrieval", "retrieval_pairs": 8, "eval_segments": [1, 2, 9, 16, 64]}
    assert train_lengths(RunConfig(**base, segment_size=8)) == [2, 3, 5, 9]
    assert train_lengths(RunConfig(**base, segment_size=16)) == [1, 2, 3, 5, 9]
    assert train_lengths(RunConfig(**base, segment_size=16, retrieval_pairs_per_segment=2)) == [1, 2, 3, 5]
    assert train_lengths(RunConfig(**{**base, "retrieval_pairs": 1}, segment_size=8, extra_stages=[32])) == [2, 32]
    assert eval_lengths(RunConfig(**base, segment_size=8)) == [9, 16, 64]
    # the levers count the retrieval stages: the last two of [2, 3, 5, 9]
    plan = stage_plan(RunConfig(**base, segment_size=8, lever_stages=2))
    assert [(p.segments, p.levers) for p in plan] == [(2, False), (3, False), (5, True), (9, True)]


def test_retrieval_samples_hold_k_pairs_or_as_many_as_their_segments_do():
    """Counted by the SEP token (id 2) of each pair: 3 segments hold 2 of K = 4 pairs, 5 hold all 4,
    and 8 hold the same 4 followed by filler (id 1) up to the question."""
    from benchmarks.learning import Samples

    cfg = RunConfig(**{**PRESETS["cpu"], "task": "retrieval", "retrieval_pairs": 4})
    data = Samples(cfg, "train")
    for segments, pairs in ((3, 2), (5, 4), (8, 4)):
        ids, labels = data.batch(segments, [0, 1], 2, "cpu")
        assert ids.shape == (2, segments * 8)
        assert (ids[:, :-8] == 2).sum(dim=1).tolist() == [pairs, pairs]
        assert (labels != -100).sum(dim=1).tolist() == [1, 1]
    assert (ids[:, 32:-4] == 1).all()
    with pytest.raises(ValueError, match="retrieval uses 37 token ids, more than vocab_size=32"):
        Samples(RunConfig(**{**PRESETS["cpu"], "task": "retrieval", "vocab_size": 32}), "test").dataset(5, 4)


def test_an_associative_run_keeps_its_results_so_far_in_the_partial_folder(tmp_path):
    """The associative variant trains and is tested through the same loop (its memory is a state
    of matrices, read through a stream), and each tested length lands in partial/ at once."""
    import json

    cfg = RunConfig(**{**PRESETS["cpu"], **VARIANTS["associative"], "task": "token", "variant": "associative",
                       "max_train_segments": 2, "steps_per_stage": 3, "eval_segments": [1, 3],
                       "eval_samples": 8, "associative_key_size": 4})
    result = run_one(cfg, str(tmp_path))
    saved = json.loads((tmp_path / "token-associative-seed0.json").read_text())
    assert saved["partial"] and saved["accuracy"] == result["accuracy"]
    assert set(result["accuracy"]) == {"1", "3"} and all(0 <= a <= 1 for a in result["accuracy"].values())
    assert saved["config"]["memory_kind"] == "associative"


def test_hard_gate_runs_also_test_the_same_weights_with_soft_gates(tmp_path, monkeypatch):
    """With soft_gate_segments, the lengths of eval_segments are tested with hard gates and those
    of soft_gate_segments with soft ones, on the same weights."""
    from benchmarks import learning

    tested = []

    def accuracy(cfg, model, segments, device, *rest):
        tested.append((segments, model.memory_config.associative_hard_gates))
        return 0.5 if model.memory_config.associative_hard_gates else 0.25

    monkeypatch.setattr(learning, "accuracy", accuracy)
    variant = "associative_gate_noise2_hard"
    cfg = RunConfig(**{**PRESETS["cpu"], **VARIANTS[variant], "task": "token", "variant": variant,
                       "max_train_segments": 1, "steps_per_stage": 2, "eval_segments": [1, 3],
                       "soft_gate_segments": [3], "associative_key_size": 4})
    result = run_one(cfg, str(tmp_path))
    assert tested == [(1, True), (3, True), (3, False)]
    assert result["accuracy"] == {"1": 0.5, "3": 0.5} and result["soft_gate_accuracy"] == {"3": 0.25}
    assert "soft gates 3:0.25" in learning._one_line(result)


def test_gate_threshold_tests_test_the_same_weights_at_each_threshold_after_the_run_s_own(tmp_path, monkeypatch):
    """With gate_threshold_tests, every length of eval_segments is tested at the run's threshold,
    then again at each listed one, with hard gates, on the same weights; the partial file holds
    every score."""
    import json

    from benchmarks import learning

    tested, weights = [], set()

    def accuracy(cfg, model, segments, device, *rest):
        config = model.memory_config
        tested.append((segments, config.associative_hard_gates, config.associative_gate_threshold))
        weights.add(model.memory.associative.layers[0].gate.weight.data_ptr())
        return config.associative_gate_threshold / 4

    monkeypatch.setattr(learning, "accuracy", accuracy)
    variant = "associative_late2_write_cost0.1_floor"
    cfg = RunConfig(**{**PRESETS["cpu"], **VARIANTS[variant], "task": "token", "variant": variant,
                       "max_train_segments": 1, "steps_per_stage": 2, "eval_segments": [1, 3],
                       "gate_threshold_tests": [0.5, 2.0], "associative_key_size": 4})
    result = run_one(cfg, str(tmp_path))
    assert tested == [(1, True, 0.0), (3, True, 0.0), (1, True, 0.5), (3, True, 0.5), (1, True, 2.0), (3, True, 2.0)]
    assert len(weights) == 1
    assert result["accuracy"] == {"1": 0.0, "3": 0.0}
    assert result["gate_threshold_accuracy"] == {"0.5": {"1": 0.125, "3": 0.125}, "2.0": {"1": 0.5, "3": 0.5}}
    saved = json.loads((tmp_path / "token-associative_late2_write_cost0.1_floor-seed0.json").read_text())
    assert saved["gate_threshold_accuracy"] == result["gate_threshold_accuracy"]
    assert "gate threshold 2.0 1:0.50 3:0.50" in learning._one_line(result)


def test_a_capacity_grid_keeps_one_partial_file_per_number_of_pairs(tmp_path):
    """--pairs runs one retrieval run per K with the same task, variant and seed: each keeps its
    own file in partial/ (they overwrote one another, losing all but the last K of a cut grid)."""
    from benchmarks.learning import save_partial

    for k in (2, 8):
        config = {"task": "retrieval", "variant": "paper", "seed": 3, "retrieval_pairs": k}
        save_partial(str(tmp_path), {"config": config, "accuracy": {str(k + 1): k / 10}})
    save_partial(str(tmp_path), {"config": {"task": "detect", "variant": "paper", "seed": 3, "retrieval_pairs": 4},
                                 "accuracy": {}})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["detect-paper-seed3.json", "retrieval-paper-seed3-K2.json",
                                                          "retrieval-paper-seed3-K8.json"]


def test_the_seed_plot_draws_one_line_per_run_in_a_colour_per_variant(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    from unittest import mock

    from benchmarks import learning

    runs = [{"config": {"task": "detect", "variant": v, "seed": s, "retrieval_pairs": 4},
             "accuracy": {"1": 1.0, "16": 0.5 + s / 10}} for v in ("paper", "associative") for s in (0, 1, 2)]
    drawn = []
    with mock.patch.object(learning, "_save", lambda fig, path, title: drawn.append(fig)):
        learning.plot_seeds(runs, str(tmp_path / "seeds.png"))
    lines = drawn[0].axes[0].get_lines()
    assert len(lines) == 6
    assert len({line.get_color() for line in lines}) == 2
    assert sorted(tuple(line.get_ydata()) for line in lines)[0] == (1.0, 0.5)


def _curve_run(seed: int, variant: str = "late", stages: int = 4, steps: int = 100, spike_at: int | None = None) -> dict:
    """A run's record as train() logs it: windows of 50 steps (a stage's last window ends with it),
    each with its mean loss and every step's gradient norm; one spike where asked."""
    curve, step = [], 0
    for stage in range(1, stages + 1):
        for _ in range(steps // 50):
            norms = [10.0 if spike_at == step + i + 1 else 0.01 for i in range(50)]
            step += 50
            curve.append({"step": step, "stage": stage, "loss": 1.0 / step, "grad_norm": sum(norms) / 50,
                          "grad_norms": norms})
    config = {"task": "detect", "variant": variant, "seed": seed, "retrieval_pairs": 4, "max_train_segments": stages,
              "steps_per_stage": steps, "lever_stages": 2 if variant == "late" else None, "a_field_gone_since": 1}
    return {"config": config, "curve": curve, "accuracy": {"16": 1.0}, "last_accuracy": {"16": 0.5},
            "averaged_steps": 100, "device": "cpu"}


def test_the_curves_plot_draws_every_step_and_marks_the_stages_and_the_late_levers(tmp_path):
    """curves.png: per run, one loss point per logged window and one gradient norm per optimizer
    step at that step (counted from 1); dotted lines where stages 2..4 start (100 steps a stage:
    steps 101, 201, 301), a dashed one where the last two stages' levers switch on (step 201),
    none for a run with levers from the start."""
    import matplotlib

    matplotlib.use("Agg")
    from unittest import mock

    from benchmarks import learning

    drawn = []
    with mock.patch.object(learning, "_save", lambda fig, path, title: drawn.append(fig)):
        learning.plot_curves([_curve_run(0, spike_at=237), _curve_run(1)], str(tmp_path / "curves.png"))
        learning.plot_curves([_curve_run(0, variant="always")], str(tmp_path / "curves.png"))
    loss_ax, norm_ax = drawn[0].axes
    solid = [line for line in norm_ax.get_lines() if line.get_linestyle() == "-"]
    assert len(solid) == 2 and list(solid[0].get_xdata()) == list(range(1, 401))
    assert list(solid[0].get_ydata()).index(10.0) == 236 and max(solid[1].get_ydata()) == 0.01
    assert [list(line.get_xdata()) for line in loss_ax.get_lines() if line.get_linestyle() == "-"][0] == list(
        range(50, 401, 50))
    dotted = sorted(line.get_xdata()[0] for line in loss_ax.get_lines() if line.get_linestyle() == ":")
    assert dotted == [101, 201, 301]
    assert [line.get_xdata()[0] for line in loss_ax.get_lines() if line.get_linestyle() == "--"] == [201]
    assert not [line for line in drawn[1].axes[0].get_lines() if line.get_linestyle() == "--"]


def test_plot_from_merges_calls_into_one_report_and_never_replaces_one_of_them(tmp_path):
    """--plot-from a b: one runs.json with a's runs then b's, each call's date and command, the
    accuracy table over all of them, and the plots; an out-dir holding one of the inputs, a file
    that is not JSON, one that is not a report, and one that is not there are named errors that
    leave the input as it was."""
    import json

    from benchmarks import learning

    calls = []
    for index, seeds in enumerate(([0, 1], [2])):
        runs = [_curve_run(seed) for seed in seeds]
        for run in runs:
            run["accuracy"] = {"16": 0.25 * (run["config"]["seed"] + 1)}
        folder = tmp_path / f"call{index}"
        folder.mkdir()
        (folder / "runs.json").write_text(json.dumps({"date": f"day {index}", "argv": [f"call {index}"],
                                                      "wall_seconds": 10.0, "runs": runs}))
        calls.append(str(folder / "runs.json"))
    out = tmp_path / "merged"
    report = learning.main(["--plot-from", *calls, "--out-dir", str(out)])
    saved = json.loads((out / "runs.json").read_text())
    assert [r["config"]["seed"] for r in saved["runs"]] == [0, 1, 2]
    assert saved["accuracy"] == {"detect": {"late": {"16": [0.25, 0.5, 0.75]}}} == report["accuracy"]
    assert saved["date"] == "day 0, day 1" and saved["wall_seconds"] == 20.0
    assert [(m["path"], m["argv"]) for m in saved["merged"]] == [(calls[0], ["call 0"]), (calls[1], ["call 1"])]
    for name in ("accuracy.png", "seeds.png", "curves.png", "last_vs_other_weights.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name

    before = (tmp_path / "call0" / "runs.json").read_text()
    with pytest.raises(SystemExit, match="would replace it; pass another --out-dir"):
        learning.main(["--plot-from", calls[0], calls[1], "--out-dir", str(tmp_path / "call0")])
    assert (tmp_path / "call0" / "runs.json").read_text() == before
    (tmp_path / "broken.json").write_text('{"runs": [')
    (tmp_path / "other.json").write_text('{"rows": []}')
    for path, why in (("broken.json", "not JSON"), ("other.json", "not a runs.json"), ("absent.json", "No such file")):
        with pytest.raises(SystemExit, match=f"--plot-from .*{path}: {why}"):
            learning.main(["--plot-from", str(tmp_path / path), "--out-dir", str(out)])
    with pytest.raises(SystemExit, match="--plot-from or --runs, not both"):
        learning.main(["--plot-from", calls[0], "--runs", "detect/paper", "--out-dir", str(out)])


def test_the_last_weights_plot_names_what_else_each_run_tested(tmp_path):
    """Averaged runs are drawn against their last weights as "mean of the last N steps", runs that
    kept a checkpoint as "kept"; a run that tested only its last weights is not drawn."""
    import matplotlib

    matplotlib.use("Agg")
    from unittest import mock

    from benchmarks import learning

    averaged = [_curve_run(seed) for seed in (0, 1)]
    kept = {**_curve_run(2, variant="kept"), "selected": True}
    del kept["averaged_steps"]
    plain = {**_curve_run(3, variant="plain"), "last_accuracy": {}}
    drawn = []
    with mock.patch.object(learning, "_save", lambda fig, path, title: drawn.append(fig)):
        learning.plot_last_against_other_weights([*averaged, kept, plain], str(tmp_path / "x.png"))
    labels = [text.get_text() for text in drawn[0].axes[0].get_legend().get_texts()]
    assert labels == ["kept: last weights", "kept: kept", "late: last weights", "late: mean of the last 100 steps"]


def test_saved_weights_test_again_elsewhere_to_the_same_answers_and_with_other_settings(tmp_path, monkeypatch):
    """--save-weights keeps the weights a run tests (with its config); --weights tests them again
    without training: the same parameters, the same accuracies at the same lengths, and --set
    changes what is tested (other lengths, hard gates). A field RunConfig lacks is named."""
    import json

    from benchmarks import learning

    tested = []
    real_evaluate = learning.evaluate

    def evaluate(cfg, model, *rest):
        tested.append((cfg, {k: v.detach().clone() for k, v in model.state_dict().items()}))
        return real_evaluate(cfg, model, *rest)

    monkeypatch.setattr(learning, "evaluate", evaluate)
    out = tmp_path / "run"
    settings = {"max_train_segments": 2, "steps_per_stage": 20, "eval_segments": [1, 3], "eval_samples": 16,
                "associative_key_size": 4}
    trained = learning.main(["--preset", "cpu", "--runs", "token/associative_gate_noise2/5", "--save-weights",
                             "--set", json.dumps(settings), "--out-dir", str(out)])["runs"][0]
    weights = out / "weights" / "token-associative_gate_noise2-seed5.pt"
    assert trained["weights"] == str(weights)
    again = learning.main(["--weights", str(weights), "--out-dir", str(tmp_path / "again"),
                           "--set", json.dumps({"eval_segments": [1, 3, 5], "associative_hard_gates": True})])["runs"][0]
    (cfg_trained, state_trained), (cfg_again, state_again) = tested
    assert state_trained.keys() == state_again.keys()
    assert all(torch.equal(state_trained[k].float(), state_again[k].float()) for k in state_trained)
    assert (cfg_again.seed, cfg_again.associative_gate_noise, cfg_again.associative_hard_gates) == (5, 2.0, True)
    assert not cfg_trained.associative_hard_gates and set(again["accuracy"]) == {"1", "3", "5"}
    assert again["trained_on"] == "cpu" and again["final_loss"] == trained["curve"][-1]["loss"]
    soft = learning.main(["--weights", str(weights), "--out-dir", str(tmp_path / "soft"),
                          "--set", json.dumps({"eval_segments": [1, 3]})])["runs"][0]
    assert soft["accuracy"] == trained["accuracy"]  # the same weights and test samples: the same answers
    from benchmarks import associative_gates

    traced = associative_gates.main(["--weights", str(weights), "--segments", "3", "--samples", "4",
                                     "--lengths", "1", "3", "--set", json.dumps({"eval_samples": 16})])[0]
    assert traced["accuracy"] == {1: trained["accuracy"]["1"], 3: trained["accuracy"]["3"]}
    assert traced["gate_noise"] == 2.0 and len(traced["layers"][0]["gate_by_segment"]) == 3
    with pytest.raises(SystemExit, match=r"\['eval_lengths'\]: not RunConfig fields"):
        learning.main(["--weights", str(weights), "--out-dir", str(tmp_path / "bad"), "--set", '{"eval_lengths": [2]}'])
    with pytest.raises(SystemExit, match="none.pt: no such file"):
        learning.main(["--weights", str(tmp_path / "none.pt"), "--out-dir", str(tmp_path / "bad")])
    report = out / "runs.json"
    with pytest.raises(SystemExit, match="runs.json: not a file of --save-weights"):
        learning.main(["--weights", str(report), "--out-dir", str(tmp_path / "bad")])
    with pytest.raises(SystemExit, match="not JSON"):
        learning.main(["--runs", "token/paper", "--out-dir", str(tmp_path / "bad"), "--set", "{eval_segments: [2]}"])


def test_set_keeps_a_variant_s_own_fields_and_names_each_one_it_could_not_change(capsys):
    """--set applies to every run except where the run's variant sets the field: the variant keeps
    its value (documented runs rely on it) and one line names the field, the variant and both
    values; a field no variant sets, or set to the variant's own value, is applied silently."""
    import argparse

    from benchmarks.learning import configs

    args = argparse.Namespace(preset="cpu", runs=["detect/associative_late2_write_cost0.1_floor/0",
                                                  "detect/paper/0"], tasks=[], variants=[], seeds=[0], pairs=[],
                              set='{"associative_write_cost": 0.3, "lever_stages": 2, "adam_beta2": 0.95}')
    late, paper = configs(args)
    assert (late.associative_write_cost, late.lever_stages, late.adam_beta2) == (0.1, 2, 0.95)
    assert (paper.associative_write_cost, paper.lever_stages, paper.adam_beta2) == (0.3, 2, 0.95)
    printed = capsys.readouterr().out.splitlines()
    assert printed == ["--set associative_write_cost=0.3 does not apply to variant "
                       "associative_late2_write_cost0.1_floor, which sets associative_write_cost=0.1: "
                       "define a variant to change it"]
