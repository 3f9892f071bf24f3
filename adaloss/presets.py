"""The report's four experiments and the two corrected comparisons (DESIGN.md).

- ``report``: the four experiments exactly, quirks included: frozen class
  weights, the report's ArcFace (no normalisation, margin at test time) and
  AdaFace (q from already-normalised embeddings, raw-weight evaluation).
- ``paper``: the same networks and settings with the published heads and the
  class weights trained; the AdaFace networks drop their final L2-normalise.
- ``fair``: one backbone per data set (the report's AdaFace network without its
  L2-normalise) for every head, same optimizer, lr 1e-3, epochs, batches and
  initial weights; only the head differs.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from . import nn

__all__ = ["RunConfig", "runs", "build", "REPORT_ACCURACY", "PRESETS", "DATASETS", "HEADS"]

PRESETS = ("report", "paper", "fair")
DATASETS = ("mnist", "cifar10")
HEADS = ("softmax", "cosface", "arcface", "adaface")   # the heads the presets use
EPOCHS = {"mnist": 10, "cifar10": 20}
REPORT_ACCURACY = {("mnist", "arcface"): 97.86, ("mnist", "adaface"): 99.11,
                   ("cifar10", "arcface"): 62.35, ("cifar10", "adaface"): 68.13}

# layer lists: ("conv", in, out) is 3x3 padding 1
ARCFACE_NETS = {
    "mnist": [("conv", 1, 32), ("relu",), ("pool",), ("conv", 32, 64), ("relu",), ("pool",),
              ("flatten",), ("linear", 3136, 128), ("relu",)],
    "cifar10": [("conv", 3, 64), ("relu",), ("pool",), ("conv", 64, 128), ("relu",), ("pool",),
                ("conv", 128, 256), ("relu",), ("pool",), ("flatten",), ("linear", 4096, 128),
                ("relu",)],
}
ADAFACE_NETS = {
    "mnist": [("conv", 1, 32), ("relu",), ("conv", 32, 64), ("relu",), ("pool",), ("flatten",),
              ("linear", 12544, 256), ("relu",), ("linear", 256, 128), ("l2norm",)],
    "cifar10": [("conv", 3, 32), ("relu",), ("conv", 32, 64), ("relu",), ("pool",), ("flatten",),
                ("linear", 16384, 256), ("relu",), ("linear", 256, 128), ("l2norm",)],
}
INPUT_SHAPES = {"mnist": (1, 28, 28), "cifar10": (3, 32, 32)}


@dataclass
class RunConfig:
    """Everything one training run needs; JSON-serialisable."""

    dataset: str
    preset: str
    head: str                      # softmax | cosface | arcface | adaface
    layers: list
    head_kwargs: dict
    lr: float
    epochs: int
    batch_size: int = 64
    train_head: bool = True
    eval_rule: str = "plain"
    kaiming_linear: bool = False   # Kaiming-normal for the AdaFace nets' two linear weights
    report_accuracy: float | None = None
    num_classes: int = 10
    embedding_dim: int = 128
    notes: list = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.dataset}-{self.preset}-{self.head}"

    def to_dict(self) -> dict:
        return asdict(self)


def runs(dataset: str, preset: str, epochs: int | None = None) -> list[RunConfig]:
    """The runs a preset makes on a data set."""
    if dataset not in DATASETS:
        raise ValueError(f"dataset: expected one of {DATASETS}, got {dataset!r}")
    if preset not in PRESETS:
        raise ValueError(f"preset: expected one of {PRESETS}, got {preset!r}")
    n_epochs = EPOCHS[dataset] if epochs is None else epochs
    cifar = dataset == "cifar10"
    if preset in ("report", "paper"):
        report = preset == "report"
        arc_net = ARCFACE_NETS[dataset]
        ada_net = ADAFACE_NETS[dataset] if report else ADAFACE_NETS[dataset][:-1]
        arc_kwargs = ({"s": 10.0 if cifar else 30.0, "m": 0.5, "variant": "report"} if report
                      else {"s": 64.0, "m": 0.5, "variant": "paper"})
        ada_kwargs = ({"s": 64.0, "m": 0.4, "h": 0.33, "variant": "report"} if report
                      else {"s": 64.0, "m": 0.4, "h": 0.333, "t_alpha": 0.01, "variant": "paper"})
        return [
            RunConfig(dataset, preset, "arcface", arc_net, arc_kwargs,
                      lr=1e-4 if cifar else 1e-3, epochs=n_epochs, train_head=not report,
                      eval_rule="report" if report else "plain",
                      report_accuracy=REPORT_ACCURACY[(dataset, "arcface")] if report else None),
            RunConfig(dataset, preset, "adaface", ada_net, ada_kwargs, lr=1e-3, epochs=n_epochs,
                      train_head=not report, eval_rule="report" if report else "plain",
                      kaiming_linear=True,
                      report_accuracy=REPORT_ACCURACY[(dataset, "adaface")] if report else None),
        ]
    backbone = ADAFACE_NETS[dataset][:-1]
    heads = {"softmax": {}, "cosface": {"s": 64.0, "m": 0.4},
             "arcface": {"s": 64.0, "m": 0.5, "variant": "paper"},
             "adaface": {"s": 64.0, "m": 0.4, "h": 0.333, "t_alpha": 0.01, "variant": "paper"}}
    return [RunConfig(dataset, preset, head, backbone, kwargs, lr=1e-3, epochs=n_epochs,
                      kaiming_linear=True) for head, kwargs in heads.items()]


def build_net(layers: list, input_shape: tuple | None = None,
              kaiming_linear: bool = False) -> nn.Sequential:
    """A Sequential from a layer list ("conv", in, out) ... (3x3 convolutions, padding 1)."""
    made = []
    for spec in layers:
        kind = spec[0]
        if kind == "conv":
            made.append(nn.Conv2d(spec[1], spec[2], 3, padding=1))
        elif kind == "linear":
            made.append(nn.Linear(spec[1], spec[2]))
            if kaiming_linear:
                nn.kaiming_normal_(made[-1].params["weight"])
        elif kind == "relu":
            made.append(nn.ReLU())
        elif kind == "pool":
            made.append(nn.MaxPool2d(2))
        elif kind == "flatten":
            made.append(nn.Flatten())
        elif kind == "l2norm":
            made.append(nn.L2Normalize())
        else:
            raise ValueError(f"layers: unknown layer kind {kind!r}")
    return nn.Sequential(made, input_shape=input_shape)


def build_head(config: RunConfig) -> nn._Head:
    cls = {"softmax": nn.Softmax, "cosface": nn.CosFace, "arcface": nn.ArcFace,
           "adaface": nn.AdaFace}[config.head]
    return cls(config.num_classes, config.embedding_dim, **config.head_kwargs)


def build(config: RunConfig, seed: int = 0) -> nn.Trainer:
    """Network, head and Adam for a run, initialised from `seed`: runs that share
    a seed and a network start from the same weights."""
    nn.manual_seed(seed)
    net = build_net(config.layers, INPUT_SHAPES[config.dataset], config.kaiming_linear)
    head = build_head(config)
    params = net.parameters() + (head.parameters() if config.train_head else [])
    return nn.Trainer(net, head, nn.Adam(params, lr=config.lr))
