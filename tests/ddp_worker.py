"""Run under torchrun by tests/test_distributed.py: N training steps, then each rank saves its weights."""
import sys
from pathlib import Path

import torch

from ddpm import config, data, distributed
from ddpm.train import Trainer

out, steps = Path(sys.argv[1]), int(sys.argv[2])
cfg = config.load(Path(__file__).resolve().parents[1] / "configs/ci.yaml", ["train.batch_size=8", *sys.argv[3:]])
world, device = distributed.init(torch.device("cpu"))
trainer = Trainer(cfg, device, data.load_offline_subset().images[:96], world.rank, world.world_size)
torch.save(trainer.net.state_dict(), out / f"init-world{world.world_size}-rank{world.rank}.pt")
for step in range(steps):
    trainer.step(step)
    if step == 0:  # the first step's gradients, after DDP's all-reduce
        torch.save({n: p.grad.clone() for n, p in trainer.net.named_parameters()},
                   out / f"grads-world{world.world_size}-rank{world.rank}.pt")
torch.save(trainer.net.state_dict(), out / f"world{world.world_size}-rank{world.rank}.pt")
# how many graphs dynamo compiled (0 in eager runs): one per compiled run, none recompiled
(out / f"graphs-world{world.world_size}-rank{world.rank}.txt").write_text(
    str(torch._dynamo.utils.counters["stats"]["unique_graphs"]))
# as train() ends: DDP's reducer (and the gloo work it holds) freed, every rank past its last collective,
# then the group destroyed; a gloo rank once aborted at exit ("terminate called without an active exception")
del trainer
distributed.barrier(world)
distributed.shutdown()
