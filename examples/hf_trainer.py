"""Distil a small student from a logit cache with Hugging Face `Trainer`.

    python examples/hf_trainer.py --cache data/logits.zarr --steps 40
    torchrun --nproc-per-node 2 examples/hf_trainer.py --cache data/logits.zarr   # or: accelerate launch ...

`DistillationTrainer` is a `Trainer` whose loss is the cache's distillation loss; the dataset is
map-style, so the Trainer's sampler shards it over the processes and resumes it as usual.
"""

import argparse
import os

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, TrainingArguments

from pipeline import DistillationTrainer, LogitCache

parser = argparse.ArgumentParser()
parser.add_argument("--cache", default="data/logits.zarr")  # a path, a URL or a manifest
parser.add_argument("--student", default=None, help="an HF model to start from (default: a small new Llama)")
parser.add_argument("--out", default="data/examples/hf-trainer")
parser.add_argument("--steps", type=int, default=40)
parser.add_argument("--batch-size", type=int, default=8)
parser.add_argument("--kd-weight", type=float, default=0.8)
args = parser.parse_args()

cache = LogitCache.open(args.cache)
if args.student:
    student = AutoModelForCausalLM.from_pretrained(args.student)
else:
    torch.manual_seed(0)
    student = LlamaForCausalLM(LlamaConfig(vocab_size=cache.spec.vocab_size, hidden_size=64, intermediate_size=172,
                                           num_hidden_layers=2, num_attention_heads=4,
                                           max_position_embeddings=cache.spec.seq_len))
training = TrainingArguments(
    output_dir=args.out, max_steps=args.steps, per_device_train_batch_size=args.batch_size, learning_rate=2e-3,
    lr_scheduler_type="cosine", warmup_steps=min(10, args.steps // 4), logging_steps=10, save_strategy="no",
    report_to=[], dataloader_num_workers=1, use_cpu=not torch.cuda.is_available(),
    ddp_backend="gloo" if not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", 1)) > 1 else None)
trainer = DistillationTrainer(model=student, args=training, train_dataset=cache.dataset(), kd_weight=args.kd_weight)
trainer.train()
if trainer.is_world_process_zero():
    trainer.save_model(args.out)
    print(f"student saved to {args.out}")
