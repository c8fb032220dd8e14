"""Worker for tests/test_torchrun.py: `macl.train.pretrain` on W gloo ranks, each fed its share of fixed global
batches, against one process fed the whole batches (same seeds, instance norm so the split does not change
the normalisation)."""
import os

import torch

from macl.settings.config import MethodConfig, NetConfig, OptimConfig, PretrainConfig, TrainConfig
from macl.parallel import init_from_env, shutdown
from macl.train import pretrain

GLOBAL_BATCH, STEPS = 4, 3


def config() -> PretrainConfig:
    # 32² at depth 2 (a non-degenerate MACL geometry); the faithful preset's image heads have no BatchNorm, whose
    # per-rank batch statistics would differ from the one process's
    return PretrainConfig(net=NetConfig(dims=2, base_width=4, depth=2, norm="instance"),
                          method=MethodConfig(name="macl", threshold=0.3, impl="torch", preset="faithful"),
                          optim=OptimConfig(lr=0.05), train=TrainConfig(steps=STEPS, device="cpu", log_every=1,
                                                                        checkpoint_every=0, amp=False))


def global_batches() -> list:
    """STEPS global batches of GLOBAL_BATCH 32×32 slices with four views and positions (seeded)."""
    g = torch.Generator().manual_seed(11)
    out = []
    for _ in range(STEPS):
        base = torch.randn(GLOBAL_BATCH, 1, 32, 32, generator=g)
        views = {f"img{i}": base + 0.3 * torch.randn(base.shape, generator=g) for i in range(1, 5)}
        out.append({**views, "positions": torch.rand(GLOBAL_BATCH, generator=g)})
    return out


def shard(batch: dict, rank: int, world: int) -> dict:
    n = GLOBAL_BATCH // world
    return {k: v[rank * n:(rank + 1) * n] for k, v in batch.items()}


def worker(rank: int, world: int, port: int, run_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    w = init_from_env("cpu")
    try:
        batches = [shard(b, w.rank, w.size) for b in global_batches()]
        pretrain(config(), lambda start: iter(batches[start:]), run_dir, world=w)
    finally:
        shutdown(w)
