"""Data registry, readers, custom domains, robust image loading, prompts, OpenCLIP loading and cached zero-shot pseudo-labels."""
import json, logging, subprocess, sys
from pathlib import Path

import pytest
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, PngImagePlugin

torch.set_num_threads(1)

from latteclip_nb import data as D
from latteclip_nb import prompts as P
from latteclip_nb.data import (DATASETS, FolderDomain, ImageDataset, Split, clean_classname, collate_skip, download, get_spec,
                               load_image, make_fake_dataset, read_coop_split, register_dataset, splits)


# ---------------------------------------------------------------- prompts (every string pinned by hand against the paper)
_P, _G = "in the photo concisely, less than 20 words.", "in all the photos concisely, less than 20 words."
EXPECTED = {
    "eurosat": ("a photo of a rose.", "Describe the land use in the satellite image concisely, less than 20 words.",
                "Describe the common visual attributes of the land use in all the satellite images concisely, less than 20 words."),
    "sun397": ("a photo of a rose.", f"Describe the scene {_P}", f"Describe the common visual attributes of the scenes {_G}"),
    "food101": ("a photo of a rose, a type of food.", f"Describe the rose food {_P}", f"Describe the common visual attributes of the foods {_G}"),
    "flowers102": ("a photo of a rose, a type of flower.", "Describe the rose flower in the photo concisely, less than 20 words.",
                   f"Describe the common visual attributes of the flowers {_G}"),
    "dtd": ("rose texture.", f"Describe the texture {_P}", f"Describe the common visual attributes of the textures {_G}"),
    "fgvc_aircraft": ("a photo of a rose, a type of aircraft.", f"Describe the aircraft {_P}",
                      f"Describe the common visual attributes of the aircrafts {_G}"),
    "oxford_pets": ("a photo of a rose.", f"Describe the pet {_P}", f"Describe the common visual attributes of the pets {_G}"),
    "stanford_cars": ("a photo of a rose.", f"Describe the car {_P}", f"Describe the common visual attributes of the cars {_G}"),
    "ucf101": ("a photo of a person doing rose", f"Describe the action of the person {_P}",
               f"Describe the common visual attributes of the person's actions {_G}"),
    "caltech101": ("a photo of a rose.", f"Describe the object {_P}", f"Describe the common visual attributes of the objects {_G}"),
}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_prompts_pinned(name):
    s = get_spec(name)
    assert (P.class_description(s, "rose"), P.image_prompt(s, "rose"), P.group_prompt(s)) == EXPECTED[name]
    if "{c}" not in s.image_prompt: assert P.image_prompt(s) == EXPECTED[name][1]
    else:
        with pytest.raises(ValueError, match=s.name): P.image_prompt(s)


def test_generic_and_llava_prompts():
    assert P.generic_image_prompt("galaxy") == "Describe the galaxy in the photo concisely, using less than 20 words."
    assert P.generic_group_prompt("galaxies") == "Describe the common visual attributes of the galaxies in all the photos concisely, less than 20 words."
    assert P.llava_chat("Hi") == "[INST] <image>\nHi [/INST]"
    assert P.llava_zero_shot_prompt(["a b", "c"]) == ("Select the most appropriate category for the image from the following options:a b, c. "
                                                     "Write only the category name.")
    with pytest.raises(ValueError): P.llava_zero_shot_prompt(["only"])


def test_prompts_does_not_import_data():
    code = "import sys, latteclip_nb.prompts; assert 'latteclip_nb.data' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------- registry
def test_registry_values():
    assert list(DATASETS)[:10] == ["eurosat", "sun397", "food101", "flowers102", "dtd", "fgvc_aircraft", "oxford_pets",
                                   "stanford_cars", "ucf101", "caltech101"]
    sched = {"dtd": (100, 10), "eurosat": (15, 40), "fgvc_aircraft": (50, 15), "flowers102": (50, 12), "food101": (15, 140),
             "oxford_pets": (100, 10), "stanford_cars": (50, 20), "sun397": (15, 40), "ucf101": (50, 20), "caltech101": (50, 10)}
    dirs = {"eurosat": "eurosat/2750", "sun397": "sun397/SUN397", "food101": "food-101/images", "flowers102": "oxford_flowers/jpg",
            "dtd": "dtd/images", "fgvc_aircraft": "fgvc_aircraft/images", "oxford_pets": "oxford_pets/images",
            "stanford_cars": "stanford_cars", "ucf101": "ucf101/UCF-101-midframes", "caltech101": "caltech-101/101_ObjectCategories"}
    sizes = {"eurosat": (10, 18900, 8100), "sun397": (397, 19850, 19850), "food101": (101, 70700, 30300), "flowers102": (102, 5726, 2463),
             "dtd": (47, 3948, 1692), "fgvc_aircraft": (100, 6667, 3333), "oxford_pets": (37, 3680, 3669),
             "stanford_cars": (196, 8144, 8041), "ucf101": (101, 9537, 3783), "caltech101": (100, 5777, 2465)}
    for n in sched:
        s = DATASETS[n]
        assert (s.epochs, s.warmup_steps) == sched[n] and s.image_dir == dirs[n] and (s.n_classes, s.n_train, s.n_test) == sizes[n]
        assert s.lr == 1e-7 and s.weight_decay == (1e-7 if n == "caltech101" else 0.2)
        assert s.kind == ("fgvc" if n == "fgvc_aircraft" else "coop") and s.dots == (n in ("stanford_cars", "ucf101"))
    assert DATASETS["fgvc_aircraft"].domain_plural == "aircrafts" and DATASETS["ucf101"].domain_plural == "person's actions"


def test_aliases_and_unknown():
    for a, n in {"cars": "stanford_cars", "pets": "oxford_pets", "flowers": "flowers102", "food": "food101",
                 "aircraft": "fgvc_aircraft", "caltech": "caltech101", "FGVC-Aircraft": "fgvc_aircraft"}.items():
        assert get_spec(a).name == n
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'.*eurosat.*caltech101"): get_spec("imagenet")
    with pytest.raises(ValueError, match="template"): D.DatasetSpec("x", "x", "", "no slot", "d", "ds", "p", "g", 1, 1)
    with pytest.raises(ValueError, match="kind"): D.DatasetSpec("x", "x", "", "{}", "d", "ds", "p", "g", 1, 1, kind="zip")


def test_register_dataset(tmp_path):
    spec = D.DatasetSpec("toy_reg", "toy", "", "a {}.", "toy", "toys", "p", "g", 1, 1, kind="shapes")
    sp = {"train": Split(tmp_path, ["a.png"], None, ["x", "y"]), "test": None}
    seen = {}
    def loader(root, **kw): seen.update(root=root, **kw); return sp
    try:
        assert register_dataset(spec, loader) is spec and get_spec("toy_reg") is spec
        assert splits("toy_reg", tmp_path) is sp and seen == {"root": tmp_path}
        splits("toy_reg", tmp_path, split_file="f.json"); assert seen["split_file"] == "f.json"
        with pytest.raises(ValueError, match="built-in"): register_dataset(D.DatasetSpec("dtd", "x", "", "{}", "d", "ds", "p", "g", 1, 1), loader)
        with pytest.raises(TypeError): register_dataset(spec, "not callable")
    finally:
        DATASETS.pop("toy_reg", None); D._LOADERS.pop("toy_reg", None)


# ---------------------------------------------------------------- readers and cleaning
def test_clean_classname():
    assert clean_classname("Apply_Eye_Makeup") == "apply eye makeup"
    assert clean_classname("AM General Hummer SUV 2000") == "am general hummer suv 2000"
    assert clean_classname("Mr._Bean", dots=True) == "mr bean" and clean_classname("st._bernard") == "st. bernard"


def test_coop_reader(tmp_path):
    rows = make_fake_dataset(tmp_path, "cars", classnames=["Audi_S4.Sedan", "BMW_M3", "Tesla"], n_train=2, n_val=1, n_test=2)
    sp = splits("stanford_cars", tmp_path)
    tr, te = sp["train"], sp["test"]
    assert tr.classnames == ["audi s4 sedan", "bmw m3", "tesla"] == te.classnames
    assert tr.ids == [r[0] for r in rows["train"] + rows["val"]] and tr.labels == [r[1] for r in rows["train"] + rows["val"]]
    assert te.ids == [r[0] for r in rows["test"]] and len(tr) == 9 and len(te) == 6
    assert tr.root == tmp_path / "stanford_cars" and all(p.is_file() for p in tr.paths)
    sub = tr.subset([4, 1])
    assert sub.ids == [tr.ids[4], tr.ids[1]] and sub.labels == [tr.labels[4], tr.labels[1]]


def test_coop_reader_keeps_dots_elsewhere(tmp_path):
    make_fake_dataset(tmp_path, "dtd", classnames=["St._Bernard", "Zig_Zag"])
    assert splits("dtd", tmp_path)["train"].classnames == ["st. bernard", "zig zag"]


def test_fgvc_reader(tmp_path):
    make_fake_dataset(tmp_path, "fgvc_aircraft", classnames=["A300B4", "Cessna 172", "F/A-18"], n_train=1, n_val=2, n_test=1)
    folder = tmp_path / "fgvc_aircraft"
    assert (folder / "variants.txt").read_text().splitlines() == ["A300B4", "Cessna 172", "F/A-18"]
    assert (folder / "images_variant_test.txt").read_text().splitlines()[1] == "1te0 Cessna 172"
    sp = splits("aircraft", tmp_path)
    assert sp["train"].classnames == ["a300b4", "cessna 172", "f/a-18"]
    assert sp["train"].labels == [0, 1, 2, 0, 0, 1, 1, 2, 2] and sp["test"].ids == ["0te0.jpg", "1te0.jpg", "2te0.jpg"]
    (folder / "images_variant_val.txt").write_text("123 Boeing 999\n")
    with pytest.raises(ValueError, match="Boeing 999"): splits("aircraft", tmp_path)
    (folder / "variants.txt").unlink()
    with pytest.raises(FileNotFoundError, match="variants.txt"): splits("aircraft", tmp_path)


def test_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="data root .*missing"): splits("dtd", tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="dtd/images.*download\\('dtd'"): splits("dtd", tmp_path)
    make_fake_dataset(tmp_path, "dtd")
    sf = tmp_path / "dtd/split_zhou_DescribableTextures.json"
    moved = sf.rename(tmp_path / "mine.json")
    with pytest.raises(FileNotFoundError, match="split_zhou_DescribableTextures.json.*CoOp"): splits("dtd", tmp_path)
    assert len(splits("dtd", tmp_path, split_file=moved)["train"]) == 9
    rows = json.loads(moved.read_text())
    for r in rows["test"][:4]: (tmp_path / "dtd/images" / r[0]).unlink()
    with pytest.raises(FileNotFoundError, match=r"4 of 6 images .*missing.*e\.g\. \['banded/0te0.jpg'"):
        splits("dtd", tmp_path, split_file=moved)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"train": [["a.jpg", 0]], "val": [], "test": []}))
    with pytest.raises(ValueError, match="relpath, label, classname"): read_coop_split(bad, tmp_path)
    bad.write_text(json.dumps({"train": [["a.jpg", 0, "a"], ["a.jpg", 1, "b"]], "val": [], "test": []}))
    with pytest.raises(ValueError, match="more than once"): read_coop_split(bad, tmp_path, check_files=False)
    bad.write_text(json.dumps({"train": [["a.jpg", 0, "a"], ["b.jpg", 2, "b"]], "val": [], "test": []}))
    with pytest.raises(ValueError, match="labels should be 0..1"): read_coop_split(bad, tmp_path, check_files=False)
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"): read_coop_split(bad, tmp_path)


def test_size_mismatch_warns(tmp_path, caplog):
    make_fake_dataset(tmp_path, "eurosat")
    with caplog.at_level(logging.WARNING, logger="latteclip_nb"): splits("eurosat", tmp_path)
    assert "the paper's split has 18900" in caplog.text


# ---------------------------------------------------------------- download
TV_IMAGES = {"EuroSAT": "eurosat/2750", "SUN397": "SUN397", "Food101": "food-101/images", "Flowers102": "flowers-102/jpg",
             "DTD": "dtd/dtd/images", "FGVCAircraft": "fgvc-aircraft-2013b/data/images", "OxfordIIITPet": "oxford-iiit-pet/images"}


def test_download_layout(tmp_path, monkeypatch):
    import torchvision.datasets as tvd
    calls = []
    for cls, images in TV_IMAGES.items():
        def make(images=images, cls=cls):
            class Fake:
                def __init__(self, root, download=False):
                    assert download
                    calls.append(cls)
                    f = Path(root) / images / "c" / "1.jpg"; f.parent.mkdir(parents=True, exist_ok=True)
                    Image.new("RGB", (4, 4)).save(f)
            return Fake
        monkeypatch.setattr(tvd, cls, make())
    split = tmp_path / "my_split.json"
    split.write_text(json.dumps({"train": [["c/1.jpg", 0, "a"], ["c/1.jpg", 1, "b"]], "val": [], "test": []}))
    (tmp_path / "data/food-101").mkdir(parents=True)
    (tmp_path / "data/food-101/split_zhou_Food101.json").write_text("{}")     # placed before the download: kept
    from latteclip_nb.split_files import _TORCHVISION
    for n in _TORCHVISION:
        d = download(n, tmp_path / "data", split_file=split if n == "eurosat" else None)
        assert d == tmp_path / "data" / get_spec(n).image_dir and (d / "c/1.jpg").is_file(), n
    assert sorted(calls) == sorted(TV_IMAGES) and not (tmp_path / "data/.download").exists()
    assert (tmp_path / "data/eurosat/split_zhou_EuroSAT.json").read_text() == split.read_text()
    assert (tmp_path / "data/food-101/split_zhou_Food101.json").read_text() == "{}"
    download("dtd", tmp_path / "data"); assert calls.count("DTD") == 1          # already there: no second download
    with pytest.raises(ValueError, match="fgvc_aircraft"): download("fgvc_aircraft", tmp_path / "data", split_file=split)


@pytest.mark.parametrize("name,where", [("stanford_cars", "ROOT/stanford_cars/cars_train"), ("ucf101", "UCF-101-midframes.zip"),
                                        ("caltech101", "ROOT/caltech-101/101_ObjectCategories")])
def test_download_manual(tmp_path, name, where):
    with pytest.raises(RuntimeError, match="cannot be downloaded") as e: download(name, tmp_path)
    assert where in str(e.value) and "split_zhou_" in str(e.value) and "CoOp" in str(e.value)


# ---------------------------------------------------------------- images and the Dataset
def test_load_image_keeps_info(tmp_path):
    meta = PngImagePlugin.PngInfo(); meta.add_text("Comment", "hello")
    Image.new("RGBA", (3, 2), (10, 20, 30, 40)).save(tmp_path / "a.png", pnginfo=meta)
    im = load_image(tmp_path / "a.png")
    assert im.mode == "RGB" and im.size == (3, 2) and im.info["Comment"] == "hello" and im.info["path"] == str(tmp_path / "a.png")
    with pytest.raises(FileNotFoundError): load_image(tmp_path / "nope.png")


def test_image_dataset_skips_corrupt(tmp_path, caplog):
    import torchvision.transforms as T
    make_fake_dataset(tmp_path, "dtd")
    tr = splits("dtd", tmp_path)["train"]
    (tr.root / tr.ids[2]).write_bytes(b"\x89PNG garbage")
    ds = ImageDataset(tr, T.Compose([T.Resize((8, 8)), T.ToTensor()]))
    with caplog.at_level(logging.WARNING, logger="latteclip_nb"):
        items = [ds[i] for i in range(len(ds))] + [ds[2]]
    assert items[2] is None and items[-1] is None and ds.skipped == 1 and ds.bad == {2}
    assert caplog.text.count("skipping unreadable image") == 1 and tr.ids[2] in caplog.text   # logged once, with its path
    x, idx = collate_skip(items[:5])
    assert x.shape == (4, 3, 8, 8) and idx.tolist() == [0, 1, 3, 4]
    assert collate_skip([None]) is None


# ---------------------------------------------------------------- custom domains
def _png(p: Path):
    p.parent.mkdir(parents=True, exist_ok=True); Image.new("RGB", (5, 5), (1, 2, 3)).save(p)


def test_folder_domain(tmp_path):
    for rel in ("imgs/x.png", "imgs/sub/deeper/y.JPG", "imgs/.cache/z.png", "imgs/readme.md", "imgs/test/Cat/1.png",
                "imgs/test/dog/2.png", "imgs/test/dog/sub/3.png"):
        if rel.endswith(".md"): (tmp_path / rel).write_text("x")
        else: _png(tmp_path / rel)
    fd = FolderDomain(tmp_path / "imgs", classnames=["cat", "Dog"], domain="pet", test_root=tmp_path / "imgs/test")
    sp = fd.splits()
    assert sp["train"].ids == ["sub/deeper/y.JPG", "x.png"] and sp["train"].labels is None       # test folder excluded
    assert sp["test"].ids == ["Cat/1.png", "dog/2.png", "dog/sub/3.png"] and sp["test"].labels == [0, 1, 1]
    assert fd.spec.image_prompt == P.generic_image_prompt("pet") and fd.spec.group_prompt == P.generic_group_prompt("pets")
    (tmp_path / "classes.txt").write_text("cat\ndog\n")
    assert FolderDomain(tmp_path / "imgs", classes_file=tmp_path / "classes.txt").splits()["test"] is None
    with pytest.raises(FileNotFoundError, match="image folder .*nowhere"): FolderDomain(tmp_path / "nowhere", classnames=["a", "b"])
    with pytest.raises(FileNotFoundError, match="test folder"): FolderDomain(tmp_path / "imgs", classnames=["a", "b"], test_root=tmp_path / "t")
    with pytest.raises(ValueError, match="duplicate class names \\['cat'\\]"): FolderDomain(tmp_path / "imgs", classnames=["cat", "Cat", "dog"])
    with pytest.raises(ValueError, match="at least 2"): FolderDomain(tmp_path / "imgs", classnames=["cat"])
    (tmp_path / "classes.txt").write_text("cat\ncat\n")
    with pytest.raises(ValueError, match="classes.txt: duplicate"): FolderDomain(tmp_path / "imgs", classes_file=tmp_path / "classes.txt")
    with pytest.raises(ValueError, match="not both"): FolderDomain(tmp_path / "imgs", classnames=["a", "b"], classes_file=tmp_path / "classes.txt")
    (tmp_path / "empty/sub").mkdir(parents=True); (tmp_path / "empty/sub/a.txt").write_text("x")
    with pytest.raises(ValueError, match="no images .*empty"): FolderDomain(tmp_path / "empty", classnames=["a", "b"])
    with pytest.raises(ValueError, match="match no class name"):
        FolderDomain(tmp_path / "imgs", classnames=["cat", "bird"], test_root=tmp_path / "imgs/test").splits()


def test_folder_domain_register(tmp_path):
    _png(tmp_path / "a.png")
    fd = FolderDomain(tmp_path, classnames=["a", "b"], domain="widget", name="widgets_test")
    try:
        fd.register()
        assert get_spec("widgets_test").domain == "widget" and splits("widgets_test", tmp_path)["train"].ids == ["a.png"]
    finally:
        DATASETS.pop("widgets_test", None); D._LOADERS.pop("widgets_test", None)


# ---------------------------------------------------------------- CLIP
from latteclip_nb import clip as C
from latteclip_nb.core import file_keys


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return C.load_clip("latte-tiny", pretrained=None, device="cpu")


@pytest.fixture()
def toy(tmp_path):
    make_fake_dataset(tmp_path, "dtd", classnames=["Red", "Green", "Blue"], n_train=3, n_val=1, n_test=2, size=40)
    return splits("dtd", tmp_path)


def test_load_clip_shapes(tiny):
    model, train_tf, eval_tf, tok = tiny
    img = Image.new("RGB", (60, 45), (0, 100, 200))
    assert train_tf(img).shape == eval_tf(img).shape == (3, 32, 32) and not model.training
    names = [type(t).__name__ for t in train_tf.transforms]
    assert names[0] == "RandomResizedCrop" and "RandomHorizontalFlip" not in names
    assert train_tf.transforms[0].scale == (0.9, 1.0)
    cj = next(t for t in train_tf.transforms if type(t).__name__ == "color_jitter")
    gs = next(t for t in train_tf.transforms if type(t).__name__ == "gray_scale")
    assert cj.p == 0.8 and cj.transf.hue == (-0.1, 0.1) and cj.transf.saturation == (0.5, 1.5) and gs.p == 0.2


def test_text_classifier_equals_hand_built(tiny):
    model, _, _, tok = tiny
    cls, tpl = ["cat", "dog", "eel"], ["a photo of a {}.", "itap of a {}"]
    W = C.text_classifier(model, tok, cls, tpl)
    with torch.no_grad():
        rows = []
        for c in cls:
            e = F.normalize(model.encode_text(tok([t.format(c) for t in tpl])), dim=-1).mean(0)
            rows.append(e / e.norm())
    assert W.shape == (3, 64) and torch.allclose(W, torch.stack(rows), atol=1e-5)
    with pytest.raises(ValueError): C.encode_texts(model, tok, [])


def test_encode_images(tiny, toy):
    model, _, eval_tf, _ = tiny
    tr = toy["train"]
    ds = ImageDataset(tr, eval_tf)
    V = C.encode_images(model, ds, batch_size=4)
    with torch.no_grad(): ref = F.normalize(model.encode_image(torch.stack([ds[i][0] for i in range(len(ds))])), dim=-1)
    assert V.shape == (len(tr), 64) and torch.allclose(V, ref, atol=1e-5)
    (tr.root / tr.ids[3]).write_bytes(b"junk")
    ds2 = ImageDataset(tr, eval_tf)
    V2 = C.encode_images(model, ds2, batch_size=4, num_workers=1)                # skipped in a worker, reported back here
    assert V2[3].abs().sum() == 0 and torch.allclose(V2[4:], V[4:], atol=1e-6) and ds2.bad == {3}


@pytest.mark.parametrize("fmt", ["safetensors", "pt", "pt_state_dict_entry", "folder"])
def test_checkpoint_round_trip(tiny, toy, tmp_path, fmt):
    model, _, eval_tf, tok = tiny
    if fmt == "safetensors": f = C.save_clip_weights(model, tmp_path / "w.safetensors")
    elif fmt == "pt": f = tmp_path / "w.pt"; torch.save(model.state_dict(), f)
    elif fmt == "pt_state_dict_entry": f = tmp_path / "w.pt"; torch.save({"state_dict": model.state_dict(), "epoch": 3}, f)
    else: C.save_clip_weights(model, tmp_path / "open_clip_model.safetensors"); f = tmp_path
    torch.manual_seed(123)                                                       # a different random init underneath
    m2, *_ = C.load_clip("latte-tiny", pretrained=str(f), device="cpu")
    ds = ImageDataset(toy["test"], eval_tf)
    assert torch.equal(C.encode_images(m2, ds), C.encode_images(model, ds))
    assert torch.equal(C.encode_texts(m2, tok, ["a red thing"]), C.encode_texts(model, tok, ["a red thing"]))


def test_load_clip_errors(monkeypatch, tmp_path):
    with pytest.raises(ValueError, match="unknown OpenCLIP model 'nope'"): C.load_clip("nope")
    with pytest.raises(ValueError, match="laion2b_s34b_b79k"): C.load_clip("ViT-B-32", "laion3b")
    with pytest.raises(FileNotFoundError, match="w.safetensors"): C.load_clip("latte-tiny", str(tmp_path / "w.safetensors"))
    with pytest.raises(FileNotFoundError, match="no checkpoint"): C.load_clip("latte-tiny", tmp_path)
    import open_clip.factory as ocf
    def offline(*a, **k): raise RuntimeError("Failed to download file (open_clip_pytorch_model.bin): Name or service not known")
    monkeypatch.setattr(ocf, "download_pretrained", offline)
    with pytest.raises(RuntimeError, match="offline.*pretrained='/path/to/open_clip_pytorch_model.bin'") as e:
        C.load_clip("ViT-B-32", "laion2b_s34b_b79k", device="cpu")
    assert "HF_HOME" in str(e.value)


def test_pseudo_label_cache(tiny, toy, tmp_path, monkeypatch, caplog):
    model, _, eval_tf, tok = tiny
    tr, tpl, cache = toy["train"], "a photo of a {}.", tmp_path / "cache"
    key = {"model": "latte-tiny", "pretrained": None, "dataset": "dtd", "split": "train"}
    with caplog.at_level(logging.INFO, logger="latteclip_nb"):
        pl = C.zero_shot_pseudo_labels(model, eval_tf, tok, tr, tpl, cache, key, k=3, batch_size=4)
    assert "c_zs accuracy" in caplog.text and not pl.cached
    S = C.encode_images(model, ImageDataset(tr, eval_tf), batch_size=4) @ C.text_classifier(model, tok, tr.classnames, tpl).T
    assert torch.equal(pl.c_zs, S.argmax(1)) and torch.equal(pl.topk, S.argsort(1, descending=True))
    assert torch.allclose(pl.scores, S.sort(1, descending=True).values, atol=1e-6)
    assert pl.accuracy == pytest.approx((S.argmax(1) == torch.tensor(tr.labels)).float().mean().item())
    j = next(cache.glob("*.json")); meta = json.loads(j.read_text())
    assert meta["content"] == file_keys(tr.root, tr.ids) and meta["key"]["template"] == tpl and meta["key"]["classnames"] == tr.classnames
    assert "root" not in meta["key"] and str(tr.root) not in j.read_text()                  # keyed by content, not by folder

    calls = []
    real = C.encode_images
    monkeypatch.setattr(C, "encode_images", lambda *a, **k: calls.append(1) or real(*a, **k))
    hit = C.zero_shot_pseudo_labels(model, eval_tf, tok, tr, tpl, cache, key, k=3)                        # hit
    assert hit.cached and not calls and torch.equal(hit.c_zs, pl.c_zs) and torch.equal(hit.scores, pl.scores)
    perm = [5, 0, 7, 1, 2, 8, 3, 4, 6, 9, 10, 11]
    re = C.zero_shot_pseudo_labels(model, eval_tf, tok, tr.subset(perm), tpl, cache, key, k=3)           # reordered: hit
    assert re.cached and not calls and torch.equal(re.c_zs, pl.c_zs[perm])
    sub = C.zero_shot_pseudo_labels(model, eval_tf, tok, tr.subset(range(10)), tpl, cache, key, k=3)      # subset: hit
    assert sub.cached and not calls and torch.equal(sub.c_zs, pl.c_zs[:10])
    other = C.zero_shot_pseudo_labels(model, eval_tf, tok, tr, "{} texture.", cache, {**key}, k=3)       # other template: miss
    assert not other.cached and len(calls) == 1 and len(list(cache.glob("*.json"))) == 2
    # a crash between the two writes of an update (new tensors, old JSON) reads as a miss
    meta = json.loads(j.read_text()); meta["content"] = meta["content"][:10]; j.write_text(json.dumps(meta))
    torn = C.zero_shot_pseudo_labels(model, eval_tf, tok, tr, tpl, cache, key, k=3)
    assert not torn.cached and len(calls) == 2 and torch.equal(torn.c_zs, pl.c_zs)
    # tensors of another entry under this entry's name are not trusted either
    t_new = next(p for p in cache.glob("*.safetensors") if p.stem == j.stem)
    t_new.write_bytes(next(p for p in cache.glob("*.safetensors") if p.stem != j.stem).read_bytes())
    torn = C.zero_shot_pseudo_labels(model, eval_tf, tok, tr, tpl, cache, key, k=3)
    assert not torn.cached and torch.equal(torn.c_zs, pl.c_zs)
    with pytest.raises(ValueError, match="lacks \\['split'\\]"):
        C.zero_shot_pseudo_labels(model, eval_tf, tok, tr, tpl, cache, {"model": "m", "pretrained": None, "dataset": "d"})


def test_pseudo_label_key_tracks_checkpoint_file(tmp_path, monkeypatch):
    monkeypatch.setenv("LATTECLIP_CACHE", str(tmp_path / "cache"))
    key = lambda f: C.pseudo_label_key({"model": "m", "pretrained": str(f), "dataset": "d", "split": "train"}, "{}", ["a", "b"], 5)
    f = tmp_path / "w.safetensors"; f.write_bytes(b"1")
    k1 = key(f)
    f.write_bytes(b"22")
    k2 = key(f)
    assert k2 != k1                                                        # re-trained at the same path: another key
    (tmp_path / "moved").mkdir(); f.rename(tmp_path / "moved" / "w.safetensors")
    assert key(tmp_path / "moved" / "w.safetensors") == k2                # a moved checkpoint: the same key
    assert str(tmp_path) not in json.dumps(k2)


def test_pseudo_label_cache_tracks_image_folder(tiny, toy, tmp_path, monkeypatch):
    """Same relative ids under another folder with other pixels (a re-rendered world) are computed, not stale labels."""
    import shutil
    model, _, eval_tf, tok = tiny
    tr, tpl, cache = toy["train"], "a photo of a {}.", tmp_path / "cache"
    key = {"model": "latte-tiny", "pretrained": None, "dataset": "dtd", "split": "train"}
    first = C.zero_shot_pseudo_labels(model, eval_tf, tok, tr, tpl, cache, key, k=3)
    copy = tmp_path / "copy"; shutil.copytree(tr.root, copy)
    for p in (copy / i for i in tr.ids): Image.fromarray(255 - np.asarray(Image.open(p).convert("RGB"))).save(p)
    moved = C.zero_shot_pseudo_labels(model, eval_tf, tok, Split(copy, tr.ids, tr.labels, tr.classnames), tpl, cache, key, k=3)
    assert not moved.cached and not torch.equal(moved.scores, first.scores)
    assert C.zero_shot_pseudo_labels(model, eval_tf, tok, tr, tpl, cache, key, k=3).cached
    calls = []
    real = C.encode_images
    monkeypatch.setattr(C, "encode_images", lambda m, ds, **k: calls.append(len(ds)) or real(m, ds, **k))
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(copy / tr.ids[2])            # one re-rendered image
    again = C.zero_shot_pseudo_labels(model, eval_tf, tok, Split(copy, tr.ids, tr.labels, tr.classnames), tpl, cache, key, k=3)
    assert calls == [1] and torch.equal(again.scores[3:], moved.scores[3:])
    moved_cache = tmp_path / "moved-cache"; shutil.move(str(cache), moved_cache)        # a moved cache folder: a hit
    assert C.zero_shot_pseudo_labels(model, eval_tf, tok, tr, tpl, moved_cache, key, k=3).cached and calls == [1]


def test_pseudo_label_cache_retries_an_unreadable_image(tiny, toy, tmp_path):
    model, _, eval_tf, tok = tiny
    import shutil
    tpl, cache = "a photo of a {}.", tmp_path / "cache"
    root = tmp_path / "train"; shutil.copytree(toy["train"].root, root)
    tr = Split(root, toy["train"].ids, toy["train"].labels, toy["train"].classnames)
    key = {"model": "latte-tiny", "pretrained": None, "dataset": "dtd", "split": "train"}
    good = (root / tr.ids[1]).read_bytes()
    (root / tr.ids[1]).write_bytes(b"not an image")
    first = C.zero_shot_pseudo_labels(model, eval_tf, tok, tr, tpl, cache, key, k=3)
    assert torch.equal(first.scores[1], torch.zeros(3))                                   # a zero embedding's label
    (root / tr.ids[1]).write_bytes(good)                                                  # fixed
    fixed = C.zero_shot_pseudo_labels(model, eval_tf, tok, tr, tpl, cache, key, k=3)
    ref = C.zero_shot_pseudo_labels(model, eval_tf, tok, toy["train"], tpl, tmp_path / "ref", key, k=3)
    assert not fixed.cached and torch.equal(fixed.c_zs, ref.c_zs) and torch.allclose(fixed.scores, ref.scores, atol=1e-6)


def test_zero_shot_eval(tiny, toy):
    model, _, eval_tf, tok = tiny
    te = toy["test"]
    r = C.zero_shot_eval(model, eval_tf, tok, te, "a photo of a {}.")
    V = C.encode_images(model, ImageDataset(te, eval_tf))
    p = (V @ C.text_classifier(model, tok, te.classnames, "a photo of a {}.").T).argmax(1)
    labels = torch.tensor(te.labels)
    assert torch.equal(r["preds"], p) and torch.equal(r["labels"], labels)
    assert r["top1"] == pytest.approx((p == labels).float().mean().item())
    for c in range(3): assert r["per_class"][c].item() == pytest.approx((p[labels == c] == c).float().mean().item())
    ens = C.zero_shot_eval(model, eval_tf, tok, te, ["a photo of a {}.", "a {} picture"])
    Wens = C.text_classifier(model, tok, te.classnames, ["a photo of a {}.", "a {} picture"])
    assert torch.equal(ens["preds"], (V @ Wens.T).argmax(1))
    one = C.zero_shot_eval(model, eval_tf, tok, te.subset([0, 1]), "a photo of a {}.")       # class 1, 2 absent
    assert torch.isnan(one["per_class"][1:]).all()
