"""The embedded dataset: scikit-learn's 8×8 handwritten digits, offline, and in-memory sources.

``digits_arrays(split)`` gives the digits' fixed train / test split; :class:`ArraySource` makes
any pair of in-memory arrays a random-access source for ``ddpm_jax.data.ImageDataset``.
"""

from __future__ import annotations

import numpy as np

DIGITS = "digits"
_DIGITS_TEST_SIZE = 360


def digits_arrays(split: str) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled 8×8 handwritten digits (1,797 images, 10 classes), offline.

    The stratified split is ``train_test_split(arange(1797), test_size=360, random_state=0,
    stratify=labels)``: 1,437 train and 360 test examples, sorted by original index.

    Args:
      split: ``"train"``, ``"test"`` or ``"all"``.

    Returns:
      images: ``[N, 8, 8, 1]`` uint8, sklearn's 0..16 intensities mapped by ``round(v * 255 / 16)``.
      labels: ``[N]`` int32 in ``[0, 10)``.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if split not in ("train", "test", "all"):
        raise ValueError(f"split={split!r} is not valid for 'digits'; use 'train', 'test' or 'all'")
    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    labels = digits.target.astype(np.int32)
    if split == "all":
        return images, labels
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=_DIGITS_TEST_SIZE, random_state=0, stratify=labels
    )
    idx = np.sort(train_idx if split == "train" else test_idx)
    return images[idx], labels[idx]


class ArraySource:
    """Random-access source over in-memory arrays: ``source[i] -> {"image", "label"}``."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self._images, self._labels = images, labels

    def __len__(self) -> int:
        return len(self._images)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return {"image": self._images[index], "label": self._labels[index]}


__all__ = ["DIGITS", "ArraySource", "digits_arrays"]
