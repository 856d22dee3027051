"""Two CPU processes (gloo) must agree with one process that sees the whole batch."""
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from latteclip_nb.loss import contrastive_loss
from latteclip_nb.prototypes import PrototypeBank


def _batch(seed=0, B=8, C=5, D=6):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(C, D, generator=g), torch.randint(0, C, (2 * B,), generator=g),
            torch.randn(2 * B, D, generator=g), F.normalize(torch.randn(B, D, generator=g), dim=-1),
            torch.randn(B, D, generator=g))


def _worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        init, labels, targets, v, t = _batch()
        bank = PrototypeBank(init)
        # each rank holds a different, unequal share of the labels/targets
        sl = slice(0, 3) if rank == 0 else slice(3, None)
        bank.update(labels[sl], targets[sl])
        half = len(v) // world
        vs = v[rank * half:(rank + 1) * half].clone().requires_grad_()
        loss = contrastive_loss(vs, t[rank * half:(rank + 1) * half], torch.tensor(20.))
        loss.backward()
        torch.save({"protos": bank.prototypes, "loss": loss.detach(), "grad": vs.grad}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_ranks_match_one_process():
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_worker, args=(2, f"{d}/pg", d), nprocs=2, join=True)
        r0, r1 = (torch.load(f"{d}/rank{r}.pt", weights_only=True) for r in (0, 1))
    init, labels, targets, v, t = _batch()
    ref = PrototypeBank(init); ref.update(labels, targets)
    assert torch.equal(r0["protos"], r1["protos"])
    assert torch.allclose(r0["protos"], ref.prototypes, atol=1e-6)
    # the gathered loss is the loss of the global batch, on every rank
    vg = v.clone().requires_grad_()
    full = contrastive_loss(vg, t, torch.tensor(20.)); full.backward()
    assert torch.allclose(r0["loss"], full, atol=1e-6) and torch.allclose(r1["loss"], full, atol=1e-6)
    # each rank's gradient is world_size x the single-process one (DDP's gradient averaging undoes the factor)
    assert torch.allclose(torch.cat([r0["grad"], r1["grad"]]) / 2, vg.grad, atol=1e-6)
