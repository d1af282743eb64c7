"""The associative memory (memory_kind="associative") against the ARMT update written out by hand.

The reference below wraps the backbone's decoder layers in a plain module that adds the read
before each layer and writes after it, with the delta rule computed token by token (outer
products in a loop), and runs the whole causal LM on ``[segment ; memory tokens]``: no hooks,
no sessions, no einsums of the code under test.
"""
import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rmt_peft import MemoryConfig, RMTModel
from rmt_peft.associative import (AssociativeLayer, AssociativeState, dpfp, logistic_noise, perturb, read_memory,
                                  relative_change, write_back_loss, write_memory)
from rmt_peft.errors import UserError
from rmt_peft.memory_state import MemoryState
from rmt_peft.speedups import transformer_blocks
from rmt_peft.tiny_models import tiny_model

EPS = 1e-5


def dpfp_by_hand(x, order=3):
    """Feature i + j * 2d is x'[i] * x'[(i - j - 1) mod 2d], x' = [relu(x), relu(-x)]."""
    plus_minus = torch.cat([x.clamp(min=0), (-x).clamp(min=0)], dim=-1)
    width = plus_minus.shape[-1]
    features = []
    for j in range(order):
        for i in range(width):
            features.append(plus_minus[..., i] * plus_minus[..., (i - j - 1) % width])
    return torch.stack(features, dim=-1)


def test_dpfp_matches_its_definition():
    x = torch.randn(3, 5)
    torch.testing.assert_close(dpfp(x), dpfp_by_hand(x), rtol=0, atol=0)
    assert dpfp(x).shape == (3, 30) and (dpfp(x) >= 0).all()


class HandLayer(nn.Module):
    """A decoder layer with the associative read before it and the delta-rule write after it."""

    def __init__(self, block, proj, state, index, m, correction=True, hard_gates=False, floor=False, threshold=0.0):
        super().__init__()
        self.block, self.proj, self.state, self.index, self.m, self.correction = block, proj, state, index, m, correction
        self.hard_gates, self.floor, self.threshold = hard_gates, floor, threshold

    def forward(self, hidden, *args, **kwargs):
        A, z, first = self.state["A"][self.index], self.state["z"][self.index], self.state["first"]
        if not first:
            q = dpfp_by_hand(hidden @ self.proj.query.weight.T)
            hidden = hidden + (q @ A) / ((q * z[:, None, :]).sum(-1, keepdim=True) + EPS)
        out = self.block(hidden, *args, **kwargs)
        h = out if isinstance(out, torch.Tensor) else out[0]
        memory = h[:, -self.m:]
        new_A, new_z = [], []
        for b in range(memory.shape[0]):
            dA, dz, largest = torch.zeros_like(A[b]), torch.zeros_like(z[b]), torch.zeros_like(z[b])
            for j in range(self.m):
                x = memory[b, j]
                k = dpfp_by_hand(x @ self.proj.key.weight.T)
                v = x @ self.proj.value.weight.T
                logit = x @ self.proj.gate.weight[0] + self.proj.gate.bias[0]
                gate = (logit > self.threshold).float() if self.hard_gates else torch.sigmoid(logit)
                self.state["gates"].append(gate.detach())
                self.state.setdefault("logits", []).append(logit.detach())
                if first:
                    old, c = torch.zeros_like(v), 1.0
                else:
                    weight = k @ z[b] + EPS
                    old = (k @ A[b]) / weight
                    c = (1 - weight / (k.norm() ** 2 + EPS)).clamp(0, 1).detach() if self.correction else 1.0
                dA = dA + gate * torch.outer(k, v - old)
                # the write-back loss's term (MemoryConfig.associative_write_back_weight): only v has a gradient
                scale = (v.pow(2).sum() + old.pow(2).sum()).detach()
                self.state.setdefault("back", []).append((1 - torch.sigmoid(logit)).detach()
                                                         * (v - old.detach()).pow(2).sum() / scale)
                bound = self.state.setdefault("bound", {}).setdefault((self.index, b), 0.0)
                self.state["bound"][self.index, b] = bound + (gate * (v - old).norm()).item()
                dz = dz + c * k
                largest = torch.maximum(largest, k)
            new_A.append(A[b] + dA)
            new_z.append(torch.maximum(z[b] + dz, largest) if self.floor else z[b] + dz)
        self.state["next_A"][self.index] = torch.stack(new_A)
        self.state["next_z"][self.index] = torch.stack(new_z)
        return out


def hand_armt(causal_lm, rmt, ids, segment_size, layers_path, correction=True, hard_gates=False, floor=False,
              threshold=0.0):
    """(logits, loss, final state) of ARMT computed by hand, segments cut from the left."""
    model = copy.deepcopy(causal_lm)
    parent, name = layers_path
    layers = getattr(parent(model), name)
    assoc, m = rmt.memory.associative, rmt.memory_config.num_memory_tokens
    width, hidden = assoc.key_features, rmt.memory_tokens.shape[1]
    batch = ids.shape[0]
    state = {"A": [torch.zeros(batch, width, hidden)] * len(layers), "z": [torch.zeros(batch, width)] * len(layers),
             "first": True, "next_A": [None] * len(layers), "next_z": [None] * len(layers), "gates": []}
    for i in range(len(layers)):
        layers[i] = HandLayer(layers[i], assoc.layers[i], state, i, m, correction, hard_gates, floor, threshold)
    logits = []
    for start in range(0, ids.shape[1], segment_size):
        seg = ids[:, start:start + segment_size]
        emb = model.get_input_embeddings()(seg)
        x = torch.cat([emb, rmt.memory_tokens.unsqueeze(0).expand(batch, -1, -1)], dim=1)
        logits.append(model(inputs_embeds=x).logits[:, :seg.shape[1]])
        state.update(A=list(state["next_A"]), z=list(state["next_z"]), first=False)
    logits = torch.cat(logits, dim=1)
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    return logits, loss, state


LAYERS = {"gpt2": (lambda m: m.transformer, "h"), "gpt_neox": (lambda m: m.gpt_neox, "layers"),
          "llama": (lambda m: m.model, "layers")}


def associative_model(arch="gpt2", m=2, key_size=4, segment_size=5, seed=0, **memory):
    backbone = tiny_model(arch, num_layers=2)
    config = MemoryConfig(num_memory_tokens=m, segment_size=segment_size, memory_kind="associative",
                          associative_key_size=key_size, **memory)
    torch.manual_seed(seed)
    rmt = RMTModel.from_backbone(backbone, config, verbose=False)
    with torch.no_grad():  # the value projections start at zero: make the memory carry something
        for layer in rmt.memory.associative.layers:
            layer.value.weight.normal_(0, 0.3)
            layer.query.weight.mul_(4)
            layer.key.weight.mul_(4)
    return backbone, rmt


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox", "llama"])
def test_two_and_three_segments_match_the_delta_rule_by_hand(arch):
    backbone, rmt = associative_model(arch)
    ids = torch.randint(2, 128, (2, 13))  # two full segments and a short one
    params = list(rmt.memory.parameters())
    out = rmt(ids, labels=ids, return_logits=True)
    grads = torch.autograd.grad(out.loss, params)
    ref_logits, ref_loss, state = hand_armt(backbone, rmt, ids, 5, LAYERS[arch])
    ref_grads = torch.autograd.grad(ref_loss, params)
    torch.testing.assert_close(out.logits, ref_logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.loss, ref_loss, rtol=1e-5, atol=1e-6)
    for mine, ref in zip(out.memory.matrices, state["A"]):
        torch.testing.assert_close(mine, ref, rtol=1e-4, atol=1e-5)
    for mine, ref in zip(out.memory.normalizers, state["z"]):
        torch.testing.assert_close(mine, ref, rtol=1e-4, atol=1e-5)
    for (name, _), mine, ref in zip(rmt.memory.named_parameters(), grads, ref_grads):
        assert ref.abs().sum() > 0, name  # every memory parameter is on the path of the loss
        torch.testing.assert_close(mine, ref, rtol=1e-3, atol=1e-6, msg=name)
    # the memory changed what the second segment computes: an untrained backbone alone differs
    assert not torch.allclose(out.logits[:, 5:10], backbone(ids[:, 5:10]).logits, atol=1e-3)


def test_without_correction_matches_by_hand():
    backbone, rmt = associative_model(associative_correction=False)
    ids = torch.randint(2, 128, (1, 15))
    with torch.no_grad():
        out = rmt(ids, labels=ids)
        _, ref_loss, state = hand_armt(backbone, rmt, ids, 5, LAYERS["gpt2"], correction=False)
    torch.testing.assert_close(out.loss, ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.memory.normalizers[1], state["z"][1], rtol=1e-4, atol=1e-5)


def test_the_normalizer_floor_matches_by_hand_and_leaves_no_row_without_normalizer():
    backbone, rmt = associative_model(associative_normalizer_floor=True)
    ids = torch.randint(2, 128, (2, 15))
    params = list(rmt.memory.parameters())
    out = rmt(ids, labels=ids)
    ref_loss, state = hand_armt(backbone, rmt, ids, 5, LAYERS["gpt2"], floor=True)[1:]
    torch.testing.assert_close(out.loss, ref_loss, rtol=1e-5, atol=1e-6)
    for mine, ref in zip(torch.autograd.grad(out.loss, params), torch.autograd.grad(ref_loss, params)):
        torch.testing.assert_close(mine, ref, rtol=1e-3, atol=1e-6)
    for mine, ref in zip(out.memory.normalizers, state["z"]):
        torch.testing.assert_close(mine, ref, rtol=1e-4, atol=1e-5)
    # With z_f >= k_f for every key written, row f of A (a sum of gate_j k_jf (v_j - v'_j)) is at
    # most z_f times the sum of gate_j |v_j - v'_j| over the writes: what one feature's query reads
    # is bounded. The authors' update on the same weights and inputs breaks that bound.
    def worst(state, layer, sample):
        rows = state["A"][layer][sample].detach().norm(dim=-1) / (state["z"][layer][sample].detach() + EPS)
        return rows.max().item() / state["bound"][layer, sample]
    plain = hand_armt(backbone, rmt, ids, 5, LAYERS["gpt2"])[2]
    pairs = [(layer, sample) for layer in range(2) for sample in range(2)]
    assert max(worst(state, *p) for p in pairs) <= 1.0
    assert max(worst(plain, *p) for p in pairs) > 3.0


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox"])
def test_hard_gates_match_by_hand_outside_training_only(arch):
    """Evaluation with associative_hard_gates equals the delta rule by hand with each gate 0 or 1
    by its logit's sign (gates of both kinds occur; the normaliser is not gated, as with soft
    gates); training computes what the soft gates do; the config at call time decides."""
    backbone, rmt = associative_model(arch, associative_hard_gates=True)
    _, soft = associative_model(arch)
    ids = torch.randint(2, 128, (2, 15))
    with torch.no_grad():
        for model in (rmt, soft):
            torch.manual_seed(1)
            for layer in model.memory.associative.layers:
                layer.gate.weight.normal_(0, 1)
        out = rmt.eval()(ids, labels=ids, return_logits=True)
        ref_logits, ref_loss, state = hand_armt(backbone, rmt, ids, 5, LAYERS[arch], hard_gates=True)
        assert set(torch.stack(state["gates"]).unique().tolist()) == {0.0, 1.0}
        torch.testing.assert_close(out.logits, ref_logits, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(out.loss, ref_loss, rtol=1e-5, atol=1e-6)
        for mine, ref in zip(out.memory.tensors(), [*state["A"], *state["z"]]):
            torch.testing.assert_close(mine, ref, rtol=1e-4, atol=1e-5)
        soft_loss = soft.eval()(ids, labels=ids).loss
        assert abs(out.loss.item() - soft_loss.item()) > 1e-4
        losses = []
        for model in (rmt, soft):
            torch.manual_seed(2)  # the same dropout
            losses.append(model.train()(ids, labels=ids).loss)
        torch.testing.assert_close(*losses)
        rmt.memory_config = dataclasses.replace(rmt.memory_config, associative_hard_gates=False)
        torch.testing.assert_close(rmt.eval()(ids, labels=ids).loss, soft_loss)


def test_a_gate_threshold_opens_the_hard_gates_only_above_it_as_by_hand():
    """associative_gate_threshold: a hard gate is open where its logit exceeds the threshold, the
    delta rule by hand with that rule; some logits fall between 0 and the threshold, so the
    result differs from the sign's. Training (soft gates) ignores it."""
    backbone, rmt = associative_model("gpt2", associative_hard_gates=True, associative_gate_threshold=0.2)
    ids = torch.randint(2, 128, (2, 15))
    with torch.no_grad():
        torch.manual_seed(1)
        for layer in rmt.memory.associative.layers:
            layer.gate.weight.normal_(0, 1)
        out = rmt.eval()(ids, labels=ids, return_logits=True)
        ref_logits, ref_loss, state = hand_armt(backbone, rmt, ids, 5, LAYERS["gpt2"], hard_gates=True, threshold=0.2)
        logits = torch.stack(state["logits"])
        assert ((logits > 0) & (logits <= 0.2)).any() and (logits > 0.2).any()
        torch.testing.assert_close(out.logits, ref_logits, rtol=1e-4, atol=1e-5)
        for mine, ref in zip(out.memory.tensors(), [*state["A"], *state["z"]]):
            torch.testing.assert_close(mine, ref, rtol=1e-4, atol=1e-5)
        _, _, at_sign = hand_armt(backbone, rmt, ids, 5, LAYERS["gpt2"], hard_gates=True)
        assert max((a - b).abs().max() for a, b in zip(state["A"], at_sign["A"])) > 1e-3
        torch.manual_seed(2)
        trained = rmt.train()(ids, labels=ids).loss
        rmt.memory_config = dataclasses.replace(rmt.memory_config, associative_gate_threshold=0.0)
        torch.manual_seed(2)
        torch.testing.assert_close(rmt(ids, labels=ids).loss, trained)


def test_straight_through_gates_write_as_hard_gates_with_the_soft_gates_gradient():
    """write_memory(straight_through=True): the matrix and normaliser of hard gates exactly, and
    the gate logits' gradient of soft gates, for a loss linear in the matrix, by hand: the update
    is linear in each gate, so d/dlogit = sigmoid'(logit) <R, k (v - v')>."""
    torch.manual_seed(0)
    keys, values = torch.randn(2, 3, 4), torch.randn(2, 3, 5)
    logits = torch.randn(2, 3, 1, requires_grad=True)
    matrix, normalizer = torch.randn(2, 24, 5), torch.rand(2, 24) + 0.5
    new, grown = write_memory(keys, values, logits, matrix, normalizer, False, True, hard_gates=True,
                              straight_through=True)
    hard, hard_grown = write_memory(keys, values, logits.detach(), matrix, normalizer, False, True, hard_gates=True)
    torch.testing.assert_close(new, hard, rtol=0, atol=0)
    torch.testing.assert_close(grown, hard_grown, rtol=0, atol=0)
    R = torch.randn_like(new)
    (new * R).sum().backward()
    k = dpfp_by_hand(keys)
    stored = torch.einsum("bmk,bkh->bmh", k, matrix) / (torch.einsum("bk,bmk->bm", normalizer, k)[..., None] + EPS)
    s = torch.sigmoid(logits.detach())
    expected = s * (1 - s) * torch.einsum("bkh,bmk,bmh->bm", R, k, values - stored)[..., None]
    torch.testing.assert_close(logits.grad, expected, rtol=1e-4, atol=1e-6)
    assert expected.abs().max() > 0.1


def test_hard_gates_in_training_write_in_training_what_evaluation_writes_and_train_the_gates():
    """associative_hard_gates_in_training: without dropout, a training forward equals evaluation's
    hard-gated delta rule by hand (logits, loss, state), and the gates still get a gradient (the
    soft gates'); without it, training's soft gates give another loss."""
    backbone, rmt = associative_model("gpt2", associative_hard_gates=True, associative_hard_gates_in_training=True)
    for module in rmt.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    backbone.config.attn_pdrop = backbone.config.resid_pdrop = backbone.config.embd_pdrop = 0.0
    ids = torch.randint(2, 128, (2, 15))
    with torch.no_grad():
        torch.manual_seed(1)
        for layer in rmt.memory.associative.layers:
            layer.gate.weight.normal_(0, 1)
        ref_logits, ref_loss, state = hand_armt(backbone, rmt, ids, 5, LAYERS["gpt2"], hard_gates=True)
    assert set(torch.stack(state["gates"]).unique().tolist()) == {0.0, 1.0}
    out = rmt.train()(ids, labels=ids, return_logits=True)
    torch.testing.assert_close(out.logits, ref_logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.loss, ref_loss, rtol=1e-5, atol=1e-6)
    for mine, ref in zip(out.memory.tensors(), [*state["A"], *state["z"]]):
        torch.testing.assert_close(mine, ref, rtol=1e-4, atol=1e-5)
    out.loss.backward()
    gate_grad = rmt.memory.associative.layers[0].gate.weight.grad
    assert gate_grad is not None and gate_grad.abs().max() > 1e-6 and torch.isfinite(gate_grad).all()
    rmt.memory_config = dataclasses.replace(rmt.memory_config, associative_hard_gates_in_training=False)
    with torch.no_grad():
        assert abs(rmt(ids, labels=ids).loss.item() - ref_loss.item()) > 1e-4


def test_the_backbone_alone_is_unchanged_outside_the_model():
    backbone = tiny_model("gpt2", num_layers=2)
    RMTModel.from_backbone(backbone, MemoryConfig(num_memory_tokens=2, segment_size=5, memory_kind="associative"),
                           verbose=False, speedups=False)
    ids = torch.randint(2, 128, (2, 7))
    fresh = tiny_model("gpt2", num_layers=2)
    with torch.no_grad():
        torch.testing.assert_close(backbone(ids).logits, fresh(ids).logits, rtol=0, atol=0)


def test_relative_change_by_hand_skips_samples_with_nothing_written():
    """Two layers, two samples; sample 1 has nothing written before (its first write is no drift)."""
    old_a = [torch.tensor([[[3.0, 4.0]], [[0.0, 0.0]]]), torch.tensor([[[1.0, 0.0]], [[0.0, 0.0]]])]
    new_a = [torch.tensor([[[3.0, 5.0]], [[7.0, 7.0]]]), torch.tensor([[[1.0, 2.0]], [[9.0, 9.0]]])]
    z_old = torch.tensor([[1.0], [0.0]])
    old = AssociativeState(tuple(old_a), (z_old, z_old))
    new = AssociativeState(tuple(new_a), (z_old + 1, z_old + 1))
    # sample 0: layer 0 r = 1 / max(25, 34), layer 1 r = 4 / max(1, 5)
    assert relative_change(old, new).item() == pytest.approx((1 / 34 + 4 / 5) / 2)
    assert relative_change(old, new, power=0.5).item() == pytest.approx(((1 / 34) ** 0.5 + (4 / 5) ** 0.5) / 2)
    c0, c1 = 1 / 34, 4 / 5
    assert relative_change(old, new, tolerance=0.5).item() == pytest.approx((c0 / (c0 + 0.5) + c1 / (c1 + 0.5)) / 2)
    nothing = AssociativeState.zeros(2, 2, 1, 2)
    assert relative_change(nothing, new).item() == 0.0
    # a matrix still at zero (Wv starts there) written for the first time: bounded, not 1e12
    zero = AssociativeState((torch.zeros(1, 1, 2),), (torch.ones(1, 1),))
    assert relative_change(zero, AssociativeState((torch.ones(1, 1, 2),), (torch.ones(1, 1),))).item() == 1.0


def test_noise_goes_on_the_matrices_relative_to_each_rows_rms():
    torch.manual_seed(0)
    matrix = torch.zeros(2, 3, 4000)
    matrix[:, 0] = torch.randn(2, 4000) * 5.0
    matrix[:, 1] = torch.randn(2, 4000) * 0.1  # row 2 untouched by any key
    state = AssociativeState((matrix,), (torch.ones(2, 3),))
    noisy = perturb(state, 0.3)
    assert torch.equal(noisy.normalizers[0], state.normalizers[0])
    noise = noisy.matrices[0] - matrix
    rms = matrix.pow(2).mean(-1).sqrt()
    assert torch.equal(noise[:, 2], torch.zeros(2, 4000))
    ratio = noise[:, :2].std(-1) / rms[:, :2]
    torch.testing.assert_close(ratio, torch.full_like(ratio, 0.3), rtol=0.05, atol=0)


def test_the_stability_loss_is_the_matrices_change_per_transition_by_hand():
    """Trained with the stability loss (power 0.5), the loss is the task's plus the weight times the
    mean over the transitions after the first of the matrices' relative change, the states after
    each segment computed by hand (hand_armt on the input's prefixes)."""
    backbone, rmt = associative_model("gpt_neox", memory_stability_weight=2.0, memory_stability_power=0.5)
    ids = torch.randint(2, 128, (2, 15))
    rmt.train()  # no dropout in the tiny GPT-NeoX: training computes what evaluation does
    out = rmt(ids, labels=ids)
    with torch.no_grad():
        states = [hand_armt(backbone, rmt, ids[:, :n], 5, LAYERS["gpt_neox"])[2]["A"] for n in (5, 10, 15)]
        _, task_loss, _ = hand_armt(backbone, rmt, ids, 5, LAYERS["gpt_neox"])

    def change(old, new):  # mean over layers and samples of |new - old| / max(|old|, |new|)
        return torch.stack([((b - a).pow(2).sum((1, 2)) / torch.maximum(a.pow(2).sum((1, 2)), b.pow(2).sum((1, 2))))
                            .sqrt() for a, b in zip(old, new)]).mean()

    drift = (change(states[0], states[1]) + change(states[1], states[2])) / 2
    torch.testing.assert_close(out.memory_drift, drift, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out.loss, task_loss + 2.0 * drift, rtol=1e-4, atol=1e-6)
    params = list(rmt.memory.parameters())
    with_drift = torch.autograd.grad(out.loss, params, allow_unused=True)
    rmt.memory_config = dataclasses.replace(rmt.memory_config, memory_stability_weight=0.0)
    plain = torch.autograd.grad(rmt(ids, labels=ids).loss, params, allow_unused=True)
    assert any(not torch.allclose(a, b) for a, b in zip(with_drift, plain) if a is not None)  # the drift trains


def trained_with_a_write_cost(**memory):
    """A tiny GPT-NeoX associative model with ``memory``'s write cost, one training forward of 3
    segments (loss with the cost) and the hand-computed delta rule's task loss and gates."""
    backbone, rmt = associative_model("gpt_neox", **memory)
    ids = torch.randint(2, 128, (2, 15))
    rmt.train()  # no dropout in the tiny GPT-NeoX: training computes what evaluation does
    out = rmt(ids, labels=ids)
    with torch.no_grad():
        _, task_loss, state = hand_armt(backbone, rmt, ids, 5, LAYERS["gpt_neox"])
    return rmt, ids, out, task_loss, torch.stack(state["gates"])  # 3 segments x 2 layers x 2 samples x 2 tokens


def test_the_write_cost_is_the_mean_write_gate_by_hand_and_shuts_the_gates():
    """Trained with a write cost, the loss is the task's plus the cost times the mean write gate
    over the layers, memory tokens, samples and segments (every gate of the hand-computed delta
    rule), its gradient on the gates' biases is the cost times the gates' slope (training pushes
    them shut), and evaluation adds nothing."""
    rmt, ids, out, task_loss, gates = trained_with_a_write_cost(associative_write_cost=0.5)
    opened = gates.mean()
    assert gates.shape == (24,)
    torch.testing.assert_close(out.write_gate, opened, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss, task_loss + 0.5 * opened, rtol=1e-4, atol=1e-6)
    assert out.memory.write_gate is None  # the state handed back holds the memory only
    assert rmt(ids).memory.write_gate is None  # without labels too (nothing to add the cost to)
    biases = [layer.gate.bias for layer in rmt.memory.associative.layers]
    with_cost = torch.autograd.grad(out.loss, biases)
    rmt.memory_config = dataclasses.replace(rmt.memory_config, associative_write_cost=0.0)
    plain = torch.autograd.grad(rmt(ids, labels=ids).loss, biases)
    # the cost's own gradient on layer l's gate bias: 0.5 x the mean over segments and layers of
    # d(gate)/d(bias) = g (1 - g) (gates in the hand write's order: segment, layer, sample, token)
    gates = gates.view(3, 2, 4)
    direct = 0.5 * (gates * (1 - gates)).mean(dim=2).sum(dim=0) / (3 * 2)
    # within 2%: the gates of later segments also depend on the bias, through what they read
    torch.testing.assert_close(torch.cat([a - b for a, b in zip(with_cost, plain)]), direct, rtol=0.02, atol=0)
    rmt.memory_config = dataclasses.replace(rmt.memory_config, associative_write_cost=0.5)
    with torch.no_grad():
        torch.testing.assert_close(rmt.eval()(ids, labels=ids).loss, task_loss, rtol=1e-4, atol=1e-6)


def test_the_softplus_write_cost_charges_minus_log_shut_by_hand_and_pulls_wide_open_gates_hardest():
    """With associative_write_cost_form="softplus" the loss is the task's plus the cost times the
    mean of -log(1 - g) over every gate g of the hand-computed delta rule (softplus of the
    logits), and its gradient on each layer's gate bias is the cost times the mean gate itself,
    not the gate's slope g (1 - g): a gate open wide is pulled shut hardest."""
    rmt, ids, out, task_loss, gates = trained_with_a_write_cost(associative_write_cost=0.5,
                                                                associative_write_cost_form="softplus")
    gates = gates.double()
    charged = (-torch.log1p(-gates)).mean().float()
    torch.testing.assert_close(out.write_gate, charged, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss, task_loss + 0.5 * charged, rtol=1e-4, atol=1e-6)
    assert not torch.isclose(charged, gates.mean().float(), rtol=1e-2)  # not the gate form's charge
    biases = [layer.gate.bias for layer in rmt.memory.associative.layers]
    with_cost = torch.autograd.grad(out.loss, biases)
    rmt.memory_config = dataclasses.replace(rmt.memory_config, associative_write_cost=0.0)
    plain = torch.autograd.grad(rmt(ids, labels=ids).loss, biases)
    # d softplus(x) / dx = sigmoid(x) = g; within 2% as in the gate form's test (later segments'
    # gates also depend on the bias, through what they read)
    direct = 0.5 * gates.view(3, 2, 4).mean(dim=2).sum(dim=0).float() / (3 * 2)
    torch.testing.assert_close(torch.cat([a - b for a, b in zip(with_cost, plain)]), direct, rtol=0.02, atol=0)


def test_an_unknown_write_cost_form_or_one_without_the_associative_memory_is_refused_by_name():
    with pytest.raises(ValueError, match=r"associative_write_cost_form='sigmoid'.*\('gate', 'softplus'\)"):
        MemoryConfig(memory_kind="associative", associative_write_cost_form="sigmoid")
    with pytest.raises(ValueError, match=r"associative_write_cost_form='softplus'.*memory_kind='tokens'"):
        MemoryConfig(associative_write_cost_form="softplus")


def test_the_write_back_loss_is_each_values_distance_from_what_is_stored_times_its_shut_gate_by_hand():
    """With associative_write_back_weight the training loss is the task's plus the weight times the
    mean over every memory token, layer, sample and segment of (1 - b) |v - s|^2 / (|v|^2 + |s|^2),
    computed by hand from the delta rule (s: what the matrix holds under the token's key, zero
    before the first write), and its gradient on the associative projections is that of the hand
    term where only v carries a gradient (s, the gate and the scale held). Evaluation adds nothing."""
    backbone, rmt = associative_model("gpt_neox", associative_write_back_weight=0.5)
    ids = torch.randint(2, 128, (2, 15))
    with torch.no_grad():
        for layer in rmt.memory.associative.layers:  # gates between shut and open
            layer.gate.weight.normal_(0, 0.5)
    rmt.train()  # no dropout in the tiny GPT-NeoX
    out = rmt(ids, labels=ids)
    _, task_loss, state = hand_armt(backbone, rmt, ids, 5, LAYERS["gpt_neox"])
    back = torch.stack(state["back"])
    assert back.shape == (24,) and back.max() - back.min() > 0.2  # 3 segments x 2 layers x 2 samples x 2 tokens
    torch.testing.assert_close(out.write_back, back.mean().detach(), rtol=1e-5, atol=1e-6)
    hand_loss = task_loss + 0.5 * back.mean()
    torch.testing.assert_close(out.loss, hand_loss.detach(), rtol=1e-4, atol=1e-6)
    params = [p for layer in rmt.memory.associative.layers for p in layer.parameters()]
    mine, ref = torch.autograd.grad(out.loss, params), torch.autograd.grad(hand_loss, params)
    for a, b in zip(mine, ref):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-6)
    assert out.memory.write_back is None  # the state handed on holds the memory only
    with torch.no_grad():
        torch.testing.assert_close(rmt.eval()(ids, labels=ids).loss, task_loss, rtol=1e-4, atol=1e-6)


def test_a_write_of_what_is_stored_changes_nothing_and_costs_no_write_back():
    """The lever's premise: a value equal to what the matrix holds under its key leaves the matrix as
    it is however open the gate, and the write-back loss is then 0; a shut gate's other value costs."""
    torch.manual_seed(0)
    keys, values = torch.randn(2, 3, 4), torch.randn(2, 3, 8)
    matrix, normalizer = write_memory(keys, values, torch.zeros(2, 3, 1), torch.zeros(2, 24, 8), torch.zeros(2, 24),
                                      True, True)
    features = dpfp(keys)
    stored = (features @ matrix) / ((features * normalizer[:, None]).sum(-1, keepdim=True) + EPS)
    wide_open = torch.full((2, 3, 1), 30.0)
    again, _ = write_memory(keys, stored, wide_open, matrix, normalizer, False, True)
    torch.testing.assert_close(again, matrix, rtol=0, atol=1e-5)
    assert write_back_loss(keys, stored, -wide_open, matrix, normalizer, False) < 1e-10
    assert write_back_loss(keys, values, wide_open, matrix, normalizer, False) < 1e-10  # open gates: nothing owed
    shut = write_back_loss(keys, values, -wide_open, matrix, normalizer, False)
    by_hand = ((values - stored).pow(2).sum(-1) / (values.pow(2).sum(-1) + stored.pow(2).sum(-1))).mean()
    torch.testing.assert_close(shut, by_hand)


def test_a_write_back_weight_below_0_or_without_the_associative_memory_is_refused_by_name():
    with pytest.raises(ValueError, match=r"associative_write_back_weight=-1.*number >= 0"):
        MemoryConfig(memory_kind="associative", associative_write_back_weight=-1)
    with pytest.raises(ValueError, match=r"associative_write_back_weight=0.1.*memory_kind='tokens'"):
        MemoryConfig(associative_write_back_weight=0.1)


def test_forced_writes_open_every_gate_in_training_as_by_hand_and_the_cost_charges_the_gates_as_they_were():
    """associative_forced_write_rate=1: a training forward equals the delta rule by hand with every
    gate 1 (no dropout in the tiny GPT-NeoX); the write cost charges the soft gates the
    projections computed, and the task loss gives the gates no gradient (a forced gate is a
    constant). Evaluation forces nothing: the soft gates by hand."""
    backbone, rmt = associative_model("gpt_neox", associative_forced_write_rate=1.0, associative_write_cost=0.5)
    ids = torch.randint(2, 128, (2, 15))
    with torch.no_grad():
        torch.manual_seed(1)
        for layer in rmt.memory.associative.layers:
            layer.gate.weight.normal_(0, 1)
        ref_logits, task_loss, state = hand_armt(backbone, rmt, ids, 5, LAYERS["gpt_neox"], hard_gates=True,
                                                 threshold=-float("inf"))
        soft_logits, _, soft = hand_armt(backbone, rmt, ids, 5, LAYERS["gpt_neox"])
    assert set(torch.stack(state["gates"]).unique().tolist()) == {1.0}
    assert torch.stack(soft["gates"]).max() < 0.99  # forcing changes what is written
    out = rmt.train()(ids, labels=ids, return_logits=True)
    torch.testing.assert_close(out.logits, ref_logits, rtol=1e-4, atol=1e-5)
    for mine, ref in zip(out.memory.tensors(), [*state["A"], *state["z"]]):
        torch.testing.assert_close(mine, ref, rtol=1e-4, atol=1e-5)
    # the cost charges the unforced gates, which depend on the logits the forced run computed
    charged = torch.sigmoid(torch.stack(state["logits"])).mean()
    torch.testing.assert_close(out.write_gate, charged, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss, task_loss + 0.5 * charged, rtol=1e-4, atol=1e-6)
    gate_weights = [layer.gate.weight for layer in rmt.memory.associative.layers]
    rmt.memory_config = dataclasses.replace(rmt.memory_config, associative_write_cost=0.0)
    task_grads = torch.autograd.grad(rmt(ids, labels=ids).loss, gate_weights, allow_unused=True)
    assert all(g is None or g.abs().max() == 0 for g in task_grads)
    with torch.no_grad():
        torch.testing.assert_close(rmt.eval()(ids, labels=ids, return_logits=True).logits, soft_logits,
                                   rtol=1e-4, atol=1e-5)


def test_forced_writes_open_a_sample_s_gates_together_at_the_rate():
    """associative_forced_write_rate=0.25 over 4,000 samples: about a quarter of the samples have
    every gate of the write forced open (the logit replaced), the others none (their logits as
    projected); outside training none."""
    torch.manual_seed(0)
    layer = AssociativeLayer(16, 4)
    memory, matrix, normalizer = torch.randn(4000, 3, 16), torch.zeros(4000, 24, 16), torch.zeros(4000, 24)
    seen = []

    def kernel(keys, values, gates, *args):
        seen.append(gates)
        return matrix, normalizer

    projected = layer.gate(memory)
    layer.write(memory, matrix, normalizer, True, True, kernel, forced_rate=0.25)
    forced = seen[0] == 30.0
    per_sample = forced.all(dim=(1, 2))
    assert (forced.any(dim=(1, 2)) == per_sample).all()  # all of a sample's gates, or none
    assert 0.22 < per_sample.float().mean() < 0.28
    torch.testing.assert_close(seen[0][~per_sample], projected[~per_sample].detach())
    layer.eval()
    layer.write(memory, matrix, normalizer, True, True, kernel, forced_rate=0.25)
    assert not (seen[1] == 30.0).any()


def test_a_forced_write_rate_outside_0_to_1_or_without_the_associative_memory_is_refused_by_name():
    with pytest.raises(ValueError, match=r"associative_forced_write_rate=1.5.*probability from 0 to 1"):
        MemoryConfig(memory_kind="associative", associative_forced_write_rate=1.5)
    with pytest.raises(ValueError, match=r"associative_forced_write_rate=0.1.*memory_kind='tokens'"):
        MemoryConfig(associative_forced_write_rate=0.1)


def test_training_noise_perturbs_training_only():
    _, rmt = associative_model("gpt_neox", memory_noise_std=0.5)
    _, quiet = associative_model("gpt_neox")
    ids = torch.randint(2, 128, (2, 15))
    with torch.no_grad():
        rmt.eval()
        quiet.eval()
        torch.testing.assert_close(rmt(ids, labels=ids).loss, quiet(ids, labels=ids).loss)
    rmt.train()  # training: with gradients
    quiet.train()
    noisy, clean = rmt(ids, labels=ids), quiet(ids, labels=ids)
    assert abs(noisy.loss.item() - clean.loss.item()) > 1e-4
    # the first segment reads nothing, the last segment's write is never read: only the middle ones differ
    torch.testing.assert_close(noisy.segment_losses[0], clean.segment_losses[0])


def test_the_write_projects_keys_values_and_gates_in_one_matmul_or_module_by_module_with_hooks():
    """One linear for the three projections (a host-bound GPU step pays per launch), equal to the
    three weights applied by hand, values and gradients. Modules with hooks (DeepSpeed ZeRO-3
    gathers its partitioned weights, marked by ``ds_id``, in them) are called one by one."""
    torch.manual_seed(0)
    layer = AssociativeLayer(hidden_size=16, key_size=4)
    nn.init.normal_(layer.value.weight, std=0.3)
    nn.init.normal_(layer.gate.bias, std=0.3)
    memory = torch.randn(2, 3, 16)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        projected = layer.write_projections(memory)
    assert sum(e.name == "aten::linear" for e in prof.events()) == 1

    by_hand = (memory @ layer.key.weight.T, memory @ layer.value.weight.T,
               memory @ layer.gate.weight.T + layer.gate.bias)
    weights = [layer.key.weight, layer.value.weight, layer.gate.weight, layer.gate.bias]
    directions = [torch.randn_like(t) for t in by_hand]
    grads = []
    for outputs in (projected, by_hand):
        grads.append(torch.autograd.grad(sum((o * d).sum() for o, d in zip(outputs, directions)), weights))
    for got, want in zip((*projected, *grads[0]), (*by_hand, *grads[1])):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)

    called = []
    handle = layer.value.register_forward_pre_hook(lambda m, args: called.append(m))
    for got, want in zip(layer.write_projections(memory), by_hand):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert called == [layer.value]
    handle.remove()
    layer.gate.weight.ds_id = 7
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        layer.write_projections(memory)
    assert sum(e.name == "aten::linear" for e in prof.events()) == 3


def test_gate_noise_is_logistic_noise_on_the_gate_logits_in_training_only():
    """The write in training equals the delta rule by hand with the gates' logits plus scale x
    (log u - log(1 - u)) for the same uniform u; in eval it is the plain write; and sigmoid of a
    zero logit plus standard logistic noise is uniform on (0, 1)."""
    torch.manual_seed(0)
    layer = AssociativeLayer(hidden_size=16, key_size=4)
    nn.init.normal_(layer.value.weight, std=0.3)
    nn.init.normal_(layer.gate.weight, std=0.3)
    memory = torch.randn(2, 3, 16)
    matrix, normalizer = torch.rand(2, 24, 16), torch.rand(2, 24)
    keys, values, logits = layer.key(memory), layer.value(memory), layer.gate(memory)

    torch.manual_seed(1)
    noisy = layer.train().write(memory, matrix, normalizer, False, True, gate_noise=2.0)
    torch.manual_seed(1)
    u = torch.rand(2, 3, 1).clamp(1e-6, 1 - 1e-6)
    expected = write_memory(keys, values, logits + 2.0 * torch.log(u / (1 - u)), matrix, normalizer, False, True)
    for got, want in zip(noisy, expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    plain = write_memory(keys, values, logits, matrix, normalizer, False, True)
    assert not torch.allclose(noisy[0], plain[0])
    for got, want in zip(layer.eval().write(memory, matrix, normalizer, False, True, gate_noise=2.0), plain):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)

    gates = torch.sigmoid(logistic_noise(torch.zeros(200_000)))
    assert abs(gates.mean().item() - 0.5) < 0.01
    for q in (0.1, 0.5, 0.9):
        assert abs((gates < q).float().mean().item() - q) < 0.01


def test_a_model_with_gate_noise_differs_in_training_only():
    _, rmt = associative_model("gpt_neox", associative_gate_noise=1.0)
    _, quiet = associative_model("gpt_neox")
    ids = torch.randint(2, 128, (2, 15))
    with torch.no_grad():
        torch.testing.assert_close(rmt.eval()(ids, labels=ids).loss, quiet.eval()(ids, labels=ids).loss)
        assert abs(rmt.train()(ids, labels=ids).loss.item() - quiet.train()(ids, labels=ids).loss.item()) > 1e-4


def test_a_sample_that_has_ended_gets_no_training_noise(monkeypatch):
    """With right padding, a sample whose input ended keeps the noise-free state of its last
    segment, as when it runs alone (the noise made deterministic to compare the two)."""
    from rmt_peft import associative

    monkeypatch.setattr(associative, "perturb",
                        lambda state, std: dataclasses.replace(state, matrices=tuple(m + std for m in state.matrices)))
    _, rmt = associative_model("gpt_neox", memory_noise_std=0.01)
    rmt.train()
    long, short = torch.randint(2, 128, (1, 20)), torch.randint(2, 128, (1, 10))
    ids = torch.cat([long, torch.cat([short, torch.ones(1, 10, dtype=torch.long)], dim=1)])
    mask = torch.ones_like(ids)
    mask[1, 10:] = 0
    both = rmt(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
    alone = rmt(short, labels=short)
    for a, b in zip(both.memory.tensors(), alone.memory.tensors()):
        torch.testing.assert_close(a[1:], b, rtol=1e-4, atol=1e-5)
    plain = associative_model("gpt_neox")[1].train()(short, labels=short)
    assert not torch.allclose(alone.memory.matrices[0], plain.memory.matrices[0])  # the noise acted


def test_truncated_bptt_and_segment_checkpointing_are_exact():
    ids = torch.randint(2, 128, (2, 20))
    _, full = associative_model("gpt_neox")  # no dropout in training mode
    _, ckpt = associative_model("gpt_neox", checkpoint_segments=True, uncheckpointed_segments=0)
    _, cut = associative_model("gpt_neox", bptt_depth=1)
    losses, grads = [], []
    for rmt in (full, ckpt, cut):
        rmt.train()
        out = rmt(ids, labels=ids)
        losses.append(out.loss)
        grads.append(torch.autograd.grad(out.loss, list(rmt.memory.parameters())))
    torch.testing.assert_close(losses[1], losses[0])
    for a, b in zip(grads[1], grads[0]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    # truncation keeps the loss, drops the gradient through the early transitions ...
    torch.testing.assert_close(losses[2], losses[0])
    assert any(not torch.allclose(a, b) for a, b in zip(grads[2], grads[0]))
    # a depth covering every transition is full BPTT
    _, deep = associative_model("gpt_neox", bptt_depth=3)
    deep.train()
    out = deep(ids, labels=ids)
    for a, b in zip(torch.autograd.grad(out.loss, list(deep.memory.parameters())), grads[0]):
        torch.testing.assert_close(a, b)


def test_stream_and_read_equal_forward():
    _, rmt = associative_model()
    ids = torch.randint(2, 128, (1, 23))
    with torch.no_grad():
        out = rmt(ids, labels=ids)
        stream = rmt.stream(compute_loss=True)
        for chunk in ids.split(4, dim=1):
            stream.feed(chunk)
        result = stream.finish()
        read = rmt.read(ids)
    assert result.loss == pytest.approx(out.loss.item(), rel=1e-5)
    for a, b, c in zip(result.memory.tensors(), out.memory.tensors(), read.tensors()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(c, b, rtol=1e-5, atol=1e-6)


def test_generate_from_a_read_memory_equals_generating_after_the_document():
    _, rmt = associative_model()
    rmt.causal_lm.generation_config.pad_token_id = 1
    document, question = torch.randint(2, 128, (1, 10)), torch.randint(2, 128, (1, 3))
    with torch.no_grad():
        whole = rmt.generate(torch.cat([document, question], dim=1), max_new_tokens=4, do_sample=False)
        memory = rmt.read(document)
        split = rmt.generate(question, memory=memory, max_new_tokens=4, do_sample=False)
        plain = rmt.generate(question, max_new_tokens=4, do_sample=False,
                             output_scores=True, return_dict_in_generate=True)
        read = rmt.generate(question, memory=memory, max_new_tokens=4, do_sample=False,
                            output_scores=True, return_dict_in_generate=True)
    assert torch.equal(whole, split)
    # the memory is read while generating: the scores differ from those of an empty memory
    assert not torch.allclose(plain.scores[0], read.scores[0])


def test_padded_samples_compute_what_they_compute_alone():
    _, rmt = associative_model(segment_alignment="right")
    long, short = torch.randint(2, 128, (1, 12)), torch.randint(2, 128, (1, 7))
    ids = torch.cat([long, torch.cat([torch.ones(1, 5, dtype=torch.long), short], dim=1)])
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        both = rmt(ids, attention_mask=mask, labels=labels)
        alone = rmt(short, labels=short)
    for a, b in zip(both.memory.tensors(), alone.memory.tensors()):
        torch.testing.assert_close(a[1:], b, rtol=1e-4, atol=1e-5)


def test_memory_state_saves_and_loads_and_refuses_the_other_kind(tmp_path):
    _, rmt = associative_model()
    ids = torch.randint(2, 128, (1, 13))
    with torch.no_grad():
        stream = rmt.stream()
        stream.feed(ids)
        state = MemoryState.from_stream(stream, document="doc")
        path = state.save(str(tmp_path / "doc.mem.safetensors"))
        loaded = MemoryState.load_for(path, rmt)
        question = torch.randint(2, 128, (1, 2))
        rmt.causal_lm.generation_config.pad_token_id = 1
        expected = rmt.generate(torch.cat([ids, question], dim=1), max_new_tokens=3, do_sample=False)
        assert torch.equal(loaded.generate(rmt, question, max_new_tokens=3, do_sample=False), expected)
    tokens = RMTModel.from_backbone(tiny_model("gpt2", num_layers=2), MemoryConfig(num_memory_tokens=2, segment_size=5),
                                    verbose=False)
    with pytest.raises(UserError, match="memory_kind: 'associative' in .*'tokens' in the model"):
        MemoryState.load_for(path, tokens)
    # the floor changes what the normalisers mean: a state read without it does not load into a model with it
    floored = associative_model(associative_normalizer_floor=True)[1]
    with pytest.raises(UserError, match="associative_normalizer_floor: False in .*True in the model"):
        MemoryState.load_for(path, floored)


def test_layer_checkpointing_is_refused_in_training():
    backbone, rmt = associative_model()
    backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    rmt.train()
    with pytest.raises(UserError, match="checkpoint_segments"):
        rmt(torch.randint(2, 128, (1, 6)), labels=torch.randint(2, 128, (1, 6)))


def test_config_refuses_token_levers_and_no_memory_tokens():
    with pytest.raises(ValueError, match="memory_update.*memory_kind='associative'"):
        MemoryConfig(memory_kind="associative", memory_update="gated")
    with pytest.raises(ValueError, match="memory_gate_bias.*memory_kind='associative'"):
        MemoryConfig(memory_kind="associative", memory_gate_bias=-2.0)
    MemoryConfig(memory_kind="associative", memory_noise_std=0.3, memory_stability_weight=1.0)  # both kinds
    with pytest.raises(ValueError, match="associative_gate_noise.*memory_kind='tokens'"):
        MemoryConfig(associative_gate_noise=1.0)
    with pytest.raises(ValueError, match="associative_gate_noise=-1.0 is invalid: expected a number >= 0"):
        MemoryConfig(memory_kind="associative", associative_gate_noise=-1.0)
    with pytest.raises(ValueError, match="associative_hard_gates.*memory_kind='tokens'"):
        MemoryConfig(associative_hard_gates=True)
    with pytest.raises(ValueError, match="associative_hard_gates='yes' is invalid: expected true or false"):
        MemoryConfig(memory_kind="associative", associative_hard_gates="yes")
    with pytest.raises(ValueError, match="associative_gate_threshold=1.0 is invalid: .*set associative_hard_gates=true"):
        MemoryConfig(memory_kind="associative", associative_gate_threshold=1.0)
    with pytest.raises(ValueError, match="associative_gate_threshold=nan is invalid: expected a finite number"):
        MemoryConfig(memory_kind="associative", associative_hard_gates=True, associative_gate_threshold=float("nan"))
    MemoryConfig(memory_kind="associative", associative_hard_gates=True, associative_gate_threshold=-1)
    with pytest.raises(ValueError, match="associative_hard_gates_in_training=True is invalid: .*set associative_hard_gates=true"):
        MemoryConfig(memory_kind="associative", associative_hard_gates_in_training=True)
    with pytest.raises(ValueError, match="associative_hard_gates_in_training=1 is invalid: expected true or false"):
        MemoryConfig(memory_kind="associative", associative_hard_gates=True, associative_hard_gates_in_training=1)
    with pytest.raises(ValueError, match="associative_write_cost.*memory_kind='tokens'"):
        MemoryConfig(associative_write_cost=0.1)
    with pytest.raises(ValueError, match="associative_write_cost=-0.1 is invalid: expected a number >= 0"):
        MemoryConfig(memory_kind="associative", associative_write_cost=-0.1)
    with pytest.raises(ValueError, match="associative_normalizer_floor.*memory_kind='tokens'"):
        MemoryConfig(associative_normalizer_floor=True)
    with pytest.raises(ValueError, match="associative_normalizer_floor=1 is invalid: expected true or false"):
        MemoryConfig(memory_kind="associative", associative_normalizer_floor=1)
    with pytest.raises(ValueError, match="num_memory_tokens"):
        MemoryConfig(memory_kind="associative", num_memory_tokens=0)
    with pytest.raises(ValueError, match="memory_kind='bogus' is invalid: expected one of"):
        MemoryConfig(memory_kind="bogus")
    assert MemoryConfig(memory_kind="associative", segment_size=100, num_memory_tokens=10).positions_per_segment == 110


def test_a_state_of_another_shape_is_refused():
    _, rmt = associative_model()
    wrong = AssociativeState.zeros(3, 1, rmt.memory.associative.key_features, 64)
    with pytest.raises(ValueError, match="3 layers .* expected 2 layers"):
        rmt(torch.randint(2, 128, (1, 5)), memory=wrong)
    with pytest.raises(ValueError, match="AssociativeState"):
        rmt(torch.randint(2, 128, (1, 5)), memory=torch.zeros(1, 2, 64))


@pytest.mark.parametrize("memory_first", [True, False])
def test_compiled_blocks_trace_the_read_and_write_into_one_graph_shared_by_every_layer(memory_first):
    """The hooks compile inside the block's own graph (compiled apart, the read, the block and the
    write were three calls a layer forward and backward, which left an H200 waiting on the host),
    whether the blocks were compiled before the memory was attached or after, and the 4 layers
    share it: one graph for the first segment (nothing stored yet: no read, a write without the
    correction), one for the later ones, none per layer, no graph break."""
    from torch._dynamo.utils import counters

    from rmt_peft.speedups import compile_blocks

    backbone = tiny_model("gpt2", num_layers=4)
    config = MemoryConfig(num_memory_tokens=2, segment_size=5, memory_kind="associative", associative_key_size=4)

    def build():
        torch.manual_seed(0)
        rmt = RMTModel.from_backbone(backbone, config, verbose=False)
        for layer in rmt.memory.associative.layers:
            layer.value.weight.data.normal_(0, 0.3)
        return rmt

    ids = torch.randint(2, 128, (2, 15))

    def loss_and_grads(rmt):
        rmt.zero_grad()
        loss = rmt(ids, labels=ids).loss
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in rmt.memory.parameters()]

    eager = loss_and_grads(build())
    torch._dynamo.reset()
    counters.clear()
    try:
        if memory_first:
            rmt = build()
            compile_blocks(rmt.causal_lm, backend="eager")  # dynamo's tracing and guards, no inductor compile time
        else:
            compile_blocks(backbone, backend="eager")
            rmt = build()
        compiled = loss_and_grads(rmt)
        again = loss_and_grads(rmt)
        torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
        torch.testing.assert_close(again, eager, rtol=0, atol=0)
        assert counters["stats"]["unique_graphs"] == 2
        assert not counters["graph_break"]
    finally:
        compile_blocks(backbone, enable=False)
        torch._dynamo.reset()
    assert all(block._compiled_call_impl is None for block in transformer_blocks(backbone))


def test_a_bf16_backbone_reads_and_writes_in_bf16_and_keeps_an_fp32_state():
    """The projections are fp32 parameters; with bf16 hidden states their matmuls run in bf16 (an
    fp32 matmul per layer would cost a GPU about what the layer's own matmuls cost), and the
    state that accumulates the writes stays fp32."""
    _, rmt = associative_model()
    ids = torch.randint(2, 128, (2, 15))
    with torch.no_grad():
        reference = rmt(ids, return_logits=True)
    rmt.causal_lm.to(torch.bfloat16)
    seen = []
    block = transformer_blocks(rmt.causal_lm)[0]
    reader = next(h for h in block._forward_pre_hooks.values() if getattr(h, "kernel", None) is read_memory)

    def spy(queries, matrix, normalizer, dtype):  # the dtype of the query projection the read gets
        seen.append(queries.dtype)
        return read_memory(queries, matrix, normalizer, dtype)

    reader.kernel = spy
    with torch.no_grad():
        out = rmt(ids, return_logits=True)
    reader.kernel = read_memory
    assert seen and set(seen) == {torch.bfloat16}
    assert all(t.dtype == torch.float32 for t in out.memory.tensors())
    assert rmt.memory.associative.layers[0].query.weight.dtype == torch.float32
    torch.testing.assert_close(out.logits.float(), reference.logits, rtol=0.05, atol=0.05)


def test_compiled_gpt_neo_blocks_keep_every_graph_they_need(caplog):
    """GPT-Neo's two kinds of layer, with and without gradients, the first and the later segments
    and a short last one: more graphs than torch's default limit of 8, past which dynamo would
    run the remaining calls eagerly, warning once. compile_blocks raises the limit; training,
    evaluation and a stream then compute what eager blocks do."""
    import logging

    from rmt_peft.speedups import compile_blocks

    backbone = tiny_model("gpt_neo", num_layers=4)
    config = MemoryConfig(num_memory_tokens=2, segment_size=8, memory_kind="associative", associative_key_size=4,
                          associative_hard_gates=True)
    torch.manual_seed(0)
    rmt = RMTModel.from_backbone(backbone, config, verbose=False)
    for layer in rmt.memory.associative.layers:
        layer.value.weight.data.normal_(0, 0.3)
    ids = torch.randint(2, 128, (2, 8 * 3 + 3))

    def run():
        rmt.train()
        rmt.zero_grad()
        loss = rmt(ids, labels=ids).loss
        loss.backward()
        rmt.eval()
        with torch.no_grad():
            evaluated = rmt(ids, labels=ids).loss
        reader = rmt.stream(batch_size=2)
        reader.feed(ids)
        streamed = reader.finish()
        return loss.detach(), evaluated, [p.grad.clone() for p in rmt.memory.parameters()], streamed.memory.tensors()

    eager = run()
    torch._dynamo.reset()
    limit = torch._dynamo.config.recompile_limit
    try:
        compile_blocks(rmt.causal_lm, backend="eager")
        with caplog.at_level(logging.WARNING, logger="torch._dynamo"):
            compiled = run()
        assert not [r for r in caplog.records if "recompile_limit" in r.getMessage()]
        torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
    finally:
        compile_blocks(rmt.causal_lm, enable=False)
        torch._dynamo.config.recompile_limit = limit
        torch._dynamo.reset()
