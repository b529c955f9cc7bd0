"""scikit-learn's bundled 8x8 handwritten digits: 1797 images, no download, seconds to train."""

from __future__ import annotations

import numpy as np
import torch

from vitkit.data.dataset import DatasetError, ImageDataset, stratified_split

TEST_FRACTION = 0.2
SPLIT_SEED = 0


def load_digits(split: str = "train") -> ImageDataset:
    """The "train" or "test" part of a fixed stratified split (20% test, seed 0).

    Pixel values 0..16 are scaled to 0..255; images are (N, 1, 8, 8), classes "0".."9".
    """
    if split not in ("train", "test"):
        raise DatasetError(f"digits has splits 'train' and 'test', not {split!r}")
    try:  # scikit-learn is optional: only this dataset needs it
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError:
        raise DatasetError(
            "the 'digits' dataset ships with scikit-learn; install it "
            "(pip install 'vitkit[digits]', or pip install scikit-learn)"
        ) from None
    bunch = sklearn_digits()
    pixels = np.rint(bunch.images * (255 / 16)).astype(np.uint8)
    ds = ImageDataset(
        images=torch.from_numpy(pixels).unsqueeze(1),
        labels=torch.from_numpy(bunch.target.astype(np.int64)),
        classes=[str(d) for d in range(10)],
        name="digits",
    )
    train, test = stratified_split(ds.labels, TEST_FRACTION, SPLIT_SEED)
    return ds.subset(train if split == "train" else test)
