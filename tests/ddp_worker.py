"""One rank of the DDP test: `torchrun --nproc_per_node 2 tests/ddp_worker.py OUT_DIR` (CPU, gloo).

Each rank trains a tiny Llama with GoatTrainer for a few steps on its own shard of the data, then writes its
adapter tensors to OUT_DIR/rank{RANK}.safetensors, and its data shard and log history to OUT_DIR/rank{RANK}.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from conftest import tiny_llama
from safetensors.torch import save_file
from trainer_fixtures import adapter_copy, cpu_args, lm_dataset

from goat_hf import GoatConfig, GoatTrainer

STEPS = 3


def main(out_dir: Path) -> None:
    torch.set_num_threads(1)
    model = tiny_llama()
    args = cpu_args(out_dir / "run", ddp_backend="gloo", max_steps=STEPS, learning_rate=1e-2)
    config = GoatConfig(r=8, num_experts=4, top_k=2, aux_loss_coef=0.1)
    trainer = GoatTrainer(model=model, args=args, train_dataset=lm_dataset(4 * STEPS), goat_config=config)
    before = adapter_copy(model)
    shard = [batch["input_ids"].tolist() for batch in trainer.get_train_dataloader()]
    trainer.train()
    rank = trainer.args.process_index
    after = adapter_copy(model)
    save_file(after, str(out_dir / f"rank{rank}.safetensors"))
    report = {
        "world_size": trainer.args.world_size,
        "shard": shard,
        "moved": [name for name in after if not torch.equal(before[name], after[name])],
        "log_history": trainer.state.log_history,
    }
    (out_dir / f"rank{rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
