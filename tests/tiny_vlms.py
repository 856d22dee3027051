"""Tiny random-weight vision-language models (Qwen2.5-VL, SmolVLM/Idefics3) in the on-disk layout of the real hub
checkpoints, built offline for the tests of `--captioner hf` (`nbs/05ab_hf_captioner.ipynb`).

Configs are written by hand, tokenizers trained in memory on a few sentences and given the family's added tokens in
the real order, and the weights come from the real transformers class with a tiny config and a fixed seed, so the
folders load through `AutoProcessor` and `AutoModelForImageTextToText` as the real ones do (legacy flat config and
weight names for Qwen2.5-VL, `chat_template.json`, ...). Differences on purpose: tiny widths, random weights drawn
with std `init_std` (the written config keeps the real `initializer_range`), toy token ids, one weights file, float32
by default, and smaller image-size bounds unless given.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

__all__ = [
    "build_tiny_qwen25vl",
    "build_tiny_idefics3",
    "QWEN25VL_FILES",
    "IDEFICS3_FILES",
]

# A few sentences to train the toy BPE on (chat/vision flavoured so prompts tokenize into real merges).
_CORPUS = [
    "Describe this image in one sentence.",
    "What is in the picture? There is a red square and a blue circle.",
    "You are a helpful assistant. Answer the question about the image.",
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "A photo of a cat sitting on a wooden table next to a green plant.",
    "How many objects can you see? I can see three objects: 1, 2 and 3.",
    "Read the text in the document and summarize it briefly.",
    "The chart shows the number of visitors per month in 2024.",
    "User: what color is the sky? Assistant: the sky is blue today.",
    "Is there a person in this photo? No, there is only a dog and a ball.",
    "Write a short caption for the image, then list the main colors.",
    "Images, videos and text are all inputs for a vision language model.",
]

# Files each builder writes (README.md is written too but is not needed for loading).
QWEN25VL_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "preprocessor_config.json",
    "chat_template.json",
)
IDEFICS3_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "preprocessor_config.json",
    "processor_config.json",
    "chat_template.json",
)


# --------------------------------------------------------------------------------------------------
# generic helpers
# --------------------------------------------------------------------------------------------------
def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _is_complete(path: Path, files) -> bool:
    if not path.is_dir() or not all((path / f).is_file() for f in files):
        return False
    try:
        json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return True


def _build_atomically(path, files, write_fn) -> Path:
    """Run ``write_fn(tmp_dir)`` in a temp folder next to ``path`` and move it into place."""
    path = Path(path).expanduser().absolute()
    if _is_complete(path, files):
        return path
    if path.exists() and any(path.iterdir()):
        raise FileExistsError(f"{path} exists, is not empty and does not hold a complete tiny model")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        write_fn(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
        try:
            os.replace(tmp, path)  # atomic; replaces an empty dir, fails on a non-empty one
        except OSError:
            if _is_complete(path, files):  # somebody else finished first
                return path
            raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def _added_tokens_decoder(tokenizer) -> dict:
    """``added_tokens_decoder`` block of a v4-style tokenizer_config.json, from a tokenizers.Tokenizer."""
    out = {}
    for idx, tok in sorted(tokenizer.get_added_tokens_decoder().items()):
        out[str(idx)] = {
            "content": tok.content,
            "lstrip": tok.lstrip,
            "normalized": tok.normalized,
            "rstrip": tok.rstrip,
            "single_word": tok.single_word,
            "special": tok.special,
        }
    return out


def _train_bpe(tokenizer, vocab_size: int, special_tokens=()):
    from tokenizers import pre_tokenizers, trainers

    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        show_progress=False,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(_CORPUS, trainer=trainer)
    return tokenizer


def _add_tokens(tokenizer, tokens) -> None:
    """Append (content, special) pairs one by one so ids follow the given order."""
    from tokenizers import AddedToken

    for content, special in tokens:
        before = tokenizer.get_vocab_size(with_added_tokens=True)
        tok = AddedToken(content, special=special, normalized=False, lstrip=False, rstrip=False, single_word=False)
        if special:
            tokenizer.add_special_tokens([tok])
        else:
            tokenizer.add_tokens([tok])
        assert tokenizer.token_to_id(content) == before, content


def _save_tokenizer_files(tokenizer, out: Path) -> None:
    tokenizer.save(str(out / "tokenizer.json"))
    tokenizer.model.save(str(out))  # vocab.json + merges.txt, like the hub repos ship them


def _save_weights(model, out: Path, rename, dtype: str) -> None:
    import torch
    from safetensors.torch import save_file

    torch_dtype = getattr(torch, dtype)
    tied = set(getattr(model, "_tied_weights_keys", None) or {}) if model.config.tie_word_embeddings else set()
    tensors = {}
    for name, tensor in model.state_dict().items():
        if name in tied:
            continue  # tied weights are not stored, as in the real checkpoint
        tensors[rename(name)] = tensor.detach().to(torch_dtype).contiguous().clone()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    os.chmod(out / "model.safetensors", 0o644)  # save_file may create it 0600; match the other files


def _readme(title: str, real_repo: str, extra: str) -> str:
    return (
        "---\nlibrary_name: transformers\npipeline_tag: image-text-to-text\ntags:\n- tiny\n- random-weights\n---\n\n"
        f"# {title}\n\nTiny RANDOM-weight model with the file layout of `{real_repo}`, built offline by "
        "`tiny_vlms.py` for tests. Its outputs are meaningless.\n\n" + extra + "\n"
    )


# --------------------------------------------------------------------------------------------------
# Qwen2.5-VL (Qwen/Qwen2.5-VL-3B-Instruct layout)
# --------------------------------------------------------------------------------------------------
QWEN_PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Added tokens of the Qwen2.5 tokenizer, in id order (real ids 151643..151664), with their `special` flag.
QWEN_ADDED_TOKENS = [
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
]

# chat_template.json of Qwen/Qwen2.5-VL-*-Instruct (also stored in its tokenizer_config.json).
QWEN25VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _qwen_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    tok = Tokenizer(
        models.BPE(
            unk_token=None, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False, byte_fallback=False
        )
    )
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    _train_bpe(tok, vocab_size=360)  # 256 byte symbols + ~100 merges; no specials inside the BPE vocab
    _add_tokens(tok, QWEN_ADDED_TOKENS)
    return tok


def _init_model(cls, config, seed: int, init_std: float):
    """Instantiate ``cls(config)`` with a fixed seed, drawing the random weights with std ``init_std``.

    The written config.json keeps the real ``initializer_range``; only the random draw uses ``init_std``
    (larger than the real 0.02 so that the tiny random model's greedy outputs depend on the image and prompt
    instead of collapsing to one repeated token).
    """
    import torch

    for sub in (config, *(getattr(config, k, None) for k in ("text_config", "vision_config"))):
        if sub is not None and hasattr(sub, "initializer_range"):
            sub.initializer_range = init_std
    torch.manual_seed(seed)
    return cls(config).eval()


def _write_qwen25vl(out: Path, seed: int, min_pixels: int, max_pixels: int, dtype: str,
                    tie_word_embeddings: bool, init_std: float) -> None:
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tok = _qwen_tokenizer()
    ids = {content: tok.token_to_id(content) for content, _ in QWEN_ADDED_TOKENS}
    n_tokens = tok.get_vocab_size(with_added_tokens=True)
    vocab_size = _round_up(n_tokens, 64)  # the real one: 151665 tokens -> vocab_size 151936
    _save_tokenizer_files(tok, out)

    added = [c for c, special in QWEN_ADDED_TOKENS if special and c != "<|endoftext|>"]
    _write_json(
        out / "tokenizer_config.json",
        {
            "add_bos_token": False,
            "add_prefix_space": False,
            "added_tokens_decoder": _added_tokens_decoder(tok),
            "additional_special_tokens": added,
            "bos_token": None,
            "chat_template": QWEN25VL_CHAT_TEMPLATE,
            "clean_up_tokenization_spaces": False,
            "eos_token": "<|im_end|>",
            "errors": "replace",
            "model_max_length": 131072,
            "pad_token": "<|endoftext|>",
            "split_special_tokens": False,
            "tokenizer_class": "Qwen2Tokenizer",
            "unk_token": None,
        },
    )
    _write_json(out / "chat_template.json", {"chat_template": QWEN25VL_CHAT_TEMPLATE})
    _write_json(
        out / "preprocessor_config.json",
        {
            "min_pixels": min_pixels,
            "max_pixels": max_pixels,
            "patch_size": 14,
            "temporal_patch_size": 2,
            "merge_size": 2,
            "image_mean": [0.48145466, 0.4578275, 0.40821073],
            "image_std": [0.26862954, 0.26130258, 0.27577711],
            "image_processor_type": "Qwen2VLImageProcessor",
            "processor_class": "Qwen2_5_VLProcessor",
        },
    )

    # Flat (legacy) config.json exactly in the shape of the hub file, tiny sizes.
    head_dim = 16  # 64 hidden / 4 heads; mrope_section must sum to head_dim // 2 (real: [16, 24, 24] for 128)
    config_dict = {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "attention_dropout": 0.0,
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "vision_token_id": ids["<|vision_pad|>"],
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "hidden_act": "silu",
        "hidden_size": 64,
        "initializer_range": 0.02,
        "intermediate_size": 128,
        "max_position_embeddings": 128000,
        "max_window_layers": 70,
        "model_type": "qwen2_5_vl",
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "sliding_window": 32768,
        "tie_word_embeddings": tie_word_embeddings,  # 3B: true; 7B/32B/72B: false
        "torch_dtype": dtype,
        "transformers_version": "4.41.2",
        "use_cache": True,
        "use_sliding_window": False,
        "vision_config": {
            "depth": 2,
            "hidden_act": "silu",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "in_chans": 3,
            "out_hidden_size": 64,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "spatial_patch_size": 14,
            "window_size": 112,
            "fullatt_block_indexes": [1],  # real: [7, 15, 23, 31] of 32 -> block 0 windowed, block 1 full
            "tokens_per_second": 2,
            "temporal_patch_size": 2,
        },
        "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
        "vocab_size": vocab_size,
    }
    assert sum(config_dict["rope_scaling"]["mrope_section"]) == head_dim // 2
    _write_json(out / "config.json", config_dict)
    _write_json(
        out / "generation_config.json",
        {
            "bos_token_id": ids["<|endoftext|>"],
            "pad_token_id": ids["<|endoftext|>"],
            "do_sample": True,
            "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
            "repetition_penalty": 1.05,
            "temperature": 0.1,
            "top_p": 0.001,
            "top_k": 1,
            "transformers_version": "4.37.0",
        },
    )

    config = Qwen2_5_VLConfig.from_pretrained(out)  # parse the flat file the same way loading will
    model = _init_model(Qwen2_5_VLForConditionalGeneration, config, seed, init_std)

    def rename(name: str) -> str:  # hub checkpoints use the pre-v4.52 names: model.* (text) and visual.*
        if name.startswith("model.language_model."):
            return "model." + name[len("model.language_model.") :]
        if name.startswith("model.visual."):
            return name[len("model.") :]
        return name

    _save_weights(model, out, rename, dtype)
    (out / "README.md").write_text(
        _readme(
            "tiny-random Qwen2.5-VL",
            "Qwen/Qwen2.5-VL-3B-Instruct",
            f"Image tokens per image = (H'/28)*(W'/28) where (H', W') = smart_resize(H, W, 28, "
            f"min_pixels={min_pixels}, max_pixels={max_pixels}); at most max_pixels/784 = {max_pixels // 784}.",
        ),
        encoding="utf-8",
    )


def build_tiny_qwen25vl(path, seed: int = 0, *, min_pixels: int = 56 * 56, max_pixels: int = 28 * 28 * 16,
                        dtype: str = "float32", tie_word_embeddings: bool = False, init_std: float = 0.1) -> Path:
    """Build (once) a tiny random Qwen2.5-VL in the layout of ``Qwen/Qwen2.5-VL-3B-Instruct``.

    Text tower: 2 layers, hidden 64, 4 heads (2 KV heads), head_dim 16, mrope_section [2, 3, 3].
    ``tie_word_embeddings=True`` reproduces the 3B flag (no ``lm_head.weight`` stored); with tied random
    embeddings greedy decoding just repeats the last prompt token, so the default is untied (7B/32B/72B flag,
    ``lm_head.weight`` stored).
    Vision tower: 2 blocks (block 0 window attention, block 1 full attention), hidden 32, 2 heads, with the real
    patch_size 14, temporal_patch_size 2, spatial_merge_size 2 and window_size 112, so the processor's token
    arithmetic is the real one: an HxW image becomes smart_resize(H, W, factor=28, min_pixels, max_pixels)
    and gives (H'/14)*(W'/14) patches and (H'/28)*(W'/28) ``<|image_pad|>`` tokens.  ``max_pixels`` defaults to
    28*28*16 = 12544 (<= 16 image tokens per image; the real file has 12845056), ``min_pixels`` to the real 3136.

    Files: config.json (flat legacy layout with rope_scaling mrope), generation_config.json, model.safetensors
    (legacy ``model.*`` / ``visual.*`` / ``lm_head`` names), tokenizer.json, tokenizer_config.json
    (Qwen2Tokenizer), vocab.json, merges.txt, preprocessor_config.json (Qwen2VLImageProcessor +
    Qwen2_5_VLProcessor, min_pixels/max_pixels), chat_template.json, README.md.
    """
    return _build_atomically(
        path,
        QWEN25VL_FILES,
        lambda out: _write_qwen25vl(out, seed, min_pixels, max_pixels, dtype, tie_word_embeddings, init_std),
    )


# --------------------------------------------------------------------------------------------------
# Idefics3 / SmolVLM (HuggingFaceTB/SmolVLM-256M-Instruct layout)
# --------------------------------------------------------------------------------------------------
# SmolLM2's special tokens, ids 0..16 inside its BPE vocabulary.
SMOLLM2_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<repo_name>",
    "<reponame>",
    "<file_sep>",
    "<filename>",
    "<gh_stars>",
    "<issue_start>",
    "<issue_comment>",
    "<issue_closed>",
    "<jupyter_start>",
    "<jupyter_text>",
    "<jupyter_code>",
    "<jupyter_output>",
    "<jupyter_script>",
    "<empty_output>",
]

# chat_template.json of HuggingFaceTB/SmolVLM-256M-Instruct.
SMOLVLM_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def _smolvlm_tokenizer(min_reserved: int = 8):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    tok = Tokenizer(models.BPE(unk_token=None, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ]
    )
    tok.post_processor = processors.ByteLevel(add_prefix_space=True, trim_offsets=False, use_regex=True)
    tok.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    _train_bpe(tok, vocab_size=400, special_tokens=SMOLLM2_SPECIAL_TOKENS)  # specials get ids 0..16
    assert [tok.token_to_id(t) for t in SMOLLM2_SPECIAL_TOKENS] == list(range(len(SMOLLM2_SPECIAL_TOKENS)))
    base = tok.get_vocab_size(with_added_tokens=True)

    # Real: <global-img>=49152, <row_1_col_1>..<row_6_col_6>=49153..49188, <fake_token_around_image>=49189,
    # <image>=49190, 88 <|reserved_special_token_i|>, <end_of_utterance>=49279 = vocab_size - 1.
    grid = [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
    head = ["<global-img>", *grid, "<fake_token_around_image>", "<image>"]
    total = _round_up(base + len(head) + min_reserved + 1, 64)
    reserved = [f"<|reserved_special_token_{i}|>" for i in range(total - base - len(head) - 1)]
    _add_tokens(tok, [(t, True) for t in [*head, *reserved, "<end_of_utterance>"]])
    assert tok.get_vocab_size(with_added_tokens=True) == total
    return tok, base


def _write_idefics3(out: Path, seed: int, longest_edge: int, max_image_size: int, dtype: str, init_std: float) -> None:
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration

    # vision tower: SigLIP-like, tiny; image_size == max_image_size["longest_edge"] like the real one (512).
    patch_size, scale_factor = 8, 4
    if max_image_size % (patch_size * scale_factor):
        raise ValueError(f"max_image_size must be a multiple of {patch_size * scale_factor}")
    image_seq_len = (max_image_size // patch_size) ** 2 // scale_factor**2  # real: (512/16)^2/4^2 = 64

    tok, base = _smolvlm_tokenizer()
    vocab_size = tok.get_vocab_size(with_added_tokens=True)  # real: 49280, exactly the tokenizer length
    ids = lambda t: tok.token_to_id(t)  # noqa: E731
    _save_tokenizer_files(tok, out)

    additional = ["<fake_token_around_image>", "<image>", "<end_of_utterance>"]
    specials = {
        "additional_special_tokens": additional,
        "bos_token": "<|im_start|>",
        "eos_token": "<end_of_utterance>",
        "pad_token": "<|im_end|>",
        "unk_token": "<|endoftext|>",
    }
    _write_json(
        out / "tokenizer_config.json",
        {
            "add_prefix_space": False,
            "added_tokens_decoder": _added_tokens_decoder(tok),
            **{k: specials[k] for k in ("additional_special_tokens", "bos_token")},
            "clean_up_tokenization_spaces": False,
            "eos_token": specials["eos_token"],
            "legacy": False,
            "model_max_length": 8192,
            "pad_token": specials["pad_token"],
            "processor_class": "Idefics3Processor",
            "tokenizer_class": "GPT2Tokenizer",
            "truncation_side": "left",
            "unk_token": specials["unk_token"],
            "vocab_size": base,
        },
    )
    _write_json(
        out / "special_tokens_map.json",
        {
            "additional_special_tokens": [
                {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
                for t in additional
            ],
            **{
                k: {"content": specials[k], "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
                for k in ("bos_token", "eos_token", "pad_token", "unk_token")
            },
        },
    )
    added_ids = {tok.id_to_token(i): i for i in range(base, vocab_size)}
    _write_json(out / "added_tokens.json", dict(sorted(added_ids.items())))
    _write_json(out / "chat_template.json", {"chat_template": SMOLVLM_CHAT_TEMPLATE})
    _write_json(out / "processor_config.json", {"image_seq_len": image_seq_len, "processor_class": "Idefics3Processor"})
    _write_json(
        out / "preprocessor_config.json",
        {
            "do_convert_rgb": True,
            "do_image_splitting": True,
            "do_normalize": True,
            "do_pad": True,
            "do_rescale": True,
            "do_resize": True,
            "image_mean": [0.5, 0.5, 0.5],
            "image_processor_type": "Idefics3ImageProcessor",
            "image_std": [0.5, 0.5, 0.5],
            "max_image_size": {"longest_edge": max_image_size},
            "processor_class": "Idefics3Processor",
            "resample": 1,
            "rescale_factor": 0.00392156862745098,
            "size": {"longest_edge": longest_edge},
        },
    )
    config_dict = {
        "architectures": ["Idefics3ForConditionalGeneration"],
        "image_token_id": ids("<image>"),
        "model_type": "idefics3",
        "scale_factor": scale_factor,
        "text_config": {
            "architectures": ["VLlama3ForCausalLM"],
            "attention_bias": False,
            "attention_dropout": 0.0,
            "head_dim": 16,
            "hidden_act": "silu",
            "hidden_size": 64,
            "initializer_range": 0.041666666666666664,
            "intermediate_size": 128,
            "max_position_embeddings": 8192,
            "mlp_bias": False,
            "model_type": "llama",
            "num_attention_heads": 4,
            "num_hidden_layers": 2,
            "num_key_value_heads": 2,
            "pad_token_id": ids("<|im_end|>"),
            "pretraining_tp": 1,
            "rms_norm_eps": 1e-05,
            "rope_scaling": None,
            "rope_theta": 100000,
            "torch_dtype": dtype,
            "use_cache": True,
            "vocab_size": vocab_size,
        },
        "tie_word_embeddings": False,
        "torch_dtype": dtype,
        "transformers_version": "4.46.0",
        "use_cache": True,
        "vision_config": {
            "hidden_size": 32,
            "image_size": max_image_size,
            "intermediate_size": 64,
            "max_image_size": {"longest_edge": max_image_size},
            "model_type": "idefics3_vision",
            "num_attention_heads": 2,
            "num_hidden_layers": 2,
            "patch_size": patch_size,
            "size": {"longest_edge": longest_edge},
            "tie_word_embeddings": False,
        },
        "vocab_size": vocab_size,
    }
    _write_json(out / "config.json", config_dict)
    _write_json(
        out / "generation_config.json",
        {
            "_from_model_config": True,
            "bos_token_id": ids("<|im_start|>"),
            "eos_token_id": [ids("<|im_end|>"), ids("<end_of_utterance>")],
            "pad_token_id": ids("<|im_end|>"),
            "transformers_version": "4.46.0",
        },
    )

    config = Idefics3Config.from_pretrained(out)
    model = _init_model(Idefics3ForConditionalGeneration, config, seed, init_std)
    _save_weights(model, out, lambda n: n, dtype)  # names already match the hub checkpoint
    (out / "README.md").write_text(
        _readme(
            "tiny-random SmolVLM (Idefics3)",
            "HuggingFaceTB/SmolVLM-256M-Instruct",
            f"Every image is resized to longest edge {longest_edge}, cut into ceil(H'/{max_image_size}) x "
            f"ceil(W'/{max_image_size}) tiles plus one global image; each tile gives image_seq_len="
            f"{image_seq_len} `<image>` tokens.",
        ),
        encoding="utf-8",
    )


def build_tiny_idefics3(path, seed: int = 0, *, longest_edge: int = 256, max_image_size: int = 64,
                        dtype: str = "float32", init_std: float = 0.1) -> Path:
    """Build (once) a tiny random Idefics3 in the layout of ``HuggingFaceTB/SmolVLM-256M-Instruct``.

    Text tower: Llama, 2 layers, hidden 64, 4 heads (2 KV heads), head_dim 16, untied lm_head.
    Vision tower: SigLIP-style, 2 layers, hidden 32, 2 heads, patch_size 8, image_size = max_image_size (64).
    Connector: pixel shuffle with the real scale_factor 4, so image_seq_len = (64/8)^2 / 4^2 = 4 per tile.
    Image processor: Idefics3ImageProcessor exactly as SmolVLM's (splitting on, LANCZOS, pad, mean/std 0.5) but
    ``size={"longest_edge": 256}`` and ``max_image_size={"longest_edge": 64}`` (real: 2048 / 512, same 4:1 ratio).
    Tokenizer: SmolLM2-style byte-level BPE (GPT2Tokenizer) with SmolLM2's 17 specials at ids 0..16, then
    ``<global-img>``, ``<row_i_col_j>`` (36), ``<fake_token_around_image>``, ``<image>``, reserved tokens and
    ``<end_of_utterance>`` as the last id; config vocab_size == len(tokenizer) (a multiple of 64).

    Files: config.json, generation_config.json, model.safetensors, tokenizer.json, tokenizer_config.json,
    special_tokens_map.json, added_tokens.json, vocab.json, merges.txt, preprocessor_config.json,
    processor_config.json (image_seq_len), chat_template.json, README.md.
    """
    return _build_atomically(
        path, IDEFICS3_FILES, lambda out: _write_idefics3(out, seed, longest_edge, max_image_size, dtype, init_std)
    )


if __name__ == "__main__":
    import sys
    import time

    root = Path(sys.argv[1] if len(sys.argv) > 1 else "tiny_models")
    for name, fn in (("tiny-qwen25vl", build_tiny_qwen25vl), ("tiny-idefics3", build_tiny_idefics3)):
        t0 = time.perf_counter()
        p = fn(root / name)
        size = sum(f.stat().st_size for f in p.iterdir())
        print(f"{p}: {time.perf_counter() - t0:.2f}s, {size / 1e6:.2f} MB, files={sorted(f.name for f in p.iterdir())}")
