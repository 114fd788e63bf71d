"""PyTorch side of `just bench-cpu`: the same measurements as our Rust bench.

A torchvision ResNet (`--arch`, default ResNet-50; random init: speed does
not depend on the weights) with fastai's head written out in plain torch,
128 px, batch 64 by default:

- train_frozen   images/s: forward, BCE-with-logits, backward, Adam step with
                 the body's conv weights frozen and every BatchNorm trainable
                 (fastai's freeze() with train_bn=True)
- train_unfrozen images/s: the same with everything trainable
- eval           images/s: eval mode, no_grad
- peak_rss_mb    the process's peak resident memory
- peak_gpu_mb    with --device cuda: the CUDA allocator's peak

With `--device cuda` (the GPU check, bench/gpu/run.sh) the model and the
batch live on the GPU, cuDNN picks its algorithms by benchmark (PyTorch's
fastest setting), and every timed loop ends with a synchronize.
`--precision` sets the arithmetic: `f32` (TF32 off for convolutions and
matmuls), `tf32` (TF32 on for both) or `bf16` (autocast to bfloat16 for the
forward pass and the loss, the model and the input channels_last, the
fused AdamW): PyTorch's fastest training setting. Each
training step reads its loss back (as ours does), and each eval step is
synchronised, so both sides wait for every step; each rate is the batch
over the median timed step, as ours (on a shared machine one slow step
should not move it).

The data pipeline is measured on fastai's own DataLoaders by
`bench/fastai_data.py`. Prints a JSON object on stdout; progress goes to
stderr.
"""

import argparse
import json
import os
import resource
import statistics
import sys
import time


def log(*args):
    print(*args, file=sys.stderr, flush=True)


def peak_rss_mb():
    """This process's peak resident memory in MiB.

    VmHWM belongs to the address space, which execve replaces; ru_maxrss
    does not reset across execve, so when the Rust bench forks and execs
    this script it would report the parent's peak instead.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def fastai_head(torch, nf, n_classes):
    nn = torch.nn

    class ConcatPool(nn.Module):
        def forward(self, x):
            return torch.cat([x.amax(dim=(2, 3)), x.mean(dim=(2, 3))], dim=1)

    def bn(n):
        layer = nn.BatchNorm1d(n)
        layer.bias.data.fill_(1e-3)
        return layer

    head = nn.Sequential(
        ConcatPool(),
        bn(2 * nf),
        nn.Dropout(0.25),
        nn.Linear(2 * nf, 512, bias=False),
        nn.ReLU(inplace=True),
        bn(512),
        nn.Dropout(0.5),
        nn.Linear(512, n_classes, bias=False),
    )
    return head


def build_model(torch, torchvision, arch, n_classes):
    body = getattr(torchvision.models, arch)(weights=None)
    features = body.fc.in_features
    body = torch.nn.Sequential(*list(body.children())[:-2])
    return torch.nn.Sequential(body, fastai_head(torch, features, n_classes))


def set_frozen(model, frozen):
    norm_types = (
        model[0][1].__class__,  # BatchNorm2d
        model[1][1].__class__,  # BatchNorm1d
    )
    for module in model[0].modules():
        for param in module.parameters(recurse=False):
            param.requires_grad_(not frozen or isinstance(module, norm_types))
    for param in model[1].parameters():
        param.requires_grad_(True)


def synchronize(torch, batch):
    if batch.is_cuda:
        torch.cuda.synchronize()


def autocast(torch, batch, precision):
    """bf16 autocast on CUDA for `--precision bf16`, a no-op otherwise."""
    enabled = precision == "bf16" and batch.is_cuda
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=enabled)


def time_train(torch, model, frozen, batch, targets, warmup, iters, precision="f32"):
    set_frozen(model, frozen)
    params = [p for p in model.parameters() if p.requires_grad]
    fused = {"fused": True} if batch.is_cuda and precision == "bf16" else {}
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.99), eps=1e-5, weight_decay=0.01, **fused)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    model.train()
    batch = batch.clone().requires_grad_(False)

    # Seconds in forward (with the loss), backward and the optimizer
    # (zero_grad + step), printed like ours; on a GPU only the total is
    # meaningful, as the parts are not synchronised.
    split = [0.0, 0.0, 0.0]

    def step():
        t0 = time.perf_counter()
        with autocast(torch, batch, precision):
            loss = loss_fn(model(batch).float(), targets)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=False)
        t3 = time.perf_counter()
        for i, dt in enumerate((t1 - t0, t2 - t1, t3 - t2)):
            split[i] += dt
        return loss.item()

    for _ in range(warmup):
        step()
    synchronize(torch, batch)
    split[:] = [0.0, 0.0, 0.0]
    steps = []
    for _ in range(iters):
        start = time.perf_counter()
        step()  # loss.item() waits for the step
        steps.append(time.perf_counter() - start)
    ms = [1000.0 * s / iters for s in split]
    print(
        f"pytorch: {1000.0 * statistics.median(steps):.0f} ms/step (median; mean "
        f"{1000.0 * statistics.mean(steps):.0f} = forward+loss {ms[0]:.0f}, "
        f"backward {ms[1]:.0f}, optimizer {ms[2]:.0f})",
        file=sys.stderr,
    )
    return batch.shape[0] / statistics.median(steps)


def time_eval(torch, model, batch, warmup, iters, precision="f32"):
    model.eval()
    steps = []
    with torch.no_grad(), autocast(torch, batch, precision):
        for _ in range(warmup):
            model(batch)
        synchronize(torch, batch)
        for _ in range(iters):
            start = time.perf_counter()
            model(batch)
            synchronize(torch, batch)
            steps.append(time.perf_counter() - start)
    return batch.shape[0] / statistics.median(steps)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--arch", default="resnet50", help="a torchvision ResNet: resnet18 ... resnet152")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument(
        "--precision",
        default="f32",
        choices=["f32", "tf32", "bf16"],
        help="f32 (no TF32), tf32, or bf16 autocast + channels_last (CUDA)",
    )
    parser.add_argument(
        "--only",
        default="train_frozen,train_unfrozen,eval",
        help="comma list of phases to measure",
    )
    args = parser.parse_args()
    only = set(args.only.split(","))

    import torch
    import torchvision

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    n_classes = 20
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        tf32 = args.precision != "f32"
        torch.backends.cudnn.allow_tf32 = tf32
        torch.backends.cuda.matmul.allow_tf32 = tf32
    model = build_model(torch, torchvision, args.arch, n_classes).to(device)
    batch = torch.randn(args.batch_size, 3, args.size, args.size).to(device)
    if device.type == "cuda" and args.precision == "bf16":
        model = model.to(memory_format=torch.channels_last)
        batch = batch.contiguous(memory_format=torch.channels_last)
    targets = (torch.rand(args.batch_size, n_classes) < 0.1).float().to(device)

    result = {
        "torch": torch.__version__,
        "simd": torch.backends.cpu.get_cpu_capability(),
        "arch": args.arch,
        "threads": args.threads,
        "batch_size": args.batch_size,
        "size": args.size,
        "device": args.device,
        "precision": args.precision,
    }
    if device.type == "cuda":
        result["gpu"] = torch.cuda.get_device_name(device)
        result["cudnn_allow_tf32"] = torch.backends.cudnn.allow_tf32
    log(f"pytorch {torch.__version__}, {torch.get_num_threads()} threads")
    if "train_frozen" in only:
        log("pytorch: train_frozen")
        result["train_frozen"] = time_train(
            torch, model, True, batch, targets, args.warmup, args.iters, args.precision
        )
    if "train_unfrozen" in only:
        log("pytorch: train_unfrozen")
        result["train_unfrozen"] = time_train(
            torch, model, False, batch, targets, args.warmup, args.iters, args.precision
        )
    if "eval" in only:
        log("pytorch: eval")
        result["eval"] = time_eval(torch, model, batch, args.warmup, args.iters, args.precision)
    result["peak_rss_mb"] = peak_rss_mb()
    if device.type == "cuda":
        result["peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    print(json.dumps(result))


if __name__ == "__main__":
    main()
