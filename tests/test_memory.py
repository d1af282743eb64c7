import pytest

from rmt_peft import MemoryConfig


@pytest.mark.parametrize("field,value,message", [
    ("num_memory_tokens", -1, "num_memory_tokens=-1 is invalid: expected an integer >= 0"),
    ("segment_size", 0, "segment_size=0 is invalid: expected an integer >= 1"),
    ("bptt_depth", -2, "bptt_depth=-2 is invalid"),
    ("segment_alignment", "center", "segment_alignment='center' is invalid: expected one of ('left', 'right')"),
    ("loss_segments", 0, "loss_segments=0 is invalid"),
    ("memory_init_std", 0.0, "memory_init_std=0.0 is invalid"),
])
def test_bad_values_name_the_field(field, value, message):
    with pytest.raises(ValueError) as err:
        MemoryConfig(**{field: value})
    assert message in str(err.value)


def test_round_trip_and_unknown_fields():
    cfg = MemoryConfig(num_memory_tokens=10, segment_size=2028, bptt_depth=3)
    assert MemoryConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.positions_per_segment == 2048
    with pytest.raises(ValueError, match=r"unknown MemoryConfig field\(s\) \['num_mem_tokens'\]"):
        MemoryConfig.from_dict({"num_mem_tokens": 3})
