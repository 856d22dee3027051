"""Tests of the ReCLIP baseline: projection, sparse kNN graph, CG label propagation, LayerNorm-only branches, end to end."""
import json
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from PIL import Image

import latteclip_nb
from latteclip_nb.reclip import (ReclipConfig, branch_pseudo_labels, class_centroids, conjugate_gradient, knn_graph,
                                 make_branch, project, propagate, reclip_epochs, run_reclip, text_norm_params,
                                 vision_norm_params)

torch.set_num_threads(1)


def dense_knn_graph(x, k):
    """The reference's dense construction: full affinity, top-k, (W + W^T)/2, D^-1/2 W D^-1/2."""
    N = x.shape[0]
    A = ((x @ x.T + 1) / 2) * (1 - torch.eye(N))
    v, i = A.topk(k, dim=1)
    W = torch.zeros_like(A).scatter_(1, i, v)
    W = (W + W.T) / 2
    d = W.sum(1).rsqrt()
    return d[:, None] * W * d[None, :]


def test_epoch_rule():
    assert [reclip_epochs(n) for n in (100, 5000, 19850, 70700, 500_000)] == [2, 3, 5, 16, 100]


def test_project_removes_shared_direction():
    torch.manual_seed(0)
    D, C = 12, 4
    E = torch.eye(D)
    text = F.normalize(5 * E[0] + E[1:C + 1], dim=-1)
    u0 = torch.linalg.svd(text.T, full_matrices=False)[0][:, 0]
    assert abs(abs(u0 @ E[0]) - 1) < 1e-2  # the shared direction is the first singular vector
    p = project(torch.randn(30, D) * 7, text)
    assert torch.allclose(p @ u0, torch.zeros(30), atol=1e-5)
    assert torch.allclose(p.norm(dim=1), torch.ones(30), atol=1e-5)
    assert torch.allclose(p[:, C + 1:], torch.zeros(30, D - C - 1), atol=1e-5)  # inside the class span
    # a feature along the shared direction alone has nothing left (zero vector, not NaN)
    assert torch.equal(project(u0[None], text), torch.zeros(1, D))


def test_project_errors():
    with pytest.raises(ValueError, match="at least 2"):
        project(torch.randn(3, 4), torch.randn(1, 4))
    with pytest.raises(ValueError, match="dim 5"):
        project(torch.randn(3, 5), torch.randn(3, 4))


@settings(max_examples=25, deadline=None)
@given(n=st.integers(2, 30), k=st.integers(1, 8), d=st.integers(2, 6), chunk=st.integers(1, 40), seed=st.integers(0, 99))
def test_knn_graph_matches_dense(n, k, d, chunk, seed):
    x = F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=1)
    S = knn_graph(x, k, max_elems=chunk * n)
    kk = min(k, n - 1)
    Sd = S.to_dense()
    assert torch.allclose(Sd, dense_knn_graph(x, kk), atol=1e-5)
    assert torch.allclose(Sd, Sd.T)
    assert (Sd.diagonal() == 0).all()
    per_row = torch.bincount(S.indices()[0], minlength=n)
    assert per_row.min() >= kk and per_row.sum() <= 2 * kk * n


def test_knn_graph_symmetric_sparse_bounded():
    torch.manual_seed(3)
    x = F.normalize(torch.randn(500, 16), dim=1)
    k = 10
    S = knn_graph(x, k, max_elems=500 * 37)  # uneven chunks
    assert S.is_sparse and S._nnz() <= 2 * k * 500
    (r, c), v = S.indices(), S.values()
    back = torch.sparse_coo_tensor(torch.stack([c, r]), v, S.shape, check_invariants=True).coalesce()
    assert torch.equal(back.indices(), S.indices()) and torch.allclose(back.values(), S.values())
    # mean row occupancy is between k and 2k; spectrum of the normalised graph is within [-1, 1]
    per_row = torch.bincount(r, minlength=500).float()
    assert k <= per_row.mean() <= 2 * k
    ev = torch.linalg.eigvalsh(S.to_dense())
    assert ev.max() <= 1 + 1e-4 and ev.min() >= -1 - 1e-4


def test_cg_matches_direct_solve():
    torch.manual_seed(4)
    M = torch.randn(20, 20, dtype=torch.float64)
    A = M @ M.T + 20 * torch.eye(20, dtype=torch.float64)
    B = torch.randn(20, 3, dtype=torch.float64)
    X = conjugate_gradient(lambda P: A @ P, B, max_iter=100, tol=1e-12)
    assert torch.allclose(X, torch.linalg.solve(A, B), atol=1e-8)
    # zero right-hand side columns stay zero (no division by zero)
    B[:, 1] = 0
    assert torch.equal(conjugate_gradient(lambda P: A @ P, B, 50, 1e-12)[:, 1], torch.zeros(20, dtype=torch.float64))


def test_propagation_matches_closed_form():
    torch.manual_seed(5)
    S = knn_graph(F.normalize(torch.randn(50, 5), dim=1), 4)
    seeds = torch.tensor([3, 11])
    Y = torch.zeros(50, 2); Y[seeds, torch.arange(2)] = 1
    exact = torch.linalg.solve(torch.eye(50) - 0.95 * S.to_dense(), Y)
    res = propagate(S, seeds, alpha=0.95, max_iter=300, tol=1e-10)
    assert torch.allclose(res.scores, exact, atol=1e-4)
    assert torch.equal(res.labels, exact.argmax(1))


def test_propagation_two_clusters():
    g = torch.Generator().manual_seed(0)
    a, b = torch.tensor([1., 0, 0, 0]), torch.tensor([0., 0, 1, 0])
    pts = torch.cat([a + 0.2 * torch.randn(40, 4, generator=g), b + 0.2 * torch.randn(40, 4, generator=g)])
    perm = torch.randperm(80, generator=g)
    truth = torch.arange(2).repeat_interleave(40)[perm]
    nodes = F.normalize(torch.cat([pts[perm], torch.stack([a, b])]), dim=1)  # seeds last this time
    res = propagate(knn_graph(nodes, 6), torch.tensor([80, 81]), alpha=0.99)
    assert torch.equal(res.labels[:80], truth)
    assert torch.equal(res.labels[80:], torch.tensor([0, 1]))
    assert ((res.confidence >= -1e-6) & (res.confidence <= 1 + 1e-6)).all()
    with pytest.raises(ValueError, match="alpha"):
        propagate(knn_graph(nodes, 6), torch.tensor([80, 81]), alpha=1.0)


def test_branch_pseudo_labels_and_centroids():
    E = torch.eye(5)
    text = F.normalize(3 * E[0] + E[1:4], dim=1)
    g = torch.Generator().manual_seed(1)
    imgs = F.normalize(torch.cat([text[c] + 0.05 * torch.randn(15, 5, generator=g) for c in range(3)]), dim=1)
    feats = torch.cat([imgs[:10], torch.zeros(1, 5), imgs[10:]])  # one unreadable image
    lab, conf, cents = branch_pseudo_labels(feats, text, ReclipConfig(k=5))
    truth = torch.arange(3).repeat_interleave(15)
    assert lab[10] == -1 and conf[10] == 0
    assert torch.equal(torch.cat([lab[:10], lab[11:]]), truth)
    assert torch.allclose(cents.norm(dim=1), torch.ones(3), atol=1e-5)
    assert (cents @ text.T).argmax(1).tolist() == [0, 1, 2]
    # centroid of a class = normalised mean of its members (text node included), empty class -> fallback
    c = class_centroids(torch.tensor([[2., 0], [0, 1], [0, 3]]), torch.tensor([1, 1, 1]), torch.tensor([[9., 9], [0, 0]]))
    assert torch.allclose(c, torch.tensor([[9., 9], [2 / 4.4721, 4 / 4.4721]]), atol=1e-4)


def _tiny_clip():
    cfg = json.loads((Path(latteclip_nb.__file__).parent / "assets" / "latte-tiny.json").read_text())
    torch.manual_seed(0)
    return open_clip.CLIP(**cfg)


@pytest.mark.parametrize("branch", ["vision", "text"])
def test_only_layernorm_parameters_change(branch):
    model = _tiny_clip()
    original = {n: t.clone() for n, t in model.state_dict().items()}
    m, params = make_branch(model, branch, "cpu")
    assert {n for n, p in m.named_parameters() if p.requires_grad} == set(params)
    assert not m.training
    before = {n: t.clone() for n, t in m.state_dict().items()}
    opt = torch.optim.SGD(params.values(), lr=0.5, momentum=0.9, weight_decay=1e-4)
    tok = open_clip.get_tokenizer("ViT-B-32")
    for _ in range(2):
        img = F.normalize(m.encode_image(torch.randn(6, 3, 32, 32)), dim=-1)
        txt = F.normalize(m.encode_text(tok(["a red thing", "a blue thing", "a green thing"])), dim=-1)
        opt.zero_grad()
        F.cross_entropy(100 * img @ txt.T, torch.tensor([0, 1, 2, 0, 1, 2])).backward()
        opt.step()
    after = m.state_dict()
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed == set(params)
    lns = {n for n, mod in m.named_modules() if isinstance(mod, torch.nn.LayerNorm)}
    assert all(n.rsplit(".", 1)[0] in lns for n in changed)
    if branch == "vision": assert all(n.startswith("visual.") for n in changed)
    else:
        assert not any(n.startswith("visual.") for n in changed)
        assert {"ln_final.weight", "ln_final.bias"} <= changed
    assert all(torch.equal(original[n], t) for n, t in model.state_dict().items())  # input model untouched
    assert set(vision_norm_params(model)).isdisjoint(text_norm_params(model))


def test_make_branch_errors():
    with pytest.raises(ValueError, match="'vision' or 'text'"):
        make_branch(_tiny_clip(), "audio", "cpu")


def _colour_split(root, n, seed, classnames=("red", "blue")):
    from latteclip_nb.data import Split
    rng = np.random.default_rng(seed)
    root = Path(root); root.mkdir(parents=True, exist_ok=True)
    base = {"red": [200, 30, 30], "blue": [30, 30, 200], "green": [30, 200, 30]}
    ids, labels = [], []
    for i in range(n):
        c = i % len(classnames)
        arr = np.clip(np.array(base[classnames[c]]) + rng.normal(0, 25, (32, 32, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(root / f"{i:03d}.png"); ids.append(f"{i:03d}.png"); labels.append(c)
    return Split(root=root, ids=ids, labels=labels, classnames=list(classnames))


TEMPLATES = ["a photo of a {} square.", "a {} thing."]


def test_run_reclip_tiny(tmp_path):
    from latteclip_nb.clip import load_clip
    torch.manual_seed(0)
    model, train_tf, eval_tf, tokenizer = load_clip("latte-tiny", pretrained=None, device="cpu")
    names = ["red", "blue", "green"]
    train, test = _colour_split(tmp_path / "train", 21, 0, names), _colour_split(tmp_path / "test", 9, 1, names)
    for split in (train, test):  # one unreadable file in each split
        (split.root / "broken.png").write_bytes(b"not an image")
        split.ids.append("broken.png"); split.labels.append(0)
    before = {n: t.clone() for n, t in model.state_dict().items()}
    cfg = ReclipConfig(k=5, batch_size=8, epochs=2, num_workers=0, eval_batch_size=16, max_steps=4)
    res = run_reclip(model, tokenizer, train_tf, eval_tf, train, test, names, TEMPLATES, cfg, device="cpu")
    assert 0 <= res["top1"] <= 1 and len(res["preds"]) == len(test)
    assert res["preds"][-1] == -1 and set(res["preds"][:-1]) <= {0, 1, 2}  # unreadable test image counts as wrong
    assert res["top1"] == pytest.approx(np.mean(np.array(res["preds"]) == np.array(test.labels)))
    assert res["labels"] == test.labels
    assert len(res["per_class"]) == 3 and all(0 <= a <= 1 for a in res["per_class"])
    assert 0 <= res["top1_v"] <= 1 and 0 <= res["top1_t"] <= 1
    assert res["steps"] <= 4 and 1 <= len(res["history"]) <= 2
    for h in res["history"]:
        assert 0 <= h["agree"] <= 1 and 0 <= h["pl_acc_v"] <= 1 and 0 <= h["pl_acc_t"] <= 1
    assert all(torch.equal(before[n], t) for n, t in model.state_dict().items())
    # augmentation path and unlabeled test split
    from latteclip_nb.data import Split
    unl = Split(root=test.root, ids=test.ids, labels=None, classnames=names)
    res2 = run_reclip(model, tokenizer, train_tf, eval_tf, train, unl, names, TEMPLATES,
                      ReclipConfig(k=5, batch_size=8, epochs=1, num_workers=0, max_steps=1, augment=True), device="cpu")
    assert res2["top1"] is None and len(res2["preds"]) == len(test)


def test_run_reclip_resumes(tmp_path):
    from latteclip_nb.clip import load_clip
    torch.manual_seed(0)
    model, train_tf, eval_tf, tokenizer = load_clip("latte-tiny", pretrained=None, device="cpu")
    train, test = _colour_split(tmp_path / "train", 20, 0), _colour_split(tmp_path / "test", 8, 1)
    args = (model, tokenizer, train_tf, eval_tf, train, test, ["red", "blue"], TEMPLATES)
    kw = dict(k=5, batch_size=8, epochs=2, num_workers=0, eval_batch_size=16)
    full = run_reclip(*args, ReclipConfig(**kw, out_dir=str(tmp_path / "a")), device="cpu")
    # a run interrupted after epoch 1 (simulated by a step cap), then resumed without the cap
    first = full["history"][0]["steps"]
    part = run_reclip(*args, ReclipConfig(**kw, max_steps=first, out_dir=str(tmp_path / "b")), device="cpu")
    assert len(part["history"]) == 1
    resumed = run_reclip(*args, ReclipConfig(**kw, out_dir=str(tmp_path / "b")), device="cpu")
    assert resumed["preds"] == full["preds"] and resumed["steps"] == full["steps"]
    assert [h["loss_t"] for h in resumed["history"]] == pytest.approx([h["loss_t"] for h in full["history"]], abs=1e-6)
    # a finished run is returned from disk; another configuration in the same folder is refused
    again = run_reclip(*args, ReclipConfig(**kw, out_dir=str(tmp_path / "a")), device="cpu")
    assert again["preds"] == full["preds"] and again["history"] == full["history"]
    with pytest.raises(ValueError, match="another ReCLIP configuration"):
        run_reclip(*args, ReclipConfig(**{**kw, "k": 3}, out_dir=str(tmp_path / "a")), device="cpu")


def test_run_reclip_errors(tmp_path):
    from latteclip_nb.data import Split
    s = Split(root=tmp_path, ids=["a.png", "b.png"], labels=None, classnames=["x"])
    with pytest.raises(ValueError, match="at least 2 classes"):
        run_reclip(None, None, None, None, s, s, ["x"], ["{}"], ReclipConfig())
    with pytest.raises(ValueError, match="templates"):
        run_reclip(None, None, None, None, s, s, ["x", "y"], ["no slot"], ReclipConfig())
