"""Tests of clipfuse.data: folder layouts, the seeded stratified split, the digits demo sample."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pytest

from clipfuse.data import list_images, scan_folders, scan_labeled, split_labeled, write_digits_dataset

from conftest import write_shapes_folder


def _touch(path: Path, data: bytes = b"x") -> Path:
    """Scanning looks at names only, so any bytes will do."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


# --------------------------------------------------------------------------- scan_labeled / scan_folders


@pytest.fixture
def messy_labeled(tmp_path) -> Path:
    """A labeled folder with odd but legal contents, and the files that must (not) be found."""
    root = tmp_path / "labeled"
    _touch(root / "zebra" / "z1.JPG")
    _touch(root / "zebra" / "z2.Png")
    _touch(root / "zebra" / "nested" / "deeper" / "z3.jpeg")  # nested inside a class: still zebra
    _touch(root / "zebra" / ".hidden.jpg")
    _touch(root / "zebra" / ".cache" / "z4.jpg")  # inside a hidden folder
    _touch(root / "zebra" / "notes.txt")
    _touch(root / "apple" / "a1.webp")
    _touch(root / "empty_class" / "readme.md")  # no images: not a class
    _touch(root / ".git" / "objects" / "x.png")  # hidden folder: not a class
    _touch(root / "labels.csv")  # a non-image file at the top is fine
    return root


def test_scan_labeled_classes_labels_and_filters(messy_labeled):
    files, classes = scan_labeled(messy_labeled)
    assert classes == ["apple", "zebra"]
    found = {Path(f.path).relative_to(messy_labeled).as_posix(): f.label for f in files}
    assert found == {
        "apple/a1.webp": "apple",
        "zebra/z1.JPG": "zebra",
        "zebra/z2.Png": "zebra",
        "zebra/nested/deeper/z3.jpeg": "zebra",
    }
    assert all(f.split == "labeled" and os.path.isabs(f.path) for f in files)


def test_scan_labeled_on_generated_shapes(tmp_path):
    written = write_shapes_folder(tmp_path / "shapes", n_per_class=2)
    files, classes = scan_labeled(tmp_path / "shapes")
    assert classes == sorted(written) == ["blue", "green", "red"]
    assert sorted((f.path, f.label) for f in files) == sorted(
        (str(p), name) for name, paths in written.items() for p in paths
    )


def test_list_images_is_sorted_and_recursive(messy_labeled):
    paths = list_images(messy_labeled / "zebra")
    assert paths == sorted(paths)
    assert [Path(p).name for p in paths] == ["z3.jpeg", "z1.JPG", "z2.Png"]  # 'nested/...' sorts before 'z1'


def test_images_directly_in_labeled_root_raise(messy_labeled):
    _touch(messy_labeled / "stray.jpg")
    with pytest.raises(ValueError) as info:
        scan_labeled(messy_labeled)
    msg = str(info.value)
    assert "stray.jpg" in msg
    assert "sub-folder per class" in msg and "--unlabeled" in msg


def test_empty_labeled_folder_raises(tmp_path):
    (tmp_path / "labeled" / "cats").mkdir(parents=True)  # a class folder without images
    with pytest.raises(ValueError, match="no images"):
        scan_labeled(tmp_path / "labeled")


def test_missing_folder_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        scan_folders(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="unlabeled"):
        scan_folders(unlabeled=tmp_path / "nope")


def test_file_as_folder_raises_not_a_directory(tmp_path):
    f = _touch(tmp_path / "photo.jpg")
    with pytest.raises(NotADirectoryError, match="not a folder"):
        scan_folders(f)
    with pytest.raises(NotADirectoryError):
        scan_folders(unlabeled=f)


def test_no_folder_at_all_raises():
    with pytest.raises(ValueError, match="no folder"):
        scan_folders()


def test_scan_folders_unlabeled_rows(messy_labeled, tmp_path):
    _touch(tmp_path / "pool" / "b.jpg")
    _touch(tmp_path / "pool" / "sub" / "a.png")
    _touch(tmp_path / "pool" / ".DS_Store")
    folders = scan_folders(messy_labeled, unlabeled=tmp_path / "pool")
    unlabeled = [f for f in folders.files if f.split == "unlabeled"]
    assert [Path(f.path).name for f in unlabeled] == ["b.jpg", "a.png"]  # sorted by full path
    assert all(f.label is None for f in unlabeled)
    assert sum(f.split == "labeled" for f in folders.files) == 4
    assert folders.classes == ["apple", "zebra"]


def test_test_folder_with_class_folders_gives_labeled_test_rows(messy_labeled, tmp_path):
    _touch(tmp_path / "test" / "zebra" / "t1.jpg")
    _touch(tmp_path / "test" / "apple" / "t2.png")
    folders = scan_folders(messy_labeled, test=tmp_path / "test")
    test_rows = {Path(f.path).name: f.label for f in folders.files if f.split == "test"}
    assert test_rows == {"t1.jpg": "zebra", "t2.png": "apple"}


def test_plain_test_folder_gives_unlabeled_test_rows(messy_labeled, tmp_path):
    _touch(tmp_path / "test" / "t1.jpg")
    _touch(tmp_path / "test" / "t2.png")
    folders = scan_folders(messy_labeled, test=tmp_path / "test")
    test_rows = [f for f in folders.files if f.split == "test"]
    assert len(test_rows) == 2 and all(f.label is None for f in test_rows)


def test_test_class_unknown_to_labeled_raises(messy_labeled, tmp_path):
    _touch(tmp_path / "test" / "zebra" / "t1.jpg")
    _touch(tmp_path / "test" / "mango" / "t2.jpg")
    with pytest.raises(ValueError) as info:
        scan_folders(messy_labeled, test=tmp_path / "test")
    msg = str(info.value)
    assert "['mango']" in msg and "rename" in msg


def test_known_classes_keep_their_order(messy_labeled):
    folders = scan_folders(messy_labeled, known_classes=["zebra", "kiwi"])
    assert folders.classes == ["zebra", "kiwi", "apple"]  # known first, in their order; new appended
    labels = {f.label for f in folders.files}
    assert labels == {"zebra", "apple"}


def test_known_classes_let_test_folder_be_labeled(tmp_path):
    _touch(tmp_path / "test" / "kiwi" / "t1.jpg")
    folders = scan_folders(test=tmp_path / "test", known_classes=["zebra", "kiwi"])
    assert folders.classes == ["zebra", "kiwi"]
    assert [(f.split, f.label) for f in folders.files] == [("test", "kiwi")]


def test_known_classes_argument_not_mutated(messy_labeled):
    known = ["zebra"]
    scan_folders(messy_labeled, known_classes=known)
    assert known == ["zebra"]


# --------------------------------------------------------------------------- split_labeled


def _class_labels(n_classes: int = 48, per_class: int = 15) -> np.ndarray:
    return np.repeat(np.arange(n_classes), per_class)


def test_split_is_deterministic_per_seed():
    labels = np.random.default_rng(3).permutation(_class_labels())
    tr1, va1 = split_labeled(labels, seed=7)
    tr2, va2 = split_labeled(labels, seed=7)
    tr3, va3 = split_labeled(labels, seed=8)
    np.testing.assert_array_equal(tr1, tr2)
    np.testing.assert_array_equal(va1, va2)
    assert not np.array_equal(va1, va3)


def test_split_is_stratified_and_partitions_rows():
    labels = _class_labels()
    train, val = split_labeled(labels, val_fraction=0.2, seed=0)
    assert np.intersect1d(train, val).size == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([train, val])), np.arange(len(labels)))
    assert np.all(np.diff(train) > 0) and np.all(np.diff(val) > 0)  # sorted
    assert abs(len(val) / len(labels) - 0.2) < 0.02
    for c in range(48):
        assert np.sum(labels[val] == c) >= 1
        assert np.sum(labels[train] == c) >= 1


def test_split_small_classes():
    labels = np.array([0, 1, 1, 2, 2, 2])  # class 0 has one image, class 1 two
    train, val = split_labeled(labels, val_fraction=0.2, seed=0)
    assert 0 in train and 0 not in val  # a single image stays in train
    for c in (1, 2):
        assert np.sum(labels[val] == c) == 1
        assert np.sum(labels[train] == c) >= 1


def test_split_large_fraction_never_empties_train():
    labels = _class_labels(3, 4)
    train, val = split_labeled(labels, val_fraction=0.99, seed=0)
    for c in range(3):
        assert np.sum(labels[train] == c) == 1 and np.sum(labels[val] == c) == 3


def test_split_ignores_unlabeled_rows():
    labels = np.array([-1, 0, 0, -1, 1, 1, 1, -1, 0, 1])
    train, val = split_labeled(labels, seed=0)
    used = np.concatenate([train, val])
    assert not np.isin([0, 3, 7], used).any()
    np.testing.assert_array_equal(np.sort(used), np.flatnonzero(labels >= 0))


def test_split_only_unlabeled_gives_empty():
    train, val = split_labeled(np.full(5, -1))
    assert train.size == 0 and val.size == 0
    assert train.dtype.kind == "i" and val.dtype.kind == "i"


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5, float("nan")])
def test_split_invalid_fraction_raises(fraction):
    with pytest.raises(ValueError, match="val_fraction"):
        split_labeled(np.array([0, 0, 1, 1]), val_fraction=fraction)


# --------------------------------------------------------------------------- write_digits_dataset


@pytest.fixture(scope="module")
def digits_root(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    root = tmp_path_factory.mktemp("digits")
    return root, write_digits_dataset(root)


def _read_truth(path: Path) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.reader(f))


def test_digits_layout(digits_root):
    root, paths = digits_root
    assert paths["labeled"] == root / "labeled" and paths["unlabeled"] == root / "unlabeled"
    class_dirs = sorted(p.name for p in paths["labeled"].iterdir())
    assert len(class_dirs) == 10
    assert set(class_dirs) == {"zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"}
    for d in class_dirs:
        assert len(list((paths["labeled"] / d).glob("*.png"))) == 15
    n_unlabeled = len(list(paths["unlabeled"].glob("*.png")))
    assert n_unlabeled == 1797 - 150
    names = [p.name for p in root.rglob("*.png")]
    assert len(names) == len(set(names)) == 1797  # every digit exactly once


def test_digits_truth_lists_exactly_the_unlabeled_files(digits_root):
    from sklearn.datasets import load_digits

    _, paths = digits_root
    rows = _read_truth(paths["truth"])
    assert rows[0] == ["path", "label"]
    truth = dict(rows[1:])
    assert len(truth) == len(rows) - 1
    assert set(truth) == {str(p) for p in paths["unlabeled"].glob("*.png")}
    names = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
    target = load_digits().target
    for path, label in truth.items():
        assert label == names[target[int(Path(path).stem.split("_")[1])]]


def test_digits_pixels_match_sklearn(digits_root):
    from PIL import Image
    from sklearn.datasets import load_digits

    root, _ = digits_root
    images = load_digits().images
    for i in (0, 500, 1796):
        (path,) = root.rglob(f"digit_{i:04d}.png")
        with Image.open(path) as img:
            assert img.mode == "L" and img.size == (8, 8)
            got = np.asarray(img).astype(int)
        np.testing.assert_array_equal(got, np.round(images[i] * 255 / 16).astype(int))


def test_digits_scan_and_split_fit_together(digits_root):
    _, paths = digits_root
    folders = scan_folders(paths["labeled"], unlabeled=paths["unlabeled"])
    assert len(folders.classes) == 10
    assert len(folders.files) == 1797
    labels = np.array([folders.classes.index(f.label) if f.label else -1 for f in folders.files])
    train, val = split_labeled(labels)
    assert len(train) + len(val) == 150 and len(val) == 30


def test_digits_is_idempotent(digits_root):
    root, paths = digits_root
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*.png")}
    truth_before = paths["truth"].read_bytes()
    again = write_digits_dataset(root)
    assert again == paths
    after = {p: p.stat().st_mtime_ns for p in root.rglob("*.png")}
    assert after == before  # same files, none rewritten
    assert paths["truth"].read_bytes() == truth_before


def test_digits_with_another_seed_leaves_no_stale_files(tmp_path):
    first = write_digits_dataset(tmp_path, seed=0)
    labeled_before = set(first["labeled"].rglob("*.png"))
    second = write_digits_dataset(tmp_path, seed=1)
    labeled_after = set(second["labeled"].rglob("*.png"))
    assert labeled_after != labeled_before and len(labeled_after) == 150
    names = [p.name for p in tmp_path.rglob("digit_*.png")]
    assert len(names) == len(set(names)) == 1797  # no digit both labeled and unlabeled


def test_class_words_from_folder_names_and_files(tmp_path):
    from clipfuse.data import default_class_words, load_class_words, readable_name

    assert readable_name("golden_retriever") == "golden retriever"
    assert readable_name("GoldenRetriever") == "golden retriever"
    assert readable_name("sea-lion") == "sea lion"
    classes = ["cat", "dog", "sea_lion"]
    assert default_class_words(classes)["sea_lion"] == ["sea lion"]
    yaml_file = tmp_path / "words.yaml"
    yaml_file.write_text("cat: [cat, kitten]\ndog: puppy\n")
    words, defaulted = load_class_words(yaml_file, classes)
    assert words == {"cat": ["cat", "kitten"], "dog": ["puppy"], "sea_lion": ["sea lion"]}
    assert defaulted == ["sea_lion"]
    json_file = tmp_path / "words.json"
    json_file.write_text('{"sea_lion": ["sea lion", "seal"]}')
    assert load_class_words(json_file, classes)[0]["sea_lion"] == ["sea lion", "seal"]


@pytest.mark.parametrize("content, message", [
    ("- cat\n- dog\n", "must map class names to words"),
    ("cow: [cow]\n", "names classes the store does not have: cow"),
    ("cat: []\n", "needs a word or a list of non-empty words"),
    ("cat: [cat\n", "can't parse class words file"),
])
def test_class_words_file_errors(tmp_path, content, message):
    from clipfuse.data import load_class_words

    path = tmp_path / "words.yaml"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        load_class_words(path, ["cat", "dog"])
