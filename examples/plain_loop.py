"""Distil a small student from a logit cache in a plain PyTorch loop.

    python examples/plain_loop.py --cache data/logits.zarr --steps 40
"""

import argparse

import torch
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from pipeline import LogitCache, collate, hidden_and_head, linear_distillation_loss

parser = argparse.ArgumentParser()
parser.add_argument("--cache", default="data/logits.zarr")  # a path, a URL or a manifest
parser.add_argument("--student", default=None, help="an HF model to start from (default: a small new Llama)")
parser.add_argument("--steps", type=int, default=40)
parser.add_argument("--batch-size", type=int, default=8)
parser.add_argument("--kd-weight", type=float, default=0.8)
args = parser.parse_args()

cache = LogitCache.open(args.cache)
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if args.student:
    student = AutoModelForCausalLM.from_pretrained(args.student)
else:
    torch.manual_seed(0)
    student = LlamaForCausalLM(LlamaConfig(vocab_size=cache.spec.vocab_size, hidden_size=64, intermediate_size=172,
                                           num_hidden_layers=2, num_attention_heads=4,
                                           max_position_embeddings=cache.spec.seq_len))
student.to(device).train()
optimizer = torch.optim.AdamW(student.parameters(), lr=2e-3)
loader = DataLoader(cache.dataset(), batch_size=args.batch_size, shuffle=True, collate_fn=collate, num_workers=1)

step = 0
while step < args.steps:
    for batch in loader:
        batch = {name: values.to(device) for name, values in batch.items()}
        # the student's forward without its LM head: hidden states (B, T, d) and the head; the loss applies
        # the head a chunk of positions at a time, so the (B, T, V) logits never exist
        hidden, head = hidden_and_head(student, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        out = linear_distillation_loss(hidden, head, batch, kd_weight=args.kd_weight)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if step % 10 == 0 or step == 1:
            print(f"step {step}: loss {out.loss.item():.4f} (kd {out.kd.item():.4f}, ce {out.ce.item():.4f})")
        if step == args.steps:
            break
