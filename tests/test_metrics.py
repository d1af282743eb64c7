"""exact_match (rmt_peft/metrics.py): logits at t predict the label at t+1; a sample is right when
every labelled position is."""
import torch

from rmt_peft.metrics import exact_match


def one_hot_logits(predicted: list[list[int]], vocab: int = 6) -> torch.Tensor:
    """Logits whose argmax at each position is ``predicted[b][t]``."""
    logits = torch.zeros(len(predicted), len(predicted[0]), vocab)
    for b, row in enumerate(predicted):
        for t, token in enumerate(row):
            logits[b, t, token] = 1.0
    return logits


def test_a_sample_is_right_when_every_labelled_position_is_predicted_one_step_ahead():
    # positions 0..3 predict labels 1..4; the last position predicts nothing
    logits = one_hot_logits([[2, 3, 4, 0, 5],    # predicts 2, 3, 4, 0 for positions 1..4
                             [2, 3, 1, 0, 5],    # wrong at position 3 (labelled)
                             [2, 3, 1, 0, 5],    # the same, position 3 unlabelled
                             [1, 1, 1, 1, 1]])   # nothing labelled at all
    labels = torch.tensor([[-100, 2, 3, 4, -100],
                           [-100, -100, -100, 4, 0],
                           [-100, -100, -100, -100, 0],
                           [5, -100, -100, -100, -100]])  # position 0 is never predicted
    assert exact_match(logits, labels).tolist() == [1.0, 0.0, 1.0, 1.0]
    assert exact_match(logits, labels).dtype == torch.float32
