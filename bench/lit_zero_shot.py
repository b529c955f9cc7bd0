"""LiT on Fashion-MNIST: zero-shot accuracy on classes no caption named, the setting chosen on
held-out classes of the training set, never on the test's.

    python bench/wordnet_descriptions.py "T-shirt/top,Trouser,Pullover,Dress,Coat,Sandal,\
Shirt,Sneaker,Bag,Ankle boot" --out /tmp/fm_desc.json
    python bench/lit_zero_shot.py --descriptions /tmp/fm_desc.json        # ~15 min, 2 cores

The shipped Fashion-MNIST model is the locked image tower; its features of every image are
computed once and shared by all runs. Settings: two text towers (3 blocks x 128 trained 1,000
steps, `vitkit train-clip`'s default; 1 block x 64 trained 150 steps), each with captions made
of the class names in 4 templates only, or with the classes' descriptions too (`--descriptions`:
e.g. WordNet's definitions and hypernyms, from `wordnet_descriptions.py`).

- Validation (selects the setting): the test's 3 zero-shot classes (Shirt, Bag, Ankle boot) are
  left out entirely; of the other 7, each fold holds 2 out and trains on 5 (training images
  only), then classifies the held-out classes' training images between their 2 names (chance
  50%). Mean over the 3 folds and `--val-seeds` seeds each.
- Test (reported): train on the 7 classes' training images; classify the test images of
  Shirt, Bag and Ankle boot among their 3 names (chance 33.3%) and among all 10, and the 7
  seen classes' test images among all 10. Every setting is run, the validated one marked.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from vitkit import data
from vitkit.data.captions import captions_from_labels
from vitkit.infer.zero_shot import class_embeddings, read_descriptions
from vitkit.runtime import cpu_name
from vitkit.train.contrastive import ContrastiveConfig, tower_features, train_contrastive
from vitkit.weights import load_pretrained

TEMPLATES = ("a photo of a {}.", "a picture of a {}.", "an image of the {}.", "a {}.")
UNSEEN = ("Shirt", "Bag", "Ankle boot")
FOLDS = (("Pullover", "Coat"), ("Trouser", "Sneaker"), ("Dress", "Sandal"))
TOWERS = {
    "1x64, 150 steps": {"text_depth": 1, "text_width": 64, "steps": 150},
    "3x128, 1000 steps": {"text_depth": 3, "text_width": 128, "steps": 1000},
}


def accuracy(run, features: torch.Tensor, labels: torch.Tensor, names: list[str], desc) -> float:
    """Top-1 of images (as locked-tower features) among `names`; `labels` index `names`."""
    clip, tokenizer = run.clip, run.tokenizer
    with torch.no_grad():
        classes = class_embeddings(clip, tokenizer, names, TEMPLATES, desc)
        image = F.normalize(clip.visual.head(features), dim=-1)
        return ((image @ classes.T).argmax(dim=1) == labels).float().mean().item()


def subset(dataset: data.ImageDataset, features: torch.Tensor, names: list[str]):
    """The features and labels (indices into `names`) of the images of those classes."""
    wanted = torch.tensor([dataset.classes.index(n) for n in names])
    keep = torch.isin(dataset.labels, wanted).nonzero().flatten()
    remap = {int(c): i for i, c in enumerate(wanted)}
    labels = torch.tensor([remap[int(c)] for c in dataset.labels[keep]])
    return features[keep], labels


def train(tower, train_set, features, classes, setting, desc, seed):
    pairs = captions_from_labels(train_set, TEMPLATES, classes, descriptions=desc)
    keep = torch.isin(train_set.labels, torch.tensor([train_set.classes.index(c) for c in classes]))
    config = ContrastiveConfig(seed=seed, **setting)
    return train_contrastive(tower, pairs, config, progress=False, features=features[keep])


def mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.1f} ± {100 * sd:.1f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--descriptions", type=Path, help="a JSON of class descriptions")
    p.add_argument("--seeds", type=int, default=3, help="test runs per setting")
    p.add_argument("--val-seeds", type=int, default=2, help="validation runs per fold")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"CPU: {cpu_name()}, torch {torch.__version__}")
    described = read_descriptions(args.descriptions) if args.descriptions else None
    captions = {"names": None, "names + descriptions": described} if described else {"names": None}
    tower = load_pretrained("fashion-mnist")
    train_set = data.load_dataset("fashion-mnist", split="train")
    test_set = data.load_dataset("fashion-mnist", split="test")
    start = time.perf_counter()
    train_features = tower_features(tower, train_set.images)
    test_features = tower_features(tower, test_set.images)
    print(
        f"locked tower's features of {len(train_set) + len(test_set):,} images: "
        f"{time.perf_counter() - start:.0f} s"
    )
    seen = [c for c in train_set.classes if c not in UNSEEN]
    seeds = range(args.seeds)

    rows = []
    for (tower_name, setting), (caption_name, desc) in itertools.product(
        TOWERS.items(), captions.items()
    ):
        t0 = time.perf_counter()
        val = []
        for fold, seed in itertools.product(FOLDS, range(args.val_seeds)):
            trained = [c for c in seen if c not in fold]
            run = train(tower, train_set, train_features, trained, setting, desc, seed)
            held_out = subset(train_set, train_features, list(fold))
            val.append(accuracy(run, *held_out, list(fold), desc))
            print(
                f"  validation, {' + '.join(fold)} held out, seed {seed}: {val[-1]:.1%}", flush=True
            )
        unseen3, unseen10, seen10 = [], [], []
        everything = test_set.classes
        is_unseen = torch.isin(test_set.labels, torch.tensor([everything.index(c) for c in UNSEEN]))
        for seed in seeds:
            run = train(tower, train_set, train_features, seen, setting, desc, seed)
            unseen = subset(test_set, test_features, list(UNSEEN))
            unseen3.append(accuracy(run, *unseen, list(UNSEEN), desc))
            for where, out in ((is_unseen, unseen10), (~is_unseen, seen10)):
                out.append(
                    accuracy(run, test_features[where], test_set.labels[where], everything, desc)
                )
        minutes = (time.perf_counter() - t0) / 60
        rows.append((tower_name, caption_name, val, unseen3, unseen10, seen10))
        print(
            f"{tower_name} | {caption_name} | validation {mean_sd(val)}% | unseen among 3 "
            f"{mean_sd(unseen3)}% | unseen among 10 {mean_sd(unseen10)}% | seen among 10 "
            f"{mean_sd(seen10)}% | {minutes:.1f} min",
            flush=True,
        )

    best = max(rows, key=lambda r: statistics.mean(r[2]))
    print(
        f"\ntest over seeds {list(seeds)} (mean ± sd); validation: 3 folds of 2 held-out "
        f"classes among the 7 (chance 50%), {args.val_seeds} seeds each"
    )
    print(
        "| text tower | captions | validation, held-out training classes | test: 3 unseen "
        "among 3 names (chance 33.3%) | 3 unseen among 10 (10%) | 7 seen among 10 |"
    )
    print("|---|---|---|---|---|---|")
    for row in rows:
        mark = " **(chosen)**" if row is best else ""
        print(
            f"| {row[0]} | {row[1]}{mark} | {mean_sd(row[2])}% | {mean_sd(row[3])}% "
            f"| {mean_sd(row[4])}% | {mean_sd(row[5])}% |"
        )
    print(
        f"\nper seed, unseen among 3, chosen setting: "
        f"{' / '.join(f'{100 * v:.1f}%' for v in best[3])}"
    )


if __name__ == "__main__":
    main()
