"""Read once, ask many times: generation from a given memory equals generation after re-reading."""
import pytest
import torch

from rmt_peft import MemoryConfig, RMTModel
from rmt_peft.errors import UserError
from rmt_peft.memory_state import MemoryState
from rmt_peft.tiny_models import tiny_model

GREEDY = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True)


def make_rmt(arch="gpt_neo", segment_size=8):
    rmt = RMTModel.from_backbone(tiny_model(arch, seed=2), MemoryConfig(num_memory_tokens=3, segment_size=segment_size),
                                 verbose=False)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-zero read/write embeddings: their placement matters too
        for p in (rmt.read_embedding, rmt.write_embedding):
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return rmt


def assert_same_generation(a, b):
    assert a.sequences.tolist() == b.sequences.tolist()
    assert len(a.scores) == len(b.scores) == GREEDY["max_new_tokens"]
    for x, y in zip(a.scores, b.scores):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ["gpt_neo", "opt"])
@pytest.mark.parametrize("question_length", [5, 13])  # within one segment, and across two
def test_generate_from_a_read_memory_equals_generate_on_document_and_question(arch, question_length):
    rmt = make_rmt(arch)
    document = torch.randint(2, 128, (2, 24))  # three whole segments
    question = torch.randint(2, 128, (2, question_length))
    whole = rmt.generate(torch.cat([document, question], 1), **GREEDY)
    from_memory = rmt.generate(question, memory=rmt.read(document), **GREEDY)
    assert_same_generation(from_memory, whole)
    # the memory really is used: the initial memory gives other scores
    fresh = rmt.generate(question, **GREEDY)
    assert not torch.allclose(fresh.scores[0], whole.scores[0], atol=1e-3)
    # one stored memory (batch 1) serves a batch of questions
    one = rmt.read(document[:1])
    both = rmt.generate(torch.cat([question[:1]] * 2), memory=one, **GREEDY)
    assert both.sequences[0].tolist() == both.sequences[1].tolist() == whole.sequences[0].tolist()


def test_stream_and_saved_state_answer_like_the_whole_input(tmp_path):
    rmt = make_rmt()
    document = torch.randint(2, 128, (1, 29))  # 3 segments and 5 tokens: not a whole number of segments
    question = torch.randint(2, 128, (1, 4))
    whole = rmt.generate(torch.cat([document, question], 1), **GREEDY)
    stream = rmt.stream()
    for start in range(0, 29, 6):  # chunk borders unrelated to segment borders
        stream.feed(document[:, start:start + 6])
    assert stream.pending.shape == (1, 5)
    assert_same_generation(stream.generate(question, **GREEDY), whole)

    path = MemoryState.from_stream(stream, document="doc.txt").save(str(tmp_path / "doc.memory.safetensors"))
    assert (tmp_path / "doc.memory.safetensors").stat().st_size < 4096
    state = MemoryState.load_for(path, rmt)
    assert state.num_tokens == 29 and state.info == {"document": "doc.txt"}
    assert_same_generation(state.generate(rmt, question, **GREEDY), whole)


def test_a_state_from_another_memory_config_is_a_named_error(tmp_path):
    path = str(tmp_path / "m.safetensors")
    stream = make_rmt(segment_size=8).stream()
    stream.feed(torch.randint(2, 128, (1, 20)))
    MemoryState.from_stream(stream).save(path)
    with pytest.raises(UserError, match=r"segment_size: 8 in .*m.safetensors, 16 in the model"):
        MemoryState.load_for(path, make_rmt(segment_size=16))
    wrong = RMTModel.from_backbone(tiny_model("gpt_neo", hidden_size=128), MemoryConfig(3, 8), verbose=False)
    with pytest.raises(UserError, match="hidden size: 64 .* 128 in the model"):
        MemoryState.load_for(path, wrong)
    with pytest.raises(UserError, match=r"memory of shape \(1, 3, 64\) does not fit"):
        wrong.generate(torch.ones(1, 3, dtype=torch.long), memory=MemoryState.load(path).memory, max_new_tokens=1)
    (tmp_path / "bad.safetensors").write_text("not a memory")
    with pytest.raises(UserError, match="bad.safetensors is not a safetensors memory state"):
        MemoryState.load(str(tmp_path / "bad.safetensors"))
