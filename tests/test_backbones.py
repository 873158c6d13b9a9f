"""Image-only backbones: timm models, the bundled EfficientNet-Lite0, and an open_clip config with a
timm vision tower."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from clipfuse.embed import EmbedderConfig, PretrainedWeightsError, create_embedder, load_weights_file
from conftest import write_timm_weights

PHOTOS = ("chelsea", "coffee", "astronaut", "rocket")


@pytest.fixture
def offline(monkeypatch):
    """No hub access, as on a machine without network."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def effnet():
    return create_embedder(EmbedderConfig(model="effnet-lite0"))


@pytest.fixture(scope="module")
def photos():
    from skimage import data

    return [Image.fromarray(getattr(data, name)()).convert("RGB") for name in PHOTOS]


def test_effnet_lite0_loads_offline_with_real_weights(offline):
    embedder = create_embedder(EmbedderConfig(model="effnet-lite0"))
    assert not embedder.info.random_weights and not embedder.has_text
    assert embedder.dim == 1280 and embedder.image_size == (224, 224)
    # timm's pretrained config for tf_efficientnet_lite0: bicubic resize to 256, crop 224, mean/std 0.5
    assert "CenterCrop(size=(224, 224))" in embedder.info.preprocess and "0.5000" in embedder.info.preprocess
    with pytest.raises(ValueError, match="no text tower"):
        embedder.encode_texts(["a photo of a cat"])


def test_effnet_lite0_features_are_sensible(effnet, photos):
    X = effnet.encode_images(photos)
    assert X.shape == (4, 1280) and np.allclose(np.linalg.norm(X, axis=1), 1, atol=1e-5)
    flipped = effnet.encode_images([im.transpose(Image.FLIP_LEFT_RIGHT) for im in photos])
    cropped = effnet.encode_images([im.crop((im.width // 20, im.height // 20, im.width - im.width // 20,
                                             im.height - im.height // 20)) for im in photos])
    assert np.all(np.sum(X * flipped, axis=1) >= 0.9)
    assert np.all(np.sum(X * cropped, axis=1) >= 0.9)
    unrelated = (X @ X.T)[~np.eye(4, dtype=bool)]
    assert np.all(unrelated <= 0.5), unrelated


# Computed once with the mapping in clipfuse.embed.backbones (timm 1.0.31, torch 2.14.1). A mapping
# that put any tensor under the wrong name would change these numbers.
CHELSEA_TOP5 = [282, 285, 281, 287, 904]  # tiger cat, Egyptian cat, tabby, lynx, window screen
CHELSEA_TOP5_LOGITS = [9.2356, 9.1381, 8.3953, 5.9227, 3.4109]
RAMP_LOGITS = {0: 0.2660, 1: 0.5906, 281: -0.2914, 500: 0.3422, 999: -0.4448}


def _ramp():
    return torch.linspace(-1, 1, 3 * 224 * 224).reshape(1, 3, 224, 224)


def test_effnet_lite0_imagenet_logits_match_the_reference(effnet, photos):
    with torch.no_grad():
        logits = effnet.model(effnet.preprocess(photos[0])[None])[0]
        ramp = effnet.model(_ramp())[0]
    top = logits.topk(5)
    assert top.indices.tolist() == CHELSEA_TOP5
    assert top.values.tolist() == pytest.approx(CHELSEA_TOP5_LOGITS, abs=2e-3)
    assert [float(ramp[i]) for i in RAMP_LOGITS] == pytest.approx(list(RAMP_LOGITS.values()), abs=2e-3)
    # photos of things ImageNet knows land in the right classes
    with torch.no_grad():
        coffee = int(effnet.model(effnet.preprocess(photos[1])[None]).argmax())
    assert coffee == 967  # espresso


def test_a_wrong_key_mapping_fails_the_reference(effnet):
    """The reference is sharp enough: swapping two same-shaped tensors is caught."""
    import copy

    from clipfuse.embed.backbones import effnet_lite0_state_dict

    state = effnet_lite0_state_dict()
    a, b = "blocks.1.0.bn1.weight", "blocks.1.0.bn1.bias"  # same shape, so load_state_dict accepts the swap
    assert state[a].shape == state[b].shape
    state[a], state[b] = state[b], state[a]
    broken = copy.deepcopy(effnet.model)
    broken.trunk.load_state_dict(state)
    with torch.no_grad():
        ramp = broken(_ramp())[0]
    assert [float(ramp[i]) for i in RAMP_LOGITS] != pytest.approx(list(RAMP_LOGITS.values()), abs=2e-3)


def test_timm_model_from_a_weights_file(tmp_path, tiny_timm):
    name, weights = tiny_timm
    embedder = create_embedder(EmbedderConfig(model=name, pretrained=str(weights)))
    assert not embedder.info.random_weights and embedder.info.pretrained == str(weights)
    assert embedder.image_size == (160, 160) and "0.4850" in embedder.info.preprocess  # timm's config for it
    X = embedder.encode_images([Image.new("RGB", (50, 40), (200, 30, 30)), Image.new("RGB", (40, 50), (0, 90, 200))])
    assert X.shape == (2, embedder.dim) and np.allclose(np.linalg.norm(X, axis=1), 1, atol=1e-5)

    same = create_embedder(EmbedderConfig(model=name, pretrained=str(write_timm_weights(tmp_path / "w.pt"))))
    assert same.fingerprint == embedder.fingerprint  # a .pt of the same weights (read with weights_only=True)
    other = create_embedder(EmbedderConfig(model=name, pretrained=str(write_timm_weights(tmp_path / "o.pt", seed=1))))
    assert other.fingerprint != embedder.fingerprint  # the fingerprint covers the weights


def test_weights_file_wrappers_and_refusals(tmp_path):
    state = {"w": torch.ones(2)}
    torch.save({"state_dict": {"module.w": torch.ones(2)}}, tmp_path / "wrapped.pt")
    assert torch.equal(load_weights_file(tmp_path / "wrapped.pt")["w"], state["w"])

    from pathlib import PurePosixPath

    torch.save({"w": PurePosixPath("/etc")}, tmp_path / "code.pt")  # any class: weights_only refuses to build it
    with pytest.raises(ValueError, match="never loaded"):
        load_weights_file(tmp_path / "code.pt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_weights_file(tmp_path / "missing.safetensors")


def test_timm_errors_name_the_problem_and_the_way_out(tmp_path, tiny_timm, offline):
    name, weights = tiny_timm
    with pytest.raises(ValueError, match="unknown timm model 'no_such_net'"):
        create_embedder(EmbedderConfig(model="timm:no_such_net"))
    with pytest.raises(ValueError, match="takes a weights file"):
        create_embedder(EmbedderConfig(model=name, pretrained="laion2b_s34b_b79k"))
    other_arch = write_timm_weights(tmp_path / "vit.safetensors", arch="test_vit")
    with pytest.raises(PretrainedWeightsError, match="don't fit timm model 'test_efficientnet'"):
        create_embedder(EmbedderConfig(model=name, pretrained=str(other_arch)))
    # hub weights with no hub: an error naming the offline default, never silent random weights
    with pytest.raises(PretrainedWeightsError, match="effnet-lite0"):
        create_embedder(EmbedderConfig(model="timm:test_vit.r160_in1k"))
    with pytest.warns(UserWarning, match="RANDOM WEIGHTS"):
        embedder = create_embedder(EmbedderConfig(model="timm:test_vit.r160_in1k", allow_random_weights=True))
    assert embedder.info.random_weights and embedder.info.pretrained is None


def test_open_clip_config_with_a_timm_vision_tower(tmp_path):
    """open_clip's own timm tower: a CLIP model (it has a text tower) loaded from a local-dir folder."""
    import open_clip
    from safetensors.torch import save_file

    cfg = {"embed_dim": 16,
           "vision_cfg": {"timm_model_name": "test_efficientnet", "timm_model_pretrained": False,
                          "timm_pool": "avg", "timm_proj": "linear", "image_size": 64},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {}}))
    torch.manual_seed(0)
    model = open_clip.create_model(f"local-dir:{tmp_path}", load_weights=False)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "open_clip_model.safetensors"))
    embedder = create_embedder(EmbedderConfig(model=f"local-dir:{tmp_path}"))
    assert embedder.has_text and embedder.dim == 16 and embedder.image_size == (64, 64)
    assert embedder.encode_images([Image.new("RGB", (70, 64), (9, 9, 9))]).shape == (1, 16)
    assert embedder.encode_texts(["a photo of a cat"]).shape == (1, 16)


@pytest.mark.parametrize("num_classes", [0, 7])
def test_weights_files_with_their_own_classifier_size_load(tmp_path, num_classes):
    """A headless or finetuned checkpoint loads into its architecture (the classifier is resized)."""
    import timm
    from safetensors.torch import save_file

    model = timm.create_model("test_efficientnet", pretrained=False, num_classes=num_classes)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "w.safetensors"))
    embedder = create_embedder(EmbedderConfig(model="timm:test_efficientnet", pretrained=str(tmp_path / "w.safetensors")))
    assert embedder.model.trunk.num_classes == num_classes and embedder.dim == 256


def test_a_random_weights_version_reopens_as_the_same_model(monkeypatch, offline):
    """Re-opening a version made with random weights builds the same seeded model and loads nothing,
    even where pretrained weights could now be downloaded."""
    from clipfuse.embed import backbones

    with pytest.warns(UserWarning, match="RANDOM WEIGHTS"):
        made = create_embedder(EmbedderConfig(model="timm:test_vit.r160_in1k", allow_random_weights=True))

    def no_download(*args, **kwargs):
        raise AssertionError("pretrained weights were fetched for a random-weights version")

    monkeypatch.setattr(backbones, "create_timm_trunk", no_download)
    again = create_embedder(EmbedderConfig(model="timm:test_vit.r160_in1k", random_weights=True))
    assert again.info.random_weights and again.fingerprint == made.fingerprint
