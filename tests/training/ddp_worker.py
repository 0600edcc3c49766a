"""Started by torchrun from test_distributed.py: trains the tiny config in several CPU processes and saves each
rank's final meta-architecture state (student, teacher, loss centers) for comparison."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).parent))
from tiny import tiny_config

from training.pretrain import pretrain


class DumpState(L.Callback):
    def __init__(self, out: Path):
        self.out = out

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from training.fsdp import full_state_dict

        state = {}
        for group in ("student", "teacher"):
            for name, module in getattr(pl_module.meta, group).items():
                state.update({f"{group}.{name}.{k}": v for k, v in full_state_dict(module).items()})
        state["center"] = pl_module.meta.dino_loss.centering.center.detach().cpu()
        torch.save(state, self.out / f"rank{trainer.global_rank}.pt")


class SeenPositions(L.Callback):
    """Each rank's sample positions per step (one list per micro-batch), saved as positions_rank{r}.json."""

    def __init__(self, out: Path):
        self.out, self.seen = out, {}

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: dict, *args: object) -> None:
        micro = batch.get("micro_batches", [batch])
        self.seen[int(batch["step"])] = [m["positions"].tolist() for m in micro]

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        (self.out / f"positions_rank{trainer.global_rank}.json").write_text(json.dumps(self.seen))


if __name__ == "__main__":
    data, out, changes = Path(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3])
    out.mkdir(parents=True, exist_ok=True)
    pretrain(data, out, tiny_config(**changes), seed=0, callbacks=[DumpState(out), SeenPositions(out)])
