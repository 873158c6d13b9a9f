"""Finetune an image tower on the labeled images: CLIP's from its zero-shot classifier, an image-only
backbone's from a linear probe on its frozen features (LP-FT)."""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class FinetuneConfig:
    """Everything a finetuning run decides; written beside the checkpoint."""

    epochs: int = 10  # passes over the labeled train split
    lr: float = 1e-5  # AdamW peak learning rate
    weight_decay: float = 0.01  # AdamW weight decay
    batch_size: int = 32  # images per step
    warmup: float = 0.1  # share of the steps with a linear warmup, then cosine decay to 0
    augment: bool = False  # random resized crop (scale 0.6-1) and horizontal flip
    train_text: bool = False  # also train the text tower (class embeddings recomputed each step)
    freeze_backbone: bool = False  # train only the classifier on the frozen image features
    grad_clip: float = 1.0  # max gradient norm; 0 turns clipping off
    patience: int = 3  # epochs without a better validation accuracy before stopping
    mean_teacher: bool = False  # EMA teacher and a consistency loss on unlabeled images
    ema: float = 0.999  # teacher decay per step
    consistency: float = 1.0  # weight of the consistency loss
    seed: int = 0  # seed of the shuffles, augmentation and unlabeled batches

    def __post_init__(self):
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError(f"epochs and batch_size must be >= 1 and lr > 0; got {self}.")
        if self.train_text and self.freeze_backbone:
            raise ValueError("train_text trains the text tower and freeze_backbone freezes every tower, so nothing "
                             "would train; drop one of them.")


@dataclass
class FinetuneResult:
    head: dict  # finetuned classifier: "weight" (n_classes, dim), "bias" (n_classes,) for a linear layer
    start: dict  # the classifier training started from, same keys
    start_name: str  # "zero-shot" (CLIP) or "linear probe" (image-only backbone)
    history: list  # per epoch: {"epoch", "train_loss", "val_accuracy", "seconds"}
    start_accuracy: float  # validation accuracy before training
    best_epoch: int  # 0 = no epoch beat the start (the model is unchanged)


class ClassifierHead(torch.nn.Module):
    """Logits of unit image features: ``scale * unit(f) @ unit(W).T`` without a bias (cosine, CLIP)
    or ``unit(f) @ W.T + b`` with one (a linear layer, image-only backbones).

    The same rule reads a saved classifier everywhere: a bias means a linear layer.
    """

    def __init__(self, weight, bias=None, *, scale: float = 1.0):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.as_tensor(weight, dtype=torch.float32).clone())
        self.bias = None if bias is None else torch.nn.Parameter(torch.as_tensor(bias, dtype=torch.float32).clone())
        self.scale = float(scale)

    @property
    def cosine(self) -> bool:
        return self.bias is None

    def forward(self, features: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        weight = self.weight if weight is None else weight
        logits = F.normalize(features, dim=-1) @ (F.normalize(weight, dim=-1) if self.cosine else weight).T
        return self.scale * logits + (0 if self.bias is None else self.bias)

    def export(self, weight: torch.Tensor | None = None) -> dict:
        """The classifier as CPU tensors: ``weight`` (unit rows when cosine) and ``bias`` when linear."""
        weight = (self.weight if weight is None else weight).detach().float().cpu()
        out = {"weight": F.normalize(weight, dim=-1) if self.cosine else weight.clone()}
        if self.bias is not None:
            out["bias"] = self.bias.detach().float().cpu().clone()
        return out


def fit_linear_probe(features: np.ndarray, labels: np.ndarray, n_classes: int, *, seed: int = 0):
    """Frozen backbone + FC: multinomial logistic regression on unit features, C by 3-fold CV.

    Returns
    -------
    W : ndarray of shape (n_classes, dim)
    b : ndarray of shape (n_classes,)
    """
    from clipfuse.classify.base import l2_normalize
    from clipfuse.classify.linear import fit_softmax_regression, select_C

    X = l2_normalize(np.asarray(features, dtype=np.float32))
    C = select_C(X, labels, n_classes, seed=seed)
    W, b, _ = fit_softmax_regression(X, labels, n_classes, C=C)
    return W, b


def _train_transform(preprocess, augment: bool, size):
    """The eval preprocessing, or random resized crop + flip (to the model's input ``size``)
    followed by its normalisation."""
    if not augment:
        return preprocess
    from torchvision import transforms

    normalize = next(t for t in preprocess.transforms if type(t).__name__ == "Normalize")
    return transforms.Compose([transforms.RandomResizedCrop(size, scale=(0.6, 1.0)),
                               transforms.RandomHorizontalFlip(), transforms.ToTensor(), normalize])


def _load_images(paths: list[str], draft_size: int | None = None):
    """Decoded images, the way the version trained from decodes them (``draft_size``, see ``decode_image``)."""
    from clipfuse.embed import read_image

    images = []
    for path in paths:
        record, img = read_image(path, draft_size=draft_size)
        if img is None:
            raise ValueError(f"can't read training image {path!r}: {record.error}. Re-index to drop it.")
        images.append(img)
    return images


def _train_mode(model: torch.nn.Module, frozen: bool) -> None:
    """Training mode (dropout on), with every batch-norm layer kept on its pretrained statistics.

    With a few dozen images per batch, batch statistics of a new domain differ from the
    running ones the start classifier was fitted on: in train mode they shift every feature
    at once (a linear probe at 0.90 validation accuracy fell to 0.37 after one epoch of
    EfficientNet-Lite0 on digits). The batch-norm scales and shifts still train.
    """
    model.train(not frozen)
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.eval()


def _lr_lambda(total: int, warmup: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    return factor


@torch.no_grad()
def encode(model, pixels: torch.Tensor, *, batch_size: int = 64, device=None) -> torch.Tensor:
    """Image features of preprocessed images, in eval mode, on the CPU."""
    model.eval()
    out = [torch.zeros(0)]
    for start in range(0, len(pixels), batch_size):
        out.append(model.encode_image(pixels[start:start + batch_size].to(device)).float().cpu())
    return torch.cat(out) if len(pixels) else torch.zeros(0)


@torch.no_grad()
def evaluate(model, head, pixels: torch.Tensor, labels: torch.Tensor, *, batch_size: int = 64,
             device=None) -> float:
    """Accuracy of ``model`` + ``head`` (a callable from features to logits) on preprocessed images."""
    if len(labels) == 0:
        return float("nan")
    logits = head(encode(model, pixels, batch_size=batch_size, device=device).to(device))
    return float((logits.argmax(dim=1).cpu() == labels).float().mean())


def _class_head(embedder, prompts: list[list[str]]) -> torch.Tensor:
    """Class embeddings from the text tower with gradients (for --train-text)."""
    tokens = embedder.tokenizer([p for group in prompts for p in group]).to(embedder.device)
    feats = F.normalize(embedder.model.encode_text(tokens), dim=-1)
    out, start = [], 0
    for group in prompts:
        out.append(F.normalize(feats[start:start + len(group)].mean(dim=0), dim=-1))
        start += len(group)
    return torch.stack(out)


def finetune(embedder, train: list[tuple[str, int]], val: list[tuple[str, int]], class_embeddings: np.ndarray | None,
             config: FinetuneConfig, *, n_classes: int | None = None, unlabeled: list[str] = (),
             prompts: list[list[str]] | None = None, progress=None) -> FinetuneResult:
    """Finetune ``embedder.model`` in place on labeled images; keep the best epoch's weights.

    Parameters
    ----------
    embedder : clipfuse.embed.Embedder
    train, val : list of (image path, class index)
    class_embeddings : ndarray of shape (n_classes, dim) or None
        Zero-shot text embeddings, where a CLIP classifier starts. None for an image-only
        backbone: a linear layer then starts at the linear probe fitted on the frozen
        features of the training images.
    config : FinetuneConfig
    n_classes : int, optional
        Size of the linear layer of an image-only backbone (default: the largest label + 1).
    unlabeled : list of str
        Image paths for the Mean Teacher consistency loss.
    prompts : list of list of str
        Per-class prompts, needed with ``config.train_text``.
    progress : callable(epoch, step, steps, loss, val_accuracy), optional

    Returns
    -------
    FinetuneResult
    """
    if not train:
        raise ValueError("no labeled training images; index a folder with one sub-folder per class first.")
    if config.train_text and (prompts is None or class_embeddings is None or not embedder.has_text):
        raise ValueError("train_text needs a CLIP model with a text tower and the class prompts.")
    if class_embeddings is not None and not embedder.has_text:
        raise ValueError(f"{embedder.config.model} is an image-only backbone: pass class_embeddings=None, and its "
                         "linear layer starts from a linear probe.")
    model, device = embedder.model, embedder.device
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    transform = _train_transform(embedder.preprocess, config.augment, embedder.image_size)
    train_images = _load_images([p for p, _ in train], embedder.draft_size)
    train_labels = torch.tensor([c for _, c in train])
    val_pixels = torch.stack([embedder.preprocess(img) for img in _load_images([p for p, _ in val], embedder.draft_size)]) \
        if val else torch.zeros(0)
    val_labels = torch.tensor([c for _, c in val], dtype=torch.long)
    cached = None if config.augment else torch.stack([transform(img) for img in train_images])

    if class_embeddings is not None:
        head = ClassifierHead(class_embeddings, scale=float(model.logit_scale.detach().exp()))
    else:
        eval_pixels = cached if cached is not None else torch.stack([embedder.preprocess(im) for im in train_images])
        n_classes = n_classes or int(max(train_labels.max(), val_labels.max() if len(val_labels) else 0)) + 1
        head = ClassifierHead(*fit_linear_probe(encode(model, eval_pixels, device=device).numpy(),
                                                train_labels.numpy(), n_classes, seed=config.seed))
    head = head.to(device)
    for name, p in model.named_parameters():
        p.requires_grad_(not config.freeze_backbone and (config.train_text or name.startswith(("visual.", "trunk."))))
    head.weight.requires_grad_(not config.train_text)
    params = [p for p in list(model.parameters()) + list(head.parameters()) if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(len(train) / config.batch_size)
    total = steps_per_epoch * config.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(total, int(config.warmup * total)))
    teacher = copy.deepcopy(model).eval() if config.mean_teacher and len(unlabeled) else None
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)

    def class_weight():
        return _class_head(embedder, prompts) if config.train_text else head.weight

    def classify(features):
        return head(features, class_weight())

    def snapshot():
        with torch.no_grad():
            return copy.deepcopy(model.state_dict()), head.export(class_weight())

    start_accuracy = evaluate(model, classify, val_pixels, val_labels, device=device)
    start_state, start_head = snapshot()
    best = (start_accuracy, 0, start_state, start_head)
    history, stale = [], 0
    for epoch in range(1, config.epochs + 1):
        _train_mode(model, config.freeze_backbone)
        started, losses = time.perf_counter(), []
        order = rng.permutation(len(train))
        for step in range(steps_per_epoch):
            idx = order[step * config.batch_size:(step + 1) * config.batch_size]
            x = cached[idx] if cached is not None else torch.stack([transform(train_images[i]) for i in idx])
            with amp:
                weight = class_weight()
                loss = F.cross_entropy(head(model.encode_image(x.to(device)), weight).float(),
                                       train_labels[idx].to(device))
                if teacher is not None:
                    loss = loss + config.consistency * _consistency(model, teacher, head, weight, unlabeled,
                                                                    transform, rng, len(idx), device)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            optimizer.step()
            scheduler.step()
            if teacher is not None:
                _ema_update(teacher, model, config.ema)
            losses.append(float(loss.detach()))
            if progress:
                progress(epoch, step + 1, steps_per_epoch, losses[-1], None)
        val_acc = evaluate(model, classify, val_pixels, val_labels, device=device)
        history.append({"epoch": epoch, "train_loss": float(np.mean(losses)), "val_accuracy": val_acc,
                        "seconds": time.perf_counter() - started})
        if progress:
            progress(epoch, steps_per_epoch, steps_per_epoch, history[-1]["train_loss"], val_acc)
        if val_acc > best[0] or (len(val) == 0):
            best, stale = (val_acc, epoch, *snapshot()), 0
        else:
            stale += 1
            if stale >= config.patience:
                break
    model.load_state_dict(best[2])
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return FinetuneResult(head=best[3], start=start_head, start_name="zero-shot" if head.cosine else "linear probe",
                          history=history, start_accuracy=start_accuracy, best_epoch=best[1])


def _consistency(model, teacher, head, weight, unlabeled, transform, rng, n, device) -> torch.Tensor:
    """Mean squared difference between student and teacher softmax on two views of unlabeled images."""
    paths = [unlabeled[i] for i in rng.integers(0, len(unlabeled), n)]
    images = _load_images(paths)
    x_student = torch.stack([transform(img) for img in images]).to(device)
    x_teacher = torch.stack([transform(img) for img in images]).to(device)
    student = F.softmax(head(model.encode_image(x_student), weight).float(), dim=-1)
    with torch.no_grad():
        target = F.softmax(head(teacher.encode_image(x_teacher), weight.detach()).float(), dim=-1)
    return F.mse_loss(student, target)


@torch.no_grad()
def _ema_update(teacher, student, decay: float) -> None:
    for t, s in zip(teacher.parameters(), student.parameters()):
        t.mul_(decay).add_(s.detach(), alpha=1.0 - decay)


def config_dict(config: FinetuneConfig) -> dict:
    return dataclasses.asdict(config)
