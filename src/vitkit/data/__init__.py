"""Data: datasets as uint8 image tensors in memory, or streamed from their files.

Small datasets (MNIST-sized, scikit-learn digits, modest image folders) are held as one
(N, C, H, W) uint8 tensor so that a training step does no per-image Python work; batches are
augmented and normalised as whole tensors (see transforms.py). Collections too large for
that (image folders, manifests, WebDataset shards, Hugging Face datasets: sources.py) are
streamed: decoded batch by batch in worker processes, each training image cropped at random
from the full-resolution file (stream.py).

    load_dataset("fashion-mnist", "train")        IDX files (idx.py), checksummed
    load_dataset("digits", "test")                scikit-learn's 8x8 digits (digits.py)
    load_dataset("photos/", "val", image_size=32) one subfolder per class (folder.py)
    load_dataset("kmnist/", "test")               a folder of IDX files (idx.py)
    load_dataset("labels.csv", "train")           a manifest, shards or HF dataset (sources.py)
    stream_source("photos/", "train", 224, 3)     file by file, in worker processes
"""

from vitkit.data.dataset import (
    CALIBRATION_IMAGES,
    DatasetError,
    ImageDataset,
    calibration_sample,
    dataset_stats,
    stratified_split,
)
from vitkit.data.digits import load_digits
from vitkit.data.folder import load_image_folder, split_image_folder
from vitkit.data.idx import load_idx, load_idx_dir, read_idx
from vitkit.data.load import DATASETS, load_dataset, stream_source
from vitkit.data.preprocess import centre_crop, load_image, normalize, preprocess, to_float
from vitkit.data.stream import ImageStream, RandomResizedCrop
from vitkit.data.transforms import AugmentConfig, TrainTransform, mix

__all__ = [
    "CALIBRATION_IMAGES",
    "DATASETS",
    "AugmentConfig",
    "DatasetError",
    "ImageDataset",
    "ImageStream",
    "RandomResizedCrop",
    "TrainTransform",
    "calibration_sample",
    "centre_crop",
    "dataset_stats",
    "load_dataset",
    "load_digits",
    "load_idx",
    "load_idx_dir",
    "load_image",
    "load_image_folder",
    "mix",
    "normalize",
    "preprocess",
    "read_idx",
    "split_image_folder",
    "stratified_split",
    "stream_source",
    "to_float",
]
