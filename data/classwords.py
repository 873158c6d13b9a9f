"""Class words for zero-shot prompts: from the folder names, or from a YAML/JSON file."""

from __future__ import annotations

import json
import re
from pathlib import Path


def readable_name(folder_name: str) -> str:
    """``golden_retriever`` / ``golden-retriever`` / ``GoldenRetriever`` -> ``golden retriever``."""
    spaced = re.sub(r"(?<=[a-z])(?=[A-Z])", " ", folder_name)
    return re.sub(r"[\s_\-]+", " ", spaced).strip().lower() or folder_name


def default_class_words(classes: list[str]) -> dict[str, list[str]]:
    """One phrase per class: its folder name made readable."""
    return {c: [readable_name(c)] for c in classes}


def load_class_words(path: str | Path, classes: list[str]) -> tuple[dict[str, list[str]], list[str]]:
    """Read ``class: [words or phrases]`` from a YAML or JSON file.

    A value may be one string or a list of strings. Classes the file leaves out keep their
    folder name.

    Returns
    -------
    words : dict of class -> list of str, for every class in ``classes``
    defaulted : list of str
        Classes that were missing from the file.

    Raises
    ------
    ValueError
        When the file is not a mapping, names a class the store does not have, or gives a
        class no words.
    """
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as e:  # noqa: BLE001 - yaml and json raise their own error types
        raise ValueError(f"can't parse class words file {str(path)!r}: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"class words file {str(path)!r} must map class names to words, e.g. "
                         f"`cat: [cat, kitten]`; got a {type(data).__name__}.")
    unknown = [str(k) for k in data if str(k) not in classes]
    if unknown:
        raise ValueError(f"class words file {str(path)!r} names classes the store does not have: "
                         f"{', '.join(unknown)}. Known classes: {', '.join(classes)}.")
    words = default_class_words(classes)
    for key, value in data.items():
        phrases = [value] if isinstance(value, str) else value
        if not isinstance(phrases, list) or not phrases or not all(isinstance(p, str) and p.strip() for p in phrases):
            raise ValueError(f"class {key!r} in {str(path)!r} needs a word or a list of non-empty words; got {value!r}.")
        words[str(key)] = [p.strip() for p in phrases]
    return words, [c for c in classes if c not in {str(k) for k in data}]
