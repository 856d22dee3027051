"""Kernel launches and host syncs of LatteCLIP's text encoding and training step, the packed encoder against the
bucketed one, side by side on a CPU.

At batch 512 a GPU step is bounded by how many kernels the host launches (~10-50 us each) and how often it waits for
the device, not by arithmetic, so this script counts what a GPU would launch and wait for, on a CPU:

1. text: the real ViT-B-32 text tower (open_clip, pretrained=None) encodes, forward and backward, the texts of one
   LatteCLIP step: 512 image and ~484 group descriptions of 20-45 tokens and 47 class texts of 6-10 tokens (1043 in
   all, as in gpu_check's step). For the packed encoder (one attention call per distinct length, the earlier
   `encode_tokens`, kept here) and `encode_tokens` with the bucket cost of a CPU (64) and of CUDA (8192): aten ops
   (views apart), host syncs, buckets, CPU seconds, and the largest feature difference to the packed encoder.
2. step: `Trainer.step` at batch 512 with gpu_check's texts for flyp_pl, latteclip exact and fast, with each encoder
   (the buckets priced as on CUDA), on ViT-B-32's depth with tiny widths (`ViT-B-32-narrow`: 12 + 12 blocks, width
   64; op and sync counts depend on the depth and the texts, not the widths, and its CPU time is mostly the host's
   own work per op).

Ops are counted below autograd and autocast (a TorchDispatchMode), forward and backward. Host syncs: the reads that
wait for a GPU (`.item()`, `bool()`/`int()` of a tensor, `nonzero` and boolean-mask indexing, `unique`) seen by the
dispatcher, plus `.cpu()`, `.numpy()` and `.tolist()` calls; on a CPU these also count reads of tensors that a GPU
run would already hold on the host, so the count is an upper bound.

    PYTHONPATH=. python bench/step_overhead.py                        # ~5 minutes on 2 CPU cores
    PYTHONPATH=. python bench/step_overhead.py --texts 256 --sections text   # smaller: a minute
"""
import argparse, collections, statistics, sys, time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

HERE = Path(__file__).resolve().parent
for p in (str(HERE.parent), str(HERE)):
    if p not in sys.path: sys.path.insert(0, p)

from latteclip_nb import train as T   # noqa: E402

VIEWS = {"view", "_unsafe_view", "transpose", "permute", "t", "expand", "slice", "select", "unsqueeze", "squeeze",
         "as_strided", "alias", "detach", "split", "split_with_sizes", "unbind", "reshape", "_reshape_alias",
         "lift_fresh", "chunk", "narrow", "unflatten", "flatten", "view_as", "expand_as", "t_", "diagonal"}
SYNC_OPS = {"_local_scalar_dense", "nonzero", "_unique2", "unique_consecutive", "unique_dim", "masked_select",
            "repeat_interleave", "is_nonzero"}


class Count(TorchDispatchMode):
    """Counts aten ops (views apart), host-sync ops, and the Python-level host reads (.cpu/.numpy/.tolist) in a block."""
    def __enter__(self):
        self.ops, self.views, self.syncs, self.by_name = 0, 0, 0, collections.Counter()
        self._saved = {m: getattr(torch.Tensor, m) for m in ("cpu", "numpy", "tolist")}
        for m, f in self._saved.items():
            def wrap(t, *a, _f=f, **k):
                self.syncs += 1; self.by_name[f"Tensor.{_f.__name__}"] += 1
                return _f(t, *a, **k)
            setattr(torch.Tensor, m, wrap)
        return super().__enter__()

    def __exit__(self, *exc):
        for m, f in self._saved.items(): setattr(torch.Tensor, m, f)
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in VIEWS: self.views += 1
        else: self.ops += 1; self.by_name[name] += 1
        if name in SYNC_OPS: self.syncs += 1; self.by_name[f"sync:{name}"] += 1
        return func(*args, **(kwargs or {}))


def packed_encode_tokens(model, tokens):
    "The earlier encode_tokens: all real tokens packed into one [T, W] matrix, one attention call per distinct length."
    lengths = (tokens.argmax(dim=-1) + 1).cpu()
    order = torch.argsort(lengths, stable=True)
    vals, counts = torch.unique_consecutive(lengths[order], return_counts=True)
    groups, ids, pos, eot, start, i = [], [], [], [], 0, 0
    for L, n in zip(vals.tolist(), counts.tolist()):
        rows = order[i:i + n].to(tokens.device); i += n
        ids.append(tokens[rows, :L].reshape(-1)); pos.append(torch.arange(L).repeat(n))
        eot.append(start + torch.arange(n) * L + L - 1)
        groups.append((start, n, L)); start += n * L
    ids, pos, eot = torch.cat(ids), torch.cat(pos).to(tokens.device), torch.cat(eot).to(tokens.device)
    cast = model.transformer.get_cast_dtype()
    x = model.token_embedding(ids).to(cast) + model.positional_embedding[pos].to(cast)
    for blk in model.transformer.resblocks:
        W, H = x.shape[-1], blk.attn.num_heads
        qkv = F.linear(blk.ln_1(x), blk.attn.in_proj_weight, blk.attn.in_proj_bias)
        out = []
        for s, n, L in groups:
            q, k, v = qkv[s:s + n * L].view(n, L, 3, H, W // H).permute(2, 0, 3, 1, 4)
            out.append(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(n * L, W))
        x = x + blk.ls_1(blk.attn.out_proj(torch.cat(out)))
        x = x + blk.ls_2(blk.mlp(blk.ln_2(x)))
    x = model.ln_final(x[eot])
    x = model.text_projection(x) if isinstance(model.text_projection, torch.nn.Linear) else x @ model.text_projection
    return F.normalize(x, dim=-1)[torch.argsort(order.to(tokens.device))]


ENCODERS = {"packed (before)": packed_encode_tokens,
            "buckets, cpu cost 64": lambda m, t: T.encode_tokens(m, t, call_tokens=64),
            "buckets, cuda cost 8192": lambda m, t: T.encode_tokens(m, t, call_tokens=8192)}


def step_tokens(n_desc: int, n_class: int, seed: int = 0):
    "Token ids [n_desc + n_class, 77]: descriptions of 20-45 tokens, class texts of 6-10, random ids between sot and eot."
    g = torch.Generator().manual_seed(seed)
    lens = torch.cat([torch.randint(20, 46, (n_desc,), generator=g), torch.randint(6, 11, (n_class,), generator=g)])
    tok = torch.zeros(len(lens), 77, dtype=torch.long)
    for i, L in enumerate(lens.tolist()):
        tok[i, 0], tok[i, 1:L - 1], tok[i, L - 1] = 49406, torch.randint(1, 49000, (L - 2,), generator=g), 49407
    return tok[torch.randperm(len(lens), generator=g)]


def text_section(args):
    import open_clip
    torch.manual_seed(0)
    model, _, _ = open_clip.create_model_and_transforms("ViT-B-32", pretrained=None)
    model.train()
    n_class = min(47, args.texts // 20)
    tok = step_tokens(args.texts - n_class, n_class)
    lens = tok.argmax(-1) + 1
    print(f"\n[text] ViT-B-32 text tower (random weights), {len(tok)} texts: {n_class} of 6-10 tokens, the rest 20-45 "
          f"(mean {lens.float().mean():.1f}, {len(lens.unique())} distinct lengths), forward + backward, "
          f"{torch.get_num_threads()} threads, fp32")
    small = tok[:16]
    for enc in ENCODERS.values(): enc(model, small).sum().backward()   # warm-up
    model.zero_grad(set_to_none=True)
    feats, rows = {}, []
    for name, enc in ENCODERS.items():
        counts, secs = [], []
        for r in range(args.reps):
            t0 = time.perf_counter()
            with Count() as c:
                out = enc(model, tok)
                out.pow(3).sum().backward()
            secs.append(time.perf_counter() - t0); counts.append(c)
            model.zero_grad(set_to_none=True)
        feats[name] = out.detach()
        c = counts[-1]
        b, padded = len(lens.unique()), None
        if "buckets" in name:
            bk = T.length_buckets(lens.bincount(minlength=78).tolist(), 64 if "64" in name else 8192)
            b, padded = len(bk), sum((s - a) * L for a, s, L in bk)
        rows.append((name, c.ops, c.views, c.syncs, b, padded, statistics.median(secs)))
        print(f"  {name:24s} {c.ops:6d} ops  {c.views:6d} views  {c.syncs:3d} host reads  {b:3d} "
              f"{'attention groups' if 'packed' in name else 'buckets'}"
              f"{'' if padded is None else f' ({padded} tokens, {padded / int(lens.sum()):.2f}x the real ones)'}"
              f"  {statistics.median(secs):7.2f} s", flush=True)
    ref = feats["packed (before)"]
    for name, f in feats.items():
        if name != "packed (before)": print(f"  max |feature difference| {name} vs packed: {(f - ref).abs().max():.2e}")
    with torch.no_grad():   # and against open_clip's own encode_text on the full 77-token context (a few texts)
        d = (T.encode_tokens(model, tok[:32]) - model.encode_text(tok[:32], normalize=True)).abs().max()
    print(f"  max |feature difference| encode_tokens vs open_clip encode_text (32 texts): {d:.2e}")
    base = rows[0]
    for r in rows[1:]: print(f"  {r[0]}: {base[1] / r[1]:.1f}x fewer ops than packed, CPU time {r[6] / base[6]:.2f}x")
    return rows


def narrow_vit_b32():
    "ViT-B-32's architecture (12 + 12 blocks, 224 px, patch 32, 77 tokens) at width 64: the same ops, little arithmetic."
    import json, tempfile, open_clip
    cfg = open_clip.get_model_config("ViT-B-32")
    cfg["embed_dim"] = 64
    cfg["vision_cfg"].update(width=64, head_width=32)
    cfg["text_cfg"].update(width=64, heads=8)
    folder = Path(tempfile.mkdtemp())
    (folder / "ViT-B-32-narrow.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(folder)
    torch.manual_seed(0)
    model, _, _ = open_clip.create_model_and_transforms("ViT-B-32-narrow", pretrained=None)
    return model, open_clip.get_tokenizer("ViT-B-32")


def step_section(args):
    from gpu_check import CLASSES, make_texts
    from latteclip_nb.data import get_spec
    model, tokenizer = narrow_vit_b32()
    saved_cost, T._CALL_TOKENS["cpu"] = T._CALL_TOKENS["cpu"], T._CALL_TOKENS["cuda"]   # bucket as on a GPU
    B, C, N = args.batch, 47, 4 * args.batch   # 4 images a group: ~880 distinct texts a LatteCLIP step at batch 512
    spec = get_spec("dtd")
    class_texts = [spec.template.format(c) for c in CLASSES[:C]]
    c_zs, texts = make_texts(N, C)
    side = model.visual.preprocess_cfg["size"]
    side = side if isinstance(side, int) else side[0]
    runs = {"flyp_pl": dict(method="flyp_pl", pseudo="online"),
            "latteclip_exact": dict(method="latteclip", text_grad="exact"),
            "latteclip_fast": dict(method="latteclip", text_grad="fast")}
    trainers = {k: T.Trainer(model, tokenizer, class_texts, T.TrainConfig(epochs=1, warmup_steps=1, batch_size=B, **kw),
                             total_steps=10_000, c_zs=c_zs, texts=texts, device="cpu") for k, kw in runs.items()}
    shared = trainers["flyp_pl"]
    for t in trainers.values(): t.optimizer, t.scheduler = shared.optimizer, shared.scheduler
    g = torch.Generator().manual_seed(1)
    images = torch.randn(B, 3, side, side, generator=g)
    idx = [torch.randperm(N, generator=g)[:B] for _ in range(args.reps + 1)]
    print(f"\n[step] Trainer.step on ViT-B-32-narrow (ViT-B-32's ops at width 64), buckets priced as on CUDA, batch {B}, {C} classes, {N} images, "
          f"{len(texts.group)} groups, fp32 CPU")
    original, res = T.encode_tokens, {}
    try:
        for enc_name, enc in (("packed (before)", packed_encode_tokens), ("buckets (now)", original)):
            T.encode_tokens = enc
            for name, tr in trainers.items():
                tr.step([(images, idx[0])], epoch=0)   # warm-up
                secs = []
                for r in range(args.reps):
                    t0 = time.perf_counter()
                    with Count() as c: tr.step([(images, idx[r + 1])], epoch=0)
                    secs.append(time.perf_counter() - t0)
                res[enc_name, name] = (c.ops, c.syncs, statistics.median(secs), tr.texts_encoded)
                syncs = ", ".join(f"{k.removeprefix('sync:')} {v}" for k, v in sorted(c.by_name.items())
                                  if k.startswith(("sync:", "Tensor.")))
                print(f"  {enc_name:16s} {name:16s} {c.ops:6d} ops  {c.syncs:3d} host reads ({syncs})  "
                      f"{statistics.median(secs):6.3f} s  texts {tr.texts_encoded}", flush=True)
    finally:
        T.encode_tokens, T._CALL_TOKENS["cpu"] = original, saved_cost
    for name in runs:
        a, b = res["packed (before)", name], res["buckets (now)", name]
        print(f"  {name:16s} ops {a[0]} -> {b[0]} ({a[0] / b[0]:.1f}x fewer), host time {a[2]:.3f} -> {b[2]:.3f} s")
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sections", default="text,step", help="text, step or both")
    p.add_argument("--texts", type=int, default=1043, help="[text] texts encoded (1043: gpu_check's LatteCLIP step)")
    p.add_argument("--batch", type=int, default=512, help="[step] images per step")
    p.add_argument("--reps", type=int, default=1, help="timed repetitions (the median is printed)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    sections = args.sections.split(",")
    if "text" in sections: text_section(args)
    if "step" in sections: step_section(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
