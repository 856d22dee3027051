"""Caption throughput: captions/s and peak memory for a captioner backend, batch size and view setting.

Not a test: it prints numbers. Examples:

    python bench/caption_throughput.py                    # tiny random LLaVA-NeXT on CPU: checks the harness
    python bench/caption_throughput.py --arch llava-7b --quantize nf4 --batch-sizes 16,32,64 --views single,anyres
    python bench/caption_throughput.py --model llava-hf/llava-v1.6-mistral-7b-hf   # real weights (natural answer lengths)
    python bench/caption_throughput.py --backend openai --base-url http://localhost:8000/v1 \\
        --served-model llava-hf/llava-v1.6-mistral-7b-hf --batch-sizes 8,32   # batch size = requests in flight
    python bench/caption_throughput.py --backend openai --serve-tiny       # starts `transformers serve` on the tiny model

`--arch llava-7b` builds LLaVA-1.6-Mistral-7B (CLIP ViT-L/14-336 + Mistral-7B) from a hand-written config with random
weights, saves it once under --work-dir and reloads it like a downloaded checkpoint (so `--quantize nf4` goes through
bitsandbytes as the real model would). Speed does not depend on the weight values; random weights would stop at
arbitrary lengths, so every answer is forced to --answer-tokens tokens (min_new_tokens = max_new_tokens). The target
is >= 25 captions/s single-view on one H100.
"""
import argparse, json, os, resource, tempfile, time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from latteclip_nb.captioners import (LLAVA_PINPOINTS, LlavaCaptioner, OpenAICaptioner, build_tiny_llava,
                                     tiny_llava_processor, tiny_llava_tokenizer, transformers_server)

PROMPT = "Describe the texture in the photo concisely, less than 20 words."  # a typical T_image prompt


LLAVA_7B_VOCAB = 32064   # llava-hf/llava-v1.6-mistral-7b-hf's embedding and output rows


def llava_7b_config(tokenizer, text_layers: int = 32, vision_layers: int = 24):
    """LLaVA-1.6-Mistral-7B's architecture (hand-written; ids from `tokenizer`, the vocabulary padded to the real 32064).

    The tokenizer is trained on a few lines (a few hundred tokens); the embedding and the output layer still get the real
    model's 32064 rows, so parameters, memory and the output layer's read per decoded token are the real model's."""
    assert len(tokenizer) <= LLAVA_7B_VOCAB, f"tokenizer of {len(tokenizer)} tokens, more than {LLAVA_7B_VOCAB}"
    from transformers import CLIPVisionConfig, LlavaNextConfig, MistralConfig
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=vision_layers,
                              num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768,
                              hidden_act="quick_gelu")
    text = MistralConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=text_layers, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=128, vocab_size=LLAVA_7B_VOCAB, max_position_embeddings=32768,
                         rms_norm_eps=1e-5, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    return LlavaNextConfig(vision_config=vision, text_config=text, image_token_index=tokenizer.image_token_id,
                           image_grid_pinpoints=LLAVA_PINPOINTS, vision_feature_layer=-2,
                           vision_feature_select_strategy="default", tie_word_embeddings=False)


def _publish(model, tmp: Path, folder: Path, t0: float) -> Path:
    "Move the saved random model from `tmp` into `folder` (atomic), say its size and build time, and free its memory."
    os.replace(tmp, folder)
    n = sum(p.numel() for p in model.parameters())
    print(f"built {n / 1e9:.2f} B random parameters in {time.perf_counter() - t0:.0f} s -> {folder}", flush=True)
    del model
    if torch.cuda.is_available(): torch.cuda.empty_cache()
    return folder


def build_random_llava_7b(folder: Path, device, text_layers=32, vision_layers=24) -> Path:
    """Save a random-weight LLaVA-1.6-Mistral-7B (fp16 on GPU, fp32 on CPU; 32064 vocabulary rows), once."""
    from transformers import GenerationConfig, LlavaNextForConditionalGeneration
    if (folder / "config.json").exists() and (folder / "processor_config.json").exists(): return folder
    tokenizer = tiny_llava_tokenizer(vocab_size=32064)
    dtype = torch.float16 if torch.device(device).type == "cuda" else torch.float32
    t0 = time.perf_counter()
    with torch.device(device):
        model = LlavaNextForConditionalGeneration._from_config(llava_7b_config(tokenizer, text_layers, vision_layers),
                                                               dtype=dtype)
    rows = (model.get_input_embeddings().weight.shape[0], model.get_output_embeddings().weight.shape[0])
    assert rows == (LLAVA_7B_VOCAB, LLAVA_7B_VOCAB), f"embedding/output rows {rows}, not {LLAVA_7B_VOCAB}"
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id, do_sample=False)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    model.save_pretrained(tmp, max_shard_size="4GB"); model.generation_config.save_pretrained(tmp); tiny_llava_processor(tokenizer).save_pretrained(tmp)
    return _publish(model, tmp, folder, t0)


QWEN25VL_3B_VOCAB = 151936   # Qwen/Qwen2.5-VL-3B-Instruct's embedding rows (tied with the output layer)
QWEN25VL_3B_TEXT = dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                        num_key_value_heads=2, vocab_size=QWEN25VL_3B_VOCAB, tie_word_embeddings=True,
                        rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]})
QWEN25VL_3B_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048,
                          fullatt_block_indexes=[7, 15, 23, 31])


def build_random_qwen25vl_3b(folder: Path, device, text_layers=36, vision_layers=32) -> Path:
    """Save a random-weight Qwen2.5-VL-3B-Instruct (bf16 on GPU, fp32 on CPU; the real 151936-row vocabulary), once.

    Tokenizer, processor and chat template come from the tiny Qwen2.5-VL of tests/tiny_vlms.py (the real processor's
    pixel bounds); tokens the small tokenizer does not have are never generated (`suppress_tokens`)."""
    import json, shutil, sys
    from transformers import AutoConfig, GenerationConfig, Qwen2_5_VLForConditionalGeneration
    if (folder / "config.json").exists() and (folder / "chat_template.json").exists(): return folder
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from tiny_vlms import build_tiny_qwen25vl
    tiny = build_tiny_qwen25vl(folder.parent / f".{folder.name}-tokenizer", max_pixels=12845056)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    for f in tiny.iterdir():
        if f.name not in ("config.json", "model.safetensors", "generation_config.json", "README.md"): shutil.copy(f, tmp / f.name)
    cfg = json.loads((tiny / "config.json").read_text())
    cfg.update(QWEN25VL_3B_TEXT, num_hidden_layers=text_layers, torch_dtype="bfloat16")
    cfg["vision_config"].update(QWEN25VL_3B_VISION, depth=vision_layers,
                                fullatt_block_indexes=[i for i in QWEN25VL_3B_VISION["fullatt_block_indexes"] if i < vision_layers])
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    gen = json.loads((tiny / "generation_config.json").read_text())
    n_tokens = max(int(k) for k in json.loads((tiny / "tokenizer_config.json").read_text())["added_tokens_decoder"]) + 1
    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    t0 = time.perf_counter()
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration._from_config(AutoConfig.from_pretrained(tmp), dtype=dtype)
    model.generation_config = GenerationConfig(**{k: v for k, v in gen.items() if k != "transformers_version"},
                                               suppress_tokens=list(range(n_tokens, QWEN25VL_3B_VOCAB)))
    model.save_pretrained(tmp, max_shard_size="4GB")
    return _publish(model, tmp, folder, t0)


def synthetic_images(n: int, size=(500, 375), seed=0) -> list:
    """`n` noise photos of a typical dataset size (the pixels do not change the cost)."""
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(n)]


def peak_memory_gib(device) -> tuple[float, str]:
    if torch.device(device).type == "cuda": return torch.cuda.max_memory_allocated() / 2**30, "GPU allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "process RSS (lifetime peak)"


def measure(captioner, batch_size: int, n_batches: int, device) -> dict:
    """Warm up on one batch, then time `n_batches` batches of `batch_size` captions."""
    captioner.batch_size = batch_size
    if hasattr(captioner, "concurrency"): captioner.concurrency = batch_size
    captioner.describe(synthetic_images(batch_size, seed=1), [PROMPT] * batch_size)  # warm-up (kernels, caches)
    images = synthetic_images(batch_size * n_batches)
    if torch.device(device).type == "cuda": torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
    before = captioner.stats.answers
    t0 = time.perf_counter()
    answers = captioner.describe(images, [PROMPT] * len(images))
    if torch.device(device).type == "cuda": torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    mem, kind = peak_memory_gib(device)
    if isinstance(captioner, OpenAICaptioner): kind = "client process RSS (the server is not measured)"
    words = np.mean([len(a.split()) for a in answers])
    return {"captions": len(answers), "seconds": round(seconds, 3), "captions_per_s": round(len(answers) / seconds, 3),
            "mean_words": round(float(words), 1), "peak_mem_gib": round(mem, 3), "mem_kind": kind,
            "answers_counted": captioner.stats.answers - before}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", choices=["llava", "openai"], default="llava")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--tiny", action="store_true", help="tiny random LLaVA-NeXT (the default when nothing else is given)")
    src.add_argument("--arch", choices=["llava-7b"], help="real architecture with random weights")
    src.add_argument("--model", help="a LLaVA-NeXT hub id or folder with real weights")
    p.add_argument("--text-layers", type=int, default=32, help="--arch: Mistral layers (fewer for a smoke test)")
    p.add_argument("--vision-layers", type=int, default=24, help="--arch: CLIP layers")
    p.add_argument("--quantize", default="auto", help="auto | nf4 | fp16 | bf16 | fp32")
    p.add_argument("--device", default=None)
    p.add_argument("--views", default="single", help="comma list of single,anyres")
    p.add_argument("--batch-sizes", default="1,4", help="comma list")
    p.add_argument("--n-batches", type=int, default=2, help="timed batches per setting")
    p.add_argument("--answer-tokens", type=int, default=None,
                   help="force every answer to this many tokens (default 30 for --tiny/--arch, natural for --model)")
    p.add_argument("--base-url", help="--backend openai: the server's URL")
    p.add_argument("--served-model", help="--backend openai: the served model name")
    p.add_argument("--serve-tiny", action="store_true", help="--backend openai: start `transformers serve` on the tiny model")
    p.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "latteclip-bench"))
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--json", help="append one JSON line per setting to this file")
    args = p.parse_args(argv)
    if args.threads: torch.set_num_threads(args.threads)
    from latteclip_nb.core import get_device
    device = get_device(args.device)
    work = Path(args.work_dir); work.mkdir(parents=True, exist_ok=True)
    real = args.model is not None
    forced = args.answer_tokens or (None if real else 30)
    max_new = forced or 77
    gen = {"min_new_tokens": forced} if forced else {}
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    rows = []

    def report(row):
        rows.append(row)
        print(" | ".join(f"{k}={v}" for k, v in row.items()), flush=True)
        if args.json:
            with open(args.json, "a") as f: f.write(json.dumps(row) + "\n")

    print(f"device={device} torch={torch.__version__} gpu={torch.cuda.get_device_name() if device.type == 'cuda' else '-'}",
          flush=True)
    if args.backend == "openai":
        def run(url, name, bos="request"):  # transformers serve adds <s> itself and rejects vLLM's add_special_tokens
            cap = OpenAICaptioner(url, name, max_tokens=max_new, retries=2, timeout=600, bos=bos)
            for bs in batch_sizes:
                report({"backend": "openai", "model": name, "view": "server", "batch": bs, **measure(cap, bs, args.n_batches, "cpu")})
        if args.serve_tiny:
            tiny = build_tiny_llava(work / "tiny-llava")
            with transformers_server(tiny, device=str(device)) as url: run(url, str(tiny), bos="server")
        elif args.base_url and args.served_model: run(args.base_url, args.served_model)
        else: p.error("--backend openai needs --base-url and --served-model, or --serve-tiny")
        return rows

    if real: folder, name = args.model, args.model
    elif args.arch: folder = build_random_llava_7b(work / f"llava-7b-random-t{args.text_layers}-v{args.vision_layers}",
                                                   device, args.text_layers, args.vision_layers); name = "llava-7b(random)"
    else: folder = build_tiny_llava(work / "tiny-llava"); name = "tiny"
    for view in args.views.split(","):
        if view not in ("single", "anyres"): p.error(f"--views: {view!r} is not single or anyres")
        t0 = time.perf_counter()
        cap = LlavaCaptioner(str(folder), single_view=view == "single", quantize=args.quantize, device=device,
                             max_new_tokens=max_new, generate_kwargs=gen)
        load_s = time.perf_counter() - t0
        for bs in batch_sizes:
            report({"backend": "llava", "model": name, "view": view, "precision": cap.precision, "batch": bs,
                    "answer_tokens": forced or "natural", "load_s": round(load_s, 1), **measure(cap, bs, args.n_batches, device)})
        del cap
        if device.type == "cuda": torch.cuda.empty_cache()
    return rows


if __name__ == "__main__":
    main()
