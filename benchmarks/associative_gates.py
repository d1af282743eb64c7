"""Why the associative memory forgets: its write gates and keys along a long input.

For each ``--seeds``, trains the learning benchmark's associative detect run (``--preset``,
default ``cpu_text``: a couple of minutes on a CPU) with ``--gate-noise`` (MemoryConfig's
``associative_gate_noise``), then reads ``--segments`` segments of test samples and reports, per
decoder layer, the mean write gate (the sigmoid) at segments 1, 2, 4, ... and the mean cosine
between each memory token's key features in successive segments, with the answer accuracy at
``--lengths``. Keys that repeat (cosine near 1) and gates left open a little on filler mean that
every segment overwrites part of what the fact wrote (BENCHMARKS.md, "Why the associative memory
forgets").

    python -m benchmarks.associative_gates --seeds 0 1 2

With ``--hard-gates`` it also tests the same weights with ``associative_hard_gates`` (each gate
open or shut by its logit's sign outside training):

    python -m benchmarks.associative_gates --seeds 0 1 2 3 --gate-noise 2 --hard-gates --threads 1 --lengths 16 64 128 512

With ``--spike-batches N`` it also draws N training batches after training, each with its own
gate-noise draw, takes the gradient norm of each (no step), and recomputes the largest ones with
the noise off and with other draws: whether a gradient spike comes from the batch or from the
draw (BENCHMARKS.md, "Gate noise on the GPU").

    python -m benchmarks.associative_gates --seeds 0 --gate-noise 2 --spike-batches 400

With ``--starved`` it also reads ``--segments`` segments and counts, per layer, the matrix rows
(key features) that hold a value while their normaliser is still about zero: the authors'
correction stops the normaliser growing for a key it deems stored, but the matrix row is written
all the same, so a query on that feature alone reads the row divided by about ``eps``.

    python -m benchmarks.associative_gates --seeds 0 --gate-noise 2 --starved --threads 1 \
      --set '{"task": "memorize", "associative_hard_gates": true}'

With ``--by-fact N`` it answers ``--samples`` test samples of N segments and splits the answers
by what the gates did to each sample's last fact (the text tasks): whether a gate opened at the
fact's segment (was it written at all), and whether gates opened on filler after it (was it
overwritten: the keys repeat, so a write on filler replaces what the fact wrote). A gate is open
as the model tests it: with hard gates where its logit exceeds the threshold, else where the
soft gate exceeds 1/2.

    python -m benchmarks.associative_gates --weights learning/weights/reasoning-*.pt --by-fact 16 --samples 256

With ``--forced-writes RATE ...`` it also answers ``--samples`` samples at each of ``--lengths``
with each layer's gates forced open for a sample at a segment with probability RATE (as
MemoryConfig.associative_forced_write_rate does in training): how much a write that the model
did not choose costs what its memory holds. The GPU runs that miss lose the fact to rare,
confident writes on filler; a memory that writes what keeps the fact loses nothing by them.

    python -m benchmarks.associative_gates --weights learning/weights/detect-*.pt --forced-writes 0.01 0.05 \
      --lengths 16 128 --samples 256 --segments 2

With ``--values`` it also reads ``--segments`` segments and measures, per layer, the memory
tokens' values (median norm) at shut and at open gates, the share of writes whose key finds
nothing stored, and the write-back term (MemoryConfig.associative_write_back_weight) as training
charges it: where nothing is stored that term is 1 for any value but 0, so those writes set its
floor; the runs shrink their values at shut gates instead (BENCHMARKS.md, "What the write-back
loss learns").

    python -m benchmarks.associative_gates --weights learning/weights/detect-*.pt --values --segments 16 \
      --samples 128 --lengths 16

With ``--weights`` it traces runs that ``benchmarks.learning --save-weights`` kept (trained on a
GPU, say) instead of training here:

    python -m benchmarks.associative_gates --weights learning/weights/reasoning-*-seed104.pt \
      --segments 512 --lengths 16 256 512 --threads 2
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import statistics

import torch
import torch.nn.functional as F

from benchmarks import learning
from rmt_peft.associative import EPS, AssociativeState, _WriteHook, dpfp, force_open, write_back_error
from rmt_peft.metrics import exact_match
from rmt_peft.recurrent import RMTModel
from rmt_peft.speedups import transformer_blocks


@contextlib.contextmanager
def wrapped_write_kernels(model: RMTModel, wrap):
    """Inside: each decoder layer's associative write calls ``wrap(layer index, kernel)`` instead of
    its kernel (eager segments only: a replayed CUDA graph skips the hooks)."""
    hooks = [h for block in transformer_blocks(model.causal_lm) for h in block._forward_hooks.values()
             if isinstance(h, _WriteHook)]
    kernels = [h.kernel for h in hooks]
    for hook, kernel in zip(hooks, kernels):
        hook.kernel = wrap(hook.index, kernel)
    try:
        yield
    finally:
        for hook, kernel in zip(hooks, kernels):
            hook.kernel = kernel


@contextlib.contextmanager
def recorded_writes(model: RMTModel):
    """Inside: every write of the associative memory appends (layer, gates (batch, m), key
    features (batch, m, features)) to the yielded list."""
    records: list[tuple[int, torch.Tensor, torch.Tensor]] = []

    def recording(index, kernel):
        def write(keys, values, gates, *rest):
            records.append((index, torch.sigmoid(gates.float())[..., 0].detach(), dpfp(keys.float()).detach()))
            return kernel(keys, values, gates, *rest)
        return write

    with wrapped_write_kernels(model, recording):
        yield records


@contextlib.contextmanager
def forcing_writes(model: RMTModel, rate: float, seed: int = 0):
    """Inside: each layer's gates are forced open for a sample at a segment with probability
    ``rate``, as MemoryConfig.associative_forced_write_rate does in training, here in evaluation
    too (the hard gates otherwise as the model has them). Eager segments only."""
    draws = None

    def forcing(index, kernel):
        def write(keys, values, gates, *rest):
            nonlocal draws
            if draws is None:
                draws = torch.Generator(device=gates.device).manual_seed(seed)
            return kernel(keys, values, force_open(gates, rate, draws), *rest)
        return write

    with wrapped_write_kernels(model, forcing):
        yield


@torch.no_grad()
def forced_write_accuracy(cfg: learning.RunConfig, model: RMTModel, segments: int, samples: int, rate: float,
                          device) -> float:
    """Accuracy of ``samples`` test samples of ``segments`` segments with writes forced at ``rate``
    (``forcing_writes``): how much a write where the model chose none costs what its memory
    holds."""
    model.eval()
    data, seg = learning.Samples(cfg, "test"), cfg.segment_size
    right, batch = 0.0, min(samples, 128)
    with forcing_writes(model, rate):
        for first in range(0, samples, batch):
            indices = list(range(first, min(first + batch, samples)))
            ids, labels = data.batch(segments, indices, samples, device)
            reader = model.stream(batch_size=len(indices), cuda_graph=False)
            reader.feed(ids[:, :-seg])
            logits = model(ids[:, -seg:], memory=reader.finish().memory, return_logits=True).logits
            right += exact_match(logits.float(), labels[:, -seg:]).sum().item()
    return right / samples


@torch.no_grad()
def gate_and_key_trace(model: RMTModel, ids: torch.Tensor) -> list[dict]:
    """Per decoder layer: the mean write gate at each segment of ``ids`` (batch, segments x
    segment_size) and the mean cosine of each memory token's key features between successive
    segments."""
    model.eval()
    with recorded_writes(model) as records:
        reader = model.stream(batch_size=ids.shape[0], cuda_graph=False)  # a replayed graph would skip the hooks
        reader.feed(ids)
        reader.finish()
    layers = []
    for layer in sorted({r[0] for r in records}):
        gates = torch.stack([r[1] for r in records if r[0] == layer])  # (segments, batch, m)
        keys = F.normalize(torch.stack([r[2] for r in records if r[0] == layer]), dim=-1)
        cosine = (keys[1:] * keys[:-1]).sum(-1).mean().item() if len(keys) > 1 else None
        layers.append({"gate_by_segment": gates.mean(dim=(1, 2)).tolist(), "key_cosine": cosine})
    return layers


def starved_rows(state: AssociativeState, written: float = 1e-3, starved: float = 1e-3) -> list[dict]:
    """Per layer of ``state``: the rows of its matrix that hold a value (norm above ``written`` x the
    sample's largest row norm) while their normaliser is below ``starved``, counted per sample
    (mean over the samples), and the largest and median over written rows of norm / (z + eps):
    what a query on that feature alone would read, per unit of its feature."""
    rows = []
    for matrix, normalizer in zip(state.matrices, state.normalizers):
        norm = matrix.float().norm(dim=-1)  # (batch, features)
        holds = norm > written * norm.amax(dim=-1, keepdim=True)
        ratio = (norm / (normalizer.float() + EPS))[holds]
        rows.append({"starved": ((normalizer < starved) & holds).float().sum(dim=-1).mean().item(),
                     "max_ratio": ratio.max().item() if ratio.numel() else 0.0,
                     "median_ratio": ratio.median().item() if ratio.numel() else 0.0})
    return rows


@torch.no_grad()
def starved_trace(model: RMTModel, ids: torch.Tensor, marks: list[int]) -> list[dict]:
    """``starved_rows`` of the state after each of ``marks`` segments of ``ids`` (batch, segments x
    segment_size), read in evaluation mode: per layer, a list over the marks."""
    model.eval()
    size, state, by_mark = model.memory_config.segment_size, None, []
    for segment in range(max(marks)):
        state = model.read(ids[:, segment * size:(segment + 1) * size], memory=state)
        if segment + 1 in marks:
            by_mark.append(starved_rows(state))
    return [{key: [mark[layer][key] for mark in by_mark] for key in by_mark[0][layer]}
            for layer in range(len(by_mark[0]))]


@torch.no_grad()
def value_trace(model: RMTModel, ids: torch.Tensor) -> list[dict]:
    """Per decoder layer, over every write of ``ids`` (batch, segments x segment_size): the median
    norm of the memory tokens' values at shut and at open gates (open as the model tests them), the
    share of writes whose key finds nothing stored (|s| at most 1e-3 |v|), and the write-back term
    (MemoryConfig.associative_write_back_weight) as training charges it, before the gate noise.
    The term is a relative error: where nothing is stored it is 1 for any value but 0, so its
    floor is about the share of shut writes with nothing stored, whatever the training."""
    model.eval()
    config = model.memory_config
    records: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def measuring(index, kernel):
        def write(keys, values, gates, matrix, normalizer, empty, *rest):
            error, stored = write_back_error(keys, values, matrix, normalizer, empty)
            records.append((index, gates.float()[..., 0], values.float().norm(dim=-1), stored.norm(dim=-1), error))
            return kernel(keys, values, gates, matrix, normalizer, empty, *rest)
        return write

    with wrapped_write_kernels(model, measuring):
        reader = model.stream(batch_size=ids.shape[0], cuda_graph=False)
        reader.feed(ids)
        reader.finish()
    threshold = config.associative_gate_threshold if config.associative_hard_gates else 0.0
    layers = []
    for layer in sorted({r[0] for r in records}):
        logits, v, s, error = (torch.stack([r[i] for r in records if r[0] == layer]) for i in range(1, 5))
        opened = logits > threshold
        layers.append({"value_shut": v[~opened].median().item() if (~opened).any() else None,
                       "value_open": v[opened].median().item() if opened.any() else None,
                       "open_rate": opened.float().mean().item(),
                       "nothing_stored": (s <= 1e-3 * v).float().mean().item(),
                       "write_back_term": ((1 - torch.sigmoid(logits)) * error).mean().item()})
    return layers


@torch.no_grad()
def fact_outcomes(cfg: learning.RunConfig, model: RMTModel, segments: int, samples: int, device) -> dict:
    """Answers of ``samples`` test samples of ``segments`` segments, split by what the write gates
    did to each sample's last fact: opened at the segment where it ends or not; opened on a later
    segment that holds no fact (before the answered one) or not. A sample whose last fact lies in
    the answered segment needs no memory for it and is counted apart. Also the median logit of
    the gates open on filler. Eager segments only: a replayed CUDA graph would skip the recording."""
    if cfg.task not in ("memorize", "detect", "reasoning"):
        raise SystemExit(f"--by-fact: the {cfg.task} task has no facts to place (memorize, detect, reasoning)")
    model.eval()
    data, seg = learning.Samples(cfg, "test"), cfg.segment_size
    ids, labels = data.batch(segments, list(range(samples)), samples, device)
    with recorded_writes(model) as records:
        reader = model.stream(batch_size=samples, cuda_graph=False)
        reader.feed(ids[:, :-seg])
        state = reader.finish().memory
    right = exact_match(model(ids[:, -seg:], memory=state, return_logits=True).logits.float(), labels[:, -seg:]).cpu()
    config = model.memory_config
    threshold = config.associative_gate_threshold if config.associative_hard_gates else 0.0
    logits = torch.logit(torch.stack([r[1] for r in records]).clamp(1e-7, 1 - 1e-7).cpu())  # (segments x layers, b, m)
    logits = logits.view(segments - 1, -1, samples, logits.shape[-1]).amax(dim=(1, 3))  # (segments - 1, batch)
    dataset, groups, filler_logits = data.dataset(segments, samples), {}, []

    def count(group: str, ok: bool) -> None:
        total = groups.setdefault(group, [0, 0])
        total[0], total[1] = total[0] + int(ok), total[1] + 1

    for i in range(samples):
        spans = dataset.layout(i).fact_spans  # a fact that crosses into the next segment is written there
        facts = {t for start, end in spans for t in range(start // seg, (end - 1) // seg + 1)}
        last, ok = max((end - 1) // seg for _, end in spans), bool(right[i])
        if last == segments - 1:
            count("last fact in the answered segment", ok)
            continue
        count("last fact written" if logits[last, i] > threshold else "last fact not written", ok)
        later = [t for t in range(last + 1, segments - 1) if t not in facts and logits[t, i] > threshold]
        filler_logits += [logits[t, i].item() for t in later]
        count("filler written after it" if later else "no filler written after it", ok)
    return {"segments": segments, "samples": samples, "accuracy": right.float().mean().item(), "threshold": threshold,
            "groups": groups, "filler_open_logit_median": statistics.median(filler_logits) if filler_logits else None}


def gradient_norm(model: RMTModel, ids: torch.Tensor, labels: torch.Tensor, gate_noise: float,
                  noise_seed: int | None = None) -> tuple[float, float]:
    """(gradient norm, loss) of one training batch with ``gate_noise`` (its draw from
    ``noise_seed``); the gradients are dropped, the weights unchanged."""
    kept = model.memory_config
    model.memory_config = dataclasses.replace(kept, associative_gate_noise=gate_noise)
    try:
        if noise_seed is not None:
            torch.manual_seed(noise_seed)
        loss = model(ids, labels=labels).loss
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf")).item()
    finally:
        model.zero_grad(set_to_none=True)
        model.memory_config = kept
    return norm, loss.item()


def noise_spikes(cfg: learning.RunConfig, model: RMTModel, device, batches: int, top: int = 5,
                 redraws: int = 5) -> dict:
    """The gradient norms of ``batches`` training batches (1..max_train_segments segments, each its
    own noise draw), and for the ``top`` largest: the norm with the noise off and with
    ``redraws`` other draws."""
    model.train()
    data, rng = learning.Samples(cfg, "train"), torch.Generator().manual_seed(cfg.seed)
    pool = cfg.steps_per_stage * cfg.batch_size
    drawn = []
    for i in range(batches):
        n = int(torch.randint(1, cfg.max_train_segments + 1, (1,), generator=rng))
        start = int(torch.randint(0, pool - cfg.batch_size + 1, (1,), generator=rng))
        ids, labels = data.batch(n, list(range(start, start + cfg.batch_size)), pool, device)
        norm, loss = gradient_norm(model, ids, labels, cfg.associative_gate_noise, noise_seed=10_000 + i)
        drawn.append({"batch": i, "segments": n, "start": start, "grad_norm": norm, "loss": loss})
    norms = sorted(row["grad_norm"] for row in drawn)
    largest = sorted(drawn, key=lambda row: -row["grad_norm"])[:top]
    for row in largest:
        ids, labels = data.batch(row["segments"], list(range(row["start"], row["start"] + cfg.batch_size)), pool,
                                 device)
        row["noise_off"] = gradient_norm(model, ids, labels, 0.0)
        row["redrawn"] = [gradient_norm(model, ids, labels, cfg.associative_gate_noise, 20_000 + 100 * row["batch"] + k)
                          for k in range(redraws)]
    return {"median": norms[len(norms) // 2], "max": norms[-1], "largest": largest}


def trained_runs(args, device):
    """(config, model) of each run to trace: loaded from ``--weights``, or trained here, one per
    ``--seeds`` (the learning benchmark's associative detect run with ``--gate-noise``)."""
    overrides = learning.settings(args.set)
    for path in args.weights:
        cfg, model, _ = learning.load_saved(path, overrides, device)
        yield cfg, model
    for seed in [] if args.weights else args.seeds:
        fields = {**learning.PRESETS[args.preset], **learning.VARIANTS["associative"], "task": "detect",
                  "variant": "associative", "seed": seed, "associative_gate_noise": args.gate_noise, **overrides}
        cfg = learning.RunConfig(**fields)
        torch.manual_seed(seed)
        model = learning.build_model(cfg, device)
        learning.train(cfg, model, device)
        yield cfg, model


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--preset", default="cpu_text", choices=sorted(learning.PRESETS))
    parser.add_argument("--gate-noise", type=float, default=0.0)
    parser.add_argument("--segments", type=int, default=32)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--lengths", nargs="+", type=int, default=[4, 16, 64, 128])
    parser.add_argument("--set", default="", help="JSON of RunConfig fields, e.g. '{\"steps_per_stage\": 50}'")
    parser.add_argument("--spike-batches", type=int, default=0,
                        help="after training: the gradient norms of this many batches, the largest recomputed "
                             "with the noise off and redrawn")
    parser.add_argument("--hard-gates", action="store_true",
                        help="also test at --lengths with associative_hard_gates (the same weights)")
    parser.add_argument("--starved", action="store_true",
                        help="also count the matrix rows written while their normaliser is about zero")
    parser.add_argument("--by-fact", type=int, default=0, metavar="N",
                        help="also answer --samples samples of N segments and split the answers by whether "
                             "the last fact was written and whether filler was written after it")
    parser.add_argument("--forced-writes", type=float, nargs="+", default=[], metavar="RATE",
                        help="also answer --samples samples at each of --lengths with each layer's gates forced "
                             "open per sample and segment at each RATE: what a write the model did not choose "
                             "costs it")
    parser.add_argument("--values", action="store_true",
                        help="also measure, per layer over --segments segments, the values written at shut and "
                             "open gates, the writes whose key finds nothing stored, and the write-back term")
    parser.add_argument("--weights", nargs="+", default=[], metavar="FILE",
                        help="trace runs saved by benchmarks.learning --save-weights (e.g. trained on a GPU) "
                             "instead of training --seeds; --set changes their configs")
    parser.add_argument("--threads", type=int, help="torch CPU threads (the numerics, and so a seed's outcome, "
                                                    "depend on it)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    for path in args.weights:
        learning.check_weights_file(path)
    for cfg, model in trained_runs(args, device):
        seed = cfg.seed
        ids, _ = learning.Samples(cfg, "test").batch(args.segments, list(range(args.samples)), args.samples, device)
        layers = gate_and_key_trace(model, ids)
        accuracy = {n: learning.accuracy(cfg, model, n, device) for n in args.lengths}
        row = {"seed": seed, "gate_noise": cfg.associative_gate_noise, "accuracy": accuracy, "layers": layers,
               "config": dataclasses.asdict(cfg)}
        rows.append(row)
        marks = [k for k in (1, 2, 4, 8, 16, 32, 64, 128) if k <= args.segments]
        gates = " | ".join(f"layer {i}: " + " ".join(f"{layer['gate_by_segment'][k - 1]:.2f}" for k in marks)
                           + f", keys {layer['key_cosine']:.2f}" for i, layer in enumerate(layers))
        print(f"seed {seed}: accuracy {accuracy}; mean gate at segments {marks}: {gates}", flush=True)
        if args.starved:
            row["starved"] = trace = starved_trace(model, ids, marks)
            for i, layer in enumerate(trace):
                print(f"seed {seed} layer {i}: rows written with a normaliser ~0, per sample, at segments {marks}: "
                      + " ".join(f"{n:.1f}" for n in layer["starved"]) + "; largest read per unit of feature "
                      + " ".join(f"{r:.3g}" for r in layer["max_ratio"]) + " (median "
                      + " ".join(f"{r:.3g}" for r in layer["median_ratio"]) + ")", flush=True)
        if args.values:
            row["values"] = trace = value_trace(model, ids)
            for i, layer in enumerate(trace):
                print(f"seed {seed} layer {i}: " + ", ".join(
                    f"{key} {value:.3g}" if value is not None else f"{key} -" for key, value in layer.items()),
                    flush=True)
        if args.by_fact:
            row["by_fact"] = split = fact_outcomes(cfg, model, args.by_fact, args.samples, device)
            print(f"seed {seed}: {args.by_fact} segments, accuracy {split['accuracy']:.2f}; "
                  + "; ".join(f"{group} {right}/{total} = {right / total:.2f}" for group, (right, total)
                              in sorted(split["groups"].items()))
                  + f"; median logit of the gates open on filler {split['filler_open_logit_median']}", flush=True)
        if args.forced_writes:
            row["forced_write_accuracy"] = forced = {
                rate: {n: forced_write_accuracy(cfg, model, n, args.samples, rate, device) for n in args.lengths}
                for rate in args.forced_writes}
            print(f"seed {seed}: accuracy with forced writes (rate: by length) {forced}", flush=True)
        if args.hard_gates:
            soft = model.memory_config
            model.memory_config = dataclasses.replace(soft, associative_hard_gates=True)
            row["hard_gate_accuracy"] = {n: learning.accuracy(cfg, model, n, device) for n in args.lengths}
            model.memory_config = soft
            print(f"seed {seed}: accuracy with hard gates {row['hard_gate_accuracy']}", flush=True)
        if args.spike_batches:
            row["spikes"] = spikes = noise_spikes(cfg, model, device, args.spike_batches)
            print(f"seed {seed}: gradient norm of {args.spike_batches} batches: median {spikes['median']:.3g}, "
                  f"max {spikes['max']:.3g}", flush=True)
            for big in spikes["largest"]:
                print(f"  batch {big['batch']} ({big['segments']} segments): {big['grad_norm']:.3g} (loss "
                      f"{big['loss']:.3g}); noise off {big['noise_off'][0]:.3g}; other draws "
                      + " ".join(f"{norm:.3g}" for norm, _ in big["redrawn"]), flush=True)
    return rows


if __name__ == "__main__":
    main()
