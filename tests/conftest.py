"""Shared fixtures: a tiny open_clip model on disk, generated image folders, a store."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

TINY_MODEL_CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def write_tiny_model(folder: Path, seed: int = 0) -> str:
    """Write a 1-layer open_clip model with random weights as a ``local-dir:`` folder."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_MODEL_CFG, "preprocess_cfg": {}}))
    torch.manual_seed(seed)
    model = open_clip.create_model(f"local-dir:{folder}", load_weights=False)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "open_clip_model.safetensors"))
    return f"local-dir:{folder}"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """Model name of a tiny CLIP (embed_dim 16, 32 px) with weights saved as safetensors."""
    return write_tiny_model(tmp_path_factory.mktemp("tiny-clip"))


@pytest.fixture(scope="session")
def other_tiny_model(tmp_path_factory) -> str:
    """A second tiny CLIP with different weights (another fingerprint)."""
    return write_tiny_model(tmp_path_factory.mktemp("tiny-clip-2"), seed=1)


def write_shapes_folder(root: Path, n_per_class: int = 4, size: int = 48, seed: int = 0) -> dict[str, list[Path]]:
    """Write a labeled folder of coloured shapes: root/<class>/<i>.png, each image distinct."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    colours = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 60, 220)}
    out = {}
    for name, colour in colours.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        out[name] = []
        for i in range(n_per_class):
            img = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(0, 60, 3)))
            draw = ImageDraw.Draw(img)
            x, y = rng.integers(2, size // 2, 2)
            draw.ellipse([int(x), int(y), int(x) + size // 2, int(y) + size // 2], fill=colour)
            path = root / name / f"{i:03d}.png"
            img.save(path)
            out[name].append(path)
    return out


@pytest.fixture
def shapes_dir(tmp_path) -> Path:
    root = tmp_path / "labeled"
    write_shapes_folder(root)
    return root


def write_mixed_folder(root: Path) -> dict[str, list[Path]]:
    """Write a folder of good images in awkward formats and bad files that must be reported.

    Returns ``{"good": [...], "bad": [...]}``.
    """
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(3)
    good, bad = [], []

    def photo(w=64, h=48):
        return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))

    p = root / "plain.jpg"
    photo().save(p, quality=90)
    good.append(p)
    p = root / "cmyk.jpg"
    photo().convert("CMYK").save(p)
    good.append(p)
    p = root / "deep16.png"
    Image.fromarray((rng.integers(0, 65535, (40, 40))).astype(np.uint16)).save(p)
    good.append(p)
    p = root / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees on display
    photo(60, 30).save(p, exif=exif)
    good.append(p)
    p = root / "café_日本.png"
    photo().save(p)
    good.append(p)
    p = root / "alpha.png"
    photo().convert("RGBA").save(p)
    good.append(p)

    whole = root / "plain.jpg"
    p = root / "truncated.jpg"
    p.write_bytes(whole.read_bytes()[: len(whole.read_bytes()) // 2])
    bad.append(p)
    p = root / "empty.jpg"
    p.write_bytes(b"")
    bad.append(p)
    p = root / "notes.jpg"
    p.write_text("this is a text file, not a JPEG\n")
    bad.append(p)
    return {"good": good, "bad": bad}


def write_timm_weights(path: Path, arch: str = "test_efficientnet", seed: int = 0) -> Path:
    """Save random weights of a tiny timm architecture as a checkpoint file (safetensors or .pt)."""
    import timm
    import torch

    torch.manual_seed(seed)
    state = {k: v.contiguous() for k, v in timm.create_model(arch, pretrained=False).state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save(state, path)
    return path


@pytest.fixture(scope="session")
def tiny_timm(tmp_path_factory) -> tuple[str, Path]:
    """(model name, weights file) of timm's tiny test_efficientnet (356k parameters, 160 px)."""
    return "timm:test_efficientnet", write_timm_weights(tmp_path_factory.mktemp("tiny-timm") / "w.safetensors")


def start_moto_server(env: dict | None = None):
    """Start moto's S3 server on 127.0.0.1 and a free port; ``(process, endpoint URL)`` once it answers."""
    import shutil
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    server = shutil.which("moto_server") or str(Path(sys.executable).parent / "moto_server")
    if not Path(server).exists():
        pytest.fail("moto_server is missing: install the test extra (pip install -e '.[test]').")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([server, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, **(env or {})})
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(400):
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1)  # moto's own page: no S3 action counted
            return proc, endpoint
        except OSError:
            if proc.poll() is not None:
                pytest.fail("moto_server exited at start")
            time.sleep(0.05)
    proc.kill()
    pytest.fail("moto_server did not answer within 20 s")


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory):
    """A real S3 API (moto's server) on 127.0.0.1 and a free port, stopped after the module's tests.

    Yields the endpoint URL; the AWS_* variables point at it while the tests run, and the
    local cache of files read from object storage (XDG_CACHE_HOME) is a temporary folder.
    """
    proc, endpoint = start_moto_server()
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION",
                                             "AWS_ENDPOINT_URL", "XDG_CACHE_HOME")}
    os.environ.update(AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test", AWS_REGION="us-east-1",
                      AWS_ENDPOINT_URL=endpoint, XDG_CACHE_HOME=str(tmp_path_factory.mktemp("cache")))
    try:
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_endpoint, request):
    """A fresh bucket on the test S3 server; its name."""
    import re

    import boto3

    name = re.sub(r"[^a-z0-9-]", "-", f"t-{request.node.name.lower()}")[:50].strip("-")
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return name
