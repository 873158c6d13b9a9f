"""Zero-shot class embeddings: prompt templates x class words, averaged per class by the text tower."""

from __future__ import annotations

import numpy as np

# CLIP's seven-template ensemble for ImageNet (Radford et al., the CLIP repository's
# prompt-engineering notebook) plus the plain "a photo of a {}.".
DEFAULT_TEMPLATES = (
    "a photo of a {}.",
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)


def build_prompts(words: list[str], templates=DEFAULT_TEMPLATES) -> list[str]:
    """Every template filled with every word."""
    bad = [t for t in templates if t.count("{}") != 1]
    if bad:
        raise ValueError(f"prompt templates need exactly one '{{}}' for the class word; got {bad[0]!r}.")
    return [t.format(w) for w in words for t in templates]


def class_text_embeddings(embedder, classes: list[str], class_words: dict[str, list[str]],
                          templates=DEFAULT_TEMPLATES) -> np.ndarray:
    """One unit text embedding per class: the mean of its prompts' embeddings, renormalised.

    Parameters
    ----------
    embedder : Embedder
        A model with a text tower (``encode_texts``).
    classes : list of str
        Class order of the rows.
    class_words : dict of class -> list of str

    Returns
    -------
    ndarray of shape (len(classes), dim), float32
    """
    prompts = [build_prompts(class_words[c], templates) for c in classes]
    flat = embedder.encode_texts([p for group in prompts for p in group])
    out = np.empty((len(classes), flat.shape[1]), dtype=np.float32)
    start = 0
    for i, group in enumerate(prompts):
        mean = flat[start:start + len(group)].mean(axis=0)
        out[i] = mean / max(np.linalg.norm(mean), 1e-12)
        start += len(group)
    return out
