"""Run by torchrun from tests/test_api.py: one epoch of DistillationTrainer over the first N sequences
of a cache, each rank writing the indices it was given."""

import json
import sys
from pathlib import Path

import torch
from torch.utils.data import Dataset
from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

from pipeline import DistillationTrainer, LogitCache

cache_path, n_sequences, out = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])


class Recorded(Dataset):
    def __init__(self, dataset, n):
        self.dataset, self.n, self.seen = dataset, n, []

    def __len__(self):
        return self.n

    def __getitem__(self, index):
        self.seen.append(int(index))
        return self.dataset[index]


cache = LogitCache.open(cache_path)
dataset = Recorded(cache.dataset(), n_sequences)
torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(vocab_size=cache.spec.vocab_size, hidden_size=32, intermediate_size=64,
                                     num_hidden_layers=1, num_attention_heads=4))
args = TrainingArguments(output_dir=str(out / "hf"), num_train_epochs=1, per_device_train_batch_size=4,
                         save_strategy="no", report_to=[], use_cpu=True, ddp_backend="gloo", dataloader_num_workers=0,
                         logging_steps=5)
trainer = DistillationTrainer(model=model, args=args, train_dataset=dataset)
trainer.train()
rank = trainer.args.process_index
(out / f"rank{rank}.json").write_text(json.dumps({"seen": dataset.seen, "world": trainer.args.world_size,
                                                  "loss": trainer.state.log_history[-1]["train_loss"]}))
