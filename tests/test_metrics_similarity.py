"""SSCD, S / LS and CLIP score with tiny stand-in networks (nothing downloaded), checked against numpy by hand."""

import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

from memlens.errors import InputError
from memlens.metrics import similarity as S


class TinyDescriptor(torch.nn.Module):
    """Stand-in for an SSCD TorchScript model: image batch (n, 3, h, w) -> descriptor (n, 8)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 8, 3, stride=2)

    def forward(self, x):
        return torch.relu(self.conv(x)).mean(dim=(2, 3)) + 0.1


@pytest.fixture
def sscd_file(tmp_path):
    net = TinyDescriptor().eval()
    path = tmp_path / "tiny_sscd.torchscript.pt"
    torch.jit.script(net).save(str(path))
    return path, net


def rand_image(h, w, seed):
    return (np.random.default_rng(seed).integers(0, 256, (h, w, 3)).astype(np.float32)) / 255.0


def test_presets_shapes_and_normalisation():
    img = np.full((200, 300, 3), 0.8, np.float32)  # H=200, W=300
    x = S.preprocess_sscd(img, "wen")  # shorter side 256 -> 256x384, centre crop 224, (x - .5) / .5
    assert x.shape == (3, 224, 224) and x.dtype == np.float32
    assert x == pytest.approx(np.full_like(x, (0.8 - 0.5) / 0.5), abs=1e-6)
    y = S.preprocess_sscd(img, "sscd")  # shorter side 288 -> 288x432, ImageNet statistics, no crop
    assert y.shape == (3, 288, 432)
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    assert y[:, 10, 10] == pytest.approx((0.8 - mean) / std, abs=1e-5)
    tall = S.preprocess_sscd(np.zeros((300, 100, 3), np.float32), "sscd")
    assert tall.shape == (3, 864, 288)


def test_wen_preset_matches_torchvision_recipe_by_hand():
    img = rand_image(50, 70, 1)
    pil = Image.fromarray(np.rint(img * 255).astype(np.uint8))
    # torchvision Resize(256) on a 70x50 (WxH) image: (W, H) = (int(256 * 70 / 50), 256); crop offsets round((n-224)/2)
    r = np.asarray(pil.resize((358, 256), Image.BILINEAR), np.float32) / 255.0
    top, left = int(round((256 - 224) / 2)), int(round((358 - 224) / 2))
    want = ((r[top : top + 224, left : left + 224] - 0.5) / 0.5).transpose(2, 0, 1)
    assert S.preprocess_sscd(img, "wen") == pytest.approx(want, abs=1e-6)


def test_sscd_embeddings_from_torchscript_file(sscd_file):
    path, net = sscd_file
    model = S.load_sscd(path)
    a, b = rand_image(40, 40, 2), rand_image(30, 50, 3)
    emb = S.sscd_embeddings(model, [a, b, a], "wen")
    assert emb.shape == (3, 8) and emb.dtype == np.float32
    # independent: the un-scripted module on the same inputs, normalised and dotted in numpy
    with torch.no_grad():
        raw = [net(torch.from_numpy(S.preprocess_sscd(im, "wen"))[None])[0].numpy() for im in (a, b)]
    raw = [r / np.linalg.norm(r) for r in raw]
    assert emb[0] == pytest.approx(raw[0], abs=1e-5)
    sims = S.cosine_similarity(emb[:1], emb[1:])
    assert sims[0, 0] == pytest.approx(float(raw[0] @ raw[1]), abs=1e-5)
    assert sims[0, 1] == pytest.approx(1.0, abs=1e-5)


def test_sscd_file_errors(tmp_path):
    with pytest.raises(InputError, match="SSCD model file not found"):
        S.load_sscd(tmp_path / "nope.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a model")
    with pytest.raises(InputError, match="bad.pt: not a loadable TorchScript model"):
        S.load_sscd(bad)


def test_masked_l2_by_hand():
    x_hat = np.zeros((4, 4, 3), np.float32)
    x = np.full((4, 4, 3), 0.5, np.float32)
    assert S.masked_l2(x_hat, x) == pytest.approx(np.sqrt(48 * 0.25))
    m = np.arange(16, dtype=np.float32).reshape(4, 4)  # same size as the image: no resampling involved
    w = m / m.mean()
    assert S.masked_l2(x_hat, x, m) == pytest.approx(np.sqrt(3 * np.sum((0.5 * w) ** 2)))
    assert S.masked_l2(x_hat, x, m, "none") == pytest.approx(np.sqrt(3 * np.sum((0.5 * m) ** 2)))
    assert S.masked_l2(x_hat, x, m, "minmax") == pytest.approx(np.sqrt(3 * np.sum((0.5 * m / 15) ** 2)))
    assert S.masked_l2(x_hat, x, np.full((2, 2), 0.003)) == pytest.approx(np.sqrt(12))  # constant map: weights 1
    # a reference of another size is resized to the generation's; a constant image stays constant
    assert S.masked_l2(x_hat, np.full((9, 7, 3), 0.5, np.float32)) == pytest.approx(np.sqrt(12), abs=1e-5)


def test_s_and_ls_indicator():
    assert S.s_score(0.49, 30.0) == -30.0
    assert S.s_score(0.5, 30.0) == 0.0  # 1[SSCD < 0.5] is 0 at exactly 0.5
    assert S.ls_score(0.2, 12.5) == -12.5
    assert S.ls_score(0.9, 12.5) == 0.0


def test_load_image_errors(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG garbage")
    with pytest.raises(InputError, match="broken.png: cannot read image"):
        S.load_image(bad)


class TinyClip(torch.nn.Module):
    """Stand-in with open_clip's call interface."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.img = torch.nn.Linear(3, 4)
        self.txt = torch.nn.Embedding(300, 4)

    def encode_image(self, x):
        return self.img(x.mean(dim=(2, 3)))

    def encode_text(self, tokens):
        return self.txt(tokens).mean(dim=1)


def tiny_preprocess(pil):
    return torch.from_numpy(np.asarray(pil.resize((8, 8)), np.float32) / 255.0).permute(2, 0, 1)


def tiny_tokenizer(texts):
    return torch.tensor([[ord(c) % 300 for c in t[:10].ljust(10)] for t in texts])


def test_clip_scores_with_stand_in():
    model = TinyClip().eval()
    images = [rand_image(16, 16, 4), rand_image(16, 16, 5)]
    prompts = ["a hippo", "podcast cover"]
    got = S.clip_scores(model, tiny_preprocess, tiny_tokenizer, images, prompts)
    with torch.no_grad():
        W, b, E = model.img.weight.numpy(), model.img.bias.numpy(), model.txt.weight.numpy()
    for k, (im, p) in enumerate(zip(images, prompts)):
        x = tiny_preprocess(Image.fromarray(np.rint(im * 255).astype(np.uint8))).numpy()
        fi = W @ x.mean(axis=(1, 2)) + b
        ft = E[tiny_tokenizer([p])[0].numpy()].mean(axis=0)
        assert got[k] == pytest.approx(fi @ ft / np.linalg.norm(fi) / np.linalg.norm(ft), abs=1e-5)


def test_load_clip_without_open_clip(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "open_clip", None)  # makes `import open_clip` raise ImportError
    with pytest.raises(InputError, match=r"open_clip, which is not installed.*memlens\[clip\]"):
        S.load_clip("ViT-g-14", tmp_path / "w.bin")


def test_load_clip_uses_local_file_only(monkeypatch, tmp_path):
    calls = {}

    def create(name, pretrained, device):
        calls["create"] = (name, pretrained, device)
        return TinyClip(), None, tiny_preprocess

    fake = types.SimpleNamespace(create_model_and_transforms=create, get_tokenizer=lambda name: tiny_tokenizer)
    monkeypatch.setitem(sys.modules, "open_clip", fake)
    with pytest.raises(InputError, match="CLIP weights file not found"):
        S.load_clip("ViT-g-14", "laion2b_s12b_b42k")  # a hub tag, not a file: refused, never downloaded
    weights = tmp_path / "open_clip_model.safetensors"
    weights.write_bytes(b"x")
    model, preprocess, tokenizer = S.load_clip("ViT-g-14", weights)
    assert calls["create"] == ("ViT-g-14", str(weights), "cpu")
    assert preprocess is tiny_preprocess and tokenizer is tiny_tokenizer
