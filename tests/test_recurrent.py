"""RMTModel against an independent re-implementation of the recurrence.

The reference below follows the reference RMT (a memory cell around the full causal LM): it
calls the whole ``…ForCausalLM`` with ``inputs_embeds`` and ``output_hidden_states=True``,
concatenates the full logits of every segment and takes the usual shifted cross-entropy.
RMTModel computes the same thing another way (the body only, loss in chunks at labelled
positions), so agreement is a real check.
"""
import pytest
import torch
import torch.nn.functional as F

from rmt_peft import MemoryConfig, RMTModel, segment_bounds
from rmt_peft.tiny_models import ARCHITECTURES, tiny_model


def reference_rmt(model, ids, memory0, read, write, segment_size, labels=None):
    """Returns (logits, loss, final memory), segments cut from the left, no padding."""
    m = memory0.shape[0]
    memory = memory0.unsqueeze(0).expand(ids.shape[0], -1, -1)
    logits = []
    for start in range(0, ids.shape[1], segment_size):
        seg = ids[:, start:start + segment_size]
        emb = model.get_input_embeddings()(seg)
        x = torch.cat([memory + read, emb, memory + write], dim=1) if m else emb
        out = model(inputs_embeds=x, output_hidden_states=True)
        n = seg.shape[1]
        logits.append(out.logits[:, m:m + n])
        if m:
            memory = out.hidden_states[-1][:, m + n:]
    logits = torch.cat(logits, dim=1)
    loss = None
    if labels is not None:
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                               ignore_index=-100)
    return logits, loss, memory


def randomize_memory(rmt, seed=1):
    """Non-zero read/write embeddings so that their placement is checked too."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (rmt.read_embedding, rmt.write_embedding):
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_no_memory_single_segment_is_the_backbone(arch):
    backbone = tiny_model(arch)
    rmt = RMTModel.from_backbone(backbone, MemoryConfig(num_memory_tokens=0, segment_size=32))
    ids = torch.randint(2, 128, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(rmt(ids).logits, backbone(ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["gpt_neo", "opt", "llama"])
def test_memory_recurrence_matches_reference(arch):
    backbone = tiny_model(arch)
    rmt = RMTModel.from_backbone(backbone, MemoryConfig(num_memory_tokens=3, segment_size=7))
    randomize_memory(rmt)
    ids = torch.randint(2, 128, (2, 25))  # 3 full segments and a short one
    labels = ids.clone()
    labels[:, :5] = -100
    with torch.no_grad():
        out = rmt(ids, labels=labels, return_logits=True)
        ref_logits, ref_loss, ref_memory = reference_rmt(
            backbone, ids, rmt.memory_tokens, rmt.read_embedding, rmt.write_embedding, 7, labels)
    torch.testing.assert_close(out.logits, ref_logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.loss, ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.memory, ref_memory, rtol=1e-4, atol=1e-5)
    assert out.segment_losses.shape == (4,)
    # per-segment losses weighted by their counts give back the total loss
    total = (out.segment_losses.nan_to_num() * out.segment_token_counts).sum() / out.segment_token_counts.sum()
    torch.testing.assert_close(total, out.loss)


def test_read_write_embeddings_start_at_zero_and_memory_scaled_like_embeddings():
    backbone = tiny_model("gpt_neo", hidden_size=128)
    rmt = RMTModel.from_backbone(backbone, MemoryConfig(num_memory_tokens=50, segment_size=16))
    assert rmt.memory_tokens.shape == rmt.read_embedding.shape == rmt.write_embedding.shape == (50, 128)
    assert torch.count_nonzero(rmt.read_embedding) == 0 and torch.count_nonzero(rmt.write_embedding) == 0
    emb_std = backbone.get_input_embeddings().weight.std().item()
    assert abs(rmt.memory_tokens.std().item() / emb_std - 1) < 0.1
    names = {n for n, p in rmt.named_parameters() if p.requires_grad and n.startswith("memory.")}
    assert names == {"memory.memory_tokens", "memory.read_embedding", "memory.write_embedding"}


def test_right_padding_gives_the_same_result_as_each_sample_alone():
    backbone = tiny_model("gpt2")
    rmt = RMTModel.from_backbone(backbone, MemoryConfig(num_memory_tokens=2, segment_size=6))
    randomize_memory(rmt)
    long, short = torch.randint(2, 128, (1, 20)), torch.randint(2, 128, (1, 9))
    batch = torch.cat([long, torch.cat([short, torch.zeros(1, 11, dtype=torch.long)], 1)])
    mask = torch.cat([torch.ones(1, 20), torch.cat([torch.ones(1, 9), torch.zeros(1, 11)], 1)]).long()
    labels = batch.masked_fill(mask == 0, -100)
    with torch.no_grad():
        both = rmt(batch, mask, labels=labels, return_logits=True)
        alone_long = rmt(long, labels=long, return_logits=True)
        alone_short = rmt(short, labels=short, return_logits=True)
    torch.testing.assert_close(both.logits[0], alone_long.logits[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(both.logits[1, :9], alone_short.logits[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(both.memory[1], alone_short.memory[0], rtol=1e-4, atol=1e-5)
    tokens_long, tokens_short = 19, 8
    expected = (alone_long.loss * tokens_long + alone_short.loss * tokens_short) / (tokens_long + tokens_short)
    torch.testing.assert_close(both.loss, expected, rtol=1e-5, atol=1e-6)


def test_right_alignment_with_left_padding_matches_unpadded():
    backbone = tiny_model("llama")
    cfg = MemoryConfig(num_memory_tokens=2, segment_size=5, segment_alignment="right")
    rmt = RMTModel.from_backbone(backbone, cfg)
    short = torch.randint(2, 128, (1, 7))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), short], 1)
    mask = torch.cat([torch.zeros(1, 3), torch.ones(1, 7)], 1).long()
    with torch.no_grad():
        a = rmt(padded, mask)
        b = rmt(short)
    torch.testing.assert_close(a.logits[:, 3:], b.logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(a.memory, b.memory, rtol=1e-4, atol=1e-5)


def _last_segment_loss_grads(cfg, train=True):
    torch.manual_seed(0)
    backbone = tiny_model("gpt_neo")
    rmt = RMTModel.from_backbone(backbone, cfg).train(train)
    ids = torch.randint(2, 128, (2, 3 * cfg.segment_size))
    labels = torch.full_like(ids, -100)
    labels[:, -3:] = ids[:, -3:]
    rmt(ids, labels=labels).loss.backward()
    return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in rmt.named_parameters()}


def test_last_segment_loss_reaches_memory_tokens_and_bptt_depth_cuts_it():
    full = _last_segment_loss_grads(MemoryConfig(num_memory_tokens=2, segment_size=6))
    assert full["memory.memory_tokens"].abs().sum() > 0
    cut = _last_segment_loss_grads(MemoryConfig(num_memory_tokens=2, segment_size=6, bptt_depth=1))
    assert cut["memory.memory_tokens"].abs().sum() == 0
    assert cut["memory.read_embedding"].abs().sum() > 0  # still trained through the last segment
    # depth 2 spans all three segments again: same gradients as full BPTT
    two = _last_segment_loss_grads(MemoryConfig(num_memory_tokens=2, segment_size=6, bptt_depth=2))
    torch.testing.assert_close(two["memory.memory_tokens"], full["memory.memory_tokens"])


def test_loss_segments_restricts_the_loss_to_the_last_segments():
    backbone = tiny_model("gpt_neo")
    rmt = RMTModel.from_backbone(backbone, MemoryConfig(num_memory_tokens=2, segment_size=6, loss_segments=1))
    ids = torch.randint(2, 128, (2, 18))
    masked = ids.clone()
    masked[:, :13] = -100  # the last segment (positions 12..17) predicts tokens 13..17
    with torch.no_grad():
        a = rmt(ids, labels=ids)
        rmt.memory_config.loss_segments = None
        b = rmt(ids, labels=masked)
    torch.testing.assert_close(a.loss, b.loss)


def test_checkpoint_segments_gives_the_same_gradients():
    plain = _last_segment_loss_grads(MemoryConfig(num_memory_tokens=2, segment_size=6))
    ckpt = _last_segment_loss_grads(MemoryConfig(num_memory_tokens=2, segment_size=6, checkpoint_segments=True))
    assert plain.keys() == ckpt.keys()
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)


def test_generate_reads_segments_then_decodes_greedily():
    backbone = tiny_model("gpt_neo")
    rmt = RMTModel.from_backbone(backbone, MemoryConfig(num_memory_tokens=3, segment_size=8))
    randomize_memory(rmt)
    ids = torch.randint(2, 128, (1, 21))
    new = rmt.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    # independent greedy decode: memory from the first two segments, then argmax step by step
    with torch.no_grad():
        _, _, memory = reference_rmt(backbone, ids[:, :16], rmt.memory_tokens, rmt.read_embedding,
                                     rmt.write_embedding, 8)
        seq, expected = ids[:, 16:], []
        for _ in range(4):
            x = torch.cat([memory + rmt.read_embedding, backbone.get_input_embeddings()(seq)], 1)
            token = backbone(inputs_embeds=x).logits[:, -1].argmax(-1, keepdim=True)
            expected.append(token)
            seq = torch.cat([seq, token], 1)
    assert new.tolist() == torch.cat(expected, 1).tolist()


def test_generate_refuses_to_run_past_the_position_table():
    backbone = tiny_model("gpt_neo", max_positions=32)
    rmt = RMTModel.from_backbone(backbone, MemoryConfig(num_memory_tokens=4, segment_size=24))
    with pytest.raises(ValueError, match="lower max_new_tokens to <= 4"):
        rmt.generate(torch.randint(2, 128, (1, 24)), max_new_tokens=5)


def test_segment_too_long_for_learned_positions_is_rejected():
    backbone = tiny_model("opt", max_positions=64)
    with pytest.raises(ValueError, match=r"segment_size=60 with num_memory_tokens=4 needs 68 positions.*64"):
        RMTModel.from_backbone(backbone, MemoryConfig(num_memory_tokens=4, segment_size=60))
    RMTModel.from_backbone(tiny_model("llama", max_positions=64),  # RoPE: no table to overflow
                           MemoryConfig(num_memory_tokens=4, segment_size=60))


def test_bad_inputs_are_rejected():
    rmt = RMTModel.from_backbone(tiny_model("gpt2"), MemoryConfig(num_memory_tokens=2, segment_size=8))
    with pytest.raises(ValueError, match="empty"):
        rmt(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(batch, length\)"):
        rmt(torch.zeros(5, dtype=torch.long))


def test_state_dict_holds_each_weight_once_and_old_dicts_still_load():
    torch.manual_seed(0)
    rmt = RMTModel.from_backbone(tiny_model("gpt_neo"), MemoryConfig(num_memory_tokens=2, segment_size=8),
                                 lora="attention", verbose=False)
    state = rmt.state_dict()
    assert not [k for k in state if k.startswith("causal_lm.")]
    assert len(state) == len(rmt.backbone.state_dict()) + len(rmt.memory.state_dict())  # the backbone's once
    assert rmt.causal_lm is rmt.backbone.get_base_model()
    # a dict of an earlier version (the backbone also under causal_lm.*) loads, strictly, into a fresh model
    old = {**state, **{"causal_lm." + k.removeprefix("backbone.base_model.model."): v.clone()
                       for k, v in state.items() if k.startswith("backbone.")}}
    fresh = RMTModel.from_backbone(tiny_model("gpt_neo", seed=1), MemoryConfig(num_memory_tokens=2, segment_size=8),
                                   lora="attention", verbose=False)
    fresh.load_state_dict(old, strict=True)
    ids = torch.randint(0, 128, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(ids).logits, rmt.eval()(ids).logits)


def test_segment_bounds():
    assert segment_bounds(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert segment_bounds(10, 4, "right") == [(0, 2), (2, 6), (6, 10)]
    assert segment_bounds(8, 4, "right") == [(0, 4), (4, 8)]
    assert segment_bounds(3, 4) == [(0, 3)]


def test_padded_head_weight_gives_the_same_logits_and_follows_the_weight():
    """The LM head's vocabulary is padded for aligned GPU kernels; the logits and the input
    gradient must equal the unpadded head's, and an updated weight must not be served stale."""
    model = RMTModel(tiny_model("gpt_neo", vocab_size=101), MemoryConfig(num_memory_tokens=2, segment_size=8))
    weight = model.causal_lm.get_output_embeddings().weight
    weight.requires_grad_(False)
    padded = model._padded_head_weight(weight)
    assert padded.shape[0] == 128 and torch.equal(padded[101:], torch.zeros_like(padded[101:]))
    hidden = torch.randn(3, weight.shape[1], requires_grad=True)
    logits = torch.nn.functional.linear(hidden, padded)[..., :101]
    torch.testing.assert_close(logits, hidden @ weight.T)
    (grad,) = torch.autograd.grad(logits.square().sum(), hidden)
    torch.testing.assert_close(grad, 2 * (hidden @ weight.T) @ weight)
    assert model._padded_head_weight(weight) is padded  # cached
    weight.mul_(2)
    torch.testing.assert_close(model._padded_head_weight(weight)[:101], weight)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the padded LM head is used on CUDA only")
def test_gpu_padded_head_keeps_logits_loss_and_gradients():
    backbone = tiny_model("gpt_neo", vocab_size=101).cuda()
    backbone.requires_grad_(False)
    rmt = RMTModel(backbone, MemoryConfig(num_memory_tokens=0, segment_size=32))
    ids = torch.randint(0, 101, (2, 32), device="cuda")
    hidden = torch.randn(2, 32, 64, device="cuda", requires_grad=True)
    logits = rmt._lm_logits(hidden)
    assert rmt._padded_head is not None  # the padded path ran
    torch.testing.assert_close(logits, hidden @ backbone.lm_head.weight.T, rtol=1e-4, atol=1e-4)
    (grad,) = torch.autograd.grad(logits.square().sum(), hidden)
    reference = hidden @ backbone.lm_head.weight.T
    (expected,) = torch.autograd.grad(reference.square().sum(), hidden)
    torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(rmt(ids, labels=ids).loss, backbone(ids, labels=ids).loss, rtol=1e-4, atol=1e-5)


def test_memory_does_not_hold_the_segment_hidden_state():
    """The next memory must own its (batch, m, hidden) storage: a view into the segment's hidden
    states would keep them alive across all segments of a checkpointed BPTT step."""
    rmt = RMTModel(tiny_model("gpt_neo"), MemoryConfig(num_memory_tokens=2, segment_size=16,
                                                       checkpoint_segments=True)).train()
    ids = torch.randint(0, 128, (1, 48))
    memory = rmt(ids, labels=ids).memory
    assert memory.untyped_storage().nbytes() == memory.numel() * memory.element_size()


def _seven_segment_grads(bptt_depth):
    """Gradients of the loss on the last segment of 7, and of the memory written by segment n-2."""
    torch.manual_seed(0)
    cfg = MemoryConfig(num_memory_tokens=2, segment_size=4, bptt_depth=bptt_depth)
    rmt = RMTModel.from_backbone(tiny_model("gpt_neo"), cfg, verbose=False).train()
    ids = torch.randint(2, 128, (2, 7 * 4))
    labels = torch.full_like(ids, -100)
    labels[:, -2:] = ids[:, -2:]
    written = {}
    original = rmt._segment

    def spy(memory, input_ids, *args):
        out = original(memory, input_ids, *args)
        if len(written) < 7:
            written[len(written)] = out[0]
            out[0].retain_grad()
        return out

    rmt._segment = spy
    rmt(ids, labels=labels).loss.backward()
    return rmt.memory.memory_tokens.grad, written[5].grad  # segment 5 = n-2 writes the last one's memory


@pytest.mark.parametrize("depth", [1, 2, 5])
def test_truncated_bptt_keeps_the_last_transitions_of_a_loss_at_the_end(depth):
    tokens_grad, last_written_grad = _seven_segment_grads(depth)
    assert last_written_grad is not None and last_written_grad.abs().sum() > 0
    assert tokens_grad is None or tokens_grad.abs().sum() == 0


@pytest.mark.parametrize("depth", [6, None])
def test_truncated_bptt_spanning_every_transition_reaches_the_initial_memory(depth):
    tokens_grad, _ = _seven_segment_grads(depth)
    assert tokens_grad is not None and tokens_grad.abs().sum() > 0
