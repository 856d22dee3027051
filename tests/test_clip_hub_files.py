"""CLIP checkpoints saved as open_clip's hub files (`open_clip_pytorch_model.bin`, `open_clip_model.safetensors`) load."""
import pytest
import torch
from safetensors.torch import save_file

from latteclip_nb.clip import load_clip


@pytest.mark.parametrize("name", ["open_clip_pytorch_model.bin", "open_clip_model.safetensors"])
def test_hub_layout_checkpoint_loads(tmp_path, name):
    torch.manual_seed(1)
    src = load_clip("latte-tiny", pretrained=None, device="cpu")[0]
    sd = {k: v.contiguous() for k, v in src.state_dict().items()}
    folder = tmp_path / "hub-snapshot"; folder.mkdir()
    if name.endswith(".bin"): torch.save(sd, folder / name)   # a plain state dict, as on the hub
    else: save_file(sd, str(folder / name))
    torch.manual_seed(2)                                       # another random init: only the file can make them equal
    for pretrained in (folder, folder / name):
        got = load_clip("latte-tiny", pretrained=str(pretrained), device="cpu")[0].state_dict()
        assert got.keys() == sd.keys() and all(torch.equal(got[k], sd[k]) for k in sd)
