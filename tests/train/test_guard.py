"""The divergence guard's arithmetic (rmt_peft/train/guard.py): the running level of gradient norms,
the spike rule, and a rollback's learning rate. Runs that diverge (and what they leave) are
tests/reliability/test_divergence.py's."""
import pytest
import torch

from rmt_peft.errors import TrainingDiverged
from rmt_peft.recipe import GuardSection
from rmt_peft.train.guard import DivergenceGuard, diverged, set_base_learning_rate


def test_the_level_is_an_exponential_average_of_the_norms_that_were_not_spikes():
    guard = DivergenceGuard(spike_factor=10, spike_steps=5)
    guard.check_grad_norm(2.0, 1)
    assert guard.level == 2.0  # the first norm starts it
    guard.check_grad_norm(4.0, 2)
    assert guard.level == pytest.approx(0.9 * 2.0 + 0.1 * 4.0)
    level = guard.level
    guard.check_grad_norm(100.0, 3)  # > 10 x 2.2: a spike, not averaged in
    assert (guard.level, guard.spikes, guard.spike_start) == (level, 1, 3)
    guard.check_grad_norm(10.0, 4)  # under 10 x level: the spike count starts again
    assert (guard.spikes, guard.spike_start) == (0, None)
    assert guard.level == pytest.approx(0.9 * level + 0.1 * 10.0)


def test_spikes_in_a_row_stop_the_run_at_the_count_and_name_the_first():
    guard = DivergenceGuard(spike_factor=2, spike_steps=3, level=1.0)
    guard.check_grad_norm(5.0, 7)
    guard.check_grad_norm(5.0, 8)
    with pytest.raises(TrainingDiverged, match=r"^training diverged at step 9: the gradient norm \(5\) stayed above 2 x "
                                               r"its running level \(1\) for 3 steps$") as err:
        guard.check_grad_norm(5.0, 9)
    assert (err.value.step, err.value.first_bad_step) == (9, 7)


def test_the_default_lets_a_converged_tasks_passing_spike_through_and_stops_one_that_lasts():
    """The shape the learning benchmark recorded: norms about 0.001 at a loss of about 0, then a
    spike of norms 3-30 for 50-80 steps that passes (guard.py's default of 100 steps, not 20)."""
    def feed(guard, spike_length):
        norms = [0.001] * 200 + [5.0 + (i % 7) * 4 for i in range(spike_length)] + [0.002] * 100
        for step, norm in enumerate(norms, 1):
            guard.check_grad_norm(norm, step)
    feed(DivergenceGuard(), 80)  # passes: no exception
    with pytest.raises(TrainingDiverged, match="for 20 steps"):
        feed(DivergenceGuard(spike_steps=20), 80)  # the old default stopped it
    with pytest.raises(TrainingDiverged, match="for 100 steps") as err:
        feed(DivergenceGuard(), 150)
    assert err.value.first_bad_step == 201
    assert GuardSection().spike_steps == DivergenceGuard().spike_steps  # a recipe's default is the guard's


def test_without_a_spike_factor_only_non_finite_values_stop_the_run():
    guard = DivergenceGuard(spike_factor=None, spike_steps=1)
    for step, norm in enumerate((1.0, 1e6, 1e12), 1):
        guard.check_grad_norm(norm, step)
    guard.note_loss(torch.tensor(3.0))
    guard.check_step(None, 4)  # no norm (no clipping): the losses are still checked
    guard.note_loss(float("nan"))
    with pytest.raises(TrainingDiverged, match="loss is nan") as err:
        guard.check_step(None, 5)
    assert err.value.first_bad_step == 5 and guard.losses == []  # the step's losses were read once


def test_diverged_carries_where_it_broke():
    err = diverged("x", 12)
    assert isinstance(err, TrainingDiverged) and (err.reason, err.step, err.first_bad_step) == ("x", 12, 12)
    assert diverged("x", 12, 9).first_bad_step == 9


def test_a_rollback_lowers_the_base_rate_and_keeps_the_schedules_position():
    weight = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.SGD([weight], lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / 10)
    for _ in range(4):
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.6)
    set_base_learning_rate(optimizer, scheduler, 0.5)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.3)  # 60 % of the schedule, of the new rate
    assert optimizer.param_groups[0]["initial_lr"] == 0.5 and scheduler.base_lrs == [0.5]
    assert scheduler.get_last_lr() == [pytest.approx(0.3)]
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.25)  # the schedule goes on from the new rate
