#!/usr/bin/env python3
"""Train a study cell in adaloss and in PyTorch side by side, from the same
initial weights on the same shuffled batches, and print both per-epoch curves.

The tests check every layer, head and Adam step against PyTorch one step at a
time; this checks whole training runs, where a surprising result (for example
a head whose training loss stalls) must be the method's and not ours. Both
libraries start from the same weights and see the same batches in the same
order; float rounding makes the two trajectories drift apart slowly, so expect
close, not identical, curves.

    python benchmarks/torch_replica.py --dataset cifar10 --preset fair --head arcface \\
        --epochs 5 --subset 10000 --data-root "$ADALOSS_DATA"

With ``--record`` a finished study run stands in for the adaloss side (its
cell, seed, subset and epochs are taken from the record, which must have been
made with the same run configuration), so only PyTorch trains:

    python benchmarks/torch_replica.py \\
        --record benchmarks/study/runs/cifar10-fair-arcface-seed0.json --data-root "$ADALOSS_DATA"

(``ADALOSS_DATA="$(python tests/prepare_data.py)"`` makes a data root from the
project's shared data folder.)

Writes nothing; prints a Markdown table.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
from reference import torch_head_loss, torch_net  # noqa: E402

import adaloss  # noqa: E402
from adaloss import datasets, presets, training  # noqa: E402


def mean_target_angle(cosine: np.ndarray, labels: np.ndarray) -> float:
    """Mean angle (degrees) between a test embedding and its true class weight."""
    c = np.clip(cosine[np.arange(len(labels)), labels].astype(np.float64), -1, 1)
    return float(np.degrees(np.arccos(c)).mean())


def torch_curve(torch, config, seed: int, data, epochs: int) -> dict:
    """The adaloss run's twin in PyTorch: same initial weights, same batches."""
    start = presets.build(config, seed)                  # adaloss's initial weights
    net = torch_net(torch, [layer.to_json() for layer in config.layers])
    net.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in start.net.state_dict().items()})
    weight = torch.nn.Parameter(torch.from_numpy(start.head.weight.copy()),
                                requires_grad=config.train_head)
    params = list(net.parameters()) + ([weight] if config.train_head else [])
    opt = torch.optim.Adam(params, lr=config.lr)
    kwargs = config.head_config.kwargs()
    variant = kwargs.pop("variant", "paper")
    kwargs.setdefault("s", 1.0)                          # softmax: plain logits
    kwargs.setdefault("m", 0.0)
    state = {"batch_mean": torch.tensor(20.0), "batch_std": torch.tensor(100.0)}

    def convert(x):                                      # as adaloss converts uint8 images
        return (torch.from_numpy(x).float() / 255 - 0.5) / 0.5

    rng = np.random.default_rng(seed)                    # training.fit's shuffling
    n, batch = len(data.train_labels), config.batch_size
    curve = {"train_loss": [], "test_accuracy": [], "theta_deg": [], "seconds": []}
    for _ in range(epochs):
        order = rng.permutation(n)
        t0, losses = time.perf_counter(), []
        net.train()
        for step in range(math.ceil(n / batch)):
            idx = order[step * batch:(step + 1) * batch]
            opt.zero_grad(set_to_none=True)
            loss = torch_head_loss(torch, config.head, variant, net(convert(data.train_images[idx])),
                                   weight, torch.from_numpy(data.train_labels[idx].astype(np.int64)),
                                   state=state, **kwargs)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        curve["seconds"].append(time.perf_counter() - t0)
        curve["train_loss"].append(float(np.mean(losses)))
        with torch.no_grad():                            # the margin-free rule: nearest class
            emb = torch.cat([net(convert(data.test_images[i:i + 1000]))
                             for i in range(0, len(data.test_labels), 1000)])
            cosine = (torch.nn.functional.normalize(emb)
                      @ torch.nn.functional.normalize(weight).T).numpy()
            scores = (emb @ weight.T).numpy() if config.head == "softmax" else cosine
        curve["test_accuracy"].append(float(np.mean(scores.argmax(1) == data.test_labels)))
        curve["theta_deg"].append(mean_target_angle(cosine, data.test_labels))
        print(f"PyTorch epoch {len(curve['seconds'])}: train loss {curve['train_loss'][-1]:.3f}, "
              f"test acc {100 * curve['test_accuracy'][-1]:.2f} %, mean θ_y "
              f"{curve['theta_deg'][-1]:.1f}°, {curve['seconds'][-1]:.0f} s",
              file=sys.stderr, flush=True)          # a long run shows where it is
    return curve


def from_record(path: str, args) -> dict:
    """Load a study run record and set the cell, seed, subset and epochs from it."""
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise SystemExit(f"--record: cannot read a study run record from {path!r}: {exc}")
    missing = {"dataset", "preset", "head", "seed", "config", "history"} - set(record)
    if missing:
        raise SystemExit(f"--record: {path!r} is not a study run record (no {sorted(missing)})")
    if record["preset"] not in ("paper", "fair"):
        raise SystemExit(f"--record: expected a paper or fair run, {path!r} is a "
                         f"{record['preset']} run")
    args.dataset, args.preset, args.head = record["dataset"], record["preset"], record["head"]
    args.seed, args.subset = record["seed"], record.get("subset")
    recorded = len(record["history"]["train_loss"])
    if args.epochs is None or args.epochs > recorded:
        args.epochs = recorded
    return record


def print_table(title: str, ours: dict, theirs: dict, epochs: int) -> None:
    """Both curves side by side, one Markdown row per epoch."""
    print(title + "\n")
    print("| epoch | train loss adaloss | train loss PyTorch | test acc % adaloss | "
          "test acc % PyTorch | mean θ_y adaloss | mean θ_y PyTorch | seconds adaloss | "
          "seconds PyTorch |")
    print("|---|---|---|---|---|---|---|---|---|")
    for e in range(epochs):
        theta = ours["theta_deg"][e]
        print(f"| {e + 1} | {ours['train_loss'][e]:.3f} | {theirs['train_loss'][e]:.3f} | "
              f"{100 * ours['test_accuracy'][e]:.2f} | {100 * theirs['test_accuracy'][e]:.2f} | "
              f"{'–' if theta is None else f'{theta:.1f}°'} | {theirs['theta_deg'][e]:.1f}° | "
              f"{ours['seconds'][e]:.0f} | {theirs['seconds'][e]:.0f} |")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", choices=presets.DATASETS, default="cifar10")
    ap.add_argument("--preset", choices=("paper", "fair"), default="fair",
                    help="a preset with published heads and margin-free evaluation")
    ap.add_argument("--head", choices=presets.HEADS, default="arcface")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=None, help="default 5, or the record's epochs")
    ap.add_argument("--subset", type=int, default=None, metavar="N",
                    help="N training images (and N/5 test images), as `adaloss study --subset`")
    ap.add_argument("--record", default=None, metavar="RUN.json",
                    help="a study run record to compare against instead of training adaloss; "
                         "sets --dataset, --preset, --head, --seed, --subset and --epochs")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--data-root", default=None)
    args = ap.parse_args(argv)
    record = from_record(args.record, args) if args.record else None
    if args.epochs is None:
        args.epochs = 5
    if args.epochs < 1:
        raise SystemExit(f"--epochs: expected a positive number, got {args.epochs}")
    import torch

    torch.set_num_threads(args.threads)
    adaloss.set_num_threads(args.threads)
    configs = [c for c in presets.runs(args.dataset, args.preset, args.epochs) if c.head == args.head]
    if not configs:
        raise SystemExit(f"--head: the {args.preset} preset has no {args.head} run on {args.dataset}")
    config = configs[0]
    if record is not None:
        recorded = dict(record["config"], epochs=args.epochs)
        current = json.loads(json.dumps(config.to_dict()))    # tuples as the record's lists
        if recorded != current:
            changed = sorted(k for k in set(recorded) | set(current)
                             if recorded.get(k) != current.get(k))
            raise SystemExit(f"--record: the record's run configuration differs from this "
                             f"adaloss's {args.preset} {args.head} run in {changed}")
    data = (datasets.load_mnist(args.data_root) if args.dataset == "mnist"
            else datasets.load_cifar10(args.data_root))
    if args.subset:
        data = datasets.subset(data, args.subset, max(10, args.subset // 5))

    if record is None:
        ours = adaloss_curve(config, args.seed, data, args.epochs)
        source = f"adaloss {adaloss.__version__}"
    else:
        history = record["history"]
        ours = {k: history[k][:args.epochs] for k in ("train_loss", "test_accuracy", "seconds")}
        ours["theta_deg"] = [None] * args.epochs
        if args.epochs == len(history["train_loss"]):
            ours["theta_deg"][-1] = record.get("theta_mean_deg")
        source = (f"adaloss side from {args.record} (adaloss "
                  f"{record.get('adaloss_version', '?')}, {record.get('threads', '?')} thread(s))")
    theirs = torch_curve(torch, config, args.seed, data, args.epochs)
    print_table(f"{args.dataset} {args.preset} {args.head}, seed {args.seed}, "
                f"{len(data.train_labels)} training / {len(data.test_labels)} test images, "
                f"{args.threads} thread(s), {source}, torch {torch.__version__}",
                ours, theirs, args.epochs)


def adaloss_curve(config, seed: int, data, epochs: int) -> dict:
    """Train the adaloss side, recording the mean target angle after every epoch."""
    trainer, angles = presets.build(config, seed), []

    def angle(epoch, history):
        emb = trainer.embed(data.test_images, batch_size=1000)
        w = trainer.head.weight
        cosine = ((emb / np.linalg.norm(emb, axis=1, keepdims=True))
                  @ (w / np.linalg.norm(w, axis=1, keepdims=True)).T)
        angles.append(mean_target_angle(cosine, data.test_labels))

    history = training.fit(trainer, data.train_images, data.train_labels, epochs=epochs,
                           batch_size=config.batch_size, x_test=data.test_images,
                           y_test=data.test_labels, seed=seed, progress=False, callback=angle)
    return {"train_loss": history.train_loss, "test_accuracy": history.test_accuracy,
            "seconds": history.seconds, "theta_deg": angles}


if __name__ == "__main__":
    main()
