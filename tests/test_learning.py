"""It learns, and the memory lasts: recall a token seen only in the first segment, through the
memory alone, far beyond the 3 segments trained on (benchmarks/learning.py's CPU preset)."""
import pytest

from benchmarks.learning import PRESETS, VARIANTS, RunConfig, run_one


def run(variant: str, eval_segments: list[int]) -> dict[str, float]:
    cfg = RunConfig(**{**PRESETS["cpu"], **VARIANTS[variant], "task": "token", "variant": variant,
                       "eval_segments": eval_segments})
    result = run_one(cfg)
    assert result["status"] == "ok", result
    return result["accuracy"]


@pytest.mark.slow
def test_stable_memory_keeps_a_fact_far_beyond_training_while_no_memory_stays_at_chance():
    stable = run("stable10_noise", [3, 64])  # trained on at most 3 segments
    assert stable["3"] >= 0.95 and stable["64"] >= 0.95
    without = run("baseline", [3])
    assert without["3"] <= 0.25  # 10 values: chance is 0.1


def test_the_benchmark_records_where_the_training_guard_would_stop():
    """A stage whose gradient norm jumps 100-fold and stays there: the replay names the 20th
    step of the jump (the guard's default: 20 steps above 20 x the running level)."""
    from benchmarks.learning import guard_stop
    from rmt_peft.train.guard import DivergenceGuard

    guard = DivergenceGuard()
    assert guard_stop(guard, [1.0] * 50, 0) is None
    stop = guard_stop(guard, [100.0] * 30, 50)
    assert stop.startswith("training diverged at step 69:") and "20 steps" in stop
    assert guard_stop(DivergenceGuard(), [1.0, float("nan")], 0) == "training diverged at step 1: the gradient norm is nan"
