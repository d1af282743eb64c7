"""The bad-input corpus (issue 27): a table of mistakes a user can make in recipes, data files,
`train`, `validate`, `eval`, `export`, `ask` and the Python API. On the command line each ends in
exactly one line on stderr that names the bad key, flag or file, with exit code 2 (no traceback,
no silent default, nothing written); in the API each is a ValueError (UserError is one) naming
the argument. Commands run in-process through the CLI's `main`, against files made once per
session and one shared tiny trained run (conftest.trained_run), so the corpus takes seconds."""
import json
import os
import re
import shutil

import pytest
import torch
import yaml

from rmt_peft import MemoryConfig, RMTModel, saving
from rmt_peft.adapters import attach_lora, lora_config
from rmt_peft.backbones import check_position_limit, resolve_dtype
from rmt_peft.cli import main
from rmt_peft.data.registry import build_dataset, validate_options
from rmt_peft.eval.runner import EvalSettings
from rmt_peft.memory_state import MemoryState
from rmt_peft.runs import check_output
from rmt_peft.tiny_models import save_tiny_model, tiny_config, tiny_model

VOCAB = 64  # the corpus recipe's model; the shared trained run has 640 (the offline tokenizer fits)


@pytest.fixture(scope="session")
def bad(tmp_path_factory, trained_run, tiny_recipe):
    """Every file a case names, made once: recipes, data files, documents, damaged adapters."""
    t = tmp_path_factory.mktemp("corpus")
    raw = json.loads(json.dumps(tiny_recipe))
    raw["training"]["output_dir"] = str(t / "out")
    (t / "recipe.yaml").write_text(yaml.safe_dump(raw))
    (t / "dup.yaml").write_text(yaml.safe_dump(raw) + "model: {name_or_path: 'tiny:gpt2'}\n")
    (t / "list.yaml").write_text("- 1\n- 2\n")
    (t / "broken.yaml").write_text("model: {name_or_path: [\n")
    (t / "binary.yaml").write_bytes(bytes(range(256)))
    (t / "empty.yaml").write_text("")
    for section in ("model", "data", "training"):
        (t / f"no_{section}.yaml").write_text(yaml.safe_dump({k: v for k, v in raw.items() if k != section}))
    (t / "folder.yaml").mkdir()
    (t / "a_file").write_text("x")
    (t / "empty.txt").write_text("")
    (t / "blank.txt").write_text("  \n\t\n")
    (t / "binary.bin").write_bytes(bytes(range(256)) * 8)
    (t / "latin1.txt").write_bytes("Marie est allée à la cuisine . où est Marie ?\n".encode("latin-1"))
    (t / "doc.txt").write_text("Mary went to the kitchen . John picked up the football .\n")
    (t / "qa_empty.jsonl").write_text("")
    (t / "qa_broken.jsonl").write_text('{"prompt": "where is mary", \n')
    (t / "qa_notext.jsonl").write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    (t / "qa_list.json").write_text(json.dumps([1, 2]))
    (t / "qa_latin1.jsonl").write_bytes(b'{"text": "caf\xe9 ' + b"x" * 100 + b'"}\n')
    (t / "qa.csv").write_text("question,answer\nq,a\n")
    (t / "qa_good.jsonl").write_text(json.dumps({"prompt": "where is mary ? ", "completion": "kitchen"}) + "\n")
    (t / "lemmas.jsonl").write_text(json.dumps({"name": "l", "statement": "theorem l"}) + "\n")
    # a checkpoint folder (a "real" model path, where quantization applies)
    save_tiny_model(str(t / "neo"), "gpt_neo", vocab_size=VOCAB, max_positions=64)
    # adapters: damaged copies of the shared run's final weights
    for name in ("truncated", "bad_config", "unknown_field", "lone/adapter"):  # lone: no recipe.yaml beside it
        shutil.copytree(trained_run / "final", t / name)
    with open(t / "truncated" / "memory.safetensors", "r+b") as f:
        f.truncate(40)
    (t / "bad_config" / "memory_config.json").write_text('{"num_memory_tokens": 4,')
    config = json.loads((t / "unknown_field" / "memory_config.json").read_text())
    (t / "unknown_field" / "memory_config.json").write_text(json.dumps({**config, "colour": "red"}))
    (t / "full").mkdir()
    (t / "full" / "x.txt").write_text("user file")
    state = MemoryState(torch.zeros(1, 2, 8), torch.zeros(1, 0, dtype=torch.long), MemoryConfig(2, 8), 0)
    state.save(str(t / "other.mem.safetensors"))  # read by another memory config
    (t / "not_a_state.safetensors").write_text("not safetensors")
    return t


# -- the command line -----------------------------------------------------------------------
# name: (argv, with {r} the corpus recipe, {t} the files folder, {run} the shared trained run;
#        the text the error line must contain: it names the key, flag or file)
def validate(*overrides, recipe="{r}"):
    return ["validate", recipe, *overrides]


RECIPES = {
    # model
    "model.name_or_path empty": (validate("model.name_or_path=''"), "model.name_or_path is required"),
    "model.name_or_path tiny unknown": (validate("model.name_or_path=tiny:bogus"), "unknown tiny architecture"),
    "model.name_or_path local missing": (validate("model.name_or_path=./no/such/model", "model.config={}"),
                                         "model.name_or_path='./no/such/model' does not exist"),
    "model.name_or_path a list": (validate("model.name_or_path=[a]"), "model.name_or_path"),
    "model.quantization 3bit": (validate("model.quantization=3bit"), "model.quantization='3bit'"),
    "model.quantization on a tiny model": (validate("model.quantization=4bit", "lora=attention"),
                                           "model.quantization='4bit' is not applied"),
    "model.quantization 8bit on a tiny model": (validate("model.quantization=8bit", "lora=attention"),
                                                "model.quantization='8bit' is not applied"),
    "model.dtype float7": (validate("model.dtype=float7"), "model.dtype='float7'"),
    "model.dtype int8": (validate("model.dtype=int8"), "model.dtype='int8'"),
    "model.attention fast": (validate("model.attention=fast"), "model.attention='fast'"),
    "model.compile_mode fastest": (validate("model.compile_mode=fastest"), "model.compile_mode='fastest'"),
    "model.compile_mode without blocks": (validate("model.compile_blocks=false", "model.compile_mode=default"),
                                          "model.compile_mode='default'"),
    "model.config.vocab_size -5": (validate("model.config.vocab_size=-5"), "model.config.vocab_size=-5"),
    "model.config.vocab_size 0": (validate("model.config.vocab_size=0"), "model.config.vocab_size=0"),
    "model.config.vocab_size text": (validate("model.config.vocab_size=many"), "model.config"),
    "model.config.hidden_size 0": (validate("model.config.hidden_size=0"), "model.config.hidden_size=0"),
    "model.config.num_layers 0": (validate("model.config.num_layers=0"), "model.config.num_layers=0"),
    "model.config.num_heads -1": (validate("model.config.num_heads=-1"), "model.config.num_heads=-1"),
    "model.config.max_positions 0": (validate("model.config.max_positions=0"), "model.config.max_positions=0"),
    "model.config unknown key": (validate("model.config.colour=1"), "model.config"),
    "model.config on a checkpoint": (validate("model.name_or_path={t}/neo", "model.config.vocab_size=64"),
                                     "model.config is only for tiny"),
    "model.speedups maybe": (validate("model.speedups=maybe"), "model.speedups='maybe'"),
    "model.compile_blocks 3": (validate("model.compile_blocks=3"), "model.compile_blocks=3"),
    "model.cache_dequantized_weights without 4bit": (validate("model.cache_dequantized_weights=true"),
                                                     "model.cache_dequantized_weights=true"),
    "model.tokenizer a number": (validate("model.tokenizer=5"), "model.tokenizer=5"),
    "model unknown key": (validate("model.colour=red"), "model.colour"),
    "model a list": (validate("model=[1]"), "model must be a mapping"),
    # memory
    "memory.num_memory_tokens -1": (validate("memory.num_memory_tokens=-1"), "num_memory_tokens=-1"),
    "memory.num_memory_tokens text": (validate("memory.num_memory_tokens=four"), "memory.num_memory_tokens='four'"),
    "memory.segment_size 0": (validate("memory.segment_size=0"), "segment_size=0"),
    "memory.segment_size text": (validate("memory.segment_size=eight"), "memory.segment_size='eight'"),
    "memory.segment_size over the positions": (validate("memory.segment_size=60"), "memory.segment_size=60"),
    "memory.num_memory_tokens over the positions": (validate("memory.num_memory_tokens=30"),
                                                    "memory.num_memory_tokens=30"),
    "memory.segment_alignment middle": (validate("memory.segment_alignment=middle"), "segment_alignment='middle'"),
    "memory.bptt_depth -1": (validate("memory.bptt_depth=-1"), "bptt_depth=-1"),
    "memory.loss_segments 0": (validate("memory.loss_segments=0"), "loss_segments=0"),
    "memory.memory_init_std 0": (validate("memory.memory_init_std=0"), "memory_init_std=0"),
    "memory.loss_chunk_size 0": (validate("memory.loss_chunk_size=0"), "loss_chunk_size=0"),
    "memory.memory_update sum": (validate("memory.memory_update=sum"), "memory_update='sum'"),
    "memory.memory_gate_bias inf": (validate("memory.memory_gate_bias=.inf"), "memory_gate_bias=inf"),
    "memory.memory_noise_std -1": (validate("memory.memory_noise_std=-1"), "memory_noise_std=-1"),
    "memory.memory_stability_weight -1": (validate("memory.memory_stability_weight=-1"), "memory_stability_weight=-1"),
    "memory.memory_stability_tolerance -1": (validate("memory.memory_stability_tolerance=-1"),
                                             "memory_stability_tolerance=-1"),
    "memory.memory_stability_power 2": (validate("memory.memory_stability_power=2"), "memory_stability_power=2"),
    "memory.uncheckpointed_segments -1": (validate("memory.uncheckpointed_segments=-1"), "uncheckpointed_segments=-1"),
    "memory.checkpoint_policy bogus": (validate("memory.checkpoint_policy=bogus"), "checkpoint_policy='bogus'"),
    "memory.checkpoint_segments maybe": (validate("memory.checkpoint_segments=maybe"), "memory.checkpoint_segments"),
    "memory unknown key": (validate("memory.num_memory_token=3"), "memory.num_memory_token"),
    "memory.memory_kind bogus": (validate("memory.memory_kind=bogus"), "memory_kind='bogus'"),
    # lora
    "lora preset bogus": (validate("lora=bogus_preset"), "lora='bogus_preset' is not a preset"),
    "lora r 0": (validate("lora={r: 0}"), "lora.r=0"),
    "lora r -1": (validate("lora={r: -1}"), "lora.r=-1"),
    "lora r 1.5": (validate("lora={r: 1.5}"), "lora.r=1.5"),
    "lora r text": (validate("lora={r: big}"), "lora.r='big'"),
    "lora dropout 2": (validate("lora={lora_dropout: 2.0}"), "lora.lora_dropout=2.0"),
    "lora dropout -0.1": (validate("lora={lora_dropout: -0.1}"), "lora.lora_dropout=-0.1"),
    "lora dropout 1": (validate("lora={lora_dropout: 1}"), "lora.lora_dropout=1"),
    "lora alpha 0": (validate("lora={lora_alpha: 0}"), "lora.lora_alpha=0"),
    "lora alpha inf": (validate("lora={lora_alpha: .inf}"), "lora.lora_alpha=inf"),
    "lora bias maybe": (validate("lora={bias: maybe}"), "lora.bias='maybe'"),
    "lora unknown field": (validate("lora={bogus_field: 1}"), "lora.bogus_field"),
    "lora target_modules empty": (validate("lora={target_modules: []}"), "lora.target_modules=[]"),
    "lora target_modules a number": (validate("lora={target_modules: 5}"), "lora.target_modules=5"),
    "lora target_modules with a number": (validate("lora={target_modules: [q_proj, 5]}"), "lora.target_modules="),
    "lora a number": (validate("lora=5"), "lora=5"),
    "lora a list": (validate("lora=[attention]"), "lora=['attention']"),
    "lora null on a quantized backbone": (validate("model.name_or_path={t}/neo", "model.config={}",
                                                   "model.quantization=4bit"), "lora=null fine-tunes"),
    # data
    "data.task poetry": (validate("data.task=poetry"), "data.task='poetry'"),
    "data.task empty": (validate("data.task=''"), "data.task=''"),
    "data.options unknown": (validate("data.options.colour=red"), "colour"),
    "data.options.num_values 0": (validate("data.options.num_values=0"), "num_values=0"),
    "data.options.vocab_size 0": (validate("data.options.vocab_size=0"), "vocab_size=0"),
    "data.options.vocab_size text": (validate("data.options.vocab_size=lots"), "vocab_size='lots'"),
    "data.options.vocab_size over the model": (validate("data.options.vocab_size=100000"),
                                               "data.options.vocab_size=100000 is larger"),
    "data.options a list": (validate("data.options=[1]"), "data.options"),
    "data.num_train_samples 0": (validate("data.num_train_samples=0"), "data.num_train_samples=0"),
    "data.num_eval_samples -1": (validate("data.num_eval_samples=-1"), "data.num_eval_samples=-1"),
    "data.padding_side middle": (validate("data.padding_side=middle"), "data.padding_side='middle'"),
    "data.seed text": (validate("data.seed=abc"), "data.seed='abc'"),
    "data unknown key": (validate("data.colour=red"), "data.colour"),
    "lean theorems missing": (validate("data.task=lean", "model.config.vocab_size=640",
                                       "data.options={theorems: /no/such.jsonl, lemmas: {t}/lemmas.jsonl}"),
                              "theorems='/no/such.jsonl' is not a file"),
    "lean lemmas missing": (validate("data.task=lean", "model.config.vocab_size=640",
                                     "data.options={theorems: {t}/lemmas.jsonl, lemmas: /no/lemmas.jsonl}"),
                            "lemmas='/no/lemmas.jsonl' is not a file"),
    "lean generated and a file": (validate("data.task=lean", "model.config.vocab_size=640",
                                           "data.options={theorems: generated, lemmas: {t}/lemmas.jsonl}"),
                                  "use 'generated' for both"),
    "lean missing_lemmas maybe": (validate("data.task=lean", "model.config.vocab_size=640",
                                           "data.options={missing_lemmas: maybe}"), "missing_lemmas='maybe'"),
    "lean loss_on some": (validate("data.task=lean", "model.config.vocab_size=640", "data.options={loss_on: some}"),
                          "loss_on='some'"),
    "lean generated_lemmas 0": (validate("data.task=lean", "model.config.vocab_size=640",
                                         "data.options={theorems: generated, lemmas: generated, generated_lemmas: 0}"),
                                "generated_lemmas=0"),
    "lean vocabulary smaller than the tokenizer": (validate("data.task=lean", "data.options={}"),
                                                   "model.config.vocab_size=64 is smaller"),
    "babilong noise matches nothing": (validate("data.task=babilong_memorize", "model.config.vocab_size=594",
                                                "data.options={noise: {source: files, files: '{t}/none/*.txt'}}"),
                                       "no file matches"),
    "babilong noise empty": (validate("data.task=babilong_memorize", "model.config.vocab_size=594",
                                      "data.options={noise: {source: files, files: '{t}/empty.txt'}}"),
                             "empty.txt: empty"),
    "babilong noise binary": (validate("data.task=babilong_memorize", "model.config.vocab_size=594",
                                       "data.options={noise: {source: files, files: '{t}/binary.bin'}}"),
                              "binary.bin: binary"),
    "babilong unknown option": (validate("data.task=babilong_memorize", "model.config.vocab_size=594",
                                         "data.options={colour: red}"), "colour"),
    "babilong noise source bogus": (validate("data.task=babilong_memorize", "model.config.vocab_size=594",
                                             "data.options={noise: {source: bogus}}"), "bogus"),
    "arxiv_lm unknown option": (validate("data.task=arxiv_lm", "model.config.vocab_size=640",
                                         "data.options={colour: red}"), "colour"),
    # curriculum
    "curriculum.segments []": (validate("curriculum.segments=[]"), "curriculum.segments=[] has no stage"),
    "curriculum.stages []": (validate("curriculum={stages: []}"),
                             "curriculum.stages=[] has no stage"),
    "curriculum.segments [0]": (validate("curriculum.segments=[0]"), "num_segments=0"),
    "curriculum.segments [-1]": (validate("curriculum.segments=[-1]"), "num_segments=-1"),
    "curriculum.segments text": (validate("curriculum.segments=[a]"), "curriculum.segments[0]='a'"),
    "curriculum.segments a number": (validate("curriculum.segments=3"), "curriculum.segments=3"),
    "curriculum.segments too long": (validate("curriculum.segments=[1000000000000]"),
                                     "curriculum.stages[0].num_segments: 1000000000000 segments"),
    "curriculum.steps_per_stage 0": (validate("curriculum.steps_per_stage=0"), "max_steps=0"),
    "curriculum stage without steps": (validate("curriculum.steps_per_stage=null"), "max_steps is not set"),
    "curriculum stage max_steps 0": (validate("curriculum={stages: [{num_segments: 2, max_steps: 0}]}"),
                                     "curriculum.stages[0].max_steps=0"),
    "curriculum stage mixed with 0": (validate("curriculum={stages: [{num_segments: [1, 0], max_steps: 1}]}"),
                                      "curriculum.stages[0].num_segments"),
    "curriculum stage unknown key": (validate("curriculum={stages: [{num_segments: 1, steps: 1}]}"), "steps"),
    "curriculum stage num_segments text": (validate("curriculum={stages: [{num_segments: two, max_steps: 1}]}"),
                                           "num_segments='two'"),
    "curriculum segments and stages": (validate("curriculum.stages=[{num_segments: 2, max_steps: 1}]"), "not both"),
    "curriculum.levers_from_stage 5": (validate("curriculum.levers_from_stage=5"), "curriculum.levers_from_stage=5"),
    "curriculum.levers_from_stage without levers": (validate("curriculum.levers_from_stage=1"),
                                                    "curriculum.levers_from_stage=1 has no effect"),
    "curriculum.keep_best_segments 0": (validate("curriculum.keep_best_segments=0"),
                                        "curriculum.keep_best_segments=0"),
    "curriculum.keep_best_samples 0": (validate("curriculum.keep_best_samples=0"), "curriculum.keep_best_samples=0"),
    "curriculum.keep_best_from_stage alone": (validate("curriculum.keep_best_from_stage=1"),
                                              "curriculum.keep_best_from_stage=1"),
    "curriculum.keep_best_segments without evaluations": (validate("curriculum.keep_best_segments=4"),
                                                          "curriculum.keep_best_segments=4"),
    "curriculum.keep_best_segments too long": (validate("curriculum.keep_best_segments=1000000000000",
                                                        "training.eval_strategy=steps", "training.eval_steps=2"),
                                               "curriculum.keep_best_segments: 1000000000000 segments"),
    "curriculum.metric without a threshold": (validate("curriculum.metric=eval_accuracy"),
                                              "metric='eval_accuracy' needs threshold or patience"),
    "curriculum.metric not reported": (validate("curriculum.metric=bleu", "curriculum.threshold=1"),
                                       "metric='bleu' is not reported"),
    "curriculum.metric without evaluations": (validate("curriculum.metric=eval_loss", "curriculum.threshold=1"),
                                              "set training.eval_strategy=steps"),
    "curriculum.threshold without a metric": (validate("curriculum.threshold=0.5"), "threshold/patience need a metric"),
    "curriculum.patience 0": (validate("curriculum.metric=eval_loss", "curriculum.patience=0",
                                       "training.eval_strategy=steps", "training.eval_steps=1"), "patience=0"),
    "curriculum unknown key": (validate("curriculum.colour=1"), "curriculum.colour"),
    # training
    "training.learning_rate -1": (validate("training.learning_rate=-1"), "training.learning_rate=-1.0"),
    "training.learning_rate 0": (validate("training.learning_rate=0"), "training.learning_rate=0"),
    "training.learning_rate inf": (validate("training.learning_rate=.inf"), "training.learning_rate=inf"),
    "training.learning_rate text": (validate("training.learning_rate=fast"), "training.learning_rate='fast'"),
    "training.per_device_train_batch_size 0": (validate("training.per_device_train_batch_size=0"),
                                               "training.per_device_train_batch_size=0"),
    "training.per_device_eval_batch_size -1": (validate("training.per_device_eval_batch_size=-1"),
                                               "training.per_device_eval_batch_size=-1"),
    "training.gradient_accumulation_steps 0": (validate("training.gradient_accumulation_steps=0"),
                                               "training.gradient_accumulation_steps=0"),
    "training.logging_steps 0": (validate("training.logging_steps=0"), "training.logging_steps=0"),
    "training.save_steps -5": (validate("training.save_steps=-5"), "training.save_steps=-5"),
    "training.eval_steps 0": (validate("training.eval_steps=0"), "training.eval_steps=0"),
    "training.weight_decay -1": (validate("training.weight_decay=-1"), "training.weight_decay=-1"),
    "training.max_grad_norm -1": (validate("training.max_grad_norm=-1"), "training.max_grad_norm=-1"),
    "training.warmup_steps -1": (validate("training.warmup_steps=-1"), "training.warmup_steps=-1"),
    "training.optim bogus": (validate("training.optim=bogus"), "training.optim='bogus'"),
    "training.save_total_limit -1": (validate("training.save_total_limit=-1"), "training.save_total_limit=-1"),
    "training.dataloader_num_workers -1": (validate("training.dataloader_num_workers=-1"),
                                           "training.dataloader_num_workers=-1"),
    "training.max_steps 0": (validate("training.max_steps=0"), "training.max_steps=0"),
    "training.max_steps -5": (validate("training.max_steps=-5"), "training.max_steps=-5"),
    "training.max_steps -1": (validate("training.max_steps=-1"), "training.max_steps=-1"),
    "training.max_steps text": (validate("training.max_steps=many"), "training.max_steps='many'"),
    "training.output_dir /proc": (validate("training.output_dir=/proc/foo"), "training.output_dir='/proc/foo'"),
    "training.output_dir empty": (validate("training.output_dir=''"), "training.output_dir is required"),
    "training.output_dir a file": (validate("training.output_dir={t}/a_file"), "is a file"),
    "training.output_dir under a file": (validate("training.output_dir={t}/a_file/run"), "is a file"),
    "training.output_dir the current folder": (validate("training.output_dir=."), "is the current folder"),
    "training.output_dir a folder holding this one": (validate("training.output_dir=.."), "is the current folder"),
    "training.output_dir inside a run": (validate("training.output_dir={run}/more"), "inside the training run"),
    "training.output_dir a run's stage": (validate("training.output_dir={run}/stage-0"), "inside the training run"),
    "training.output_dir a run's final": (validate("training.output_dir={run}/final"), "inside the training run"),
    "training.output_dir a number": (validate("training.output_dir=5"), "training.output_dir=5"),
    "training unknown key": (validate("training.learning_rat=0.1"), "training.learning_rat"),
    "training.eval_strategy sometimes": (validate("training.eval_strategy=sometimes"),
                                         "training.eval_strategy='sometimes'"),
    "training.lr_scheduler_type bogus": (validate("training.lr_scheduler_type=bogus"),
                                         "training.lr_scheduler_type='bogus'"),
    "training.num_train_epochs": (validate("training.num_train_epochs=3"), "training.num_train_epochs=3"),
    "training.push_to_hub": (validate("training.push_to_hub=true"), "training.push_to_hub=True"),
    "training.fsdp": (validate("training.fsdp=full_shard"), "training.fsdp='full_shard'"),
    "training.remove_unused_columns": (validate("training.remove_unused_columns=true"),
                                       "training.remove_unused_columns cannot be set"),
    "training.label_names": (validate("training.label_names=[x]"), "training.label_names cannot be set"),
    "training.report_to unknown": (validate("training.report_to=bogus"), "training.report_to: 'bogus'"),
    "training.report_to not installed": (validate("training.report_to=wandb"), "training.report_to: 'wandb'"),
    "training.bf16 and fp16": (validate("training.bf16=true", "training.fp16=true"), "training.bf16 and training.fp16"),
    "training.bf16 text": (validate("training.bf16=yes please"), "training.bf16='yes please'"),
    "training reentrant checkpointing": (validate("training.gradient_checkpointing_kwargs={use_reentrant: true}"),
                                         "use_reentrant=true"),
    "training.deepspeed missing": (validate("training.deepspeed=no_such_config"), "training.deepspeed='no_such_config'"),
    "training.deepspeed not JSON": (validate("training.deepspeed={t}/a_file"), "is not valid JSON"),
    "training.deepspeed zero3 with 8bit": (validate("model.name_or_path={t}/neo", "model.config={}", "lora=attention",
                                                    "model.quantization=8bit", "training.deepspeed=zero3"),
                                           "model.quantization='8bit' with ZeRO-3"),
    "training.deepspeed zero3 with 4bit fp32": (validate("model.name_or_path={t}/neo", "model.config={}",
                                                         "lora=attention", "model.quantization=4bit",
                                                         "training.deepspeed=zero3"), "needs model.dtype=bfloat16"),
    "training.deepspeed zero3 with compiled blocks": (validate("model.compile_blocks=true", "training.deepspeed=zero3"),
                                                      "with ZeRO-3"),
    "training.deepspeed zero3 with checkpointed segments": (validate("memory.checkpoint_segments=true",
                                                                     "training.deepspeed=zero3"),
                                                            "memory.checkpoint_segments=true with ZeRO-3"),
    "training.resume_from_checkpoint a number": (validate("training.resume_from_checkpoint=5"),
                                                 "training.resume_from_checkpoint"),
    "training a list": (validate("training=[1]"), "training must be a mapping"),
    "training.seed text": (validate("training.seed=abc"), "training.seed='abc'"),
    # guard
    "guard.on_divergence maybe": (validate("guard.on_divergence=maybe"), "guard.on_divergence='maybe'"),
    "guard.rollback_lr_factor 2": (validate("guard.rollback_lr_factor=2"), "guard.rollback_lr_factor=2.0"),
    "guard.rollback_lr_factor 0": (validate("guard.rollback_lr_factor=0"), "guard.rollback_lr_factor=0"),
    "guard.spike_factor 0.5": (validate("guard.spike_factor=0.5"), "guard.spike_factor=0.5"),
    "guard.spike_steps 0": (validate("guard.spike_steps=0"), "guard.spike_steps=0"),
    "guard.max_rollbacks -1": (validate("guard.max_rollbacks=-1"), "guard.max_rollbacks=-1"),
    "guard unknown key": (validate("guard.patience=3"), "guard.patience"),
    "guard rollback with deepspeed": (validate("guard.on_divergence=rollback", "training.deepspeed=zero2"),
                                      "guard.on_divergence='rollback' is not supported with training.deepspeed"),
    # eval section
    "eval.num_segments [0]": (validate("eval.num_segments=[0]"), "eval.num_segments contains 0"),
    "eval.num_segments too long": (validate("eval.num_segments=[1, 1000000000]"),
                                   "eval.num_segments: 1000000000 segments"),
    "eval.num_segments text": (validate("eval.num_segments=[a]"), "eval.num_segments[0]='a'"),
    "eval.num_samples 0": (validate("eval.num_samples=0"), "eval.num_samples=0"),
    "eval.batch_size -1": (validate("eval.batch_size=-1"), "eval.batch_size=-1"),
    "eval.baseline maybe": (validate("eval.baseline=maybe"), "eval.baseline='maybe'"),
    "eval unknown key": (validate("eval.colour=1"), "eval.colour"),
    # the whole recipe, overrides, files
    "trainer ppo": (validate("trainer=ppo"), "trainer='ppo'"),
    "unknown section": (validate("optimizer.lr=1"), "unknown section 'optimizer'"),
    "override without =": (validate("training.learning_rate"), "override 'training.learning_rate'"),
    "override not YAML": (validate("training.learning_rate=[1"), "override training.learning_rate"),
    "override below a value": (validate("model.name_or_path.x=1"), "model.name_or_path"),
    "recipe missing": (validate(recipe="{t}/no_such.yaml"), "no_such.yaml"),
    "recipe a folder": (validate(recipe="{t}/folder.yaml"), "is a folder"),
    "recipe not YAML": (validate(recipe="{t}/broken.yaml"), "broken.yaml' is not valid YAML"),
    "recipe binary": (validate(recipe="{t}/binary.yaml"), "binary.yaml' is not valid YAML"),
    "recipe a list": (validate(recipe="{t}/list.yaml"), "list.yaml' must hold a mapping"),
    "recipe empty": (validate(recipe="{t}/empty.yaml"), "empty.yaml' must hold a mapping"),
    "recipe duplicate key": (validate(recipe="{t}/dup.yaml"), "key 'model' is given twice"),
    "recipe without model": (validate(recipe="{t}/no_model.yaml"), "section 'model' is required"),
    "recipe without data": (validate(recipe="{t}/no_data.yaml"), "section 'data' is required"),
    "recipe without training": (validate(recipe="{t}/no_training.yaml"), "section 'training' is required"),
    "override duplicate key": (validate("data.options={vocab_size: 8, vocab_size: 9}"), "'vocab_size' is given twice"),
}


def sft(*extra, files="{t}/qa_good.jsonl"):
    return validate("trainer=sft", "model.config.vocab_size=640", "memory.segment_size=16",
                    f"data={{task: instruction, options: {{path: json, data_files: '{files}'}}}}", *extra)


SFT = {
    "sft with a task": (validate("trainer=sft"), "data.task='token_memory'"),
    "sft without path": (validate("trainer=sft", "data={task: instruction}"), "needs path"),
    "sft data file missing": (sft(files="{t}/no_such.jsonl"), "no_such.jsonl is not a file"),
    "sft data file empty": (sft(files="{t}/qa_empty.jsonl"), "qa_empty.jsonl: empty"),
    "sft data file malformed": (sft(files="{t}/qa_broken.jsonl"), "qa_broken.jsonl: line 1 is not JSON"),
    "sft data file binary": (sft(files="{t}/binary.bin"), "binary.bin: binary"),
    "sft data file not UTF-8": (sft(files="{t}/qa_latin1.jsonl"), "qa_latin1.jsonl: not UTF-8"),
    "sft data file without text": (sft(files="{t}/qa_notext.jsonl"), "qa_notext.jsonl: the first record has fields"),
    "sft data file of numbers": (sft(files="{t}/qa_list.json"), "qa_list.json: the first record is int"),
    "sft data files match nothing": (sft(files="{t}/none/*.jsonl"), "no file matches"),
    "sft data file a folder": (sft(files="{t}/full"), "full is not a file"),
    "sft csv without columns": (validate("trainer=sft", "model.config.vocab_size=640",
                                         "data={task: instruction, options: {path: csv, data_files: '{t}/qa.csv'}}"),
                                "qa.csv: its header"),
    "sft training.max_length": (sft("training.max_length=100"), "training.max_length cannot be set"),
    "sft training.packing": (sft("training.packing=true"), "training.packing cannot be set"),
    "sft training.padding_free": (sft("training.padding_free=true"), "training.padding_free cannot be set"),
}


def train(*overrides):
    return ["train", "{r}", *overrides]


TRAIN = {  # train runs the same checks as validate, then what only loading shows; no run folder is left
    "train: negative batch size": (train("training.per_device_train_batch_size=-4"),
                                   "training.per_device_train_batch_size=-4"),
    "train: lora preset bogus": (train("lora=bogus_preset"), "lora='bogus_preset'"),
    "train: lora r 0": (train("lora={r: 0}"), "lora.r=0"),
    "train: lora unknown field": (train("lora={bogus_field: 1}"), "lora.bogus_field"),
    "train: lora target_modules match nothing": (train("lora={target_modules: [nonexistent]}"),
                                                 "lora.target_modules=['nonexistent'] matches no module"),
    "train: lora target_modules regex matches nothing": (train("lora={target_modules: '.*nothing'}"),
                                                         "lora.target_modules='.*nothing' matches no module"),
    "train: vocab_size -5": (train("model.config.vocab_size=-5"), "model.config.vocab_size=-5"),
    "train: data vocab over the model": (train("data.options.vocab_size=100000"), "data.options.vocab_size=100000"),
    "train: eval.num_segments too long": (train("eval.num_segments=[1, 1000000000]"), "eval.num_segments"),
    "train: output_dir /proc": (train("training.output_dir=/proc/foo"), "training.output_dir='/proc/foo'"),
    "train: output_dir the current folder": (train("training.output_dir=."), "is the current folder"),
    "train: output_dir inside a run": (train("training.output_dir={run}/new"), "inside the training run"),
    "train: output_dir holds files": (train("training.output_dir={t}/full"), "already holds files"),
    "train: resume of nothing": (train("training.output_dir={t}/full", "training.resume_from_checkpoint=true"),
                                 "holds no run to resume"),
    "train: resume of a missing checkpoint": (train("training.resume_from_checkpoint={t}/no_such"),
                                              "training.resume_from_checkpoint="),
    "train: max_steps 0": (train("training.max_steps=0"), "training.max_steps=0"),
    "train: curriculum []": (train("curriculum.segments=[]"), "curriculum.segments=[]"),
    "train: duplicate key": (["train", "{t}/dup.yaml"], "key 'model' is given twice"),
    "train: sft data without text": (["train", *sft(files="{t}/qa_notext.jsonl")[1:]], "qa_notext.jsonl"),
    "train: quantization on a tiny model": (train("model.quantization=4bit"), "model.quantization='4bit'"),
    "recipes: unknown name": (["recipes", "no_such_recipe"], "'no_such_recipe' is not a shipped recipe"),
    "recipes: target exists": (["recipes", "quickstart", "--to", "{t}/a_file"], "already exists"),
    "unknown command": (["bogus"], "invalid choice: 'bogus'"),
    "train: unknown flag": (["train", "{r}", "--colour"], "unrecognized arguments: --colour"),
}


def evaluate(*flags, run="{run}"):
    return ["eval", run, "--no-progress", *flags]


EVAL = {
    "eval: not a run": (evaluate(run="{t}"), "is neither a training run"),
    "eval: no such path": (evaluate(run="{t}/missing"), "missing is not a folder"),
    "eval: damaged weights": (evaluate("--task", "token_memory", run="{t}/truncated"), "memory.safetensors is damaged"),
    "eval: damaged memory_config.json": (evaluate("--task", "token_memory", run="{t}/bad_config"),
                                         "memory_config.json is damaged or not JSON"),
    "eval: a memory config field unknown": (evaluate("--task", "token_memory", run="{t}/unknown_field"),
                                            "colour"),
    "eval: --samples 0": (evaluate("--samples", "0"), "--samples 0"),
    "eval: --samples -1": (evaluate("--samples", "-1"), "--samples -1"),
    "eval: --samples text": (evaluate("--samples", "many"), "argument --samples"),
    "eval: --batch-size 0": (evaluate("--batch-size", "0"), "--batch-size 0"),
    "eval: --chunk-size -3": (evaluate("--chunk-size", "-3"), "--chunk-size -3"),
    "eval: --seed text": (evaluate("--seed", "abc"), "argument --seed"),
    "eval: unknown task": (evaluate("--task", "nope"), "--task 'nope' is not known"),
    "eval: task options bad value": (evaluate("--task-options", "{num_values: 0}"), "num_values=0"),
    "eval: task options unknown": (evaluate("--task-options", "{colour: red}"), "colour"),
    "eval: task options not YAML": (evaluate("--task-options", "{a: [1"), "--task-options is not YAML"),
    "eval: task options duplicate key": (evaluate("--task-options", "{num_values: 2, num_values: 3}"),
                                         "'num_values' is given twice"),
    "eval: task options vocabulary over the model": (evaluate("--segments", "1", "--task-options",
                                                              "{vocab_size: 100000}"), "vocab_size (100000 tokens)"),
    "eval: --segments 1,,2": (evaluate("--segments", "1,,2"), "argument --segments: '1,,2': an item is empty"),
    "eval: --segments 1,2,4,...,3": (evaluate("--segments", "1,2,4,...,3"), "argument --segments: '1,2,4,...,3'"),
    "eval: --segments 0": (evaluate("--segments", "0"), "argument --segments: '0': 0 is < 1"),
    "eval: --segments -1": (evaluate("--segments=-1"), "argument --segments: '-1'"),
    "eval: --segments text": (evaluate("--segments", "a,b"), "argument --segments: 'a,b': 'a' is not an integer"),
    "eval: --segments empty": (evaluate("--segments", ""), "argument --segments: '': an item is empty"),
    "eval: --segments ... alone": (evaluate("--segments", "..."), "argument --segments: '...'"),
    "eval: --segments ... after one value": (evaluate("--segments", "1,...,8"), "argument --segments: '1,...,8'"),
    "eval: --segments ... at the end": (evaluate("--segments", "1,2,..."), "argument --segments: '1,2,...'"),
    "eval: --segments decreasing": (evaluate("--segments", "4,2,...,16"), "argument --segments: '4,2,...,16'"),
    "eval: --segments 100000000000": (evaluate("--segments", "100000000000"), "--segments / eval.num_segments"),
    "eval: --segments endless steps": (evaluate("--segments", "2,3,...,100000000000"), "more than 10,000 lengths"),
    "eval: --device bogus": (evaluate("--device", "bogus"), "--device 'bogus'"),
    "eval: --device cuda": (evaluate("--device", "cuda"), "--device cuda"),
    "eval: --device cuda:7": (evaluate("--device", "cuda:7"), "--device cuda:7"),
    "eval: --device meta": (evaluate("--device", "meta"), "--device 'meta'"),
    "eval: --dtype float7": (evaluate("--dtype", "float7"), "--dtype 'float7'"),
    "eval: --dtype int8": (evaluate("--dtype", "int8"), "--dtype 'int8'"),
    "eval: --quantization 3bit": (evaluate("--quantization", "3bit"), "argument --quantization"),
    "eval: --base-model on full weights": (evaluate("--base-model", "{t}/neo"), "base_model= applies to LoRA"),
    "eval: --curve history on a memory task": (evaluate("--curve", "history"), "--curve history does not apply"),
    "eval: --curve bogus": (evaluate("--curve", "bogus"), "argument --curve"),
    "eval: --tokenizer on a raw-token task": (evaluate("--tokenizer", "/nonexistent"), "--tokenizer '/nonexistent'"),
    "eval: --tokenizer missing": (evaluate("--task", "babilong_memorize", "--tokenizer", "/nonexistent"),
                                  "--tokenizer '/nonexistent' does not exist"),
    "eval: --tokenizer not a tokenizer": (evaluate("--task", "babilong_memorize", "--tokenizer", "{t}/full"),
                                          "--tokenizer '{t}/full' could not be loaded"),
    "eval: --out a file": (evaluate("--out", "{t}/a_file"), "--out {t}/a_file is a file"),
    "eval: --out empty": (evaluate("--out", ""), "--out is empty"),
    "eval: --out the current folder": (evaluate("--out", "."), "is the current folder"),
    "eval: --out holds files": (evaluate("--out", "{t}/full"), "already holds files"),
    "eval: --out the run": (evaluate("--out", "{run}"), "is a training run"),
    "eval: --out a run's stage": (evaluate("--out", "{run}/stage-0", "--overwrite"), "is part of the training run"),
    "eval: --out a run's logs": (evaluate("--out", "{run}/logs", "--overwrite"), "is part of the training run"),
    "eval: --out inside a run": (evaluate("--out", "{run}/mine"), "lies inside the training run"),
    "eval: --out /proc": (evaluate("--out", "/proc/foo"), "--out='/proc/foo'"),
    "eval: --out holds a run": (evaluate("--out", "{run}/..", "--overwrite"), "holds the training run"),
    "eval: overrides without a recipe": (["eval", "{t}/lone/adapter", "memory.segment_size=4"], "need a run's recipe"),
    "eval: no task without a recipe": (["eval", "{t}/lone/adapter"], "no task: pass --task"),
    "eval: override unknown key": (["eval", "{run}", "memory.colour=1"], "memory.colour"),
    "eval: override over the positions": (["eval", "{run}", "memory.segment_size=100", "--segments", "1"],
                                          "memory.segment_size=100"),
    "eval: override of the memory size": (["eval", "{run}", "memory.num_memory_tokens=2", "--segments", "1"],
                                          "memory.num_memory_tokens cannot be overridden"),
    "eval: --baseline missing": (evaluate("--baseline", "{t}/missing"), "missing is not a folder"),
}


def ask(*flags, run="{run}"):
    return ["ask", run, "--no-progress", "--question", "Where is Mary ?", *flags]


ASK = {
    "ask: --document missing": (ask("--document", "{t}/no_such.txt"), "--document {t}/no_such.txt is not a file"),
    "ask: --document a folder": (ask("--document", "{t}/full"), "--document {t}/full is not a file"),
    "ask: --document binary": (ask("--document", "{t}/binary.bin"), "binary.bin is binary"),
    "ask: --document Latin-1": (ask("--document", "{t}/latin1.txt"), "latin1.txt is not utf-8 text"),
    "ask: --document empty": (ask("--document", "{t}/empty.txt"), "empty.txt holds no text"),
    "ask: --document blank": (ask("--document", "{t}/blank.txt"), "blank.txt holds no text"),
    "ask: --encoding bogus": (ask("--document", "{t}/doc.txt", "--encoding", "bogus"), "--encoding 'bogus'"),
    "ask: --encoding ascii on Latin-1": (ask("--document", "{t}/latin1.txt", "--encoding", "ascii"),
                                         "latin1.txt is not ascii text"),
    "ask: neither document nor memory": (["ask", "{run}", "--question", "q"], "--document"),
    "ask: both document and memory": (ask("--document", "{t}/doc.txt", "--memory", "{t}/other.mem.safetensors"),
                                      "not allowed with argument"),
    "ask: --memory missing": (ask("--memory", "{t}/no_such.safetensors"), "--memory {t}/no_such.safetensors is not a file"),
    "ask: --memory not safetensors": (ask("--memory", "{t}/not_a_state.safetensors"),
                                      "not_a_state.safetensors is not a safetensors memory state"),
    "ask: --memory of another model": (ask("--memory", "{t}/other.mem.safetensors"),
                                       "other.mem.safetensors was read by a model with another memory config"),
    "ask: --save-memory empty": (ask("--document", "{t}/doc.txt", "--save-memory", ""), "--save-memory is empty"),
    "ask: --save-memory a folder": (ask("--document", "{t}/doc.txt", "--save-memory", "{t}/full"),
                                    "--save-memory {t}/full is a folder"),
    "ask: --save-memory exists": (ask("--document", "{t}/doc.txt", "--save-memory", "{t}/a_file"), "already exists"),
    "ask: --save-memory the run's memory": (ask("--document", "{t}/doc.txt", "--save-memory",
                                                "{run}/final/memory.safetensors", "--overwrite"),
                                            "is part of the training run"),
    "ask: --save-memory a checkpoint": (ask("--document", "{t}/doc.txt", "--save-memory",
                                            "{run}/stage-0/checkpoint-1/memory.safetensors", "--overwrite"),
                                        "is part of the training run"),
    "ask: --save-memory the run's summary": (ask("--document", "{t}/doc.txt", "--save-memory", "{run}/summary.json",
                                                 "--overwrite"), "is part of the training run"),
    "ask: --save-memory inside a run": (ask("--document", "{t}/doc.txt", "--save-memory", "{run}/doc.mem"),
                                        "lies inside the training run"),
    "ask: --save-memory /proc": (ask("--document", "{t}/doc.txt", "--save-memory", "/proc/x/doc.mem"),
                                 "--save-memory='/proc/x/doc.mem': /proc is not writable"),
    "ask: --save-memory under a file": (ask("--document", "{t}/doc.txt", "--save-memory", "{t}/a_file/doc.mem"),
                                        "is a file; expected a folder"),
    "ask: --max-new-tokens 0": (ask("--document", "{t}/doc.txt", "--max-new-tokens", "0"), "--max-new-tokens 0"),
    "ask: --max-new-tokens -5": (ask("--document", "{t}/doc.txt", "--max-new-tokens=-5"), "--max-new-tokens -5"),
    "ask: --max-new-tokens 100000": (ask("--document", "{t}/doc.txt", "--max-new-tokens", "100000"),
                                     "--max-new-tokens 100000"),
    "ask: --max-new-tokens text": (ask("--document", "{t}/doc.txt", "--max-new-tokens", "many"),
                                   "argument --max-new-tokens"),
    "ask: --device bogus": (ask("--document", "{t}/doc.txt", "--device", "bogus"), "--device 'bogus'"),
    "ask: --device cuda": (ask("--document", "{t}/doc.txt", "--device", "cuda"), "--device cuda"),
    "ask: --dtype float7": (ask("--document", "{t}/doc.txt", "--dtype", "float7"), "--dtype 'float7'"),
    "ask: --tokenizer missing": (ask("--document", "{t}/doc.txt", "--tokenizer", "/nonexistent"),
                                 "--tokenizer '/nonexistent' does not exist"),
    "ask: --base-model on full weights": (ask("--document", "{t}/doc.txt", "--base-model", "{t}/neo"),
                                          "base_model= applies to LoRA"),
    "ask: not a run": (ask("--document", "{t}/doc.txt", run="{t}"), "is neither a training run"),
    # the recipe.yaml beside these adapters trains on raw token ids: --tokenizer lets ask read text
    "ask: damaged weights": (ask("--document", "{t}/doc.txt", "--tokenizer", "offline", run="{t}/truncated"),
                             "memory.safetensors is damaged"),
    "ask: damaged memory_config.json": (ask("--document", "{t}/doc.txt", "--tokenizer", "offline",
                                            run="{t}/bad_config"), "memory_config.json is damaged"),
    "ask: a run on raw token ids": (ask("--document", "{t}/doc.txt", run="{t}/truncated"),
                                    "was trained on raw token ids"),
}


def export(to, *flags, source="{run}"):
    return ["export", source, "--to", to, *flags]


EXPORT = {
    "export: --to empty": (export(""), "--to is empty"),
    "export: --to empty with overwrite": (export("", "--overwrite"), "--to is empty"),
    "export: --to the current folder": (export(".", "--overwrite"), "is the current folder"),
    "export: --to a folder holding the current one": (export("..", "--overwrite"), "is the current folder"),
    "export: --to the source": (export("{run}", "--overwrite"), "is the source"),
    "export: --to a folder holding the source": (export("{run}/..", "--overwrite"), "is the source"),
    "export: --to inside the adapter": (export("{run}/final/sub"), "lies inside the adapter folder"),
    "export: --to a run's stage": (export("{run}/stage-0", "--overwrite"),
                                   "is part of the training run"),
    "export: --to a run's checkpoint": (export("{run}/stage-0/checkpoint-1", "--overwrite"),
                                        "is part of the training run"),
    "export: --to a run's logs": (export("{run}/logs", "--overwrite"), "is part of the training run"),
    "export: --to inside a run": (export("{run}/exported"), "lies inside the training run"),
    "export: --to holds files": (export("{t}/full"), "already holds files"),
    "export: --to a file": (export("{t}/a_file"), "--to {t}/a_file is a file"),
    "export: --to /proc": (export("/proc/foo"), "--to='/proc/foo'"),
    "export: --to missing": (["export", "{run}"], "the following arguments are required: --to"),
    "export: source missing": (export("{t}/out1", source="{t}/missing"), "is not a folder"),
    "export: source not an adapter": (export("{t}/out1", source="{t}/full"), "is neither an adapter folder"),
    "export: truncated memory.safetensors": (export("{t}/out1", source="{t}/truncated"), "memory.safetensors is damaged"),
    "export: damaged memory_config.json": (export("{t}/out1", source="{t}/bad_config"), "memory_config.json is damaged"),
    "export: --merge of full weights": (export("{t}/out1", "--merge"), "holds full model weights"),
    "export: --quantization 3bit": (export("{t}/out1", "--quantization", "3bit"), "argument --quantization"),
    "export: --dtype float7": (export("{t}/out1", "--dtype", "float7"), "argument --dtype"),
}

CLI = {**RECIPES, **SFT, **TRAIN, **EVAL, **ASK, **EXPORT}


@pytest.mark.parametrize("name", list(CLI))
def test_cli_bad_input_is_one_named_line_with_exit_2(name, bad, trained_run, capsys):
    argv, expected = CLI[name]
    fill = {"{r}": str(bad / "recipe.yaml"), "{t}": str(bad), "{run}": str(trained_run)}

    def filled(text):
        for key, value in fill.items():  # not str.format: YAML values hold braces
            text = text.replace(key, value)
        return text
    argv, expected = [filled(a) for a in argv], filled(expected)
    before = sorted(os.listdir(bad)), sorted(os.listdir(trained_run))
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err, err
    # the command's own lines; before them may come the progress of loading and training (-q hides it)
    lines = [line for line in err.splitlines() if line.startswith("rmt-peft")]
    assert code == 2 and len(lines) == 1 and err.endswith(lines[0]) and expected in lines[0], (code, err)
    assert (sorted(os.listdir(bad)), sorted(os.listdir(trained_run))) == before  # nothing written


# -- the Python API -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def rmt():
    return RMTModel.from_backbone(tiny_model("gpt_neo", vocab_size=VOCAB, max_positions=64),
                                  MemoryConfig(num_memory_tokens=2, segment_size=8), lora=None).eval()


IDS = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(0))
ONES = torch.ones_like(IDS)
MEMORY = torch.zeros(2, 2, 64)
NAN = torch.full((2, 2, 64), float("nan"))


def associative():
    return RMTModel.from_backbone(tiny_model("gpt_neo", vocab_size=VOCAB, max_positions=64),
                                  MemoryConfig(num_memory_tokens=2, segment_size=8, memory_kind="associative"),
                                  lora=None, verbose=False).eval()


def forward(**kwargs):
    return lambda m: m(**{"input_ids": IDS, **kwargs})


def feed(ids, labels=None, batch=2):
    return lambda m: m.stream(batch_size=batch).feed(ids, labels)


API = {  # name: (call on the module's rmt, the argument the ValueError names)
    "forward: ids 1-D": (forward(input_ids=IDS[0]), "input_ids must be \\(batch, length\\)"),
    "forward: ids 3-D": (forward(input_ids=IDS[None]), "input_ids must be \\(batch, length\\)"),
    "forward: ids empty": (forward(input_ids=IDS[:, :0]), "input_ids is empty"),
    "forward: no samples": (forward(input_ids=IDS[:0]), "input_ids is empty"),
    "forward: ids float": (forward(input_ids=IDS.float()), "input_ids must hold integer"),
    "forward: ids bool": (forward(input_ids=IDS > 3), "input_ids must hold integer"),
    "forward: ids half": (forward(input_ids=IDS.half()), "input_ids must hold integer"),
    "forward: ids a list": (forward(input_ids=IDS.tolist()), "input_ids must be a torch.Tensor"),
    "forward: ids a tuple": (forward(input_ids=tuple(IDS[0].tolist())), "input_ids must be a torch.Tensor"),
    "forward: ids >= vocab": (forward(input_ids=IDS + VOCAB), "input_ids must lie in \\[0, 64\\)"),
    "forward: ids negative": (forward(input_ids=IDS - VOCAB), "input_ids must lie in \\[0, 64\\)"),
    "forward: one id too large": (forward(input_ids=torch.where(IDS == IDS[0, 0], VOCAB, IDS)), "input_ids must lie"),
    "forward: labels short": (forward(labels=IDS[:, :10]), "labels must have the shape of input_ids"),
    "forward: labels float": (forward(labels=IDS.float()), "labels must hold integer"),
    "forward: labels a list": (forward(labels=IDS.tolist()), "labels must be a torch.Tensor"),
    "forward: labels negative": (forward(labels=IDS - 50), "labels must lie in"),
    "forward: labels >= vocab": (forward(labels=IDS + VOCAB), "labels must lie in"),
    "forward: labels -101": (forward(labels=torch.full_like(IDS, -101)), "labels must lie in"),
    "forward: mask short": (forward(attention_mask=ONES[:, :10]), "attention_mask must have the shape"),
    "forward: mask of 2": (forward(attention_mask=ONES * 2), "attention_mask must hold only 0 and 1"),
    "forward: mask negative": (forward(attention_mask=-ONES), "attention_mask must hold only 0 and 1"),
    "forward: mask a list": (forward(attention_mask=ONES.tolist()), "attention_mask must be a torch.Tensor"),
    "forward: mask empty row": (forward(attention_mask=torch.stack([ONES[0], 0 * ONES[1]])),
                                "attention_mask is all zero"),
    "forward: memory of another size": (forward(memory=torch.zeros(2, 3, 64)), "memory must be"),
    "forward: memory of another batch": (forward(memory=torch.zeros(1, 2, 64)), "memory must be"),
    "forward: memory NaN": (forward(memory=NAN), "memory holds NaN"),
    "forward: memory inf": (forward(memory=MEMORY + float("inf")), "memory holds NaN or infinite"),
    "forward: memory integers": (forward(memory=MEMORY.long()), "memory must be a floating-point"),
    "forward: memory a list": (forward(memory=MEMORY.tolist()), "memory must be a floating-point"),
    "generate: ids float": (lambda m: m.generate(IDS.float(), max_new_tokens=1), "input_ids must hold integer"),
    "generate: ids >= vocab": (lambda m: m.generate(IDS + VOCAB, max_new_tokens=1), "input_ids must lie"),
    "generate: mask all zero": (lambda m: m.generate(IDS, torch.zeros_like(IDS), max_new_tokens=1),
                                "attention_mask is all zero"),
    "generate: memory NaN": (lambda m: m.generate(IDS, memory=NAN, max_new_tokens=1), "memory holds NaN"),
    "generate: memory of another size": (lambda m: m.generate(IDS, memory=torch.zeros(2, 5, 64), max_new_tokens=1),
                                         "memory of shape"),
    "generate: beyond the positions": (lambda m: m.generate(IDS, max_new_tokens=1000), "max_new_tokens|positions"),
    "read: ids float": (lambda m: m.read(IDS.float()), "input_ids must hold integer"),
    "read: memory NaN": (lambda m: m.read(IDS, memory=NAN), "memory holds NaN"),
    "stream: batch of 1 into a stream of 2": (feed(IDS[:1]), "input_ids has a batch of 1"),
    "stream: batch of 2 into a stream of 1": (feed(IDS, batch=1), "input_ids has a batch of 2"),
    "stream: float ids": (feed(IDS.float()), "input_ids must hold integer"),
    "stream: ids >= vocab": (feed(IDS + VOCAB), "input_ids must lie in \\[0, 64\\)"),
    "stream: negative ids": (feed(IDS - 1000), "input_ids must lie in"),
    "stream: a list": (feed(IDS.tolist()), "input_ids must be a torch.Tensor"),
    "stream: 3-D ids": (feed(IDS[None]), "input_ids must be \\(batch, length\\)"),
    "stream: labels of another shape": (feed(IDS, IDS[:, :5]), "labels must have the shape"),
    "stream: labels float": (feed(IDS, IDS.float()), "labels must hold integer"),
    "stream: labels >= vocab": (feed(IDS, IDS + VOCAB), "labels must lie in"),
    "stream: generate with float ids": (lambda m: m.stream().generate(IDS[:1].float(), max_new_tokens=1),
                                        "input_ids must hold integer"),
    "associative: a tensor memory": (lambda m: associative()(input_ids=IDS, memory=MEMORY),
                                     "memory must be an AssociativeState"),
    "associative: stream batch of 2 into 1": (lambda m: associative().stream().feed(IDS),
                                              "input_ids has a batch of 2"),
    "associative: stream ids >= vocab": (lambda m: associative().stream().feed(IDS[:1] + VOCAB),
                                         "input_ids must lie in"),
    "MemoryConfig: memory_kind bogus": (lambda m: MemoryConfig(memory_kind="bogus"), "memory_kind='bogus'"),
    "MemoryConfig: num_memory_tokens -1": (lambda m: MemoryConfig(num_memory_tokens=-1), "num_memory_tokens=-1"),
    "MemoryConfig: segment_size 0": (lambda m: MemoryConfig(segment_size=0), "segment_size=0"),
    "MemoryConfig: segment_alignment": (lambda m: MemoryConfig(segment_alignment="middle"), "segment_alignment"),
    "MemoryConfig: memory_update": (lambda m: MemoryConfig(memory_update="sum"), "memory_update='sum'"),
    "MemoryConfig: bptt_depth -2": (lambda m: MemoryConfig(bptt_depth=-2), "bptt_depth=-2"),
    "MemoryConfig: loss_segments 0": (lambda m: MemoryConfig(loss_segments=0), "loss_segments=0"),
    "MemoryConfig: stability power 0": (lambda m: MemoryConfig(memory_stability_power=0), "memory_stability_power=0"),
    "MemoryConfig: noise -1": (lambda m: MemoryConfig(memory_noise_std=-1), "memory_noise_std=-1"),
    "MemoryConfig: checkpoint_policy": (lambda m: MemoryConfig(checkpoint_policy="all"), "checkpoint_policy='all'"),
    "MemoryConfig.from_dict: unknown field": (lambda m: MemoryConfig.from_dict({"colour": 1}), "colour"),
    "lora_config: preset bogus": (lambda m: lora_config("bogus", "gpt_neo"), "LoRA preset 'bogus'"),
    "lora_config: attention preset unknown architecture": (lambda m: lora_config("attention", "mamba"),
                                                           "no 'attention' LoRA preset"),
    "attach_lora: target matches nothing": (lambda m: attach_lora(tiny_model("gpt_neo"),
                                                                  {"target_modules": ["nothing"]}),
                                            "lora.target_modules=\\['nothing'\\] matches no module"),
    "from_backbone: lora a number": (lambda m: RMTModel.from_backbone(tiny_model("gpt_neo"), MemoryConfig(2, 8),
                                                                      lora=5), "lora must be"),
    "from_backbone: segment over the positions": (lambda m: RMTModel.from_backbone(
        tiny_model("gpt_neo", max_positions=16), MemoryConfig(4, 16), lora=None), "segment_size=16"),
    "from_pretrained: no such folder": (lambda m: RMTModel.from_pretrained("./no/such/folder"), "is not a folder"),
    "check_position_limit: too long": (lambda m: check_position_limit(tiny_config("gpt2", max_positions=16),
                                                                      MemoryConfig(4, 16)), "segment_size=16"),
    "resolve_dtype: float7": (lambda m: resolve_dtype("float7"), "dtype='float7'"),
    "tiny_config: unknown architecture": (lambda m: tiny_config("mamba"), "architecture='mamba'"),
    "EvalSettings: curve": (lambda m: EvalSettings(curve="bleu", segments=[1]), "EvalSettings.curve='bleu'"),
    "EvalSettings: no segments": (lambda m: EvalSettings(curve="accuracy", segments=[]), "EvalSettings.segments"),
    "EvalSettings: segments 0": (lambda m: EvalSettings(curve="accuracy", segments=[0]), "EvalSettings.segments"),
    "EvalSettings: samples 0": (lambda m: EvalSettings(curve="accuracy", segments=[1], num_samples=0),
                                "EvalSettings.num_samples=0"),
    "EvalSettings: batch -1": (lambda m: EvalSettings(curve="accuracy", segments=[1], batch_size=-1),
                               "EvalSettings.batch_size=-1"),
    "validate_options: unknown task": (lambda m: validate_options("poetry", {}), "task='poetry'"),
    "validate_options: unknown option": (lambda m: validate_options("token_memory", {"colour": 1}), "colour"),
    "validate_options: not a dict": (lambda m: validate_options("token_memory", [1]), "must be a dict"),
    "build_dataset: num_segments 0": (lambda m: build_dataset("token_memory", {}, tokenizer=None, segment_size=8,
                                                              num_segments=0, num_samples=1), "num_segments=0"),
    "build_dataset: segment_size 0": (lambda m: build_dataset("token_memory", {}, tokenizer=None, segment_size=0,
                                                              num_segments=1, num_samples=1), "segment_size=0"),
    "build_dataset: num_samples 0": (lambda m: build_dataset("token_memory", {}, tokenizer=None, segment_size=8,
                                                             num_segments=1, num_samples=0), "num_samples=0"),
    "build_dataset: no tokenizer": (lambda m: build_dataset("babilong_memorize", {}, tokenizer=None, segment_size=8,
                                                            num_segments=1, num_samples=1), "needs a tokenizer"),
    "MemoryState.load: missing": (lambda m: MemoryState.load("/no/such.safetensors"), "does not exist"),
    "MemoryState.from_stream: a batch": (lambda m: MemoryState.from_stream(m.stream(batch_size=2)),
                                         "holds one document"),
    "MemoryState.check: another config": (lambda m: MemoryState(torch.zeros(1, 3, 64), torch.zeros(1, 0).long(),
                                                                MemoryConfig(3, 8), 0).generate(m, IDS[:1]),
                                          "num_memory_tokens: 3"),
    "check_output: empty": (lambda m: check_output("", "--out", folder=True), "--out is empty"),
    "check_output: a folder for a file": (lambda m: check_output("/", "--save-memory", folder=False),
                                          "--save-memory / is a folder"),
    "saving.read_memory: no files": (lambda m: saving.read_memory("/"), "has no memory_config.json"),
    "saving.folder_kind: no model": (lambda m: saving.folder_kind("/"), "has neither adapter_config.json"),
}


@pytest.mark.parametrize("name", list(API))
def test_api_bad_input_is_a_value_error_naming_the_argument(name, rmt):
    call, message = API[name]
    with pytest.raises((ValueError, TypeError, FileNotFoundError)) as caught:
        call(rmt)
    assert re.search(message, str(caught.value)), str(caught.value)
    assert isinstance(caught.value, ValueError) or name.startswith(("from_pretrained", "saving.", "from_backbone")), \
        type(caught.value)


def test_int32_labels_work_like_int32_ids_and_all_ignored_labels_give_a_zero_loss(rmt):
    ids32 = IDS.int()
    out = rmt(input_ids=ids32, labels=ids32)
    torch.testing.assert_close(out.loss, rmt(input_ids=IDS, labels=IDS).loss)
    assert float(rmt(input_ids=IDS, labels=torch.full_like(IDS, -100)).loss) == 0.0  # documented: nothing to learn


def test_the_corpus_holds_300_cases():
    assert len(CLI) + len(API) >= 300, (len(CLI), len(API))


def test_model_dtype_is_applied_to_a_tiny_model(bad):
    from rmt_peft.recipe import load_recipe
    from rmt_peft.train.build import build_backbone

    recipe = load_recipe(str(bad / "recipe.yaml"), ["model.dtype=bfloat16"])
    assert {p.dtype for p in build_backbone(recipe, seed=0).parameters()} == {torch.bfloat16}
