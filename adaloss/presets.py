"""The report's four experiments and the two corrected comparisons (docs/design.md).

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

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace

from . import nn

__all__ = ["RunConfig", "HeadConfig", "LayerSpec", "runs", "build", "build_net", "build_head",
           "adapt", "input_shape_of", "PROTOCOLS",
           "REPORT_ACCURACY", "PRESETS", "DATASETS", "HEADS", "EPOCHS", "INPUT_SHAPES",
           "DEFAULT_PRESET", "STUDY_SEEDS", "BATCH_SIZE", "EXTRA_HEADS", "ARCFACE_RULES",
           "with_overrides"]

PRESETS = ("report", "paper", "fair")
PROTOCOLS = ("closed", "open")   # train on every class / on a seeded half (docs/evaluation.md)
DEFAULT_PRESET = "report"
DATASETS = ("mnist", "cifar10")
HEADS = ("softmax", "cosface", "arcface", "adaface")   # the heads the presets use
EXTRA_HEADS = ("combined",)        # the fair preset's heads run only when asked for (--heads)
ARCFACE_RULES = ("fallback", "easy", "clip", "straight-through")   # nn.ArcFace's rule
EPOCHS = {"mnist": 10, "cifar10": 20}                  # the report's
BATCH_SIZE = 64                                        # the report's
STUDY_SEEDS = {"mnist": 5, "cifar10": 3}               # seeds per data set of the study grid
REPORT_ACCURACY = {("mnist", "arcface"): 97.86, ("mnist", "adaface"): 99.11,
                   ("cifar10", "arcface"): 62.35, ("cifar10", "adaface"): 68.13}

HEAD_CLASSES = {"softmax": nn.Softmax, "cosface": nn.CosFace, "arcface": nn.ArcFace,
                "adaface": nn.AdaFace, "combined": nn.CombinedMargin}
# the settings each head takes (the others keep no meaning for it)
_HEAD_SETTINGS = {"softmax": (), "cosface": ("s", "m"), "arcface": ("s", "m", "variant", "rule"),
                  "adaface": ("s", "m", "h", "t_alpha", "variant"),
                  "combined": ("s", "m1", "m2", "m3")}
COMBINED_MARGINS = (1.0, 0.3, 0.2)     # the fair preset's combined head: (m1, m2, m3)
_SIZED_LAYERS = ("conv", "linear")
LAYER_KINDS = ("conv", "relu", "pool", "flatten", "linear", "l2norm")


@dataclass(frozen=True)
class LayerSpec:
    """One layer of a preset network.

    ``conv``: 3x3 convolution, padding 1, from ``in_features`` to
    ``out_features`` channels; ``linear``: ``in_features`` to ``out_features``;
    ``relu``, ``pool`` (2x2 max), ``flatten`` and ``l2norm`` take no sizes.
    In JSON (results.json, run records) a layer is the list
    ``["conv", 1, 32]`` or ``["relu"]``, as it always was.
    """

    kind: str
    in_features: int = 0
    out_features: int = 0

    def __post_init__(self) -> None:
        if self.kind not in LAYER_KINDS:
            raise ValueError(f"layers: unknown layer kind {self.kind!r}; expected one of "
                             f"{LAYER_KINDS}")
        sizes = (self.in_features, self.out_features)
        if self.kind in _SIZED_LAYERS:
            if any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in sizes):
                raise ValueError(f"layers: a {self.kind} layer needs positive in_features and "
                                 f"out_features, got {sizes}")
        elif sizes != (0, 0):
            raise ValueError(f"layers: a {self.kind} layer takes no sizes, got {sizes}")

    @classmethod
    def coerce(cls, value) -> "LayerSpec":
        """A LayerSpec from itself, the JSON/tuple form ``("conv", 1, 32)`` or a
        dict of its fields."""
        if isinstance(value, LayerSpec):
            return value
        if isinstance(value, Mapping):
            return cls(**value)
        if isinstance(value, (list, tuple)) and value and isinstance(value[0], str):
            return cls(*value)
        raise TypeError(f"layers: expected a LayerSpec or a tuple like ('conv', 1, 32), got "
                        f"{value!r}")

    def to_json(self) -> list:
        """``[kind, in_features, out_features]``, or ``[kind]`` for a layer without sizes."""
        if self.kind in _SIZED_LAYERS:
            return [self.kind, self.in_features, self.out_features]
        return [self.kind]

    # Layers were tuples like ("conv", 1, 32) before they were LayerSpecs: code
    # that unpacks or indexes them keeps working, with a warning.
    def _as_tuple(self) -> tuple:
        warnings.warn("using a layer as a tuple is deprecated; use LayerSpec's kind, "
                      "in_features and out_features (or to_json())", DeprecationWarning,
                      stacklevel=3)
        return tuple(self.to_json())

    def __iter__(self):
        return iter(self._as_tuple())

    def __getitem__(self, index):
        return self._as_tuple()[index]

    def __len__(self) -> int:
        return len(self._as_tuple())

    def build(self, kaiming_linear: bool = False) -> nn.Layer:
        """The adaloss layer (drawing its initial weights from adaloss's generator)."""
        if self.kind == "conv":
            return nn.Conv2d(self.in_features, self.out_features, 3, padding=1)
        if self.kind == "linear":
            layer = nn.Linear(self.in_features, self.out_features)
            if kaiming_linear:
                nn.kaiming_normal_(layer.params["weight"])
            return layer
        return {"relu": nn.ReLU, "pool": lambda: nn.MaxPool2d(2), "flatten": nn.Flatten,
                "l2norm": nn.L2Normalize}[self.kind]()


@dataclass(frozen=True)
class HeadConfig:
    """A loss head and its settings; a setting left None takes the head class's
    default. ``kind`` is one of HEADS or "combined"; softmax takes no setting,
    cosface s and m, arcface s, m, variant and rule (the paper variant's margin
    rule, nn.ArcFace), adaface s, m, h, t_alpha and variant, combined s, m1, m2
    and m3 (nn.CombinedMargin). Records written before rule and the combined
    head existed hold none of them: an ArcFace without rule is "fallback"."""

    kind: str
    s: float | None = None
    m: float | None = None
    h: float | None = None
    t_alpha: float | None = None
    variant: str | None = None
    rule: str | None = None
    m1: float | None = None
    m2: float | None = None
    m3: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in HEAD_CLASSES:
            raise ValueError(f"head: expected one of {tuple(HEAD_CLASSES)}, got {self.kind!r}")
        extra = [f.name for f in fields(self)[1:] if getattr(self, f.name) is not None
                 and f.name not in _HEAD_SETTINGS[self.kind]]
        if extra:
            raise ValueError(f"head: {self.kind} takes {_HEAD_SETTINGS[self.kind] or 'no settings'}"
                             f", got {extra}")
        if self.rule is not None:
            if self.rule not in ARCFACE_RULES:
                raise ValueError(f"rule: expected one of {ARCFACE_RULES}, got {self.rule!r}")
            if self.variant == "report" and self.rule != "fallback":
                raise ValueError(f"rule: only the paper ArcFace has margin rules; the report's "
                                 f"ArcFace takes none, got {self.rule!r}")
        checks = {"s": (0.0, 1e4, True), "m": (0.0, math.pi, False), "h": (0.0, 1e3, False),
                  "m1": (0.0, 10.0, True), "m2": (0.0, math.pi, False),
                  "m3": (0.0, math.pi, False)}
        for name, (low, high, low_open) in checks.items():
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float))
                                          and not isinstance(value, bool) and math.isfinite(value)
                                          and (value > low if low_open else value >= low)
                                          and value <= high):
                bound = f"({low:g}, {high:g}]" if low_open else f"[{low:g}, {high:g}]"
                if name in ("m", "m2", "m3"):
                    bound = "[0, pi]"
                raise ValueError(f"{name}: the {self.kind} head expects a finite number in "
                                 f"{bound}, got {value!r}")

    def kwargs(self) -> dict:
        """The settings given, as the head class's keyword arguments."""
        return {f.name: getattr(self, f.name) for f in fields(self)[1:]
                if getattr(self, f.name) is not None}

    def build(self, num_classes: int, embedding_dim: int) -> nn._Head:
        """The adaloss head (drawing its initial class weights from adaloss's generator)."""
        return HEAD_CLASSES[self.kind](num_classes, embedding_dim, **self.kwargs())


# networks: conv is 3x3 padding 1
def _net(*layers) -> list:
    return [LayerSpec(*layer) for layer in layers]


ARCFACE_NETS = {
    "mnist": _net(("conv", 1, 32), ("relu",), ("pool",), ("conv", 32, 64), ("relu",), ("pool",),
                  ("flatten",), ("linear", 3136, 128), ("relu",)),
    "cifar10": _net(("conv", 3, 64), ("relu",), ("pool",), ("conv", 64, 128), ("relu",),
                    ("pool",), ("conv", 128, 256), ("relu",), ("pool",), ("flatten",),
                    ("linear", 4096, 128), ("relu",)),
}
ADAFACE_NETS = {
    "mnist": _net(("conv", 1, 32), ("relu",), ("conv", 32, 64), ("relu",), ("pool",),
                  ("flatten",), ("linear", 12544, 256), ("relu",), ("linear", 256, 128),
                  ("l2norm",)),
    "cifar10": _net(("conv", 3, 32), ("relu",), ("conv", 32, 64), ("relu",), ("pool",),
                    ("flatten",), ("linear", 16384, 256), ("relu",), ("linear", 256, 128),
                    ("l2norm",)),
}
INPUT_SHAPES = {"mnist": (1, 28, 28), "cifar10": (3, 32, 32)}

_RUN_FIELDS = ("dataset", "preset", "head", "layers", "head_config", "lr", "epochs",
               "batch_size", "train_head", "eval_rule", "kaiming_linear", "report_accuracy",
               "num_classes", "embedding_dim", "notes")
# written only when not at their defaults, so records made before they existed,
# closed runs on the official data and runs that do not use them keep the
# records (and run names) they always had
_OPTIONAL_RUN_FIELDS = {"margin_warmup": 0, "softmax_warmup": 0, "protocol": "closed",
                        "input_shape": None}


@dataclass(init=False)
class RunConfig:
    """Everything one training run needs; JSON-serialisable through to_dict().

    ``head`` is the head's name, ``head_config`` its typed settings and
    ``layers`` a list of LayerSpec. ``protocol`` is "closed" (train and test on
    every class) or "open" (train on a seeded half of the classes, evaluate on
    the other half; ``num_classes`` is then the trained half's). ``input_shape``
    (C, H, W) is None for the preset data sets' own shapes (INPUT_SHAPES) and
    set by ``adapt`` for other data. For the records written so far, the
    constructor also takes the head's settings as a dict (positionally where
    head_config goes, or as ``head_kwargs=``) and layers as tuples or lists.
    """

    dataset: str
    preset: str
    head: str                      # softmax | cosface | arcface | adaface
    layers: list
    head_config: HeadConfig
    lr: float
    epochs: int
    batch_size: int = BATCH_SIZE
    train_head: bool = True
    eval_rule: str = "plain"
    kaiming_linear: bool = False   # Kaiming-normal for the AdaFace nets' two linear weights
    report_accuracy: float | None = None
    num_classes: int = 10
    embedding_dim: int = 128
    notes: list = field(default_factory=list)
    margin_warmup: int = 0         # epochs of linear margin warm-up (training.fit)
    softmax_warmup: int = 0        # epochs with the margins at 0 first (training.fit)
    protocol: str = "closed"
    input_shape: tuple | None = None

    def __init__(self, dataset: str, preset: str, head, layers, head_config=None,
                 lr: float | None = None, epochs: int | None = None,
                 batch_size: int = BATCH_SIZE, train_head: bool = True,
                 eval_rule: str = "plain", kaiming_linear: bool = False,
                 report_accuracy: float | None = None, num_classes: int = 10,
                 embedding_dim: int = 128, notes: list | None = None, *,
                 head_kwargs: Mapping | None = None, margin_warmup: int = 0,
                 softmax_warmup: int = 0, protocol: str = "closed", input_shape=None):
        if isinstance(head, HeadConfig):
            head_config, head = (head if head_config is None else head_config), head.kind
        if head_kwargs is not None:
            if head_config is not None:
                raise TypeError("RunConfig: give head_config or head_kwargs, not both")
            head_config = head_kwargs
        if head_config is None:
            head_config = HeadConfig(head)
        elif isinstance(head_config, Mapping):       # the head_kwargs dict of old records
            head_config = HeadConfig(head, **head_config)
        elif not isinstance(head_config, HeadConfig):
            raise TypeError(f"head_config: expected a HeadConfig or a dict of settings, got "
                            f"{type(head_config).__name__}")
        if head_config.kind != head:
            raise ValueError(f"head_config: a {head_config.kind} head for a run of head {head!r}")
        if lr is None or epochs is None:
            raise TypeError("RunConfig: lr and epochs are required")
        for name, value in (("margin_warmup", margin_warmup), ("softmax_warmup", softmax_warmup)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name}: expected a non-negative number of epochs, got "
                                 f"{value!r}")
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol: expected one of {PROTOCOLS}, got {protocol!r}")
        if input_shape is not None:
            input_shape = tuple(input_shape)
            if len(input_shape) != 3 or any(isinstance(v, bool) or not isinstance(v, int)
                                            or v < 1 for v in input_shape):
                raise ValueError(f"input_shape: expected (C, H, W) of positive ints, got "
                                 f"{input_shape!r}")
        self.dataset, self.preset, self.head = dataset, preset, head
        self.layers = [LayerSpec.coerce(layer) for layer in layers]
        self.head_config = head_config
        self.lr, self.epochs, self.batch_size = lr, epochs, batch_size
        self.train_head, self.eval_rule, self.kaiming_linear = train_head, eval_rule, kaiming_linear
        self.report_accuracy = report_accuracy
        self.num_classes, self.embedding_dim = num_classes, embedding_dim
        self.notes = list(notes) if notes is not None else []
        self.margin_warmup, self.softmax_warmup = margin_warmup, softmax_warmup
        self.protocol, self.input_shape = protocol, input_shape

    @property
    def name(self) -> str:
        """``dataset-preset-head``, followed by what differs from the preset's
        head (``_name_suffix``): e.g. cifar10-fair-arcface-easy,
        cifar10-fair-arcface-mwarm5, cifar10-fair-combined-1-0.3-0.2; plus
        ``-open`` under the open protocol."""
        suffix = "" if self.protocol == "closed" else f"-{self.protocol}"
        return f"{self.dataset}-{self.preset}-{self.head}" + _name_suffix(self) + suffix

    @property
    def head_kwargs(self) -> dict:
        """Deprecated: ``head_config.kwargs()``."""
        warnings.warn("RunConfig.head_kwargs is deprecated; use RunConfig.head_config "
                      "(a HeadConfig; .kwargs() gives the dict)", DeprecationWarning, stacklevel=2)
        return self.head_config.kwargs()

    @head_kwargs.setter
    def head_kwargs(self, value: Mapping) -> None:
        warnings.warn("RunConfig.head_kwargs is deprecated; set RunConfig.head_config "
                      "(e.g. dataclasses.replace(config.head_config, s=16.0))",
                      DeprecationWarning, stacklevel=2)
        self.head_config = HeadConfig(self.head, **value)

    def to_dict(self) -> dict:
        """The JSON form, the same as records have always held: layers as lists,
        the head's settings as the dict ``head_kwargs``."""
        out = {}
        for name in _RUN_FIELDS:
            if name == "layers":
                out["layers"] = [LayerSpec.coerce(layer).to_json() for layer in self.layers]
            elif name == "head_config":
                out["head_kwargs"] = self.head_config.kwargs()
            elif name == "notes":
                out["notes"] = list(self.notes)
            else:
                out[name] = getattr(self, name)
        for name, default in _OPTIONAL_RUN_FIELDS.items():
            value = getattr(self, name)
            if value != default:
                out[name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, d: Mapping) -> "RunConfig":
        """The inverse of to_dict (reads every record written so far)."""
        return cls(**d)


def runs(dataset: str, preset: str, epochs: int | None = None,
         extra_heads=()) -> list[RunConfig]:
    """The runs a preset makes on a data set; `extra_heads` (some of
    EXTRA_HEADS, fair preset only) adds heads the preset runs only on request."""
    if dataset not in DATASETS:
        raise ValueError(f"dataset: expected one of {DATASETS}, got {dataset!r}")
    if preset not in PRESETS:
        raise ValueError(f"preset: expected one of {PRESETS}, got {preset!r}")
    extra_heads = list(extra_heads)
    if set(extra_heads) - set(EXTRA_HEADS):
        raise ValueError(f"extra_heads: expected some of {EXTRA_HEADS}, got {extra_heads!r}")
    if extra_heads and preset != "fair":
        raise ValueError(f"heads: {extra_heads} belong to the fair preset only, not {preset!r}")
    n_epochs = EPOCHS[dataset] if epochs is None else epochs
    cifar = dataset == "cifar10"
    if preset in ("report", "paper"):
        report = preset == "report"
        arc_net = ARCFACE_NETS[dataset]
        ada_net = ADAFACE_NETS[dataset] if report else ADAFACE_NETS[dataset][:-1]
        arc_head = (HeadConfig("arcface", s=10.0 if cifar else 30.0, m=0.5, variant="report")
                    if report else HeadConfig("arcface", s=64.0, m=0.5, variant="paper"))
        ada_head = (HeadConfig("adaface", s=64.0, m=0.4, h=0.33, variant="report") if report
                    else HeadConfig("adaface", s=64.0, m=0.4, h=0.333, t_alpha=0.01,
                                    variant="paper"))
        return [
            RunConfig(dataset, preset, "arcface", arc_net, arc_head,
                      lr=1e-4 if cifar else 1e-3, epochs=n_epochs, train_head=not report,
                      eval_rule="report" if report else "plain",
                      report_accuracy=REPORT_ACCURACY[(dataset, "arcface")] if report else None),
            RunConfig(dataset, preset, "adaface", ada_net, ada_head, lr=1e-3, epochs=n_epochs,
                      train_head=not report, eval_rule="report" if report else "plain",
                      kaiming_linear=True,
                      report_accuracy=REPORT_ACCURACY[(dataset, "adaface")] if report else None),
        ]
    backbone = ADAFACE_NETS[dataset][:-1]
    heads = [HeadConfig("softmax"), HeadConfig("cosface", s=64.0, m=0.4),
             HeadConfig("arcface", s=64.0, m=0.5, variant="paper"),
             HeadConfig("adaface", s=64.0, m=0.4, h=0.333, t_alpha=0.01, variant="paper")]
    if "combined" in extra_heads:
        m1, m2, m3 = COMBINED_MARGINS
        heads.append(HeadConfig("combined", s=64.0, m1=m1, m2=m2, m3=m3))
    return [RunConfig(dataset, preset, head.kind, backbone, head, lr=1e-3, epochs=n_epochs,
                      kaiming_linear=True) for head in heads]


def _preset_head(config: RunConfig) -> HeadConfig | None:
    """The head a preset gives this run's data set and head (None: unknown).
    A run on other data (``adapt``) takes the head of the official data set
    whose network it adapted: CIFAR-10's for colour images, MNIST's otherwise."""
    if config.preset not in PRESETS:
        return None
    dataset = config.dataset
    if dataset not in DATASETS:
        colour = config.input_shape is not None and config.input_shape[0] == 3
        dataset = "cifar10" if colour else "mnist"
    extra = list(EXTRA_HEADS) if config.preset == "fair" else []
    for c in runs(dataset, config.preset, 1, extra):
        if c.head == config.head:
            return c.head_config
    return None


def _name_suffix(config: RunConfig) -> str:
    """What a run changes of its preset's head, for its name: the head settings
    that differ (s, m, h, t_alpha as -s32, -m0.3 ...; the ArcFace rule as
    -easy; the combined head always names its margins, -1-0.3-0.2) and the
    warm-ups (-swarm2, -mwarm5). Empty for a run as the preset makes it."""
    head, preset = config.head_config, _preset_head(config)
    parts = []
    if head.kind == "combined":
        parts.append("-".join(f"{v:g}" for v in (head.m1 if head.m1 is not None else 1.0,
                                                 head.m2 if head.m2 is not None else 0.5,
                                                 head.m3 if head.m3 is not None else 0.0)))
    for name in ("s", "m", "h", "t_alpha"):
        value = getattr(head, name)
        if value is not None and (preset is None or getattr(preset, name) != value):
            parts.append(f"{name.replace('_', '')}{value:g}")
    if head.rule not in (None, "fallback"):
        parts.append(head.rule)
    if config.softmax_warmup:
        parts.append(f"swarm{config.softmax_warmup}")
    if config.margin_warmup:
        parts.append(f"mwarm{config.margin_warmup}")
    return "".join(f"-{p}" for p in parts)


# the head settings with_overrides changes, and the heads that take each
_OVERRIDABLE = {"s": ("cosface", "arcface", "adaface", "combined"),
                "m": ("cosface", "arcface", "adaface"), "h": ("adaface",),
                "rule": ("arcface",), "m1": ("combined",), "m2": ("combined",),
                "m3": ("combined",)}


def with_overrides(configs: list, margin_warmup: int = 0, softmax_warmup: int = 0,
                   strict: bool = True, **head_settings) -> list[RunConfig]:
    """Copies of `configs` with head settings (s, m, h, rule, m1, m2, m3)
    changed on the heads that take them, and the warm-ups set on the heads
    with a margin (not softmax). A setting None is left as it is. Raises
    ValueError, naming the setting, for a value out of the head's range or a
    setting that none of the configs' heads takes (unless not `strict`). A
    value equal to the preset's leaves the run (and its name) as it is."""
    unknown = set(head_settings) - set(_OVERRIDABLE)
    if unknown:
        raise TypeError(f"with_overrides: unknown head settings {sorted(unknown)}; expected "
                        f"some of {tuple(_OVERRIDABLE)}")
    given = {k: v for k, v in head_settings.items() if v is not None}
    for name, value in (("margin_warmup", margin_warmup), ("softmax_warmup", softmax_warmup)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name}: expected a non-negative number of epochs, got {value!r}")
    heads = {c.head for c in configs}
    for name in given if strict else ():
        if not heads & set(_OVERRIDABLE[name]):
            raise ValueError(f"{name}: none of the heads {sorted(heads)} takes it (it is for "
                             f"{', '.join(_OVERRIDABLE[name])})")
    if strict and (margin_warmup or softmax_warmup) and heads <= {"softmax"}:
        raise ValueError("margin_warmup, softmax_warmup: softmax has no margin to warm up")
    out = []
    for config in configs:
        changes = {k: v for k, v in given.items() if config.head in _OVERRIDABLE[k]}
        if config.head == "arcface" and config.head_config.variant == "report" and \
                changes.get("rule") not in (None, "fallback"):
            raise ValueError(f"rule: only the paper ArcFace has margin rules; the "
                             f"{config.preset} preset's ArcFace is the report's")
        if changes.get("rule") == "fallback" and config.head_config.rule is None:
            del changes["rule"]        # the default: the run stays the preset's
        head = replace(config.head_config, **changes)   # checks the ranges
        new = RunConfig.from_dict({**config.to_dict(), "head_kwargs": head.kwargs()})
        if config.head != "softmax":
            new.margin_warmup, new.softmax_warmup = margin_warmup, softmax_warmup
        out.append(new)
    return out


def build_net(layers: list, input_shape: tuple | None = None,
              kaiming_linear: bool = False) -> nn.Sequential:
    """A Sequential from a list of LayerSpec (or tuples ("conv", in, out) ...)."""
    return nn.Sequential([LayerSpec.coerce(spec).build(kaiming_linear) for spec in layers],
                         input_shape=input_shape)


def build_head(config: RunConfig) -> nn._Head:
    """The head of a run, initialised from adaloss's generator."""
    return config.head_config.build(config.num_classes, config.embedding_dim)


def input_shape_of(config: RunConfig) -> tuple:
    """The (C, H, W) a run's network takes: its ``input_shape``, else its preset
    data set's."""
    if config.input_shape is not None:
        return tuple(config.input_shape)
    if config.dataset not in INPUT_SHAPES:
        raise ValueError(f"config: data set {config.dataset!r} has no known input shape; "
                         "set input_shape (presets.adapt does)")
    return INPUT_SHAPES[config.dataset]


def adapt(config: RunConfig, input_shape, num_classes: int, dataset: str | None = None
          ) -> RunConfig:
    """A copy of `config` for images of `input_shape` (C, H, W) and
    `num_classes` classes: the first convolution takes C channels and the first
    linear layer after the flatten the flattened size, computed from the layer
    list (3x3 convolutions keep the size, each 2x2 pool halves it, so H and W
    must be divisible by 2 ** pools). `dataset` renames the run's data set."""
    shape = tuple(int(v) for v in input_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"input_shape: expected (C, H, W) of positive sizes, got {input_shape!r}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes: expected an int >= 2, got {num_classes!r}")
    layers = [LayerSpec.coerce(layer) for layer in config.layers]
    pools = sum(layer.kind == "pool" for layer in layers)
    c, h, w = shape
    if h % 2 ** pools or w % 2 ** pools:
        raise ValueError(f"input_shape: the {config.preset} network for {config.head} has "
                         f"{pools} 2x2 max-pools, so image height and width must be divisible by "
                         f"{2 ** pools}; the data's images are {h}x{w} (resize or crop them, "
                         f"e.g. to {max(2 ** pools, h - h % 2 ** pools)}x"
                         f"{max(2 ** pools, w - w % 2 ** pools)})")
    out, cur, first_conv, first_linear = [], (c, h, w), True, True
    for layer in layers:
        if layer.kind == "conv":
            if first_conv:
                layer = LayerSpec("conv", cur[0], layer.out_features)
                first_conv = False
            cur = (layer.out_features, cur[1], cur[2])
        elif layer.kind == "pool":
            cur = (cur[0], cur[1] // 2, cur[2] // 2)
        elif layer.kind == "flatten":
            cur = (cur[0] * cur[1] * cur[2],)
        elif layer.kind == "linear":
            if first_linear:
                layer = LayerSpec("linear", cur[0], layer.out_features)
                first_linear = False
            cur = (layer.out_features,)
        out.append(layer)
    new = RunConfig.from_dict(config.to_dict())
    new.layers = out
    new.input_shape = shape
    new.num_classes = num_classes
    if dataset is not None:
        new.dataset = dataset
    return new


def build(config: RunConfig, seed: int = 0) -> nn.Trainer:
    """Network, head and Adam for a run, initialised from `seed`: runs that share
    a seed and a network start from the same weights."""
    nn.manual_seed(seed)
    net = build_net(config.layers, input_shape_of(config), config.kaiming_linear)
    head = build_head(config)
    params = net.parameters() + (head.parameters() if config.train_head else [])
    return nn.Trainer(net, head, nn.Adam(params, lr=config.lr))
