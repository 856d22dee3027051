"""Two CPU processes (gloo) must agree with one process that sees the whole batch."""
import sys, tempfile, time
from pathlib import Path

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


def _views_worker(rank, world, init_file, out_dir, root):
    """One rank's share of a batch of device-augmented views: its shard of the sampler, uint8 crops, DeviceAugment."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.save(_device_views(root, rank, world), f"{out_dir}/views{rank}.pt")
    finally:
        dist.destroy_process_group()


def _device_views(root, rank=0, world=1, epoch=1):
    "The device-augmented views and indices of epoch `epoch`'s first batch of 8 (this rank's shard) of the 12-image world."
    from latteclip_nb.clip import make_train_transform
    from latteclip_nb.data import Split
    from latteclip_nb.views import EpochBatches, SeededViews, collate_views, split_transform
    names = sorted(p.name for p in Path(root).glob("*.png"))
    split = Split(root=Path(root), ids=names, labels=[0] * len(names), classnames=["a", "b"])
    worker_tf, augment = split_transform(make_train_transform(24, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)))
    sampler = EpochBatches(len(split), 8, seed=3, rank=rank, world=world); sampler.set_epoch(epoch)
    crops, idx, seeds = collate_views(SeededViews(split, worker_tf, seed=3, with_seeds=True).__getitems__(next(iter(sampler))))
    return dict(views=augment(crops, seeds), idx=idx)


def test_device_augmentation_same_batch_in_two_processes(tmp_path):
    """The device half of the augmentation depends on (seed, epoch, sample) only: two gloo ranks' shards are one process's batch."""
    from PIL import Image
    rng = torch.Generator().manual_seed(0)
    (tmp_path / "world").mkdir()
    for i in range(12):
        Image.fromarray(torch.randint(0, 256, (30, 40, 3), generator=rng, dtype=torch.uint8).numpy()).save(tmp_path / "world" / f"im{i:02d}.png")
    mp.spawn(_views_worker, args=(2, str(tmp_path / "pg"), str(tmp_path), str(tmp_path / "world")), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"views{r}.pt", weights_only=True) for r in (0, 1))
    one = _device_views(tmp_path / "world")
    assert torch.equal(torch.cat([r0["idx"], r1["idx"]]), one["idx"]) and len(r0["idx"]) == 4
    assert torch.allclose(torch.cat([r0["views"], r1["views"]]), one["views"], atol=1e-6)
    assert not torch.allclose(_device_views(tmp_path / "world", epoch=2)["views"], one["views"])   # another epoch, other views


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


# ------------------------------------------------------------------ torchrun on CUDA: backends and devices
# NCCL's rule: a collective over an NCCL group takes CUDA tensors only ("No backend type associated with device type
# cpu" otherwise). The package keeps every collective's tensor on the rank's device and creates the group with
# "cpu:gloo,cuda:nccl", so a CPU tensor (a barrier, a small count) still has a backend.
import os
import sys
from pathlib import Path

import pytest

import latteclip_nb.experiment as E
import latteclip_nb.train as T


def test_init_distributed_gives_both_device_types_a_backend(monkeypatch):
    """Defect: the group was created with "nccl" alone, so _same_size's CPU tensor had no backend on a GPU box."""
    seen = {}
    monkeypatch.setenv("WORLD_SIZE", "2"); monkeypatch.setenv("RANK", "1"); monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: seen.setdefault("set_device", i))
    monkeypatch.setattr(E.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(E, "_join_group", lambda rank, world, backend: seen.setdefault("backend", backend))   # the rendezvous
    rank, world, device = E._init_distributed(torch.device("cuda"))
    assert seen == {"set_device": 1, "backend": "cpu:gloo,cuda:nccl"}
    assert device == torch.device("cuda", 1)


def test_same_size_hands_the_collective_a_tensor_on_the_process_device(monkeypatch):
    """Defect: the micro-batch size was all-reduced as a CPU tensor whatever the process's device."""
    seen = []

    class Stop(Exception): pass

    def fake_all_reduce(t, op=None):
        seen.append(t.device); raise Stop
    monkeypatch.setattr(T.dist, "all_reduce", fake_all_reduce)
    with pytest.raises(Stop):
        T._same_size((torch.zeros(3, 1), torch.zeros(3)), 2, torch.device("meta"))  # a stand-in for cuda:N
    assert seen == [torch.device("meta")]


def test_make_captioner_asks_for_the_rank_device(monkeypatch):
    """Defect: every rank's in-process LLaVA landed on cuda:0 (no device was passed)."""
    import latteclip_nb.captions as C
    asked = []
    monkeypatch.setattr(C, "build_captioner", lambda *a, **kw: asked.append(kw.get("device")) or "captioner")
    for local in (0, 1):
        monkeypatch.setenv("WORLD_SIZE", "2"); monkeypatch.setenv("RANK", str(local)); monkeypatch.setenv("LOCAL_RANK", str(local))
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "set_device", lambda i: None)
        monkeypatch.setattr(E.dist, "is_initialized", lambda: False)
        monkeypatch.setattr(E, "_join_group", lambda *a, **kw: None)
        device = E._init_distributed(torch.device("cuda"))[2]
        assert E.make_captioner(E.ExperimentConfig(dataset="shapes", captioner="llava"), None, device) == "captioner"
    assert asked == [torch.device("cuda", 0), torch.device("cuda", 1)]


_COLLECTIVES = ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor",
                "all_gather_object", "broadcast_object_list")


def _recording_worker(rank, world, init_file, d):
    sys.path.insert(0, str(Path(__file__).parent))
    from test_train import DDP_CFG, run
    from latteclip_nb.train import TrainConfig
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    devices = []
    for name in _COLLECTIVES:
        real = getattr(dist, name)

        def wrapped(*a, _real=real, **kw):
            for x in list(a) + list(kw.values()):
                for t in (x if isinstance(x, (list, tuple)) else [x]):
                    if isinstance(t, torch.Tensor): devices.append(str(t.device))
            return _real(*a, **kw)
        setattr(dist, name, wrapped)
    try:
        res = run(Path(d) / "ddp", TrainConfig(method="latteclip", **DDP_CFG), Path(d) / "world", device="cpu")
        torch.save({"devices": devices, "device": str(next(res.model.parameters()).device)}, f"{d}/rec{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_every_collective_tensor_is_on_the_trainer_device(tmp_path):
    sys.path.insert(0, str(Path(__file__).parent))
    from test_train import tiny_world
    tiny_world(tmp_path / "world")
    mp.spawn(_recording_worker, args=(2, str(tmp_path / "pg"), str(tmp_path)), nprocs=2, join=True)
    for r in (0, 1):
        rec = torch.load(tmp_path / f"rec{r}.pt", weights_only=True)
        assert len(rec["devices"]) > 10                 # the micro-batch sizes, prototypes, features and epoch counts
        assert set(rec["devices"]) == {rec["device"]}


def _full_disk_worker(rank, world, init_file, d):
    import errno
    sys.path.insert(0, str(Path(__file__).parent))
    from test_train import DDP_CFG, run
    import latteclip_nb.train as T
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    def full(obj, path): raise OSError(errno.ENOSPC, f"no space left on the device writing {path}")
    T.atomic_torch_save = full          # only rank 0 writes checkpoints: only its write fails
    try:
        run(Path(d) / "ddp", T.TrainConfig(method="flyp_pl", **{**DDP_CFG, "ckpt_every": 1}), Path(d) / "world", device="cpu")
        outcome = "finished"
    except OSError as e: outcome = str(e)
    Path(d, f"outcome{rank}.txt").write_text(outcome)
    dist.barrier()                      # both ranks stopped: neither tears the group down while the other still uses it
    dist.destroy_process_group()


def test_a_failed_checkpoint_on_rank_0_stops_every_rank(tmp_path):
    """Rank 0 cannot write its checkpoint: both ranks stop with one line (none is left waiting at a barrier)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from test_train import tiny_world
    tiny_world(tmp_path / "world")
    ctx = mp.start_processes(_full_disk_worker, args=(2, str(tmp_path / "pg"), str(tmp_path)), nprocs=2, join=False)
    deadline = time.time() + 300
    try:
        while not ctx.join(timeout=5):
            assert time.time() < deadline, "a rank is still waiting after rank 0's checkpoint failed"
    finally:
        for p in ctx.processes:
            if p.is_alive(): p.kill()
    r0, r1 = (Path(tmp_path, f"outcome{r}.txt").read_text() for r in (0, 1))
    assert "no space left" in r0 and "training stopped at step 1" in r0, r0
    assert "rank 0 could not write the checkpoint" in r1 and "step 1" in r1, r1


# ------------------------------------------------------------------ devices of the ranks, sharded evaluation
def test_rank_device_keeps_an_explicit_device(monkeypatch):
    """Defect: an explicit device='cpu' became cuda:LOCAL_RANK under a process group, and mp.spawn ranks shared cuda:0."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert T.rank_device("cpu", 1, 2) == torch.device("cpu")
    assert T.rank_device("cuda:0", 1, 2) == torch.device("cuda", 0)
    assert T.rank_device("cuda", 1, 2) == torch.device("cuda", 1)        # mp.spawn: no LOCAL_RANK, the spawn index
    assert T.rank_device(None, 3, 4) == torch.device("cuda", 1)          # 4 ranks over 2 GPUs of this node
    assert T.rank_device("cuda", 0, 1) == torch.device("cuda")           # one process: as given
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert T.rank_device("cuda", 5, 8) == torch.device("cuda", 0)        # torchrun: the launcher's local rank


def _eval_worker(rank, world, init_file, d, split, W):
    sys.path.insert(0, str(Path(__file__).parent))
    from test_train import tiny_clip
    from latteclip_nb.evaluate import evaluate
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model, _, eval_tf, _ = tiny_clip()
        seen, encode = [], model.encode_image
        model.encode_image = lambda x, **kw: seen.append(len(x)) or encode(x, **kw)
        r = evaluate(model, eval_tf, split, W, batch_size=4, shard=True)
        torch.save({"preds": r["preds"], "top1": r["top1"], "unreadable": r["unreadable"], "encoded": sum(seen)},
                   f"{d}/eval{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_sharded_evaluation_equals_one_process(tmp_path):
    """Two gloo ranks each encode half of the test images; both get the single-process predictions."""
    sys.path.insert(0, str(Path(__file__).parent))
    from test_train import tiny_clip, tiny_world
    from latteclip_nb.evaluate import evaluate
    split = tiny_world(tmp_path / "world", n=13)[0]                    # 13: shards of 6 and 7 images
    (split.root / split.ids[8]).write_bytes(b"not an image")           # one unreadable image, in rank 1's shard
    model, _, eval_tf, _ = tiny_clip()
    W = F.normalize(torch.randn(3, model.visual.output_dim, generator=torch.Generator().manual_seed(0)), dim=-1)
    ref = evaluate(model, eval_tf, split, W, batch_size=4)
    mp.spawn(_eval_worker, args=(2, str(tmp_path / "pg"), str(tmp_path), split, W), nprocs=2, join=True)
    for r in (0, 1):
        got = torch.load(tmp_path / f"eval{r}.pt", weights_only=False)
        assert torch.equal(torch.as_tensor(got["preds"]), torch.as_tensor(ref["preds"]))
        assert got["top1"] == ref["top1"] and got["unreadable"] == ref["unreadable"] == 1
    # each rank encoded only its own share (rank 1's share holds the unreadable image)
    assert [torch.load(tmp_path / f"eval{r}.pt", weights_only=False)["encoded"] for r in (0, 1)] == [6, 6]


# ------------------------------------------------------------------ one-process methods under a launcher
def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); return s.getsockname()[1]


def _zeroshot_worker(rank, world, port, data_root, out, cache):
    import json
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), LATTECLIP_CACHE=cache)
    torch.set_num_threads(1)
    import latteclip_nb.experiment as E
    written, real_write = [], E.atomic_write_json
    E.atomic_write_json = lambda path, obj, *a, **kw: written.append(Path(path).name) or real_write(path, obj, *a, **kw)
    cfg = E.ExperimentConfig(dataset="dtd", data_root=data_root, method="zeroshot", model="latte-tiny", pretrained="none",
                             num_workers=0, out_dir=out)
    m = E.run_experiment(cfg)          # env:// group created from the variables above, as under torchrun
    Path(f"{out}-rank{rank}.json").write_text(json.dumps(dict(metrics=m, written=written, group_left=dist.is_initialized())))


def test_one_process_methods_run_on_rank_0_alone(tmp_path, monkeypatch):
    """zeroshot under 2 gloo ranks (env://): rank 0 runs it and writes metrics.json; rank 1 returns at once, writing
    nothing; the result equals a single-process run; no process group is left behind."""
    import json
    from latteclip_nb.data import make_fake_dataset
    from latteclip_nb.experiment import ExperimentConfig, run_experiment
    make_fake_dataset(tmp_path / "data", "dtd", n_train=3, n_val=1, n_test=2)
    out, cache = tmp_path / "ddp", str(tmp_path / "cache")
    mp.spawn(_zeroshot_worker, args=(2, _free_port(), str(tmp_path / "data"), str(out), cache), nprocs=2, join=True)
    r0, r1 = (json.loads(Path(f"{out}-rank{r}.json").read_text()) for r in (0, 1))
    assert r1["metrics"] == {} and r1["written"] == [] and not r0["group_left"] and not r1["group_left"]
    assert "metrics.json" in r0["written"] and json.loads((out / "metrics.json").read_text())["top1"] == r0["metrics"]["top1"]
    monkeypatch.setenv("LATTECLIP_CACHE", cache)
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE"): monkeypatch.delenv(k, raising=False)
    one = run_experiment(ExperimentConfig(dataset="dtd", data_root=str(tmp_path / "data"), method="zeroshot", model="latte-tiny",
                                          pretrained="none", num_workers=0, out_dir=str(tmp_path / "one")))
    for k in ("top1", "zeroshot_top1", "per_class", "confusion", "n_test", "n_classes"):
        if k in one: assert r0["metrics"][k] == one[k], k
