"""The reference side of the GPU check's whole-recipe timing: fastai's
`fine_tune(epochs, base_lr, freeze_epochs)` written as a plain PyTorch loop
(the GPU machine has PyTorch and torchvision but not fastai), on the same
dataset folder our CLI trains on (`train.csv` + `train/*.jpg`, as written by
`multilabel synth`).

The recipe, as fastai runs it (`../shared/reference/fastai-recipe.md`):
- a torchvision ResNet with fastai's head (`pytorch_cpu.fastai_head`), from
  random weights (the machine has no network; ours runs `--weights none`);
- RandomResizedCrop(size, scale=(0.35, 1)) for training, squash to size
  for validation; ImageNet normalization;
- Adam with fastai's settings (betas 0.9/0.99, eps 1e-5, decoupled weight
  decay 0.01 except on BatchNorm and bias parameters), three parameter
  groups (stem to layer2, layer3 to layer4, head);
- frozen phase: body weights frozen, BatchNorm trained, one cycle over
  `freeze_epochs` at `slice(base_lr)` (the body's groups at a tenth) with
  pct_start 0.99 and div 25; then everything, one
  cycle over `epochs` at `slice(base_lr / 2 / lr_mult, base_lr / 2)` with
  pct_start 0.3 and div 5; cosine annealing, momentum 0.95 → 0.85 → 0.95,
  final division 1e5;
- validation loss and accuracy_multi at 0.5 after every epoch;
- `--precision bf16`: autocast to bfloat16 for the forward pass and the
  loss, channels_last, fused AdamW (PyTorch's fastest training setting).

Wall time runs from the start of `main` after the imports to the saved
model, data loading (DataLoader with `--workers`, every core by default)
and validation included. Prints a JSON object on stdout.
"""

import argparse
import csv
import json
import math
import os
import sys
import time


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="folder with train.csv and train/")
    parser.add_argument("--out", required=True, help="where to save the model (state_dict)")
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--bs", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--freeze-epochs", type=int, default=3)
    parser.add_argument("--base-lr", type=float, default=2e-3)
    parser.add_argument("--lr-mult", type=float, default=100.0)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--precision", default="bf16", choices=["f32", "bf16"])
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import torch
    import torchvision
    from torchvision import transforms
    from PIL import Image

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from pytorch_cpu import fastai_head

    start = time.perf_counter()
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    bf16 = args.precision == "bf16" and cuda
    if cuda:
        torch.backends.cudnn.benchmark = True

    rows = list(csv.DictReader(open(os.path.join(args.data, "train.csv"))))
    vocab = sorted({label for r in rows for label in r["labels"].split()})
    index = {label: i for i, label in enumerate(vocab)}
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    train_tf = transforms.Compose([
        transforms.RandomResizedCrop(args.size, scale=(0.35, 1.0)),
        transforms.ToTensor(),
        transforms.Normalize(mean, std),
    ])
    valid_tf = transforms.Compose([
        transforms.Resize((args.size, args.size)),
        transforms.ToTensor(),
        transforms.Normalize(mean, std),
    ])

    class Items(torch.utils.data.Dataset):
        def __init__(self, rows, tf):
            self.rows, self.tf = rows, tf

        def __len__(self):
            return len(self.rows)

        def __getitem__(self, i):
            r = self.rows[i]
            image = Image.open(os.path.join(args.data, "train", r["fname"])).convert("RGB")
            target = torch.zeros(len(vocab))
            for label in r["labels"].split():
                target[index[label]] = 1.0
            return self.tf(image), target

    is_valid = [r["is_valid"].strip().lower() in ("true", "1") for r in rows]
    train_rows = [r for r, v in zip(rows, is_valid) if not v]
    valid_rows = [r for r, v in zip(rows, is_valid) if v]
    loader = lambda rows, tf, shuffle: torch.utils.data.DataLoader(  # noqa: E731
        Items(rows, tf), batch_size=args.bs, shuffle=shuffle, drop_last=shuffle,
        num_workers=args.workers, pin_memory=cuda, persistent_workers=args.workers > 0)
    train_dl = loader(train_rows, train_tf, True)
    valid_dl = loader(valid_rows, valid_tf, False)

    body = getattr(torchvision.models, args.arch)(weights=None)
    features = body.fc.in_features
    body = torch.nn.Sequential(*list(body.children())[:-2])
    model = torch.nn.Sequential(body, fastai_head(torch, features, len(vocab))).to(device)
    if bf16:
        model = model.to(memory_format=torch.channels_last)
    # fastai's resnet split: stem to layer2, layer3 to layer4, head.
    groups = [list(body[:6].modules()), list(body[6:].modules()), list(model[1].modules())]
    norm_types = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)
    loss_fn = torch.nn.BCEWithLogitsLoss()

    def set_frozen(frozen):
        for g, modules in enumerate(groups):
            for m in modules:
                for p in m.parameters(recurse=False):
                    p.requires_grad_(not frozen or g == 2 or isinstance(m, norm_types))

    def one_cycle(phase, epochs, lrs, pct_start, div):
        """fit_one_cycle: cosine warm-up from lr/div, cosine down to lr/div/1e5."""
        params = []
        for modules, lr in zip(groups, lrs):
            decay, no_decay = [], []
            for m in modules:
                for name, p in m.named_parameters(recurse=False):
                    if p.requires_grad:
                        (no_decay if isinstance(m, norm_types) or name == "bias" else decay).append(p)
            params += [{"params": decay, "lr": lr, "weight_decay": 0.01},
                       {"params": no_decay, "lr": lr, "weight_decay": 0.0}]
        params = [g for g in params if g["params"]]
        fused = {"fused": True} if cuda else {}
        opt = torch.optim.AdamW(params, betas=(0.95, 0.99), eps=1e-5, **fused)
        peaks = [g["lr"] for g in params]
        total = epochs * len(train_dl)
        warm = max(1, int(total * pct_start))

        def cos(a, b, t):
            return b + (a - b) * (1 + math.cos(math.pi * t)) / 2

        def at(step):
            if step < warm:
                t = step / warm
                return [cos(p / div, p, t) for p in peaks], cos(0.95, 0.85, t)
            t = (step - warm) / max(1, total - warm)
            return [cos(p, p / div / 1e5, t) for p in peaks], cos(0.85, 0.95, t)

        step = 0
        for epoch in range(epochs):
            model.train()
            epoch_start = time.perf_counter()
            seen = 0
            for x, y in train_dl:
                lrs_now, mom = at(step)
                for g, lr in zip(opt.param_groups, lrs_now):
                    g["lr"] = lr
                    g["betas"] = (mom, 0.99)
                x = x.to(device, non_blocking=True)
                y = y.to(device, non_blocking=True)
                if bf16:
                    x = x.contiguous(memory_format=torch.channels_last)
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
                    loss = loss_fn(model(x).float(), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
                seen += x.shape[0]
            train_seconds = time.perf_counter() - epoch_start
            entry = validate(epoch, loss.item(), seen / train_seconds, train_seconds)
            history.append({"phase": phase, **entry})

    def validate(epoch, train_loss, images_per_s, train_seconds):
        model.eval()
        total, correct, count, n = 0.0, 0.0, 0, 0
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            for x, y in valid_dl:
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                if bf16:
                    x = x.contiguous(memory_format=torch.channels_last)
                logits = model(x).float()
                total += loss_fn(logits, y).item() * x.shape[0]
                correct += ((torch.sigmoid(logits) > 0.5).float() == y).float().sum().item()
                count += y.numel()
                n += x.shape[0]
        entry = {"epoch": epoch, "train_loss": train_loss, "valid_loss": total / max(n, 1),
                 "accuracy_multi": correct / max(count, 1), "train_images_per_s": images_per_s,
                 "train_seconds": train_seconds}
        print(json.dumps(entry), file=sys.stderr)
        return entry

    history = []
    if args.freeze_epochs > 0:
        set_frozen(True)
        # slice(base_lr): the body's groups (only their BatchNorm trains) at
        # a tenth of the head's.
        base = args.base_lr
        one_cycle("frozen", args.freeze_epochs, [base / 10, base / 10, base], pct_start=0.99, div=25.0)
    set_frozen(False)
    lr = args.base_lr / 2
    lrs = [lr / args.lr_mult * (args.lr_mult ** (i / 2)) for i in range(3)]
    one_cycle("unfrozen", args.epochs, lrs, pct_start=0.3, div=5.0)
    torch.save(model.state_dict(), args.out)
    if cuda:
        torch.cuda.synchronize()
    result = {
        "wall_seconds": time.perf_counter() - start,
        "torch": torch.__version__,
        "device": args.device,
        "precision": args.precision,
        "workers": args.workers,
        "train_images": len(train_rows),
        "valid_images": len(valid_rows),
        "history": history,
    }
    if cuda:
        result["gpu"] = torch.cuda.get_device_name(device)
        result["peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    print(json.dumps(result))


if __name__ == "__main__":
    main()
