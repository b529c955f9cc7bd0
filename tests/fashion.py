import pytest

from vitkit.data import ImageDataset, idx, load_dataset


def load_fashion_mnist(split: str) -> ImageDataset:
    """A split of Fashion-MNIST. Only a missing dataset skips the test; a corrupt one fails it."""
    if not any(idx.is_idx_dir(d) for d in idx.search_dirs("fashion-mnist")):
        pytest.skip("Fashion-MNIST is not installed (`make data` installs it)")
    return load_dataset("fashion-mnist", split)
