"""Training across machines: two torchrun nodes on one machine (one process each, gloo), with node-local and with
shared out-dirs and caches, equal one process over the same global batch; every node resumes at the same step or none."""
import json, logging, os, shutil, subprocess, sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).parent))
from test_distributed import _free_port

BIN = Path(sys.executable).parent
# a short LatteCLIP run on the shapes world: 80 training images, 3 steps of a global batch of 32
ARGS = ["--dataset", "shapes", "--method", "latteclip", "--max-steps", "3", "--batch-size", "32", "--data-fraction", "0.05",
        "--num-workers", "0", "--no-report"]


def _env(cache):
    return {**os.environ, "LATTECLIP_CACHE": str(cache), "OMP_NUM_THREADS": "1"}


def _two_nodes(tmp, caches, outs):
    """`torchrun --nnodes 2 --node_rank k --nproc_per_node 1 --rdzv_backend c10d` twice, as on two machines; (rc, log) per node."""
    port, procs = _free_port(), []
    for k in (0, 1):
        log = open(tmp / f"node{k}.log", "w")
        cmd = [str(BIN / "torchrun"), "--nnodes", "2", "--node_rank", str(k), "--nproc_per_node", "1", "--rdzv_backend", "c10d",
               "--rdzv_endpoint", f"127.0.0.1:{port}", "--no-python", str(BIN / "latteclip-train"), *ARGS, "--out-dir", str(outs[k])]
        procs.append((subprocess.Popen(cmd, env=_env(caches[k]), cwd=tmp, stdout=log, stderr=subprocess.STDOUT), log))
    out = []
    for p, log in procs:
        try: rc = p.wait(timeout=600)
        finally:
            if p.poll() is None: p.kill()
            log.close()
        out.append((rc, Path(log.name).read_text()))
    return out


def _captions(store):
    """The distinct (kind, item, prompt, model) keys in a caption store."""
    return {(r["kind"], r["item_id"], r["prompt"], r["model"]) for f in Path(store).glob("captions-*.jsonl")
            for r in map(json.loads, f.read_text().splitlines())}


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The same run in one process (same global batch): its metrics and its caption store."""
    root = tmp_path_factory.mktemp("one")
    r = subprocess.run([str(BIN / "latteclip-train"), *ARGS, "--out-dir", str(root / "out")], env=_env(root / "cache"),
                       cwd=root, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads((root / "out" / "metrics.json").read_text()), _captions(root / "cache" / "captions" / "shapes")


def _same_metrics(m, one):
    assert m["n_train"] == one["n_train"] == 80 and m["history"][-1]["step"] == one["history"][-1]["step"] == 3
    assert m["c_zs_train_accuracy"] == one["c_zs_train_accuracy"] and m["zeroshot_top1"] == one["zeroshot_top1"]
    assert abs(m["top1"] - one["top1"]) <= 0.5
    assert all(abs(a - b) <= 0.5 for a, b in zip(m["per_class"], one["per_class"]))
    for a, b in zip(m["history"], one["history"]):
        assert abs(a["loss"] - b["loss"]) < 1e-4 and a["agreement"] == b["agreement"], (a, b)


def test_two_nodes_with_node_local_folders(tmp_path, one_process):
    """Each node has its own cache and out-dir (no shared filesystem): c_zs comes from rank 0, every node's store gets
    every shard's captions, rank 0's node alone holds metrics.json and the export, and the other says where they are."""
    one, one_captions = one_process
    caches, outs = [tmp_path / f"cache{k}" for k in (0, 1)], [tmp_path / f"out{k}" for k in (0, 1)]
    (rc0, log0), (rc1, log1) = _two_nodes(tmp_path, caches, outs)
    assert rc0 == 0 and rc1 == 0, (log0[-3000:], log1[-3000:])
    holders = [k for k in (0, 1) if (outs[k] / "metrics.json").exists()]
    assert len(holders) == 1, holders                       # rank 0's node: which one is the rendezvous's choice
    k0, k1 = holders[0], 1 - holders[0]
    _same_metrics(json.loads((outs[k0] / "metrics.json").read_text()), one)
    assert (outs[k0] / "train" / "classifier" / "classifier.json").exists()
    assert not (outs[k1] / "train" / "classifier").exists() and not (outs[k1] / "figures").exists()
    other_log = (log0, log1)[k1]
    assert "written by rank 0 on node 0" in other_log and str(outs[k0]) in other_log, other_log[-2000:]
    # each node's store holds all the captions (its own shard and the other's), as one process's does
    for k in (0, 1): assert _captions(caches[k] / "captions" / "shapes") == one_captions
    assert not [p for k in (0, 1) for p in (*caches[k].rglob(".latteclip-node-*"), *outs[k].rglob(".latteclip-node-*"))]
    # a second run of both nodes finds the finished run (rank 0's answer) and changes nothing
    before = (outs[k0] / "metrics.json").read_bytes()
    (rc0, log0), (rc1, log1) = _two_nodes(tmp_path, caches, outs)
    assert rc0 == 0 and rc1 == 0, (log0[-3000:], log1[-3000:])
    assert (outs[k0] / "metrics.json").read_bytes() == before and not (outs[k1] / "metrics.json").exists()


def test_two_nodes_with_shared_folders(tmp_path, one_process):
    """Both nodes see one cache and one out-dir (a shared filesystem): one store, one metrics.json, equal to one process."""
    one, one_captions = one_process
    (rc0, log0), (rc1, log1) = _two_nodes(tmp_path, [tmp_path / "cache"] * 2, [tmp_path / "out"] * 2)
    assert rc0 == 0 and rc1 == 0, (log0[-3000:], log1[-3000:])
    _same_metrics(json.loads((tmp_path / "out" / "metrics.json").read_text()), one)
    assert "written by rank 0" not in log0 + log1
    assert _captions(tmp_path / "cache" / "captions" / "shapes") == one_captions
    assert not list(tmp_path.rglob(".latteclip-node-*"))


# ------------------------------------------------------------------ resuming: every node at the same step, or none
def _node_worker(rank, world, init_file, d, phase):
    """One "node" of two (its own LOCAL_RANK 0, its own out-dir) running `train`: stopped, resumed, or refused."""
    from test_train import DDP_CFG, run
    from latteclip_nb.train import TrainConfig
    os.environ.update(LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", GROUP_RANK=str(rank))
    torch.set_num_threads(1)
    seen = []
    handler = logging.Handler(); handler.emit = lambda rec: seen.append(rec.getMessage())
    logging.getLogger("latteclip_nb").addHandler(handler); logging.getLogger("latteclip_nb").setLevel(logging.INFO)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    cfg = TrainConfig(method="latteclip", **DDP_CFG, ckpt_every=1)
    try:
        res = run(Path(d) / f"node{rank}", cfg, Path(d) / "world", stop_at=2 if phase == "stop" else None)
        out = dict(step=res.step, history=res.history, classifier=res.classifier, export=res.classifier_path is not None)
    except ValueError as e: out = dict(error=str(e))
    finally: dist.destroy_process_group()
    out["resumed"] = [m for m in seen if m.startswith("resuming")]
    torch.save(out, f"{d}/{phase}{rank}.pt")


def _spawn(d, phase):
    (d / "pg").unlink(missing_ok=True)
    mp.spawn(_node_worker, args=(2, str(d / "pg"), str(d), phase), nprocs=2, join=True)
    return [torch.load(d / f"{phase}{r}.pt", weights_only=False) for r in (0, 1)]


def test_node_local_checkpoints_resume_at_one_step(tmp_path):
    """Node-local out-dirs: each node keeps a copy of the checkpoint; with both copies at step 2 both ranks resume at
    step 2 and end as an uninterrupted run; with one copy missing every rank stops with one line and nothing moves;
    once finished, a rerun loads rank 0's export on every rank (the other node has none) instead of training."""
    from test_train import DDP_CFG, run, strip, tiny_world
    from latteclip_nb.train import TrainConfig
    tiny_world(tmp_path / "world")
    stopped = _spawn(tmp_path, "stop")
    assert [s["step"] for s in stopped] == [2, 2]
    ckpts = [tmp_path / f"node{r}" / "checkpoint.pt" for r in (0, 1)]
    saved = [torch.load(c, weights_only=True) for c in ckpts]
    assert [s["state"]["step"] for s in saved] == [2, 2]   # rank 1's node has its own copy, with rank 0's generator states
    assert torch.equal(saved[0]["rng"]["torch"], saved[1]["rng"]["torch"])
    # one node lost its copy (a node-local disk replaced, a crash between the two writes): nobody resumes
    shutil.move(ckpts[1], tmp_path / "aside.pt")
    refused = _spawn(tmp_path, "uneven")
    for r in refused:
        assert "different steps" in r.get("error", "") and "rank 0's copy: step 2" in r["error"] and "rank 1's copy: none" in r["error"], r
        assert "\n" not in r["error"] and r["resumed"] == []
    assert torch.load(ckpts[0], weights_only=True)["state"]["step"] == 2 and not ckpts[1].exists()   # nothing was touched
    shutil.move(tmp_path / "aside.pt", ckpts[1])
    resumed = _spawn(tmp_path, "resume")
    for r in resumed: assert len(r["resumed"]) == 1 and " at step 2/" in r["resumed"][0], r["resumed"]
    full = run(tmp_path / "full", TrainConfig(method="latteclip", **DDP_CFG, ckpt_every=1), tmp_path / "world")
    assert resumed[0]["step"] == resumed[1]["step"] == full.step
    assert torch.equal(resumed[0]["classifier"], resumed[1]["classifier"])
    assert torch.allclose(resumed[0]["classifier"], full.classifier, atol=1e-5)
    for a, b in zip(strip(resumed[0]["history"]), strip(full.history)):
        assert abs(a["loss"] - b["loss"]) < 1e-5 and a["agreement"] == b["agreement"]
    assert not any(c.exists() for c in ckpts)   # each node removed its copy after the export
    assert (tmp_path / "node0" / "classifier" / "classifier.json").exists() and not (tmp_path / "node1" / "classifier").exists()
    # run again: rank 0's node holds the finished export, rank 1's does not; both load rank 0's, neither trains
    again = _spawn(tmp_path, "again")
    for r in again:
        assert r["resumed"] == [] and r["step"] == full.step and r["export"] and torch.equal(r["classifier"], resumed[0]["classifier"])
    assert not any(c.exists() for c in ckpts) and not (tmp_path / "node1" / "classifier").exists()
