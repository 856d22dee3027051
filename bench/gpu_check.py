"""One prepared check on one CUDA GPU: training step throughput, loader throughput, caption throughput, environment.

Not a test: it measures and reports, whatever the numbers are. One JSON file plus a printed table:

    PYTHONPATH=. python bench/gpu_check.py --out gpu.json            # one CUDA GPU, under 8 minutes
    python bench/gpu_check.py --tiny --out /tmp/x.json                  # tiny configs on CPU, seconds (the test suite)

1. train: the real ViT-B-32 (random weights) at batch 512 in bf16 autocast through `latteclip_nb.train.Trainer`:
   flyp_pl (online pseudo-labels), latteclip text_grad="exact" and "fast", GPU-resident inputs; the methods take turns
   (the order rotates every repetition) after warm-up; median step time, images/s, peak GPU memory, ratio to flyp_pl.
2. loader: JPEGs (500x375) written at start-up, read through the same DataLoader that `train` builds (SeededViews,
   EpochBatches, collate_views, the train augmentation, num_workers = the cores): the loader alone, and the latteclip
   exact step fed by it, against the same step on GPU-resident tensors.
3. caption: `LlavaCaptioner.describe` on LLaVA-1.6-Mistral-7B's architecture with random weights (saved once to a
   temporary folder, loaded the way a downloaded checkpoint is; the real 32064-row vocabulary; its content hash timed
   apart): NF4 when bitsandbytes and its CUDA library load, then bf16; single view at the automatic batch and at the
   fixed ones (default 64), each on the automatic fast path (compiled decode step, or the static cache where compile
   is unavailable) and eagerly, with how many answers differ; anyres eagerly; every answer forced to 30 tokens;
   captions/s, time to the first token, decode per token, peak GPU memory, projected Food101 hours.
4. environment: GPU, torch, transformers, open_clip, bitsandbytes, Python, cores, git commit.

Packages the GPU machine lacks travel in bench/wheels/site (bench/fetch_wheels.sh), appended to sys.path at start.
Each section has a share of the time budget (--budget-s, default 420 s: the whole command, imports included, stays
near 7.5 minutes); a measurement that would not fit in what is left is skipped and listed under "skipped" with its
estimate. The JSON is written after every section (and every caption setting).
"""
import argparse, gc, json, math, os, platform, shutil, statistics, subprocess, sys, tempfile, time, traceback
_T0 = time.perf_counter()   # before the heavy imports: the whole run is reported, not only the measured part
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for p in (str(ROOT), str(HERE)):   # the package from the working tree, and the sibling bench scripts
    if p not in sys.path: sys.path.insert(0, p)
CARRIED = HERE / "wheels" / "site"   # bench/fetch_wheels.sh: open_clip, ftfy, wcwidth, bitsandbytes (CUDA 13.0 library)
CARRIED_PACKAGES = ("open_clip", "ftfy", "wcwidth", "bitsandbytes")


def use_carried(folder=CARRIED) -> bool:
    """Put the carried packages' folder at the end of sys.path (what the machine has comes first); before transformers
    is imported, so that it sees bitsandbytes. True when the folder exists."""
    global CARRIED
    folder = Path(folder)
    if not folder.is_dir(): return False
    CARRIED = folder   # what `environment` reports as carried
    if str(folder) not in sys.path: sys.path.append(str(folder))
    return True

import numpy as np
import torch
from PIL import Image

SCHEMA = 1
SHARES = {"startup": 15, "train": 75, "loader": 60, "caption": 300}   # relative shares of --budget-s, cumulative
TARGETS = {"latteclip_exact_images_per_s": (">=", 5000), "latteclip_exact_ratio_to_flyp_pl": ("<=", 1.3),
           "latteclip_fast_ratio_to_flyp_pl": ("<=", 1.15),
           # the loader with uint8 workers and the augmentation on the device, without and with the image cache
           "loader_device_augment_images_per_s": (">=", 4000), "loader_image_cache_images_per_s": (">=", 10000),
           "exact_step_fed_images_per_s": (">=", 3000),
           # captions: the default (NF4, single view, auto batch, auto decoding) and bf16 as users get them
           "captions_per_s_default_nf4": (">=", 15), "captions_per_s_single_bf16": (">=", 45),
           "decode_ms_per_token_bf16_b64": ("<=", 15), "food101_h_default": ("<=", 3), "food101_h_bf16": ("<=", 1)}

CLASSES = ["banded", "blotchy", "braided", "bubbly", "bumpy", "chequered", "cobwebbed", "cracked", "crosshatched",
           "crystalline", "dotted", "fibrous", "flecked", "freckled", "frilly", "gauzy", "grid", "grooved", "honeycombed",
           "interlaced", "knitted", "lacelike", "lined", "marbled", "matted", "meshed", "paisley", "perforated", "pitted",
           "pleated", "polka-dotted", "porous", "potholed", "scaly", "smeared", "spiralled", "sprinkled", "stained",
           "stratified", "striped", "studded", "swirly", "veined", "waffled", "woven", "wrinkled", "zigzagged"]  # DTD's 47
SUBJECTS = ["A close-up photo of", "A detailed view of", "An image showing", "A picture of", "A photograph of", "A macro shot of"]
THINGS = ["woven fabric", "a stone wall", "old tree bark", "a ceramic tile", "a knitted scarf", "dry cracked soil",
          "a honeycomb", "a marble floor", "a metal grate", "a lace curtain", "a leather bag", "a painted wooden door"]
DETAILS = ["with thin parallel stripes in muted brown and beige tones",
           "covered in small irregular dark spots on a pale background",
           "showing a dense repeating pattern of tiny hexagonal cells",
           "with rough uneven ridges running diagonally across the surface",
           "featuring bright alternating squares of black and white color",
           "with soft fuzzy fibers tangled together in loose curls",
           "marked by deep grooves and scattered flecks of grey paint",
           "with smooth glossy swirls of cream and dark green"]
SETTINGS = ["under soft daylight", "in harsh direct sunlight", "under warm indoor lamps", "in a dim corner",
            "against a plain white wall", "on a wooden table"]


def description(i: int) -> str:
    """An image description of about 20 words, different for every `i` (the length of a LLaVA answer under a 20-word prompt)."""
    return (f"{SUBJECTS[i % 6]} {THINGS[(i // 6) % 12]} {DETAILS[(i // 72) % 8]} {SETTINGS[(i // 576) % 6]}, "
            f"item {i}.")


def group_description(g: int) -> str:
    """A group description of about 20 words, different for every group `g`."""
    return (f"All the photos show {THINGS[g % 12]} {DETAILS[(g // 12) % 8]}, seen {SETTINGS[(g // 96) % 6]}, "
            f"group {g}.")


def synthetic_photo(i: int, size=(500, 375)) -> Image.Image:
    """A smooth random photo (a JPEG of it is about as large as a real photo's), different for every `i`."""
    rng = np.random.default_rng(i)
    low = rng.integers(0, 256, (max(2, size[1] // 24), max(2, size[0] // 24), 3), dtype=np.uint8)
    im = np.asarray(Image.fromarray(low).resize(size, Image.Resampling.BICUBIC), dtype=np.int16)
    im = im + rng.integers(-12, 13, im.shape, dtype=np.int16)
    return Image.fromarray(np.clip(im, 0, 255).astype(np.uint8))


def _write_jpeg(job):
    folder, i, size = job
    synthetic_photo(i, size).save(Path(folder) / f"{i:05d}.jpg", quality=90)
    return (Path(folder) / f"{i:05d}.jpg").stat().st_size


def cores() -> int:
    try: return len(os.sched_getaffinity(0))
    except AttributeError: return os.cpu_count() or 1


class Budget:
    """Cumulative per-section deadlines: time a section leaves unused goes to the later ones."""
    def __init__(self, total_s: float, shares: dict):
        self.t0, self.total, self.ends, acc = time.perf_counter(), total_s, {}, 0.0
        scale = total_s / sum(shares.values())
        for name, s in shares.items(): acc += s * scale; self.ends[name] = acc
        self.section, self.skipped, self.spent, self._start = None, [], {}, 0.0

    def elapsed(self) -> float: return time.perf_counter() - self.t0

    def start(self, name: str):
        self.section, self._start = name, self.elapsed()

    def end(self):
        self.spent[self.section] = round(self.elapsed() - self._start, 1)

    def left(self) -> float: return self.ends[self.section] - self.elapsed()

    def fits(self, what: str, estimate_s: float) -> bool:
        """True when `estimate_s` fits in what is left of the section's budget; else record `what` as skipped."""
        if estimate_s <= self.left(): return True
        self.skip(what, f"needs ~{estimate_s:.0f} s, {max(0.0, self.left()):.0f} s left of the {self.section} budget",
                  estimate_s)
        return False

    def skip(self, what: str, why: str, estimate_s=None):
        self.skipped.append(dict(section=self.section, what=what, why=why,
                                 estimate_s=None if estimate_s is None else round(estimate_s, 1)))
        print(f"  skipped {what}: {why}", flush=True)


def sync(device):
    if device.type == "cuda": torch.cuda.synchronize(device)


def reset_peak(device):
    if device.type == "cuda": torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device):
    """Peak GPU memory allocated since the last reset (GiB); None off CUDA."""
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 3) if device.type == "cuda" else None


def bitsandbytes_status(device) -> tuple:
    """(bitsandbytes version or None, one line on its native library: the library loaded, or why NF4 cannot run)."""
    try: import bitsandbytes
    except Exception as e: return None, f"bitsandbytes does not import ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    if device.type != "cuda": return bitsandbytes.__version__, "not checked off CUDA"
    try:
        from bitsandbytes.cextension import ErrorHandlerMockBNBNativeLibrary, lib
        if isinstance(lib, ErrorHandlerMockBNBNativeLibrary):
            msg = [l.strip() for l in str(getattr(lib, "error_msg", "")).splitlines() if l.strip()]
            return bitsandbytes.__version__, f"its CUDA library does not load: {msg[0] if msg else 'no reason given'}"
        return bitsandbytes.__version__, f"loaded {Path(getattr(getattr(lib, '_lib', None), '_name', '?')).name}"
    except Exception as e: return bitsandbytes.__version__, f"library not checked ({type(e).__name__}: {e})"


def environment(device, commit=None) -> dict:
    import transformers
    env = dict(device=str(device), gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None,
               gpu_memory_gib=round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)
               if device.type == "cuda" else None,
               cuda=torch.version.cuda, torch=torch.__version__, transformers=transformers.__version__,
               python=platform.python_version(), platform=platform.platform(), cpu_cores=cores(),
               torch_threads=torch.get_num_threads())
    try:
        import open_clip; env["open_clip"] = open_clip.__version__
    except ImportError: env["open_clip"] = None
    env["bitsandbytes"], env["bitsandbytes_library"] = bitsandbytes_status(device)
    # the packages imported from the carried folder (bench/wheels/site), not from the machine's own environment
    env["carried"] = sorted(n for n in CARRIED_PACKAGES if n in sys.modules and sys.modules[n] is not None
                            and Path(getattr(sys.modules[n], "__file__", None) or "/").resolve().is_relative_to(CARRIED.resolve()))
    env["git_commit"], env["git_dirty"] = commit, None
    if commit is None:
        try:
            run = lambda *a: subprocess.run(["git", "-C", str(ROOT), *a], capture_output=True, text=True, timeout=10, check=True).stdout
            env["git_commit"] = run("rev-parse", "HEAD").strip()
            env["git_dirty"] = bool(run("status", "--porcelain", "--untracked-files=no").strip())
        except Exception: pass   # a copy of the tree without .git: pass --commit
    return env


# ----------------------------------------------------------------------------------------------------- training
def make_texts(n_images: int, n_classes: int, seed: int = 0):
    """c_zs and `captions.Texts` for n_images: one ~20-word description per image, 4 images per group, groups per class."""
    from latteclip_nb.captions import Texts
    g = torch.Generator().manual_seed(seed)
    c_zs = torch.randint(0, n_classes, (n_images,), generator=g)
    G = max(n_classes, n_images // 4)
    group_label = torch.arange(G) % n_classes
    # each image's own group is one of its class's groups (groups are collages of images with the same c_zs)
    per_class = [torch.nonzero(group_label == c).flatten() for c in range(n_classes)]
    group_of = torch.stack([per_class[int(c)][i % len(per_class[int(c)])] for i, c in enumerate(c_zs)])
    texts = Texts(image=[description(i) for i in range(n_images)], group=[group_description(k) for k in range(G)],
                  group_label=group_label, group_of=group_of)
    return c_zs, texts


def train_section(args, budget, device, res, state):
    from latteclip_nb.clip import load_clip
    from latteclip_nb.data import get_spec
    from latteclip_nb.train import TrainConfig, Trainer
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model, train_tf, _, tokenizer = load_clip(args.model, pretrained=None, device=device)
    build_s = time.perf_counter() - t0
    size = model.visual.preprocess_cfg["size"]
    side = size if isinstance(size, int) else size[0]
    B, N, C = args.batch, state["n_images"], args.classes
    spec = get_spec("dtd")
    names = (CLASSES * (C // len(CLASSES) + 1))[:C]
    class_texts = [spec.template.format(c if i < len(CLASSES) else f"{c} {i}") for i, c in enumerate(names)]
    c_zs, texts = make_texts(N, C)
    precision = "bf16" if device.type == "cuda" else "fp32"
    runs = {"flyp_pl": dict(method="flyp_pl", pseudo="online"),
            "latteclip_exact": dict(method="latteclip", text_grad="exact"),
            "latteclip_fast": dict(method="latteclip", text_grad="fast")}
    t0 = time.perf_counter()
    trainers = {name: Trainer(model, tokenizer, class_texts, TrainConfig(epochs=1, warmup_steps=1, batch_size=B,
                                                                          precision=precision, **kw),
                              total_steps=100_000, c_zs=c_zs, texts=texts, device=device) for name, kw in runs.items()}
    setup_s = time.perf_counter() - t0
    shared = trainers["flyp_pl"]
    for t in trainers.values(): t.optimizer, t.scheduler = shared.optimizer, shared.scheduler   # one AdamW state in memory
    tb = trainers["latteclip_exact"].table
    lengths = (tb.tokens[tb.image_id].argmax(-1) + 1).float()
    g = torch.Generator().manual_seed(1)
    images = torch.randn(B, 3, side, side, generator=g).to(device)
    batches = [torch.randperm(N, generator=g)[:B].to(device) for _ in range(args.warmup + args.reps)]
    names_ = list(runs)
    times, peaks, encoded = {n: [] for n in names_}, {n: [] for n in names_}, {n: [] for n in names_}

    def step(name, idx, record):
        sync(device); reset_peak(device)
        t = time.perf_counter()
        trainers[name].step([(images, idx)], epoch=0)
        sync(device)
        dt = time.perf_counter() - t
        if record:
            times[name].append(dt); peaks[name].append(peak_gib(device)); encoded[name].append(trainers[name].texts_encoded)
        return dt

    last = {}
    for w in range(args.warmup):
        for name in names_: last[name] = step(name, batches[w], record=False)
    per_round = sum(last.values())
    reps = args.reps
    while reps > 1 and per_round * reps > budget.left() - 1: reps -= 1
    if reps < args.reps: budget.skip(f"train repetitions {reps + 1}..{args.reps}",
                                     f"a round of the three methods takes {per_round:.2f} s", per_round * (args.reps - reps))
    for r in range(reps):
        order = names_[r % 3:] + names_[:r % 3]
        for name in order: step(name, batches[args.warmup + r], record=True)
    methods = {}
    for name in names_:
        med = statistics.median(times[name])
        methods[name] = dict(median_step_s=round(med, 5), min_step_s=round(min(times[name]), 5),
                             max_step_s=round(max(times[name]), 5), images_per_s=round(B / med, 1),
                             peak_mem_gib=None if device.type != "cuda" else max(peaks[name]),
                             texts_encoded=int(statistics.median(encoded[name])), steps_s=[round(x, 5) for x in times[name]])
    for name in names_:
        methods[name]["ratio_to_flyp_pl"] = round(methods[name]["median_step_s"] / methods["flyp_pl"]["median_step_s"], 4)
    res["train"] = dict(model=args.model, weights="random", batch=B, precision=precision, image_size=side, classes=C,
                        images=N, groups=len(texts.group), warmup_steps_per_method=args.warmup, reps=reps,
                        order="interleaved, rotated every repetition", inputs="GPU-resident tensors" if device.type == "cuda"
                        else "resident tensors", build_s=round(build_s, 2), trainer_setup_s=round(setup_s, 2),
                        description_words=round(statistics.mean(len(s.split()) for s in texts.image[:512]), 1),
                        description_tokens=round(float(lengths.mean()), 1),
                        group_description_tokens=round(float((tb.tokens[tb.group_id].argmax(-1) + 1).float().mean()), 1),
                        methods=methods, text_shapes=shape_count(trainers["latteclip_exact"], N, B, c_zs))
    state.update(model=model, train_tf=train_tf, tokenizer=tokenizer, exact=trainers["latteclip_exact"])


def shape_count(trainer, N, B, c_zs, steps=200):
    """Distinct text-tower shapes of a realistic LatteCLIP exact run of `steps` steps, padded as on CUDA and unpadded.

    Each step's texts: the class texts of c_zs and of a second label (c_zs shifted for a fifth of the batch, as c_ft
    differs from c_zs early in a run), the image descriptions and a seeded group draw; planned by `text_shapes`."""
    from latteclip_nb.text_table import text_shapes
    tb = trainer.table.to("cpu"); c_zs = torch.as_tensor(c_zs).cpu()
    g = torch.Generator().manual_seed(2)
    seen = {"padded": set(), "unpadded": set()}
    for s in range(steps):
        idx = torch.randperm(N, generator=g)[:B]
        c_ft = torch.where(torch.rand(B, generator=g) < 0.2, (c_zs[idx] + 1) % len(tb.class_id), c_zs[idx])
        rows, _ = tb.draw_groups(idx, c_zs, "class", 0, s)
        uniq = torch.cat([tb.class_id[c_zs[idx]], tb.class_id[c_ft], tb.image_id[idx], rows]).unique()
        for name, pad in (("padded", (64, 8)), ("unpadded", (1, 1))):
            seen[name].update(text_shapes(tb.tokens[uniq], 8192, pad))
    return dict(steps=steps, padded=len(seen["padded"]), unpadded=len(seen["unpadded"]), pad=[64, 8], call_tokens=8192)


# ------------------------------------------------------------------------------------------------------- loader
def loader_section(args, budget, device, res, state):
    from torch.utils.data import DataLoader
    from latteclip_nb.data import Split, load_image
    from latteclip_nb.train import EpochBatches, SeededViews, collate_views
    split, train_tf, B, W = state["split"], state.get("train_tf"), args.batch, args.workers
    if train_tf is None:   # the train section did not run: the same augmentation from the same loader
        from latteclip_nb.clip import load_clip
        train_tf = load_clip(args.model, pretrained=None, device="cpu")[1]
    # what one worker spends per image: decoding and the train augmentation, timed in this process
    k = min(32, state["n_files"])
    t = time.perf_counter(); ims = [load_image(p) for p in split.paths[:k]]; decode = (time.perf_counter() - t) / k
    t = time.perf_counter(); [train_tf(im) for im in ims]; augment = (time.perf_counter() - t) / k
    views = SeededViews(split, train_tf, 0)
    t = time.perf_counter(); first_views = [views[(0, i)] for i in range(k)]; per_image = (time.perf_counter() - t) / k
    # workers hand their batches over in shared memory (/dev/shm), `prefetch_factor` (2) batches each in flight: at
    # batch 512 that is ~0.3 GB a batch, so 16 workers want ~10 GB; fewer workers when /dev/shm is smaller
    batch_gib = B * first_views[0][0].numel() * first_views[0][0].element_size() / 2**30
    shm = shm_usage()
    W_asked = W
    if W > 0 and shm is not None:
        W = min(W, int(0.8 * shm[1] / (2 * batch_gib)))
        if W < 1:
            budget.skip("loader: every measurement", f"/dev/shm has {shm[1]:.2f} GiB free, one worker's two batches in "
                        f"flight need {2 * batch_gib:.2f} GiB: give the machine a larger /dev/shm")
            res["loader"] = dict(batch=B, num_workers_asked=W_asked, batch_mib=round(batch_gib * 1024, 3),
                                 shm_total_gib=round(shm[0], 2), shm_free_gib=round(shm[1], 2))
            return
    expect = W / per_image   # what W workers could give if nothing else limited them
    sampler = EpochBatches(len(split), B, 1, 0, True)
    # the DataLoader `train` builds, with the same arguments
    loader = DataLoader(views, batch_sampler=sampler, num_workers=W, collate_fn=collate_views,
                        pin_memory=device.type == "cuda", persistent_workers=W > 0)
    n_epoch = sampler.steps_per_epoch * B
    out = dict(files=state["n_files"], file_size=list(args.jpeg_size), jpeg_mib=state["jpeg_mib"], write_s=state["write_s"],
               split_images=len(split), steps_per_epoch=sampler.steps_per_epoch, batch=B, num_workers=W,
               num_workers_asked=W_asked, pin_memory=device.type == "cuda",
               augmentation="clip.make_train_transform (RandomResizedCrop 0.9-1, "
               "ColorJitter p=.8, grayscale p=.2)", decode_ms_per_image=round(1000 * decode, 2),
               augment_ms_per_image=round(1000 * augment, 2), view_ms_per_image=round(1000 * per_image, 2),
               workers_bound_images_per_s=round(expect, 1), batch_mib=round(batch_gib * 1024, 3),
               shm_total_gib=None if shm is None else round(shm[0], 2), shm_free_gib=None if shm is None else round(shm[1], 2),
               shm_need_gib=round(2 * W * batch_gib, 2))
    if W < W_asked:
        out["shm_bounded"] = (f"{W} workers, not {W_asked}: /dev/shm has {shm[1]:.1f} GiB free and each worker keeps two "
                              f"{batch_gib:.2f} GiB batches in flight")
        print(f"  {out['shm_bounded']}", flush=True)
    res["loader"] = out
    watch = ShmWatch()

    def epoch(e, consume=None, loader=loader):
        sampler.set_epoch(e)
        t0 = time.perf_counter(); n = 0; first = None
        with watch:
            for batch in loader:
                if batch is None: continue
                if consume is not None: consume(batch, e)
                n += len(batch[1])
                if first is None: first = (time.perf_counter() - t0, n)
            sync(device)
        total = time.perf_counter() - t0
        out["shm_peak_gib"] = watch.peak_gib
        after = (n - first[1]) / max(1e-9, total - first[0]) if first and n > first[1] else None
        return n, total, first[0] if first else None, after

    est = n_epoch / expect * 1.5 + 5
    if not budget.fits("loader: the first (worker start-up) epoch", est): return
    n, total, first, _ = epoch(0)
    out["first_epoch_s"] = round(total, 2)
    if not budget.fits("loader: the timed loader-only epoch", total): return
    n, total, first, _ = epoch(1)
    out.update(loader_images_per_s=round(n / total, 1), loader_epoch_s=round(total, 2), loader_first_batch_s=round(first, 3))
    trainer = state.get("exact")
    resident = res.get("train", {}).get("methods", {}).get("latteclip_exact", {}).get("images_per_s")
    if trainer is None: budget.skip("loader: the latteclip exact step fed by the loader", "the train section did not run")
    elif budget.fits("loader: the latteclip exact step fed by the loader", total + n / resident * 1.2 + 2):
        reset_peak(device)
        n, total, first, after = epoch(2, lambda batch, e: trainer.step([batch], e))
        out.update(fed_images_per_s=round(n / total, 1), fed_epoch_s=round(total, 2), fed_first_batch_s=round(first, 3),
                   fed_after_first_batch_images_per_s=None if after is None else round(after, 1),
                   resident_images_per_s=resident, fed_over_resident=round(n / total / resident, 3),
                   fed_peak_mem_gib=peak_gib(device))
    rate, fed = out["loader_images_per_s"], out.get("fed_images_per_s")
    fed_txt = "" if fed is None else f"; the exact step fed by it runs at {fed:.0f} images/s"
    if resident is None: out["statement"] = f"the loader alone gives {rate:.0f} images/s with {W} workers"
    elif rate >= resident:
        out["statement"] = (f"the loader alone gives {rate:.0f} images/s with {W} workers, more than the "
                            f"{resident:.0f} images/s of the step on resident tensors{fed_txt}")
    else:
        out["statement"] = (f"input-bound: {W} workers deliver {rate:.0f} images/s (a seeded view of a "
                            f"{args.jpeg_size[0]}x{args.jpeg_size[1]} JPEG takes {1000 * per_image:.1f} ms in one process: "
                            f"{1000 * decode:.1f} ms decoding, {1000 * augment:.1f} ms augmenting, the rest seeding; so at "
                            f"most ~{expect:.0f}/s), the step on resident tensors runs at {resident:.0f} images/s{fed_txt}")
    device_loaders(args, budget, device, state, out, split, train_tf, sampler, W, epoch, trainer, resident)
    # keeping up: the fed step within 10% of the resident one (or, unfed, a loader at least as fast as the step)
    out["keeps_up"] = (None if resident is None else bool(fed >= 0.9 * resident) if fed is not None
                       else bool(rate >= resident))
    del loader


def device_loaders(args, budget, device, state, out, split, train_tf, sampler, W, epoch, trainer, resident):
    """The loader with uint8 workers and the augmentation on the device (`augment="device"`), without and with the image
    cache: images/s of the loader with the device half applied, and the latteclip exact step fed by it."""
    import tempfile
    from torch.utils.data import DataLoader
    from latteclip_nb.train import ImageCache, SeededViews, cache_side, collate_views, crop_size, split_transform
    worker_tf, augment = split_transform(train_tf)
    cache_dir = tempfile.mkdtemp(prefix="image-cache-")
    for name, cached in (("device_augment", False), ("device_augment_image_cache", True)):
        row = out[name] = dict(image_cache=cached)
        cache = keys = None
        if cached:
            if not budget.fits("loader: building the image cache", out.get("loader_epoch_s", 10) * 2): return
            t = time.perf_counter(); cache = ImageCache(cache_dir, cache_side(crop_size(train_tf))); keys = cache.add(split)
            row.update(cache_build_s=round(time.perf_counter() - t, 2), cache_mib=round(cache.data.stat().st_size / 2**20, 1),
                       cache_side=cache.side)
        views = SeededViews(split, worker_tf, 0, cache, keys, with_seeds=True)
        loader = DataLoader(views, batch_sampler=sampler, num_workers=W, collate_fn=collate_views,
                            pin_memory=device.type == "cuda", persistent_workers=W > 0)
        on_device = lambda b, e: augment(b[0].to(device, non_blocking=True), b[2])
        if not budget.fits(f"loader: {name}, start-up and timed epochs", 2 * out.get("loader_epoch_s", 10) + 5): return
        epoch(0, on_device, loader)
        n, total, first, _ = epoch(1, on_device, loader)
        row.update(loader_images_per_s=round(n / total, 1), loader_epoch_s=round(total, 2),
                   batch_mib=round(args.batch * 3 * crop_size(train_tf) ** 2 / 2**20, 3))
        if trainer is not None and resident and budget.fits(f"loader: the latteclip exact step fed by {name}", total + n / resident * 1.2 + 2):
            n, total, first, after = epoch(2, lambda b, e: trainer.step([(on_device(b, e), b[1])], e), loader)
            row.update(fed_images_per_s=round(n / total, 1), fed_over_resident=round(n / total / resident, 3))
        print(f"  {name}: loader {row['loader_images_per_s']:.0f} images/s"
              + (f", fed step {row['fed_images_per_s']:.0f} images/s" if "fed_images_per_s" in row else ""), flush=True)
        del loader
    shutil.rmtree(cache_dir, ignore_errors=True)


def shm_usage(path="/dev/shm"):
    """(total, free) GiB of the shared-memory file system the DataLoader's workers use; None where there is none."""
    try: u = shutil.disk_usage(path)
    except OSError: return None
    return u.total / 2**30, u.free / 2**30


class ShmWatch:
    """Samples /dev/shm's use every 50 ms while in a `with` block; `peak_gib`: the most used above the start, or None."""
    def __init__(self): self.peak_gib, self._stop = None, None

    def __enter__(self):
        import threading
        start = shm_usage()
        if start is None: return self
        base, self._stop = start[0] - start[1], threading.Event()

        def poll():
            while not self._stop.wait(0.05):
                u = shm_usage()
                if u is not None: self.peak_gib = round(max(self.peak_gib or 0.0, u[0] - u[1] - base), 3)
        self._thread = threading.Thread(target=poll, daemon=True); self._thread.start()
        return self

    def __exit__(self, *exc):
        if self._stop is not None: self._stop.set(); self._thread.join()
        self._stop = None


# ------------------------------------------------------------------------------------------------------ caption
FOOD101_CALLS = 2 * 70_700   # Food101's train + val images, one image and one group description each (the reference recipe)


class StepClock:
    """A `generate` logits processor that records when each answer token's logits are ready (after a device sync)."""
    def __init__(self, device): self.device, self.times = device, []

    def __call__(self, input_ids, scores):
        sync(self.device); self.times.append(time.perf_counter())
        return scores


def caption_section(args, budget, device, res, state):
    out = dict(runs=[], answer_tokens=args.answer_tokens, food101_calls=FOOD101_CALLS)
    res["caption"] = out
    try:
        from latteclip_nb import captioners
        from latteclip_nb.llava import compile_support
    except ImportError as e:
        budget.skip("caption: every run", f"latteclip_nb.captioners does not import ({e})")
        out["error"] = f"import failed: {e}"
        return
    from transformers import LogitsProcessorList
    from latteclip_nb.collage import make_collage
    from latteclip_nb.data import get_spec
    from latteclip_nb.prompts import group_prompt, image_prompt, llava_chat
    work = state["work"]
    t0 = time.perf_counter()
    if args.tiny:
        folder = captioners.build_tiny_llava(work / "tiny-llava")
        out["model"] = "tiny LLaVA-NeXT (captioners.build_tiny_llava)"
    else:
        if not budget.fits("caption: building LLaVA-1.6-Mistral-7B", 90): return
        from caption_throughput import build_random_llava_7b
        folder = build_random_llava_7b(work / "llava-7b-random", device, args.llava_text_layers, args.llava_vision_layers)
        out["model"] = (f"LLaVA-1.6-Mistral-7B architecture, random weights ({args.llava_text_layers} Mistral layers, "
                        f"{args.llava_vision_layers} CLIP layers)")
    out["build_and_save_s"] = round(time.perf_counter() - t0, 1)
    out["checkpoint_mib"] = round(sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file()) / 2**20, 2)
    # the captioner names its model by a content hash of the checkpoint: hashed here once, apart from the loads (which
    # then find the hashes memoised by size, mtime and inode)
    t0 = time.perf_counter()
    out["fingerprint"] = captioners.model_fingerprint(folder)
    out["fingerprint_s"] = round(time.perf_counter() - t0, 2)
    print(f"  checkpoint {out['checkpoint_mib'] / 1024:.1f} GiB built and saved in {out['build_and_save_s']} s, "
          f"hashed in {out['fingerprint_s']} s", flush=True)
    if device.type == "cuda": torch.cuda.empty_cache()
    spec = get_spec("dtd")
    photo_prompt, collage_prompt = image_prompt(spec), group_prompt(spec)
    B_max = max(args.caption_batches + [captioners.MAX_CAPTION_BATCH if device.type == "cuda" else captioners.CPU_CAPTION_BATCH])
    pool = max(B_max * (args.caption_reps + 1), 4)   # distinct images for the warm-up and every timed batch (cycled beyond)
    photos = [synthetic_photo(10_000 + i) for i in range(min(pool, 512))]
    collages = [make_collage([synthetic_photo(20_000 + 4 * i + j) for j in range(4)], size=672) for i in range(min(pool, 128))]
    inputs = {"photo": (photos, photo_prompt), "collage": (collages, collage_prompt)}
    precisions = []
    bnb_line = state["env"].get("bitsandbytes_library") or ""
    if device.type != "cuda": budget.skip("caption: NF4", "NF4 needs CUDA")
    elif not state["env"].get("bitsandbytes"): budget.skip("caption: NF4", bnb_line or "bitsandbytes does not import")
    elif bnb_line.startswith("its CUDA library does not load"): budget.skip("caption: NF4", f"bitsandbytes {bnb_line}")
    else: precisions.append("nf4")   # the default (the paper's setting) first
    precisions.append("bf16" if device.type == "cuda" else "fp32")
    N = args.answer_tokens
    load_est, per_caption = 60.0, {}
    clock = StepClock(device)

    def describe_batches(cap, images, prompt, B, n_batches, start=0):
        """describe() on `n_batches` batches of B images (taken cyclically from `start`): per batch (seconds, seconds
        to the first answer token, the seconds between the later tokens), and the answers."""
        cap.max_new_tokens, cap.batch_size = N, B
        cap.generate_kwargs = {**cap.generate_kwargs, "min_new_tokens": N, "logits_processor": LogitsProcessorList([clock])}
        runs, answers = [], []
        for b in range(n_batches):
            batch = [images[(start + b * B + j) % len(images)] for j in range(B)]
            clock.times = []
            sync(device); t = time.perf_counter()
            answers += cap.describe(batch, [prompt] * B)
            sync(device); end = time.perf_counter()
            ts = clock.times
            runs.append((end - t, (ts[0] if ts else end) - t, [y - x for x, y in zip(ts, ts[1:])]))
        return runs, answers

    def measure(cap, precision, view, kind, B, decoding, rule, tokens, warmed, answers_by, load_s, load_peak_gib, model):
        """One caption setting: a warm-up batch where this (decoding, batch) is new, then the timed batches; a row."""
        images, prompt = inputs[kind]
        n_image_tokens, prompt_tokens = tokens[kind]
        n_batches = args.caption_reps if B > 1 else max(args.caption_reps, 3)
        est = _caption_estimate(per_caption, precision, view, kind, B, n_image_tokens, n_batches, (decoding, B) in warmed)
        if decoding == "compiled" and (decoding, B) not in warmed: est = None if est is None else est + 60   # the compile
        what = f"caption: {precision} {view} {kind} batch {B} {decoding}"
        if est is not None and not budget.fits(what, est): return None
        if est is None and budget.left() < 10: budget.skip(what, "less than 10 s left"); return None
        cap.decoding = decoding
        reset_peak(device)
        warm = None
        if (decoding, B) not in warmed:   # kernels, the allocator's pools, and (compiled) the decode step's compile
            warm = describe_batches(cap, images, prompt, B, 1)[0][0][0]; warmed.add((decoding, B))
        runs, answers = describe_batches(cap, images, prompt, B, n_batches, start=B)
        t_full = statistics.median(r[0] for r in runs)
        t_first = statistics.median(r[1] for r in runs)
        steps = [x for r in runs for x in r[2]]   # every later token of every timed batch: one sample each
        decode = statistics.median(steps) if steps else 0.0
        q = statistics.quantiles(steps, n=10) if len(steps) >= 2 else [decode] * 9
        key = (precision, view, kind, B)   # views are per model: single/anyres (LLaVA), hf-448px (the other describer)
        other = answers_by.get(key)   # the same images at the same batch under the other decoding path
        answers_by[key] = answers
        row = dict(model=model, precision=cap.precision, view=view, image=kind, batch=B, batch_rule=rule, decoding=decoding,
                   batches=n_batches, image_tokens=n_image_tokens, prompt_tokens=prompt_tokens, answer_tokens=N,
                   median_batch_s=round(t_full, 4), captions_per_s=round(B / t_full, 3),
                   prefill_s=round(t_first, 4), decode_s_per_token=round(decode, 5),
                   decode_p10_p90_s=[round(q[0], 5), round(q[-1], 5)], decode_samples=len(steps),
                   decode_tokens_per_s=round(B / decode, 1) if decode > 0 else None,
                   prefill_share=round(t_first / t_full, 3), warmup_s=None if warm is None else round(warm, 3),
                   answers_differ=None if other is None else sum(a != b for a, b in zip(answers, other)),
                   mean_words=round(statistics.mean(len(a.split()) for a in answers), 1),
                   projected_food101_h=round(FOOD101_CALLS / (B / t_full) / 3600, 2) if view != "anyres" else None,
                   load_s=round(load_s, 1), load_peak_gib=load_peak_gib, peak_mem_gib=peak_gib(device))
        out["runs"].append(row)
        if "save" in state: state["save"]()   # every caption setting is on disk as soon as it is measured
        per_caption[key] = (t_full, t_first, n_image_tokens)
        differ = "" if row["answers_differ"] is None else f", {row['answers_differ']}/{len(answers)} answers differ"
        print(f"  caption {model:13s} {precision:4s} {view:8s} {kind:7s} batch {B:3d} ({rule:5s}) {decoding:8s}: "
              f"{row['captions_per_s']:8.2f} captions/s (first token {t_first:.3f} s, decode {1000 * decode:.2f} ms/token "
              f"over {len(steps)} tokens{differ})", flush=True)
        return row

    # the single view first (the paper's setting: NF4, then bf16), then another describer of ~3B (Qwen2.5-VL-3B in
    # bf16, images bounded to 448x448 pixels), then anyres (not the paper's setting) if the budget still allows it
    settings = [("llava", p, "single") for p in precisions] + [("qwen2.5-vl-3b", "bf16" if device.type == "cuda" else "fp32", "hf-448px")]
    settings += [("llava", p, "anyres") for p in precisions]
    nf4_failed = False
    for model, precision, view in settings:
        if precision == "nf4" and nf4_failed: continue
        kinds = ["photo", "collage"] if view == "anyres" else ["photo"]
        if not budget.fits(f"caption: loading {model} {precision} {view}", load_est * (2 if precision == "nf4" else 1) + 5): continue
        reset_peak(device)
        t0 = time.perf_counter()
        try:   # batch size and decoding path as a user gets them: the automatic choices
            if model == "llava":
                cap = captioners.LlavaCaptioner(str(folder), single_view=view == "single", quantize=precision, device=device,
                                                max_new_tokens=N, generate_kwargs={"min_new_tokens": N})
            else:
                cap = hf_captioner(args, work, device, precision, N, out)
        except Exception as e:
            if precision != "nf4": raise
            line = str(e).strip().splitlines()[0] if str(e).strip() else ""
            budget.skip("caption: NF4", f"bitsandbytes cannot load the model ({type(e).__name__}: {line})")
            nf4_failed = True   # the other view would fail the same way
            continue
        load_s = time.perf_counter() - t0
        load_est = load_s if precision != "nf4" else load_est
        load_peak_gib = peak_gib(device)
        auto_B, auto_path = cap.batch_size, cap.decoding
        why_not = compile_support(cap.model)
        fast = "compiled" if not why_not else "static"   # where compile is unavailable (a CPU), the static cache alone
        out.setdefault("auto", {})[f"{precision} {view}" if model == "llava" else f"{model} {precision}"] = dict(
            batch=auto_B, decoding=auto_path, compile_unavailable=why_not or None)
        cfg = cap.model.config
        if model == "llava":
            out.setdefault("vocab_size", cfg.text_config.vocab_size)
            if not args.tiny: assert cfg.text_config.vocab_size == 32064, f"vocabulary {cfg.text_config.vocab_size}, not 32064"
        image_token = getattr(cfg, "image_token_id", None) or cfg.image_token_index
        tokens = {}
        for kind in kinds:   # image tokens per item and prompt length, from the captioner's own requests
            images, prompt = inputs[kind]
            enc = cap.inputs([images[0].convert("RGB")], [prompt])
            tokens[kind] = (int((enc["input_ids"] == image_token).sum()), int(enc["input_ids"].shape[1]))
        warmed, answers_by = set(), {}
        common = (tokens, warmed, answers_by, load_s, load_peak_gib, model)
        if view != "anyres":   # what a user gets (auto batch), fast path against eager; LLaVA also at the fixed batches
            plan = [("photo", auto_B, d, "auto") for d in (fast, "eager")]
            plan += [("photo", B, d, "fixed") for B in sorted(args.caption_batches, reverse=True)
                     if B != auto_B and model == "llava" for d in (fast, "eager")]
        else:                  # anyres: eager at the fixed batches, as measured before (not the paper's setting)
            plan = [(kind, B, "eager", "fixed") for B in sorted(args.caption_batches, reverse=True) for kind in kinds]
        for kind, B, decoding, rule in plan:
            measure(cap, precision, view, kind, B, decoding, rule, *common)
        del cap
        gc.collect()
        if device.type == "cuda": torch.cuda.empty_cache()


def hf_captioner(args, work, device, precision, N, out):
    """`HFCaptioner` on Qwen2.5-VL-3B-Instruct's architecture with random weights (--tiny: the tiny Qwen2.5-VL of the tests)."""
    from latteclip_nb.hf_captioner import HFCaptioner
    t0 = time.perf_counter()
    if args.tiny:
        sys.path.insert(0, str(ROOT / "tests"))
        from tiny_vlms import build_tiny_qwen25vl
        folder = build_tiny_qwen25vl(work / "qwen2.5-vl-tiny", max_pixels=12845056)
        out["hf_model"] = "tiny Qwen2.5-VL (tests/tiny_vlms.py)"
    else:
        from caption_throughput import build_random_qwen25vl_3b
        folder = build_random_qwen25vl_3b(work / "qwen2.5-vl-3b-random", device)
        out["hf_model"] = "Qwen2.5-VL-3B-Instruct architecture, random weights (36 Qwen2.5 layers, 32 vision blocks)"
    out["hf_build_and_save_s"] = round(time.perf_counter() - t0, 1)
    return HFCaptioner(str(folder), precision=precision, device=device, max_new_tokens=N, generate_kwargs={"min_new_tokens": N})


def _caption_estimate(per_caption, precision, view, kind, B, image_tokens, n_batches, warmed=True):
    """Seconds a caption setting will take (its warm-up if due, and the timed batches), from the closest one measured."""
    same = [(k, v) for k, v in per_caption.items() if k[0] == precision]
    if not same: same = list(per_caption.items())
    if not same: return None
    (_, _, _, b), (t_full, t_pre, toks) = min(same, key=lambda kv: (kv[0][1] != view, kv[0][2] != kind, abs(kv[0][3] - B)))
    scale = max(1.0, image_tokens / max(1, toks))
    pre = t_pre * scale * B / b
    full = pre + (t_full - t_pre) * max(1.0, scale) * max(1.0, math.sqrt(B / b))
    return 1.3 * full * (n_batches + (0 if warmed else 1)) + (5 if precision == "nf4" else 0)


# -------------------------------------------------------------------------------------------------------- main
def caption_row(res, precision, batch=None, rule=None, fast=True):
    """The single-view photo row of `precision` (at `batch` or by `rule`) on the decoding path chosen automatically."""
    cap = res.get("caption", {})
    auto = cap.get("auto", {}).get(f"{precision} single")
    if auto is None: return None
    return next((r for r in cap.get("runs", []) if r["precision"] == precision and r["view"] == "single"
                 and r["image"] == "photo" and (batch is None or r["batch"] == batch) and (rule is None or r["batch_rule"] == rule)
                 and (r["decoding"] == auto["decoding"]) == fast), None)


def targets(res, applies: bool) -> dict:
    m, ld = res.get("train", {}).get("methods", {}), res.get("loader", {})
    get = lambda row, k, scale=1: None if row is None or row.get(k) is None else round(row[k] * scale, 3)
    default, bf16 = caption_row(res, "nf4", rule="auto"), caption_row(res, "bf16", rule="auto")
    measured = {"latteclip_exact_images_per_s": m.get("latteclip_exact", {}).get("images_per_s"),
                "latteclip_exact_ratio_to_flyp_pl": m.get("latteclip_exact", {}).get("ratio_to_flyp_pl"),
                "latteclip_fast_ratio_to_flyp_pl": m.get("latteclip_fast", {}).get("ratio_to_flyp_pl"),
                "loader_device_augment_images_per_s": ld.get("device_augment", {}).get("loader_images_per_s"),
                "loader_image_cache_images_per_s": ld.get("device_augment_image_cache", {}).get("loader_images_per_s"),
                "exact_step_fed_images_per_s": max((ld.get(k, {}).get("fed_images_per_s") or 0 for k in
                                                    ("device_augment", "device_augment_image_cache")), default=0) or None,
                "captions_per_s_default_nf4": get(default, "captions_per_s"), "captions_per_s_single_bf16": get(bf16, "captions_per_s"),
                "decode_ms_per_token_bf16_b64": get(caption_row(res, "bf16", batch=64), "decode_s_per_token", 1000),
                "food101_h_default": get(default, "projected_food101_h"), "food101_h_bf16": get(bf16, "projected_food101_h")}
    out = {}
    for k, (op, goal) in TARGETS.items():
        v = measured[k]
        met = None if v is None or not applies else bool(v >= goal if op == ">=" else v <= goal)
        out[k] = dict(target=f"{op} {goal}", measured=v, met=met)
    return out


def print_table(res):
    env = res["environment"]
    print(f"\n== gpu_check ({res['mode']}) on {env['gpu'] or env['device']}, torch {env['torch']}, transformers "
          f"{env['transformers']}, open_clip {env['open_clip']}, commit {(env['git_commit'] or '?')[:10]}, "
          f"{res['process_s']:.0f} s")
    tr = res.get("train")
    if tr:
        print(f"\ntraining step: {tr['model']} batch {tr['batch']} {tr['precision']}, {tr['reps']} interleaved repetitions, "
              f"descriptions ~{tr['description_words']} words / {tr['description_tokens']} tokens")
        print(f"  {'method':16s} {'images/s':>10s} {'median s':>10s} {'x flyp_pl':>10s} {'peak GiB':>9s} {'texts':>6s}")
        for name, m in tr["methods"].items():
            print(f"  {name:16s} {m['images_per_s']:10.1f} {m['median_step_s']:10.4f} {m['ratio_to_flyp_pl']:10.3f} "
                  f"{m['peak_mem_gib'] if m['peak_mem_gib'] is not None else '-':>9} {m['texts_encoded']:6d}")
        if tr.get("text_shapes"):
            ts = tr["text_shapes"]
            print(f"  text-tower shapes in {ts['steps']} latteclip exact steps: {ts['padded']} padded to {tuple(ts['pad'])}, "
                  f"{ts['unpadded']} unpadded")
    ld = res.get("loader")
    if ld and "loader_images_per_s" in ld:
        print(f"\nloader: {ld['files']} JPEGs {ld['file_size'][0]}x{ld['file_size'][1]}, {ld['num_workers']} workers, "
              f"decode {ld['decode_ms_per_image']} ms + augment {ld['augment_ms_per_image']} ms per image, "
              f"{ld['view_ms_per_image']} ms per seeded view")
        print(f"  loader alone        {ld['loader_images_per_s']:10.1f} images/s")
        if "fed_images_per_s" in ld:
            print(f"  exact step, loader  {ld['fed_images_per_s']:10.1f} images/s")
            print(f"  exact step, resident{ld['resident_images_per_s']:10.1f} images/s   fed/resident {ld['fed_over_resident']:.2f}")
        for name in ("device_augment", "device_augment_image_cache"):
            d = ld.get(name, {})
            if "loader_images_per_s" in d:
                print(f"  {name.replace('_', ' '):27s}{d['loader_images_per_s']:10.1f} images/s"
                      + (f", exact step fed by it {d['fed_images_per_s']:.1f} images/s" if "fed_images_per_s" in d else ""))
        print(f"  {ld['statement']}")
    cp = res.get("caption", {}).get("runs")
    if cp:
        print(f"\ncaptions ({res['caption']['model']}, {res['caption']['answer_tokens']} tokens per answer; "
              f"auto: {res['caption'].get('auto')}):")
        print(f"  {'model':13s} {'prec':5s} {'view':8s} {'image':8s} {'batch':>5s} {'rule':5s} {'decoding':9s} {'captions/s':>10s} "
              f"{'prefill s':>9s} {'ms/token':>9s} {'img tok':>7s} {'peak GiB':>9s} {'differ':>6s} {'Food101 h':>9s}")
        for r in cp:
            print(f"  {r.get('model', 'llava'):13s} {r['precision']:5s} {r['view']:8s} {r['image']:8s} {r['batch']:5d} {r['batch_rule']:5s} {r['decoding']:9s} "
                  f"{r['captions_per_s']:10.2f} {r['prefill_s']:9.3f} {1000 * r['decode_s_per_token']:9.2f} {r['image_tokens']:7d} "
                  f"{r['peak_mem_gib'] if r['peak_mem_gib'] is not None else '-':>9} "
                  f"{r['answers_differ'] if r['answers_differ'] is not None else '-':>6} "
                  f"{r['projected_food101_h'] if r['projected_food101_h'] is not None else '-':>9}")
    print("\ntargets:")
    for k, t in res["targets"].items():
        print(f"  {k:34s} {t['target']:>8s}  measured {t['measured']}  met {t['met']}")
    for s in res["skipped"]: print(f"  skipped [{s['section']}] {s['what']}: {s['why']}")
    for e in res["errors"]: print(f"  ERROR [{e['section']}] {e['error']}")


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="the JSON file to write (refused if it exists, unless --overwrite)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--tiny", action="store_true", help="tiny configs on CPU in seconds (the test suite's run)")
    p.add_argument("--device", default=None, help="default: cuda if available (--tiny: cpu)")
    p.add_argument("--budget-s", type=float, default=None, help="wall-time budget (default 420; --tiny: 120)")
    p.add_argument("--sections", default="train,loader,caption")
    p.add_argument("--model", default=None, help="open_clip architecture (default ViT-B-32; --tiny: latte-tiny)")
    p.add_argument("--batch", type=int, default=None, help="training batch (default 512; --tiny: 16)")
    p.add_argument("--classes", type=int, default=None, help="classes (default 47, DTD's; --tiny: 8)")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions per method (default 20; --tiny: 3)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps per method (default 3; --tiny: 1)")
    p.add_argument("--files", type=int, default=None, help="JPEG files written at start-up (default 4096; --tiny: 32)")
    p.add_argument("--jpeg-size", type=int, nargs=2, default=None, metavar=("W", "H"), help="default 500 375 (--tiny: 160 120)")
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: the cores; --tiny: 1)")
    p.add_argument("--caption-batches", default=None, help="fixed batches beside the automatic one (default 64; --tiny: 2,1)")
    p.add_argument("--caption-reps", type=int, default=None, help="timed batches per caption setting (default 2; --tiny: 1)")
    p.add_argument("--answer-tokens", type=int, default=30, help="every answer is forced to this many tokens")
    p.add_argument("--llava-text-layers", type=int, default=32, help="Mistral layers of the 7B build (fewer: a smoke test)")
    p.add_argument("--llava-vision-layers", type=int, default=24)
    p.add_argument("--work-dir", default=None, help="temporary files (JPEGs, the random checkpoint); default: a new temp folder")
    p.add_argument("--keep-work", action="store_true", help="keep --work-dir afterwards")
    p.add_argument("--commit", default=None, help="git commit to record when the tree has no .git")
    p.add_argument("--carried", default=str(CARRIED),
                   help="folder of carried packages put at the end of sys.path when it exists (bench/fetch_wheels.sh)")
    a = p.parse_args(argv)
    tiny = a.tiny
    for name, full, small in [("budget_s", 420.0, 120.0), ("model", "ViT-B-32", "latte-tiny"), ("batch", 512, 16),
                              ("classes", 47, 8), ("reps", 20, 3), ("warmup", 3, 1), ("files", 4096, 32),
                              ("jpeg_size", [500, 375], [160, 120]), ("workers", cores(), 1),
                              ("caption_batches", "64", "2,1"), ("caption_reps", 2, 1)]:
        if getattr(a, name) is None: setattr(a, name, small if tiny else full)
    if a.device is None: a.device = "cpu" if tiny else None
    a.caption_batches = [int(b) for b in str(a.caption_batches).split(",")]
    a.sections = [s for s in a.sections.split(",") if s]
    bad = [s for s in a.sections if s not in ("train", "loader", "caption")]
    if bad: p.error(f"--sections: {bad} (use train, loader, caption)")
    return a


def save(res, out_path, budget, device, finished: bool):
    """Write the JSON as it stands (after every section, so a run cut short still reports what it measured)."""
    res["section_s"], res["skipped"] = dict(budget.spent), list(budget.skipped)
    res["wall_s"] = round(budget.elapsed(), 1)
    res["process_s"] = round(time.perf_counter() - _T0, 1)   # with the imports
    res["finished"] = finished
    res["targets"] = targets(res, applies=res["mode"] == "full" and device is not None and device.type == "cuda")
    from latteclip_nb.core import atomic_write_json
    atomic_write_json(out_path, res)


def main(argv=None) -> int:
    args = parse(argv)
    out_path = Path(args.out)
    if out_path.exists() and not args.overwrite:
        print(f"{out_path} exists: pass another --out, or --overwrite to replace it", file=sys.stderr); return 2
    use_carried(args.carried)
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()   # no per-shard loading bars in the log
    try: import open_clip  # noqa: F401
    except ImportError:
        print(f"open_clip is not installed and not carried in {args.carried}: run bench/fetch_wheels.sh where there is "
              "a registry and carry bench/wheels", file=sys.stderr); return 2
    from latteclip_nb.core import get_device
    # the budget is shared among the sections asked for: --sections train --budget-s 90 gives train 75 of the 90 s
    budget = Budget(args.budget_s, {k: v for k, v in SHARES.items() if k == "startup" or k in args.sections})
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="latteclip-gpucheck-"))
    work.mkdir(parents=True, exist_ok=True)
    res = dict(schema=SCHEMA, mode="tiny" if args.tiny else "full", started_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               argv=sys.argv[1:] if argv is None else list(argv), budget_s=args.budget_s, skipped=[], errors=[])
    state, device = {"work": work}, None
    try:
        # start-up: the JPEGs first, before CUDA is initialised in this process
        budget.start("startup")
        from latteclip_nb.data import Split
        jpegs = work / "jpegs"; jpegs.mkdir(exist_ok=True)
        t0 = time.perf_counter()
        jobs = [(str(jpegs), i, tuple(args.jpeg_size)) for i in range(args.files if "loader" in args.sections else 0)]
        if args.workers > 1 and args.files > 64:
            with ProcessPoolExecutor(min(args.workers, cores())) as ex: sizes = list(ex.map(_write_jpeg, jobs, chunksize=32))
        else: sizes = [_write_jpeg(j) for j in jobs]
        # one epoch lists the files often enough that every worker builds at least two batches (a steady state)
        repeat = max(1, math.ceil(2 * max(1, args.workers) * args.batch / args.files))
        ids = [f"{i:05d}.jpg" for i in range(args.files)] * repeat
        state.update(split=Split(jpegs, ids, None, CLASSES[:args.classes] if args.classes <= len(CLASSES) else
                                 [f"class {i}" for i in range(args.classes)]),
                     n_files=args.files, n_images=len(ids), jpeg_mib=round(sum(sizes) / 2**20, 1),
                     write_s=round(time.perf_counter() - t0, 2))
        device = get_device(args.device)
        state["env"] = res["environment"] = environment(device, args.commit)
        wrote = f", {len(jobs)} JPEGs ({state['jpeg_mib']} MiB) in {state['write_s']} s" if jobs else ""
        print(f"gpu_check: {device} {res['environment']['gpu'] or ''}{wrote}, budget {args.budget_s:.0f} s", flush=True)
        budget.end()
        save(res, out_path, budget, device, finished=False)
        state["save"] = lambda: save(res, out_path, budget, device, finished=False)
        for name, fn in (("train", train_section), ("loader", loader_section), ("caption", caption_section)):
            if name not in args.sections: continue
            if name == "caption":   # the captioner's peak memory is measured without the training state beside it
                for k in ("model", "exact", "train_tf", "tokenizer"): state.pop(k, None)
                gc.collect()
                if device.type == "cuda": torch.cuda.empty_cache()
            budget.start(name)
            print(f"[{name}] {budget.left():.0f} s budget", flush=True)
            try: fn(args, budget, device, res, state)
            except Exception as e:
                traceback.print_exc()
                res["errors"].append(dict(section=name, error=f"{type(e).__name__}: {e}"))
            budget.end()
            save(res, out_path, budget, device, finished=False)
            if device.type == "cuda": torch.cuda.empty_cache()
    finally:
        state.clear()
        if not args.keep_work: shutil.rmtree(work, ignore_errors=True)
    save(res, out_path, budget, device, finished=True)
    print_table(res)
    print(f"\nwrote {out_path}")
    return 1 if res["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
