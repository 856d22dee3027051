"""A full disk during training stops in one line and leaves the last checkpoint intact and resumable."""
import errno, os, sys, tempfile
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).parent))
from test_train import run   # noqa: E402  (the tiny world and tiny CLIP of the training tests)

from latteclip_nb.train import TrainConfig


def test_default_ckpt_every_is_steps_not_epochs():
    assert TrainConfig().ckpt_every == 50   # at batch 512, Food-101's epoch is 138 steps: at most 50 are lost


def test_disk_full_keeps_checkpoint_and_resumes(tmp_path, monkeypatch):
    cfg = TrainConfig(epochs=3, warmup_steps=1, lr=1e-4, batch_size=8, ckpt_every=2, model_name="latte-tiny")
    full = run(tmp_path / "full", cfg, tmp_path / "world")
    run(tmp_path / "r", cfg, tmp_path / "world", stop_at=2)
    ckpt = tmp_path / "r" / "checkpoint.pt"
    good = ckpt.read_bytes()
    def full_on_write(obj, f): f.write(b"partial"); raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(torch, "save", full_on_write)
    with pytest.raises(OSError) as e:
        run(tmp_path / "r", cfg, tmp_path / "world")
    msg = str(e.value)
    assert "no space left" in msg and "checkpoint.pt" in msg and "step 4" in msg and "resumes" in msg and "\n" not in msg, msg
    assert "inline_container" not in msg
    assert ckpt.read_bytes() == good and not [p for p in ckpt.parent.iterdir() if p.name.endswith(".tmp")]
    monkeypatch.undo()
    resumed = run(tmp_path / "r", cfg, tmp_path / "world")
    assert resumed.step == full.step and torch.equal(resumed.classifier, full.classifier)


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_export_weights_on_a_full_disk_fail_in_one_line_and_keep_the_old_file(tmp_path, monkeypatch):
    from safetensors.torch import load_file
    from latteclip_nb.checkpoints import _save_safetensors
    path = tmp_path / "classifier.safetensors"
    _save_safetensors({"w": torch.arange(3.0)}, path)
    real = tempfile.mkstemp
    def full_disk(dir=None, prefix=None, suffix=None):   # the temp file is a link to /dev/full: writes fail with ENOSPC
        fd, p = real(dir=dir, prefix=prefix, suffix=suffix); os.close(fd); os.unlink(p); os.symlink("/dev/full", p)
        return os.open(p, os.O_WRONLY), p
    monkeypatch.setattr(tempfile, "mkstemp", full_disk)
    with pytest.raises(OSError) as e:
        _save_safetensors({"w": torch.arange(5.0)}, path)
    assert "no space left" in str(e.value) and str(path) in str(e.value) and "\n" not in str(e.value)
    monkeypatch.undo()
    assert torch.equal(load_file(path)["w"], torch.arange(3.0)) and [p.name for p in tmp_path.iterdir()] == [path.name]
