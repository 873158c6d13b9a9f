"""Benchmark: int8 back-ends for an image tower on this CPU, side by side in one run.

The candidates for ``--precision int8``, each against torch fp32 on the same batch, interleaved
(every round runs every back-end once; the median of the rounds is kept):

- torch dynamic int8 of ``nn.Linear`` only (``quantize_dynamic``; attention in-projections stay fp32),
- torch dynamic int8 as clipfuse does it (``clipfuse.embed.int8.quantize_int8``: attention too),
- ONNX Runtime fp32, dynamic int8 and static int8 (QDQ, calibrated on image crops),
- OpenVINO fp32 and OpenVINO + NNCF int8 (post-training quantization, calibrated the same way).

ONNX Runtime and OpenVINO are optional (``pip install onnxruntime openvino nncf``); back-ends that are
not installed are skipped. Accuracy is the mean cosine of each image's vector to torch fp32's, on
crops of scikit-image's sample photos (preprocessed as CLIP does); random weights unless
``--model effnet-lite0`` (its real ImageNet weights). Speed does not depend on the weights; cosine
does somewhat, so treat it as a comparison between back-ends.

    python bench/int8_backends.py --model ViT-B-32
    python bench/int8_backends.py --model effnet-lite0
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from index_throughput import cpu_description  # noqa: E402

ACCURACY_BAR = 0.995


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="ViT-B-32", help="open_clip model name or effnet-lite0")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=2, help="threads of every back-end")
    p.add_argument("--rounds", type=int, default=5)
    return p.parse_args(argv)


class Tower(torch.nn.Module):
    """The model's ``encode_image`` as a module's forward (what ONNX export and quantization see)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model.encode_image(x)


def load(name: str):
    from clipfuse.embed import EmbedderConfig, create_embedder

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        e = create_embedder(EmbedderConfig(model=name, device="cpu", random_weights=name != "effnet-lite0"))
    return e


def photo_batches(embedder, n: int, seed: int) -> torch.Tensor:
    from PIL import Image
    from skimage import data

    from clipfuse.data.demo import random_crop

    rng = np.random.default_rng(seed)
    photos = [Image.fromarray(p).convert("RGB") for p in (data.chelsea(), data.coffee(), data.astronaut(),
                                                           data.rocket())]
    return torch.stack([embedder.preprocess(random_crop(photos[i % 4], rng, width=320)) for i in range(n)])


def unit(a) -> np.ndarray:
    a = np.asarray(a, dtype=np.float32)
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    embedder = load(args.model)
    model = Tower(embedder.model).eval()
    x = photo_batches(embedder, args.batch_size, seed=0)
    calibration = [photo_batches(embedder, 8, seed=s) for s in range(1, 9)]
    runners, notes = {}, []
    runners["torch fp32"] = lambda: model(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torch.ao.quantization import quantize_dynamic

        from clipfuse.embed.int8 import _float32, quantize_int8

        linear_only = quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear}, dtype=torch.qint8)
        for m in linear_only.modules():
            for method in ("get_cast_dtype", "get_weight_dtype"):
                if callable(getattr(type(m), method, None)):
                    setattr(m, method, _float32)
        runners["torch dynamic int8, Linear only"] = lambda: linear_only(x)
        try:
            ours = Tower(quantize_int8(copy.deepcopy(embedder.model), args.model)).eval()
            runners["torch dynamic int8, clipfuse (attention too)"] = lambda: ours(x)
        except ValueError as e:
            notes.append(f"clipfuse int8: {e}")
    tmp = Path(tempfile.mkdtemp(prefix="clipfuse-int8-"))
    onnx_path = tmp / "model.onnx"
    try:
        import onnxruntime as ort
        from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic as ort_dyn
        from onnxruntime.quantization import quantize_static

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, x[:1], str(onnx_path), input_names=["x"], output_names=["y"],
                              dynamic_axes={"x": {0: "b"}, "y": {0: "b"}}, opset_version=17, dynamo=False)
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = args.threads, 1

        def session(path):
            s = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            return lambda: s.run(None, {"x": x.numpy()})[0]

        runners["onnxruntime fp32"] = session(onnx_path)
        ort_dyn(str(onnx_path), str(tmp / "dynamic.onnx"), weight_type=QuantType.QInt8)
        runners["onnxruntime dynamic int8"] = session(tmp / "dynamic.onnx")

        class Reader(CalibrationDataReader):
            def __init__(self):
                self.batches = iter(calibration)

            def get_next(self):
                b = next(self.batches, None)
                return None if b is None else {"x": b.numpy()}

        quantize_static(str(onnx_path), str(tmp / "static.onnx"), Reader(), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True)
        runners["onnxruntime static int8 (QDQ)"] = session(tmp / "static.onnx")
    except ImportError:
        notes.append("onnxruntime not installed: skipped (pip install onnxruntime)")
    try:
        import openvino as ov

        if not onnx_path.exists():
            raise ImportError("openvino here converts the ONNX export, which needs onnxruntime's run first")
        core = ov.Core()
        converted = ov.convert_model(str(onnx_path))
        threads = {"INFERENCE_NUM_THREADS": args.threads}
        fp32 = core.compile_model(converted, "CPU", {**threads, "INFERENCE_PRECISION_HINT": "f32"})
        runners["openvino fp32"] = lambda: fp32(x.numpy())[0]
        try:
            import nncf

            kind = None if args.model == "effnet-lite0" else nncf.ModelType.TRANSFORMER
            quantized = nncf.quantize(converted, nncf.Dataset([b.numpy() for b in calibration]), model_type=kind,
                                      subset_size=sum(len(b) for b in calibration))
            int8 = core.compile_model(quantized, "CPU", threads)
            runners["openvino + nncf int8"] = lambda: int8(x.numpy())[0]
        except ImportError:
            notes.append("nncf not installed: OpenVINO int8 skipped (pip install nncf)")
    except ImportError as e:
        notes.append(f"openvino skipped: {e}")

    with torch.inference_mode():
        reference = unit(model(x).numpy())
        cosine = {}
        for name, run in runners.items():
            out = run()
            cosine[name] = float(np.mean(np.sum(unit(out.numpy() if hasattr(out, "numpy") else out) * reference, 1)))
        times = {name: [] for name in runners}
        for _ in range(args.rounds):
            for name, run in runners.items():
                started = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - started)
        if "torch dynamic int8, clipfuse (attention too)" in runners:  # per-batch activation scales
            alone = unit(np.concatenate([ours(x[i:i + 1]).numpy() for i in range(len(x))]))
            batch = unit(ours(x).numpy())
            notes.append(f"clipfuse int8: an image alone vs in its batch of {len(x)}: mean cosine "
                         f"{float(np.mean(np.sum(alone * batch, 1))):.6f}")

    print(f"cpu: {cpu_description()}; {os.cpu_count()} cores; {args.threads} threads; model {args.model}"
          f" ({'pretrained' if not embedder.info.random_weights else 'random'} weights), batch {args.batch_size}, "
          f"median of {args.rounds} interleaved rounds")
    base = statistics.median(times["torch fp32"])
    for name in runners:
        t = statistics.median(times[name])
        bar = "meets" if cosine[name] >= ACCURACY_BAR else "misses"
        print(f"  {name:46} {args.batch_size / t:7.1f} img/s  {base / t:5.2f}x torch fp32   cosine {cosine[name]:.5f}"
              f" ({bar} {ACCURACY_BAR})")
    for note in notes:
        print(f"  note: {note}")


if __name__ == "__main__":
    main()
