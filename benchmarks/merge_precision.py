"""Merged vs unmerged logits against the exact (fp32) computation, GPT-Neo-1.3B shape, random weights (GPU).

Shows whether a bf16 merge differs from the unmerged model by more than bf16 rounding itself does.
"""
import torch
from transformers import GPTNeoConfig, AutoModelForCausalLM
from rmt_peft import RMTModel, MemoryConfig
def run(layers, seg=1024):
    torch.manual_seed(0)
    cfg = GPTNeoConfig(vocab_size=50257, hidden_size=2048, num_layers=layers, num_heads=16,
                       attention_types=[[["global","local"], layers//2]], max_position_embeddings=2048, window_size=256)
    with torch.device("cuda"):
        bb = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
    rmt = RMTModel.from_backbone(bb, MemoryConfig(num_memory_tokens=10, segment_size=seg),
                                 lora={"target_modules":"all-linear","r":16}, verbose=False)
    with torch.no_grad():
        for n,p in rmt.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.01)
    rmt.eval()
    ids = torch.randint(0, 50257, (1, 2*seg), device="cuda")
    with torch.no_grad():
        bf = rmt(ids).logits.float()
        merged = rmt.merge_and_unload(dtype=torch.bfloat16, device="cuda")
        mbf = merged(ids).logits.float()
        m32 = rmt.merge_and_unload(dtype=torch.float32, device="cuda")
        f32 = m32(ids).logits.float()   # fp32 merge == unmerged fp32 computation (checked to 2e-4)
        with rmt.backbone.disable_adapter():
            base_bf = rmt(ids).logits.float()
    def d(a, b):
        return (a - b).abs().max().item()

    print(f"layers={layers}: unmerged-bf16 vs fp32 {d(bf,f32):.3g} | merged-bf16 vs fp32 {d(mbf,f32):.3g} | "
          f"merged-bf16 vs unmerged-bf16 {d(mbf,bf):.3g} | LoRA effect (bf16 with vs without) {d(bf,base_bf):.3g} | "
          f"scale {f32.abs().max().item():.3g}", flush=True)


for L in (2, 24):
    run(L)
