"""Caption store: resume after kill -9, torn records, sharding, and the latteclip-caption command end to end."""
import json, os, signal, subprocess, sys, time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from latteclip_nb.captions import (CaptionStore, WorkItem, caption_work, describe_dataset, record_key, shard_file,
                                   shard_of)
from latteclip_nb.collage import make_collage
from latteclip_nb.core import file_keys
from latteclip_nb.data import Split, get_spec, load_image

HERE = Path(__file__).resolve().parent
COLOURS = [(200, 30, 30), (30, 180, 60), (40, 40, 210)]
CLASSNAMES = ["red rose", "green leaf", "blue iris"]


class PixelCaptioner:
    """Deterministic stand-in for an LMM whose answer is computed from the pixels (mean colour, size)."""
    def __init__(self, model_id="pixel-test", delay=0.0):
        self.model_id, self.delay, self.seen = model_id, delay, 0

    def describe(self, images, prompts):
        time.sleep(self.delay)
        self.seen += len(images)
        return [f"{p.split()[2]} mean {np.asarray(im, dtype=float).mean((0, 1)).round(2).tolist()} size {im.size}"
                for im, p in zip(images, prompts)]


def make_images(root: Path, n: int = 16, seed: int = 0) -> list[int]:
    """Write `n` small striped images of three colours under `root`; returns their true classes."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    truth = [i % 3 for i in range(n)]
    for i, y in enumerate(truth):
        arr = np.zeros((24 + 2 * i, 28 + i, 3), np.uint8)
        arr[:] = COLOURS[y]
        arr[::3] = rng.integers(0, 255, (arr[::3].shape), dtype=np.uint8)
        Image.fromarray(arr).save(root / f"img_{i:03d}.png")
    return truth


def tiny_split(root: Path, n: int = 16):
    """A tiny training split on disk and fixed zero-shot labels (class 2 is made small on purpose)."""
    truth = make_images(root, n)
    ids = sorted(p.name for p in root.glob("*.png"))
    c_zs = torch.tensor([t if t != 2 or i < 6 else 0 for i, t in enumerate(truth)])
    return Split(root, ids, truth, CLASSNAMES), c_zs


def expected_texts(cap, split, work):
    one = lambda im, p: cap.describe([im], [p])[0]
    return ([one(load_image(split.paths[it.members[0]]), it.prompt) for it in work.images],
            [one(make_collage([load_image(split.paths[m]) for m in it.members]), it.prompt) for it in work.group_items])


def store_lines(out: Path) -> list[dict]:
    return [json.loads(l) for f in sorted(out.glob("captions-*.jsonl")) for l in f.read_text().splitlines()]


def assert_exactly_once(out: Path, work, model: str):
    """Every item of `work` has exactly one record in the store, and there is nothing else."""
    keys = [record_key(r) for r in store_lines(out)]
    assert len(keys) == len(set(keys)), "a caption was written twice"
    assert set(keys) == {it.key(model) for it in work.unique()}


# ---------------------------------------------------------------- store mechanics

def test_store_never_duplicates_and_reads_all_shards(tmp_path):
    rec = lambda i, t, m="m": dict(kind="image", item_id=i, prompt="p", model=m, text=t)
    with CaptionStore(tmp_path, shard=0) as s:
        assert s.add([rec("a", "1"), rec("a", "2"), rec("b", "3")]) == 2
        assert s.add([rec("a", "4"), rec("a", "5", m="other")]) == 1
    with CaptionStore(tmp_path, shard=1) as s:
        assert s.add([rec("b", "x"), rec("c", "6")]) == 1            # b is known from shard 0
        assert s.get(("image", "a", "p", "m")) == "1" and len(s) == 4
    assert [r["item_id"] for r in store_lines(tmp_path)] == ["a", "b", "a", "c"]


def test_torn_last_record_is_ignored_and_cut(tmp_path):
    rec = lambda i: dict(kind="group", item_id=i, prompt="p", model="m", text=i.upper())
    with CaptionStore(tmp_path, shard=3) as s: s.add([rec("a"), rec("b")])
    f = shard_file(tmp_path, 3)
    good = f.read_bytes()
    f.write_bytes(good + json.dumps(rec("c")).encode()[:-7])     # a write cut short by a kill
    assert len(CaptionStore(tmp_path, shard=None)) == 2 and f.stat().st_size > len(good)
    with CaptionStore(tmp_path, shard=3) as s:
        assert f.read_bytes() == good
        assert s.add([rec("c")]) == 1
    assert [r["item_id"] for r in store_lines(tmp_path)] == ["a", "b", "c"]


def test_same_shard_twice_is_refused(tmp_path):
    pytest.importorskip("fcntl")
    with CaptionStore(tmp_path, shard=0):
        with pytest.raises(RuntimeError, match="is in use by pid") as e: CaptionStore(tmp_path, shard=0)
        assert f"caption shard 0 of {tmp_path} is in use by pid {os.getpid()} on host " in str(e.value)
    CaptionStore(tmp_path, shard=0).close()                           # free again once closed


# ---------------------------------------------------------------- describe_dataset

def test_captions_belong_to_their_images_and_groups(tmp_path):
    split, c_zs = tiny_split(tmp_path / "imgs")
    spec = get_spec("flowers")
    texts = describe_dataset(spec, split, c_zs, PixelCaptioner(), tmp_path / "store", batch_size=3)
    work = caption_work(spec, split, c_zs)
    assert (texts.image, texts.group) == expected_texts(PixelCaptioner(), split, work)
    assert texts.group_label.tolist() == c_zs.tolist() and texts.group_of.tolist() == list(range(len(split)))
    assert_exactly_once(tmp_path / "store", work, "pixel-test")


def test_shards_partition_the_work_and_merge(tmp_path):
    split, c_zs = tiny_split(tmp_path / "imgs")
    spec, out = get_spec("dtd"), tmp_path / "store"
    kw = dict(kinds=("image", "group"), groups_per_class=3, batch_size=4)
    results = [describe_dataset(spec, split, c_zs, PixelCaptioner(), out, shard=s, num_shards=3, **kw) for s in range(3)]
    assert results[0] is None and results[1] is None and results[2] is not None
    single = describe_dataset(spec, split, c_zs, PixelCaptioner(), tmp_path / "single", **kw)
    assert (results[2].image, results[2].group) == (single.image, single.group)
    assert results[2].group_of.tolist() == [-1] * len(split)
    for s in range(3):
        for r in map(json.loads, shard_file(out, s).read_text().splitlines()):
            assert shard_of(WorkItem(r["kind"], r["item_id"], r["prompt"], ()), 3) == s
    assert_exactly_once(out, caption_work(spec, split, c_zs, **{k: kw[k] for k in ("kinds", "groups_per_class")}), "pixel-test")


WORKER = """
import sys, torch
sys.path.insert(0, {here!r})
from test_captions import PixelCaptioner, tiny_split
from latteclip_nb.captions import describe_dataset
from latteclip_nb.data import get_spec
split, c_zs = tiny_split(__import__("pathlib").Path({imgs!r}))
describe_dataset(get_spec("flowers"), split, c_zs, PixelCaptioner(delay={delay}), {out!r}, batch_size=2)
"""


def _wait_for_lines(path: Path, n: int, proc, timeout: float = 120.0):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if path.exists() and path.read_bytes().count(b"\n") >= n: return
        if proc.poll() is not None: raise AssertionError(f"the run ended (rc {proc.returncode}) before it could be killed")
        time.sleep(0.02)
    raise AssertionError(f"no {n} records in {path} after {timeout} s")


def test_kill9_then_rerun_gives_exactly_one_caption_per_item(tmp_path):
    imgs, out = tmp_path / "imgs", tmp_path / "store"
    split, c_zs = tiny_split(imgs)
    work = caption_work(get_spec("flowers"), split, c_zs)
    code = WORKER.format(here=str(HERE), imgs=str(imgs), out=str(out), delay=0.3)
    proc = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.DEVNULL)
    try: _wait_for_lines(shard_file(out, 0), 4, proc)
    finally: os.kill(proc.pid, signal.SIGKILL); proc.wait()
    assert proc.returncode == -signal.SIGKILL
    done = store_lines(out)
    assert 4 <= len(done) < len(work.unique()) and len(done) % 2 == 0   # whole batches only
    with open(shard_file(out, 0), "ab") as f: f.write(b'{"kind": "image", "item_id": "img_0')  # and a torn record
    rerun = subprocess.run([sys.executable, "-c", code.replace("delay=0.3", "delay=0.0")], capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "torn last record" in rerun.stderr
    assert_exactly_once(out, work, "pixel-test")
    texts = describe_dataset(get_spec("flowers"), split, c_zs, "pixel-test", out)   # read-only merge
    assert (texts.image, texts.group) == expected_texts(PixelCaptioner(), split, work)


# ---------------------------------------------------------------- the command, with the real tiny LLaVA-NeXT

@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory):
    captioners = pytest.importorskip("latteclip_nb.captioners")
    pytest.importorskip("latteclip_nb.clip")
    torch.set_num_threads(1)
    return captioners.build_tiny_llava(tmp_path_factory.mktemp("tiny") / "llava")


def _cli(args):
    exe = Path(sys.executable).with_name("latteclip-caption")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-c", "import sys; from latteclip_nb.captions import main; sys.exit(main())"]
    return cmd + [str(a) for a in args]


def test_cli_tiny_llava_killed_and_rerun(tmp_path, tiny_llava):
    folder, out = tmp_path / "domain", tmp_path / "store"
    make_images(folder, n=12)
    classes = tmp_path / "classes.txt"
    classes.write_text("\n".join(CLASSNAMES) + "\n")
    env = {**os.environ, "LATTECLIP_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    args = ["--folder", folder, "--classes", classes, "--domain", "flower", "--backend", "tiny", "--model", tiny_llava,
            "--clip-model", "latte-tiny", "--pretrained", "none", "--device", "cpu", "--batch-size", 1, "--workers", 1,
            "--out", out, "--cache-dir", tmp_path / "c_zs", "--save-texts", tmp_path / "texts.json"]
    proc = subprocess.Popen(_cli(args), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try: _wait_for_lines(shard_file(out, 0), 2, proc, timeout=300)
    finally: os.kill(proc.pid, signal.SIGKILL); proc.communicate()
    n_killed = len(store_lines(out))
    run = subprocess.run(_cli(args), env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    assert summary["complete"] and summary["images"] == 12 and summary["groups"] == 12
    recs = store_lines(out)
    keys = [record_key(r) for r in recs]
    assert len(keys) == len(set(keys)) and n_killed < len(keys)
    assert {r["kind"] for r in recs} == {"image", "group"} and {r["model"] for r in recs} == {summary["model"]}
    texts = json.loads((tmp_path / "texts.json").read_text())
    by_key = {(r["kind"], r["item_id"]): r["text"] for r in recs}
    ids = sorted(p.name for p in folder.glob("*.png"))
    assert texts["image"] == [by_key[("image", k)] for k in file_keys(folder, ids)]   # keyed by the images' bytes
    assert not any(str(tmp_path) in json.dumps(r) for r in recs)                       # no absolute path in the store
    assert [texts["group"][g] for g in texts["group_of"]] == texts["group"] and len(texts["group_label"]) == 12
    # exactly one caption per item: the items are those of the (cached) zero-shot labels the command used
    from latteclip_nb.captions import _dataset, _zero_shot_labels, caption_parser
    a = caption_parser().parse_args([str(x) for x in args])
    spec, split = _dataset(a)
    c_zs = _zero_shot_labels(spec, split, a)
    assert texts["group_label"] == c_zs.tolist()
    assert_exactly_once(out, caption_work(spec, split, c_zs), summary["model"])


def test_cli_simulated_backend_on_a_shapes_world(tmp_path, monkeypatch):
    shapes = pytest.importorskip("latteclip_nb.shapes")
    pytest.importorskip("latteclip_nb.clip")
    from latteclip_nb import data
    from latteclip_nb.captions import Texts, main
    name = "shapes-caption-test"
    shapes.register_shapes(name, shapes.World(seed=1, n_train=16, n_test=4))
    monkeypatch.setenv("LATTECLIP_CACHE", str(tmp_path / "cache"))
    try:
        rc = main([name, "--root", str(tmp_path / "data"), "--backend", "simulated", "--clip-model", "latte-tiny",
                   "--pretrained", "none", "--device", "cpu", "--out", str(tmp_path / "store"), "--groups-per-class", "2",
                   "--cache-dir", str(tmp_path / "c_zs"), "--save-texts", str(tmp_path / "texts.json")])
    finally:
        data.DATASETS.pop(name, None); getattr(data, "_LOADERS", {}).pop(name, None)
    assert rc == 0
    texts = Texts.load(tmp_path / "texts.json")
    assert len(texts.image) == 16 and all(t.strip() for t in texts.image + texts.group)
    assert len(texts.group) == 2 * len(set(texts.group_label.tolist())) and texts.group_of.tolist() == [-1] * 16
    assert all("simulated" in r["model"] for r in store_lines(tmp_path / "store"))


# ---------------------------------------------------------------- captions belong to the pixels

def _store_of(tmp_path):
    return tmp_path / "cache" / "captions" / "flowers"      # the default store: one per dataset name


def test_two_folders_named_train_do_not_share_captions(tmp_path):
    a, _ = tiny_split(tmp_path / "a" / "train")
    truth = make_images(tmp_path / "b" / "train", seed=1)    # same names, other pixels
    b = Split(tmp_path / "b" / "train", a.ids, truth, CLASSNAMES)
    c_zs = torch.tensor([t if t != 2 or i < 6 else 0 for i, t in enumerate(truth)])
    spec, out = get_spec("flowers"), _store_of(tmp_path)
    describe_dataset(spec, a, c_zs, PixelCaptioner(), out)
    cap = PixelCaptioner()
    tb = describe_dataset(spec, b, c_zs, cap, out)
    work = caption_work(spec, b, c_zs)
    assert cap.seen == len(work.unique())                     # nothing of folder a was reused
    assert (tb.image, tb.group) == expected_texts(PixelCaptioner(), b, work)


def test_rerendered_image_gets_a_new_caption(tmp_path):
    split, c_zs = tiny_split(tmp_path / "imgs")
    spec, out = get_spec("dtd"), tmp_path / "store"
    first = describe_dataset(spec, split, c_zs, PixelCaptioner(), out, kinds=("image",))
    Image.fromarray(np.full((30, 30, 3), 7, np.uint8)).save(split.root / split.ids[3])
    cap = PixelCaptioner()
    again = describe_dataset(spec, split, c_zs, cap, out, kinds=("image",))
    assert cap.seen == 1 and again.image[3] != first.image[3]
    assert again.image == expected_texts(PixelCaptioner(), split, caption_work(spec, split, c_zs, ("image",)))[0]


def test_unreadable_image_is_retried_once_fixed(tmp_path):
    split, c_zs = tiny_split(tmp_path / "imgs")
    spec, out = get_spec("dtd"), tmp_path / "store"
    good = (split.root / split.ids[0]).read_bytes()
    (split.root / split.ids[0]).write_bytes(b"truncated png")   # undecodable
    (split.root / split.ids[1]).unlink()                        # missing
    t1 = describe_dataset(spec, split, c_zs, PixelCaptioner(), out, kinds=("image",))
    assert t1.image[:2] == ["", ""] and t1.stats["unreadable"] == 2
    cap = PixelCaptioner()
    assert describe_dataset(spec, split, c_zs, cap, out, kinds=("image",)).stats["unreadable"] == 2 and cap.seen == 0
    n_lines = len(store_lines(out))                              # failing again writes nothing new
    (split.root / split.ids[0]).write_bytes(good)
    make_images(tmp_path / "fresh")
    (split.root / split.ids[1]).write_bytes((tmp_path / "fresh" / split.ids[1]).read_bytes())
    cap = PixelCaptioner()
    t2 = describe_dataset(spec, split, c_zs, cap, out, kinds=("image",))
    assert cap.seen == 2 and t2.stats["unreadable"] == 0 and len(store_lines(out)) == n_lines + 2
    assert t2.image == expected_texts(PixelCaptioner(), split, caption_work(spec, split, c_zs, ("image",)))[0]


def test_failed_item_with_same_bytes_is_retried(tmp_path):
    split, c_zs = tiny_split(tmp_path / "imgs", n=6)
    spec, out = get_spec("dtd"), tmp_path / "store"
    work = caption_work(spec, split, c_zs, ("image",))
    with CaptionStore(out, shard=0) as s:                       # a transient read error recorded last time
        s.add([dict(kind="image", item_id=work.images[2].item_id, prompt=work.images[2].prompt, model="pixel-test",
                    text="", error="OSError: [Errno 5] Input/output error")])
    cap = PixelCaptioner()
    t = describe_dataset(spec, split, c_zs, cap, out, kinds=("image",))
    assert cap.seen == 6 and t.image[2] and t.stats["unreadable"] == 0
    assert CaptionStore(out, shard=None).done(work.images[2].key("pixel-test"))


def test_moving_images_and_store_keeps_every_caption(tmp_path):
    split, c_zs = tiny_split(tmp_path / "cache" / "data" / "imgs")
    spec = get_spec("flowers")
    first = describe_dataset(spec, split, c_zs, PixelCaptioner(), tmp_path / "cache" / "captions")
    (tmp_path / "cache").rename(tmp_path / "moved-cache")
    moved = Split(tmp_path / "moved-cache" / "data" / "imgs", split.ids, split.labels, CLASSNAMES)
    cap = PixelCaptioner()
    again = describe_dataset(spec, moved, c_zs, cap, tmp_path / "moved-cache" / "captions")
    assert cap.seen == 0 and (again.image, again.group) == (first.image, first.group)


def test_one_call_per_rank_with_a_barrier(tmp_path):
    split, c_zs = tiny_split(tmp_path / "imgs")
    spec, out = get_spec("flowers"), tmp_path / "store"
    import latteclip_nb.captions as C
    calls = []
    real = C.caption_work
    def counting(*a, **kw): calls.append(1); return real(*a, **kw)
    C.caption_work = counting
    try:
        t = describe_dataset(spec, split, c_zs, PixelCaptioner(), out, shard=0, num_shards=2,
                             barrier=lambda: describe_dataset(spec, split, c_zs, PixelCaptioner(), out, shard=1, num_shards=2))
    finally: C.caption_work = real
    assert len(calls) == 2 and t is not None                   # this rank's one call, and the other rank's inside the barrier
    assert (t.image, t.group) == expected_texts(PixelCaptioner(), split, caption_work(spec, split, c_zs))


def test_store_keeps_bpe_ids_and_stats_do_not_retokenize(tmp_path, monkeypatch):
    split, c_zs = tiny_split(tmp_path / "imgs")
    spec, out = get_spec("flowers"), tmp_path / "store"
    t = describe_dataset(spec, split, c_zs, PixelCaptioner(), out)
    from open_clip.tokenizer import SimpleTokenizer
    tok = SimpleTokenizer()
    assert all(r["bpe"] == tok.encode(r["text"]) for r in store_lines(out))
    import latteclip_nb.captions as C, latteclip_nb.caption_store as CS
    for m in (C, CS): monkeypatch.setattr(m, "clip_bpe", lambda text: (_ for _ in ()).throw(AssertionError("re-tokenized")))
    again = describe_dataset(spec, split, c_zs, "pixel-test", out)
    assert again.stats == t.stats and again.bpe == t.bpe and set(again.bpe) == set(t.image + t.group)


# ---------------------------------------------------------------- errors in one line, the store intact

def test_read_only_store_and_full_disk_are_one_line_and_leave_the_store_intact(tmp_path, monkeypatch):
    import errno
    import latteclip_nb.captions as C
    split, c_zs = tiny_split(tmp_path / "imgs")
    spec, out = get_spec("dtd"), tmp_path / "store"
    describe_dataset(spec, split.subset(range(8)), c_zs[:8], PixelCaptioner(), out, kinds=("image",))
    before = shard_file(out, 0).read_bytes()
    real_write = os.write
    def full(fd, data):
        real_write(fd, bytes(data[:10])); raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(C.os, "write", full)
    with pytest.raises(RuntimeError, match=r"^disk full while writing \d+ captions to .*captions-000.jsonl; the store is intact"):
        describe_dataset(spec, split, c_zs, PixelCaptioner(), out, kinds=("image",))
    monkeypatch.setattr(C.os, "write", real_write)
    assert shard_file(out, 0).read_bytes() == before
    real_open = os.open
    def ro(path, *a, **kw):
        if str(path).endswith(".jsonl"): raise OSError(errno.EROFS, "Read-only file system")
        return real_open(path, *a, **kw)
    monkeypatch.setattr(C.os, "open", ro)
    with pytest.raises(RuntimeError, match=r"caption store .* is not writable \(Read-only file system\): pass --captions-dir"):
        describe_dataset(spec, split, c_zs, PixelCaptioner(), out, kinds=("image",))
    monkeypatch.setattr(C.os, "open", real_open)
    t = describe_dataset(spec, split, c_zs, PixelCaptioner(), out, kinds=("image",))   # space again: it completes
    assert t.image == expected_texts(PixelCaptioner(), split, caption_work(spec, split, c_zs, ("image",)))[0]


# ---------------------------------------------------------------- the command: plan, dry run, data root

def _shapes(name, n=16):
    shapes = pytest.importorskip("latteclip_nb.shapes")
    pytest.importorskip("latteclip_nb.clip")
    shapes.register_shapes(name, shapes.World(seed=1, n_train=n, n_test=4))


def _unregister(name):
    from latteclip_nb import data
    data.DATASETS.pop(name, None); getattr(data, "_LOADERS", {}).pop(name, None)


def test_cli_dry_run_counts_lmm_calls_without_loading_it(tmp_path, monkeypatch, capsys):
    import latteclip_nb.captions as C
    import latteclip_nb.clip as clip
    name = "shapes-dry-run-test"
    _shapes(name)
    monkeypatch.setenv("LATTECLIP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(C, "build_captioner", lambda *a, **kw: (_ for _ in ()).throw(AssertionError("LMM loaded")))
    common = [name, "--data-root", str(tmp_path / "data"), "--captioner", "llava", "--clip-model", "latte-tiny",
              "--pretrained", "none", "--device", "cpu", "--cache-dir", str(tmp_path / "c_zs"), "--dry-run"]
    try:
        load_clip = clip.load_clip
        monkeypatch.setattr(clip, "load_clip", lambda *a, **kw: (_ for _ in ()).throw(AssertionError("CLIP loaded")))
        assert C.main(common) == 0                                    # no c_zs cached: an upper bound, no model at all
        bound = capsys.readouterr()
        assert C.main(common + ["--groups-per-class", "1"]) == 0
        bound_capped = capsys.readouterr()
        monkeypatch.setattr(clip, "load_clip", load_clip)
        a = C.caption_parser().parse_args(common)
        spec, split = C._dataset(a)
        C._zero_shot_labels(spec, split, a)                           # what a real run computes first, and caches
        monkeypatch.setattr(clip, "load_clip", lambda *a, **kw: (_ for _ in ()).throw(AssertionError("CLIP loaded")))
        assert C.main(common) == 0
        one = capsys.readouterr()
        assert C.main(common + ["--groups-per-class", "1"]) == 0
        capped = capsys.readouterr()
        monkeypatch.setattr(C, "_run_setting", lambda spec, args: ("NVIDIA H200", "nf4", "single_view"))   # as on that GPU
        assert C.main(common) == 0
        on_h200 = capsys.readouterr()
    finally: _unregister(name)
    b1, b2 = json.loads(bound.out.strip().splitlines()[-1]), json.loads(bound_capped.out.strip().splitlines()[-1])
    assert not b1["exact"] and (b1["images"], b1["groups"], b1["calls"]) == (16, 16, 32) and "at most 32 LMM calls" in bound.err
    assert not b2["exact"] and b2["groups"] == 10 and "upper bound" in bound_capped.err          # 10 classes x 1
    p1, p2 = json.loads(one.out.strip().splitlines()[-1]), json.loads(capped.out.strip().splitlines()[-1])
    assert p1["dry_run"] and p1["exact"] and p1["images"] == 16 and p1["calls"] == 16 + p1["groups"] and 0 < p1["groups"] <= 16
    assert f"this run needs {p1['calls']} LMM calls: 16 images + {p1['groups']} groups (one group per image" in one.err
    assert p2["exact"] and p2["groups"] <= 3 and p2["calls"] == 16 + p2["groups"] and "1 groups per class" in capped.err
    assert not (tmp_path / "cache" / "captions").exists()
    # the expected time: none without a measured rate (a CPU), else the calls at the measured rate of that GPU
    assert p1["expected_s"] is None and "expected time: no measured rate for no GPU with fp32, single view" in one.err
    h = json.loads(on_h200.out.strip().splitlines()[-1])
    assert h["calls"] == p1["calls"] and h["expected_s"] == round(p1["calls"] / 15.046)
    assert "expected time on NVIDIA H200: about 1 min" in on_h200.err and "docs/results/gpu_check_h200.json" in on_h200.err


def test_measured_rates_are_those_of_their_files():
    # every rate --dry-run uses is the number its GPU check recorded (largest batch of that precision and view)
    from latteclip_nb.captions import MEASURED_RATES
    root = Path(__file__).resolve().parents[1]
    for (gpu, precision, view), (photo, collage, batch, source) in MEASURED_RATES.items():
        res = json.loads((root / source).read_text())
        assert res["environment"]["gpu"] == gpu
        runs = {(r["image"], r["batch"]): r["captions_per_s"] for r in res["caption"]["runs"]
                if r["precision"] == precision and r["view"] == view.replace("single_view", "single")}
        assert batch == max(b for _, b in runs) and runs[("photo", batch)] == photo
        assert collage == runs.get(("collage", batch), photo)   # single view: no collage row, the same 576 tokens


def test_decoding_choices_are_the_captioners():
    from latteclip_nb.captions import caption_parser
    from latteclip_nb.llava import DECODINGS
    act = next(a for a in caption_parser()._actions if a.dest == "caption_decoding")
    assert tuple(act.choices) == DECODINGS


def test_caption_and_train_agree_on_the_default_data_root(tmp_path, monkeypatch):
    pytest.importorskip("latteclip_nb.experiment")
    from latteclip_nb.captions import _dataset, caption_parser
    from latteclip_nb.experiment import ExperimentConfig, resolve_data
    name = "shapes-root-test"
    _shapes(name, n=6)
    monkeypatch.setenv("LATTECLIP_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("LATTECLIP_DATA", raising=False)
    try:
        _, split = _dataset(caption_parser().parse_args([name]))
        _, sp = resolve_data(ExperimentConfig(dataset=name))
        assert split.root == sp["train"].root and str(split.root).startswith(str(tmp_path / "cache" / "data"))
        monkeypatch.setenv("LATTECLIP_DATA", str(tmp_path / "elsewhere"))
        _, split = _dataset(caption_parser().parse_args([name]))
        _, sp = resolve_data(ExperimentConfig(dataset=name))
        assert split.root == sp["train"].root and str(split.root).startswith(str(tmp_path / "elsewhere"))
    finally: _unregister(name)
