"""fastai side of the data-pipeline measurement in `just bench-cpu`.

fastai's own DataLoaders over the same dataset folder the Rust side reads
(`train.csv` + `train/*.jpg`), built the way the book's chapter 6 builds
them: a DataBlock of (ImageBlock, MultiCategoryBlock) reading the CSV's
`fname` and space-separated `labels` columns, RandomResizedCrop(size,
min_scale=0.35) per item, then per batch IntToFloatTensor and ImageNet
Normalize (the batch transform vision_learner adds). Every row is a training
row, shuffled, incomplete last batch dropped, as fastai's training loader.

For each worker count: one warm-up epoch (starts the worker processes,
which persist, and fills the page cache), then `--epochs` timed epochs.
Reports images/s over the timed epochs, counting images that reach a batch,
as JSON on stdout: {"workers": {"1": ..., "2": ...}, "versions": {...}}.
Progress goes to stderr.
"""

import argparse
import json
import sys
import time


def log(*args):
    print(*args, file=sys.stderr, flush=True)


def images_per_second(root, size, batch_size, workers, epochs, seed):
    import pandas as pd
    from fastai.vision.all import (
        ColReader,
        DataBlock,
        ImageBlock,
        IndexSplitter,
        MultiCategoryBlock,
        Normalize,
        RandomResizedCrop,
        imagenet_stats,
        set_seed,
    )

    set_seed(seed)
    # Empty label cells (images with no object) stay "" rather than NaN.
    df = pd.read_csv(f"{root}/train.csv", keep_default_na=False)
    block = DataBlock(
        blocks=(ImageBlock, MultiCategoryBlock),
        get_x=ColReader("fname", pref=f"{root}/train/"),
        get_y=ColReader("labels", label_delim=" "),
        splitter=IndexSplitter([]),
        item_tfms=RandomResizedCrop(size, min_scale=0.35),
        batch_tfms=Normalize.from_stats(*imagenet_stats),
    )
    dls = block.dataloaders(
        df,
        bs=batch_size,
        num_workers=workers,
        persistent_workers=workers > 0,
        device="cpu",
    )
    train = dls.train
    for _ in train:  # warm-up
        pass
    images = 0
    start = time.perf_counter()
    for _ in range(epochs):
        for x, _y in train:
            images += x.shape[0]
    elapsed = time.perf_counter() - start
    if images == 0:
        raise SystemExit(f"fastai produced no batch from {len(df)} rows; use more images than --batch-size")
    return images / elapsed


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="dataset root: train.csv and train/*.jpg")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", default="1", help="comma list of worker counts")
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads in the main process (0: as many as workers, at least 1)",
    )
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs after the warm-up")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import fastai
    import torch

    result = {"workers": {}, "versions": {"fastai": fastai.__version__, "torch": torch.__version__}}
    for workers in (int(w) for w in args.workers.split(",")):
        # The batch transforms run in the main process: with N workers it
        # gets N threads, as our loader's N workers.
        torch.set_num_threads(args.threads or max(1, workers))
        log(f"fastai: data pipeline, {workers} worker(s), {torch.get_num_threads()} main thread(s)")
        rate = images_per_second(args.data, args.size, args.batch_size, workers, args.epochs, args.seed)
        result["workers"][str(workers)] = rate
    print(json.dumps(result))


if __name__ == "__main__":
    main()
