#!/usr/bin/env python3
"""Compare the per-batch training losses of seeded runs of the same recipe.

    python3 bench/compare_runs.py RUN_A RUN_B [RUN_C ...]

Each RUN is a run folder written by `multilabel train` (its `events.jsonl`).
For every pair of runs it prints, per phase and epoch, the largest relative
difference between the two runs' losses at the same batch, and each run's
epoch losses from `history.csv`.

Use it to check that a speed change leaves learning as it was: train the
same seeded recipe with the binary before and after the change, and with
`--kernels generic` (candle's own ops) as a control. Two correct f32
implementations drift apart once the body trains (rounding differences grow
step by step), so "unchanged" means the before/after difference is no larger
than either run's difference from the control.
"""

import csv
import itertools
import json
import sys
from pathlib import Path


def batch_losses(run):
    path = Path(run) / "events.jsonl"
    out = {}
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
            try:
                event = json.loads(line)
            except json.JSONDecodeError as e:
                sys.exit(f"{path}:{line_no}: not JSON ({e})")
            if event.get("event") == "batch_end":
                out[(event["phase"], event["epoch"], event["batch"])] = event["loss"]
    if not out:
        sys.exit(f"{path}: no batch_end events")
    return out


def main():
    runs = sys.argv[1:]
    if len(runs) < 2:
        sys.exit(__doc__.strip().splitlines()[2].strip())
    losses = {run: batch_losses(run) for run in runs}
    for a, b in itertools.combinations(runs, 2):
        common = sorted(set(losses[a]) & set(losses[b]))
        if not common:
            sys.exit(f"{a} and {b} share no batches")
        worst = {}
        for key in common:
            x, y = losses[a][key], losses[b][key]
            rel = abs(x - y) / max(abs(x), 1e-12)
            epoch = key[:2]
            worst[epoch] = max(worst.get(epoch, 0.0), rel)
        print(f"{a} vs {b}: largest relative batch-loss difference")
        for (phase, epoch), rel in sorted(worst.items(), key=lambda kv: (kv[0][0] != "frozen", kv[0][1])):
            print(f"  {phase} epoch {epoch}: {rel:.1e}")
    for run in runs:
        path = Path(run) / "history.csv"
        if path.exists():
            with open(path) as f:
                rows = list(csv.DictReader(f))
            epochs = ", ".join(f"{r['phase']} {r['epoch']} {float(r['train_loss']):.4f}/{float(r['valid_loss']):.4f}" for r in rows)
            print(f"{run}: train/valid loss {epochs}")


if __name__ == "__main__":
    main()
