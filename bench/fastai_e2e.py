"""fastai side of the end-to-end comparison in `just bench-cpu --e2e`.

The book's chapter-6 recipe on a dataset folder in PASCAL layout
(`train.csv` with fname, space-separated labels, is_valid; `train/*.jpg`):
DataBlock(ImageBlock, MultiCategoryBlock) split on `is_valid`,
RandomResizedCrop(size, min_scale=0.35), ImageNet Normalize (which
vision_learner adds only for pretrained weights, and our side always
applies), vision_learner with
accuracy_multi(thresh=0.2), `fine_tune(epochs, base_lr, freeze_epochs)`,
then `learn.save`. The body starts from random weights (`pretrained=False`):
this machine has no network, and speed does not depend on the weights; our
side is run the same way (`--weights none`).

Wall time runs from the start of `main` (after the imports, which our
binary does not pay) to the saved model, data loading and validation
included. Afterwards (not timed) the validation predictions give mAP
(scikit-learn's non-interpolated average precision, the definition ours
uses; classes without a positive are left out) and accuracy_multi at 0.2.

Prints one JSON object on stdout; fastai's progress goes to stderr.
"""

import argparse
import json
import os
import sys
import time


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True, help="folder for the saved model")
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--freeze-epochs", type=int, default=1)
    parser.add_argument("--base-lr", type=float, default=3e-3)
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()

    import contextlib
    from functools import partial

    import fastai
    import numpy as np
    import pandas as pd
    import torch
    import torchvision
    from fastai.vision.all import (
        ColReader,
        ColSplitter,
        DataBlock,
        ImageBlock,
        MultiCategoryBlock,
        Normalize,
        RandomResizedCrop,
        accuracy_multi,
        imagenet_stats,
        set_seed,
        vision_learner,
    )
    from sklearn.metrics import average_precision_score

    start = time.perf_counter()
    torch.set_num_threads(args.threads)
    set_seed(args.seed, reproducible=True)
    # Empty label cells (images with no object) stay "" rather than NaN.
    df = pd.read_csv(f"{args.data}/train.csv", keep_default_na=False)
    df["is_valid"] = df["is_valid"].astype(str).str.lower().isin(["true", "1"])
    block = DataBlock(
        blocks=(ImageBlock, MultiCategoryBlock),
        get_x=ColReader("fname", pref=f"{args.data}/train/"),
        get_y=ColReader("labels", label_delim=" "),
        splitter=ColSplitter("is_valid"),
        item_tfms=RandomResizedCrop(args.size, min_scale=0.35),
        # vision_learner adds ImageNet normalisation only for pretrained
        # weights; ours always normalises, so this side does too.
        batch_tfms=Normalize.from_stats(*imagenet_stats),
    )
    dls = block.dataloaders(df, bs=args.batch_size, num_workers=args.workers, device="cpu")
    arch = getattr(torchvision.models, args.arch)
    learn = vision_learner(
        dls, arch, pretrained=False, metrics=partial(accuracy_multi, thresh=0.2), path=args.out
    )
    # fastai prints its progress table on stdout; keep stdout for the JSON.
    with contextlib.redirect_stdout(sys.stderr):
        learn.fine_tune(args.epochs, base_lr=args.base_lr, freeze_epochs=args.freeze_epochs)
    learn.save("model")
    wall = time.perf_counter() - start

    with contextlib.redirect_stdout(sys.stderr):
        probs, targets = learn.get_preds()
    probs, targets = probs.numpy(), targets.numpy()
    has_positive = targets.sum(axis=0) > 0
    ap = average_precision_score(targets[:, has_positive], probs[:, has_positive], average=None)
    result = {
        "wall_s": wall,
        "map": float(np.mean(ap)),
        "accuracy_multi": float(((probs > 0.2) == (targets > 0.5)).mean()),
        "versions": {"fastai": fastai.__version__, "torch": torch.__version__},
        "simd": torch.backends.cpu.get_cpu_capability(),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
