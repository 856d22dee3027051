"""Training: interrupted-and-resumed runs equal uninterrupted ones; two gloo processes equal one process."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

torch.set_num_threads(1)

from latteclip_nb.captions import Texts
from latteclip_nb.clip import load_clip
from latteclip_nb.data import Split
from latteclip_nb.train import TrainConfig, load_classifier, train

NAMES = ["red", "green", "blue"]


def tiny_world(root, n=24, seed=0):
    "A Split of n generated 32-px PNGs in 3 colour classes, the class texts, descriptions and c_zs (some wrong)."
    root = Path(root); root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    ids, labels = [], []
    for i in range(n):
        y = i % 3
        px = np.clip(np.eye(3)[y] * 200 + rng.normal(0, 40, (32, 32, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(px).save(root / f"im{i:02d}.png"); ids.append(f"im{i:02d}.png"); labels.append(y)
    split = Split(root=root, ids=ids, labels=labels, classnames=NAMES)
    class_texts = [f"a photo of a {c}." for c in NAMES]
    group = [f"{c} things, mostly {c}" for c in NAMES] + [f"several {c} squares" for c in NAMES] + ["red again"]
    texts = Texts(image=[f"a {NAMES[y]} square number {i}" for i, y in enumerate(labels)], group=group,
                  group_label=torch.tensor([0, 1, 2, 0, 1, 2, 0]),
                  group_of=torch.tensor([i % 3 if i % 4 else -1 for i in range(n)]))
    c_zs = torch.tensor(labels); c_zs[::5] = (c_zs[::5] + 1) % 3
    return split, class_texts, texts, c_zs


def tiny_clip(seed=0):
    torch.manual_seed(seed)
    return load_clip("latte-tiny", pretrained=None, device="cpu")


def run(out, cfg, world_dir, n=24, **kw):
    split, class_texts, texts, c_zs = tiny_world(world_dir, n=n)
    model, train_tf, _, tok = tiny_clip()
    return train(model, tok, train_tf, split, class_texts, cfg, out, c_zs=c_zs, texts=texts, **kw)


def same_weights(a, b, atol=0.0):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.allclose(sa[k], sb[k], atol=atol, rtol=0) for k in sa)


def strip(history):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in history]


CONFIGS = {
    "latteclip": dict(method="latteclip"),
    "latteclip-accum-workers-own-fast": dict(method="latteclip", grad_accum=2, num_workers=2, group_sampling="own",
                                              text_grad="fast", momentum=0.5, ckpt_every=2),
    "flyp_pl-online": dict(method="flyp_pl", pseudo="online"),
    "oracle-max_steps": dict(method="oracle", max_steps=5),
    "latteclip-device-augment-image-cache": dict(method="latteclip", augment="device", image_cache=True, num_workers=1),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_resume_equals_uninterrupted(tmp_path, name, monkeypatch):
    monkeypatch.setenv("LATTECLIP_CACHE", str(tmp_path / "cache"))   # the file-hash memo and the image cache
    cfg = TrainConfig(epochs=3, warmup_steps=2, lr=1e-4, batch_size=8, log_every=1, model_name="latte-tiny", **CONFIGS[name])
    full = run(tmp_path / "full", cfg, tmp_path / "world")
    # interrupted twice: mid-epoch (step 2 of 3) and at an epoch boundary (step 3 -> resumes into epoch 2 at once)
    part = run(tmp_path / "part", cfg, tmp_path / "world", stop_at=2)
    assert part.classifier_path is None and part.step == 2 and (tmp_path / "part" / "checkpoint.pt").exists()
    part = run(tmp_path / "part", cfg, tmp_path / "world", stop_at=3)
    assert part.step == 3 and len(part.history) == 0
    resumed = run(tmp_path / "part", cfg, tmp_path / "world")
    assert resumed.step == full.step == min(9, cfg.max_steps or 9)
    assert strip(resumed.history) == strip(full.history) and len(full.history) == (2 if cfg.max_steps else 3)
    assert torch.equal(resumed.classifier, full.classifier)
    assert same_weights(resumed.model, full.model)
    if cfg.method == "latteclip": assert torch.equal(resumed.bank.prototypes, full.bank.prototypes)
    steps = [json.loads(line)["step"] for line in (tmp_path / "part" / "steps.jsonl").read_text().splitlines()]
    assert steps == list(range(1, full.step + 1))     # no step logged twice across the interruptions
    assert not (tmp_path / "part" / "checkpoint.pt").exists()   # removed after the final export


@pytest.mark.parametrize("drop_last", [False, True])
def test_partial_last_batch_resume(tmp_path, drop_last):
    """22 images at batch 8: ceil -> 3 steps an epoch (8, 8, 6), floor -> 2; an interruption just before and just
    after the partial batch resumes exactly."""
    cfg = TrainConfig(epochs=2, warmup_steps=1, lr=1e-4, batch_size=8, log_every=1, model_name="latte-tiny", drop_last=drop_last)
    spe = 2 if drop_last else 3
    full = run(tmp_path / "full", cfg, tmp_path / "world", n=22)
    assert full.step == 2 * spe and [r["step"] for r in full.history] == [spe, 2 * spe]
    for stop in (spe - 1, spe + spe - 1):   # before the last batch of epoch 1, before the last batch of epoch 2
        run(tmp_path / "part", cfg, tmp_path / "world", n=22, stop_at=stop)
    resumed = run(tmp_path / "part", cfg, tmp_path / "world", n=22)
    assert resumed.step == full.step and strip(resumed.history) == strip(full.history)
    assert torch.equal(resumed.bank.prototypes, full.bank.prototypes) and same_weights(resumed.model, full.model)


def test_resume_refuses_another_config(tmp_path):
    cfg = TrainConfig(epochs=2, warmup_steps=1, lr=1e-4, batch_size=8, model_name="latte-tiny")
    run(tmp_path / "r", cfg, tmp_path / "world", stop_at=1)
    other = TrainConfig(epochs=2, warmup_steps=1, lr=1e-4, batch_size=8, alpha=0.5, model_name="latte-tiny")
    with pytest.raises(ValueError, match="alpha: 0.99 -> 0.5"):
        run(tmp_path / "r", other, tmp_path / "world")
    # workers and logging are free to change
    same = TrainConfig(epochs=2, warmup_steps=1, lr=1e-4, batch_size=8, model_name="latte-tiny", num_workers=1, log_every=3)
    assert run(tmp_path / "r", same, tmp_path / "world").step == 6


def test_input_errors(tmp_path):
    split, class_texts, texts, c_zs = tiny_world(tmp_path / "world")
    model, train_tf, _, tok = tiny_clip()
    cfg = TrainConfig(epochs=1, batch_size=8)
    with pytest.raises(ValueError, match="needs c_zs"):
        train(model, tok, train_tf, split, class_texts, cfg, tmp_path / "a", texts=texts)
    with pytest.raises(ValueError, match="texts.image has 0"):
        train(model, tok, train_tf, split, class_texts, cfg, tmp_path / "a", c_zs=c_zs,
              texts=Texts([], texts.group, texts.group_label, texts.group_of))
    with pytest.raises(ValueError, match="larger than the 24"):
        train(model, tok, train_tf, split, class_texts, TrainConfig(epochs=1, batch_size=32, drop_last=True), tmp_path / "a",
              c_zs=c_zs, texts=texts)


def test_export_round_trip(tmp_path):
    cfg = TrainConfig(method="flyp_pl", pseudo="fixed", epochs=1, warmup_steps=1, lr=1e-4, batch_size=8, model_name="latte-tiny")
    res = run(tmp_path / "r", cfg, tmp_path / "world")
    clf = load_classifier(res.classifier_path)
    split = tiny_world(tmp_path / "world")[0]
    _, _, eval_tf, _ = tiny_clip()
    x = torch.stack([eval_tf(Image.open(p).convert("RGB")) for p in split.paths])
    with torch.no_grad():
        v = res.model.eval().encode_image(x, normalize=True)
    assert torch.equal(clf.predict(split.paths), (v @ res.classifier.T).argmax(1))


# ------------------------------------------------------------------ DDP: 2 gloo processes on CPU
DDP_CFG = dict(epochs=2, warmup_steps=1, lr=1e-4, batch_size=8, log_every=1, model_name="latte-tiny")
# latteclip also exercises gradient accumulation (no_sync) and keep_checkpoints (a collective save at the end)
DDP_EXTRA = dict(latteclip=dict(grad_accum=2, keep_checkpoints=1), flyp_pl=dict())


def _ddp_worker(rank, world, init_file, d, method, n=24):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        res = run(Path(d) / f"ddp-{method}", TrainConfig(method=method, **DDP_CFG, **DDP_EXTRA[method]), Path(d) / "world", n=n)
        torch.save({"classifier": res.classifier, "model": res.model.state_dict(), "history": res.history,
                    "protos": None if res.bank is None else res.bank.prototypes}, f"{d}/{method}-rank{rank}.pt")
    finally:
        dist.destroy_process_group()


# flyp_pl also runs on 20 images: 3 steps an epoch, the last of 4 images (2 per process)
@pytest.mark.parametrize("method,n", [("latteclip", 24), ("flyp_pl", 24), ("flyp_pl", 20)])
def test_two_gloo_processes_match_one(tmp_path, method, n):
    tiny_world(tmp_path / "world", n=n)
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "pg"), str(tmp_path), method, n), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"{method}-rank{r}.pt", weights_only=True) for r in (0, 1))
    # both ranks end with identical prototypes / classifiers and weights
    assert torch.equal(r0["classifier"], r1["classifier"])
    if method == "latteclip": assert torch.equal(r0["protos"], r1["protos"])
    assert all(torch.equal(r0["model"][k], r1["model"][k]) for k in r0["model"])
    # and they equal one process over the same global batches (up to float summation order)
    single = run(tmp_path / f"single-{method}", TrainConfig(method=method, **DDP_CFG, **DDP_EXTRA[method]), tmp_path / "world", n=n)
    assert single.step == 2 * -(-n // 8) and r0["history"][-1]["step"] == single.step
    assert torch.allclose(r0["classifier"], single.classifier, atol=1e-5)
    assert all(torch.allclose(r0["model"][k], v, atol=1e-5) for k, v in single.model.state_dict().items())
    for a, b in zip(r0["history"], single.history):
        assert a["agreement"] == b["agreement"] and a["label_accuracy"] == b["label_accuracy"] and abs(a["loss"] - b["loss"]) < 1e-5
    # only rank 0 wrote the export
    assert (tmp_path / f"ddp-{method}" / "classifier" / "classifier.json").exists()
    if method == "latteclip":   # the per-sample record merged from both processes is the single process's record
        from safetensors.torch import load_file
        a, b = load_file(str(tmp_path / "ddp-latteclip" / "samples.safetensors")), load_file(str(tmp_path / "single-latteclip" / "samples.safetensors"))
        assert (a["epoch"] == 1).all() and torch.equal(a["epoch"], b["epoch"]) and torch.equal(a["c_ft"], b["c_ft"])
        assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in ("weights_zs", "weights_ft", "prototypes_start", "prototypes_end"))


def test_released_loader_resume(tmp_path):
    """The released loader (released_workers=3): 22 images at batch 8 make ceil(ceil(22 / 8) / 3) x 3 = 3 full batches
    an epoch, drawing past the end of the epoch's permutation; interrupted mid-epoch it resumes exactly."""
    cfg = TrainConfig(epochs=2, warmup_steps=1, lr=1e-4, batch_size=8, log_every=1, model_name="latte-tiny", released_workers=3)
    full = run(tmp_path / "full", cfg, tmp_path / "world", n=22)
    assert full.step == 6 and [r["step"] for r in full.history] == [3, 6]
    for stop in (2, 4):
        run(tmp_path / "part", cfg, tmp_path / "world", n=22, stop_at=stop)
    resumed = run(tmp_path / "part", cfg, tmp_path / "world", n=22)
    assert resumed.step == full.step and strip(resumed.history) == strip(full.history)
    assert torch.equal(resumed.bank.prototypes, full.bank.prototypes) and same_weights(resumed.model, full.model)
    # the same run under the plain rule is another run: its checkpoint is not resumed with the released loader
    run(tmp_path / "plain", TrainConfig(**{**cfg.__dict__, "released_workers": 0}), tmp_path / "world", n=22, stop_at=1)
    with pytest.raises(ValueError, match="released_workers: 0 -> 3"):
        run(tmp_path / "plain", cfg, tmp_path / "world", n=22)


def test_released_mixer_batch_refused_in_one_line(tmp_path):
    """mixer='released' runs only with micro-batches of the embedding width (64 for latte-tiny), every one of them full."""
    base = dict(epochs=1, warmup_steps=1, lr=1e-4, model_name="latte-tiny", mixer="released")
    for cfg, n, words in [(TrainConfig(batch_size=8, **base), 70, ["D=64", "= 8", "set batch_size=64", "mixer='eq1'"]),
                          (TrainConfig(batch_size=64, grad_accum=2, **base), 130, ["= 32", "set batch_size=128"]),
                          # a split smaller than one batch of the width: no batch_size can help, and the line says so
                          (TrainConfig(batch_size=8, **base), 24, ["only 24 images", "fewer than one batch of 64", "mixer='eq1'"]),
                          (TrainConfig(batch_size=64, **base), 70, ["every batch full", "last batch of 6", "released_workers"])]:
        with pytest.raises(ValueError) as e: run(tmp_path / "a", cfg, tmp_path / f"w{n}", n=n)
        assert all(w in str(e.value) for w in words) and "\n" not in str(e.value), str(e.value)
        assert not (tmp_path / "a" / "checkpoint.pt").exists()
    res = run(tmp_path / "ok", TrainConfig(batch_size=64, released_workers=1, max_steps=1, **base), tmp_path / "w70", n=70)
    assert res.step == 1 and torch.isfinite(res.bank.prototypes).all()
# ------------------------------------------------------------------ workers by default, the speed in the log, deterministic kernels
def test_auto_workers_speed_line_and_deterministic_switch(tmp_path, monkeypatch, caplog):
    """num_workers=-1 takes this process's share of the cores; each epoch's log line has the step and loader rates;
    deterministic=True switches deterministic kernels on before the first step."""
    import logging, os
    import latteclip_nb.train as T
    from latteclip_nb.experiment import ExperimentConfig, config_parser
    assert ExperimentConfig().num_workers == -1 and config_parser().parse_args([]).num_workers == -1
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})           # one core: no worker beside the loop
    used = []
    real_loader = T.DataLoader
    monkeypatch.setattr(T, "DataLoader", lambda *a, **kw: used.append(kw["num_workers"]) or real_loader(*a, **kw))
    seen = []
    real_step = T.Trainer.step
    def step(self, *a, **kw):
        seen.append(torch.are_deterministic_algorithms_enabled())
        return real_step(self, *a, **kw)
    monkeypatch.setattr(T.Trainer, "step", step)
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    was = torch.are_deterministic_algorithms_enabled()
    caplog.set_level(logging.INFO, logger="latteclip_nb")
    try:
        cfg = TrainConfig(method="flyp_pl", epochs=1, warmup_steps=1, lr=1e-4, batch_size=8, num_workers=-1, deterministic=True)
        res = run(tmp_path / "run", cfg, tmp_path / "world")
    finally:
        torch.use_deterministic_algorithms(was)
    assert used == [0] and res.step == 3 and seen == [True] * 3 and os.environ.get("CUBLAS_WORKSPACE_CONFIG") == ":4096:8"
    line = next(r.getMessage() for r in caplog.records if "flyp_pl epoch 1/1" in r.getMessage())
    assert " steps/s, " in line and " images/s; loader " in line and "images/s (0 workers), waiting for images" in line, line
    with pytest.raises(ValueError, match="num_workers=-2"):
        TrainConfig(num_workers=-2)
