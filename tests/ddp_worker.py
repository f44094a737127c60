"""One rank of the DDP test: `torchrun --nproc_per_node 2 tests/ddp_worker.py OUT_DIR` (CPU, gloo).

Each rank trains a tiny Llama with GoatTrainer, the sharded tests' settings (sharded_worker.py: 4 steps, balance
loss on) under plain DDP, on its own shard of the data, then writes its adapter tensors to
OUT_DIR/rank{RANK}.safetensors, and its data shard and log history to OUT_DIR/rank{RANK}.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from conftest import tiny_llama
from safetensors.torch import save_file
from sharded_worker import STEPS, goat_config, train_args
from trainer_fixtures import adapter_copy, lm_dataset

from goat_hf import GoatTrainer

AUX_LOSS_COEF = 0.1


def main(out_dir: Path) -> None:
    torch.set_num_threads(1)
    model = tiny_llama()
    args = train_args(out_dir / "run", ddp_backend="gloo", save_strategy="no")
    data = lm_dataset(4 * STEPS)
    trainer = GoatTrainer(model=model, args=args, train_dataset=data, goat_config=goat_config(AUX_LOSS_COEF))
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
