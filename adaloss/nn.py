"""Layers, loss heads, Adam and the one-call training step: thin handles on C objects.

Parameters live in C arenas; ``Parameter.data`` and ``Parameter.grad`` are NumPy
views of them (no copies), in PyTorch's layouts, so a model moves to and from
PyTorch with a plain dict of arrays.
"""
from __future__ import annotations

import math
import numbers
from typing import Iterable, Mapping, Sequence

import numpy as np

from . import _core

# kinds shared with csrc/adaloss.h, as the extension exports them
_CONV, _RELU, _POOL = _core.LAYER_CONV2D, _core.LAYER_RELU, _core.LAYER_MAXPOOL2D
_FLATTEN, _LINEAR, _L2NORM = _core.LAYER_FLATTEN, _core.LAYER_LINEAR, _core.LAYER_L2NORM
_HEAD_KINDS = {"Softmax": _core.HEAD_SOFTMAX, "CosFace": _core.HEAD_COSFACE,
               "ArcFace": _core.HEAD_ARCFACE, "AdaFace": _core.HEAD_ADAFACE,
               "CombinedMargin": _core.HEAD_COMBINED}
_VARIANTS = {"paper": _core.VARIANT_PAPER, "report": _core.VARIANT_REPORT}
_RULES = {"plain": _core.RULE_PLAIN, "report": _core.RULE_REPORT}
# ArcFace's margin rules near theta + m = pi (adaloss.h, ada_margin_rule)
_MARGIN_RULES = {"fallback": _core.MARGIN_FALLBACK, "easy": _core.MARGIN_EASY,
                 "clip": _core.MARGIN_CLIP, "straight-through": _core.MARGIN_STRAIGHT_THROUGH}

_rng = np.random.default_rng()


def manual_seed(seed: int) -> np.random.Generator:
    """Seed the generator that initialises new layers and heads (like torch.manual_seed)."""
    global _rng
    if not isinstance(seed, numbers.Integral) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed: expected a non-negative int, got {seed!r}")
    _rng = np.random.default_rng(int(seed))
    return _rng


def _check_int(name: str, value, low: int = 1, high: int = 1 << 24) -> int:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if not low <= value <= high:
        raise ValueError(f"{name}: expected {low}..{high}, got {value}")
    return int(value)


def _number(name: str, value) -> float:
    """A real number as a float: the type is Python's to check; its range is
    checked once, by the C core, whose message names the argument."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"{name}: expected a number, got {type(value).__name__}")
    return float(value)


def _check_float(name: str, value, low: float = -math.inf, high: float = math.inf,
                 low_open: bool = False) -> float:
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"{name}: expected a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value < low or value > high or (low_open and value == low):
        bound = f"({low}, {high}]" if low_open else f"[{low}, {high}]"
        raise ValueError(f"{name}: expected a finite number in {bound}, got {value}")
    return value


class Parameter:
    """A named parameter: ``data`` and ``grad`` are float32 views of C memory."""

    __slots__ = ("name", "data", "grad")

    def __init__(self, name: str, data: np.ndarray, grad: np.ndarray):
        self.name, self.data, self.grad = name, data, grad

    @property
    def shape(self) -> tuple:
        return self.data.shape

    def __repr__(self) -> str:
        return f"Parameter({self.name!r}, shape={self.data.shape})"


# ----------------------------------------------------------------- init

def kaiming_uniform_default(weight: np.ndarray, bias: np.ndarray | None, fan_in: int,
                            rng: np.random.Generator) -> None:
    """PyTorch's default Conv2d/Linear init: kaiming_uniform_(a=sqrt(5)), i.e.
    U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias alike."""
    bound = 1.0 / math.sqrt(fan_in)
    weight[...] = rng.uniform(-bound, bound, size=weight.shape)
    if bias is not None:
        bias[...] = rng.uniform(-bound, bound, size=bias.shape)


def kaiming_normal_(weight: np.ndarray, rng: np.random.Generator | None = None) -> None:
    """torch.nn.init.kaiming_normal_ with its defaults: N(0, 2 / fan_in)."""
    rng = rng or _rng
    fan_in = int(np.prod(weight.shape[1:]))
    weight[...] = rng.normal(0.0, math.sqrt(2.0 / fan_in), size=weight.shape)


def xavier_uniform_(weight: np.ndarray, rng: np.random.Generator | None = None) -> None:
    """torch.nn.init.xavier_uniform_: U(-a, a), a = sqrt(6 / (fan_in + fan_out))."""
    rng = rng or _rng
    fan_out, fan_in = weight.shape[0], int(np.prod(weight.shape[1:]))
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    weight[...] = rng.uniform(-bound, bound, size=weight.shape)


# ----------------------------------------------------------------- layers

class Layer:
    """A layer description. Its parameters are its own arrays until a
    Sequential adopts it; from then on they are views of the network's arena."""

    kind: int = -1

    def __init__(self) -> None:
        self.params: dict[str, np.ndarray] = {}
        self.grads: dict[str, np.ndarray] = {}

    def spec(self) -> tuple:
        return (self.kind, 0, 0, 0, 0)

    def out_shape(self, shape: tuple) -> tuple:
        return shape

    def __getattr__(self, name: str):
        params = self.__dict__.get("params", {})
        if name in params:
            return params[name]
        raise AttributeError(f"{type(self).__name__!s} has no attribute {name!r}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Conv2d(Layer):
    """2-D convolution, stride 1, zero padding; weight (out, in, k, k) as in PyTorch."""

    kind = _CONV

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3,
                 padding: int = 0, rng: np.random.Generator | None = None):
        super().__init__()
        self.in_channels = _check_int("in_channels", in_channels)
        self.out_channels = _check_int("out_channels", out_channels)
        self.kernel_size = _check_int("kernel_size", kernel_size, 1, 63)
        if self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size: expected an odd size, got {kernel_size}")
        self.padding = _check_int("padding", padding, 0, 63)
        k = self.kernel_size
        self.params = {"weight": np.empty((out_channels, in_channels, k, k), np.float32),
                       "bias": np.empty(out_channels, np.float32)}
        kaiming_uniform_default(self.params["weight"], self.params["bias"],
                                in_channels * k * k, rng or _rng)

    def spec(self) -> tuple:
        return (_CONV, self.in_channels, self.out_channels, self.kernel_size, self.padding)

    def out_shape(self, shape: tuple) -> tuple:
        c, h, w = shape
        grow = 2 * self.padding - self.kernel_size + 1
        return (self.out_channels, h + grow, w + grow)

    def __repr__(self) -> str:
        return (f"Conv2d({self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"padding={self.padding})")


class Linear(Layer):
    """Fully connected layer, y = x W^T + b; weight (out, in) as in PyTorch."""

    kind = _LINEAR

    def __init__(self, in_features: int, out_features: int,
                 rng: np.random.Generator | None = None):
        super().__init__()
        self.in_features = _check_int("in_features", in_features, 1, 1 << 28)
        self.out_features = _check_int("out_features", out_features, 1, 1 << 24)
        if in_features * out_features > (1 << 30):
            raise ValueError(f"in_features * out_features: expected at most 2**30, got "
                             f"{in_features * out_features}")
        self.params = {"weight": np.empty((out_features, in_features), np.float32),
                       "bias": np.empty(out_features, np.float32)}
        kaiming_uniform_default(self.params["weight"], self.params["bias"], in_features,
                                rng or _rng)

    def spec(self) -> tuple:
        return (_LINEAR, self.in_features, self.out_features, 0, 0)

    def out_shape(self, shape: tuple) -> tuple:
        return (self.out_features,)

    def __repr__(self) -> str:
        return f"Linear({self.in_features}, {self.out_features})"


class ReLU(Layer):
    kind = _RELU


class MaxPool2d(Layer):
    """2x2 max pooling, stride 2 (the only size the report uses)."""

    kind = _POOL

    def __init__(self, kernel_size: int = 2):
        super().__init__()
        if kernel_size != 2:
            raise ValueError(f"kernel_size: only 2 is supported, got {kernel_size!r}")
        self.kernel_size = 2

    def out_shape(self, shape: tuple) -> tuple:
        c, h, w = shape
        return (c, h // 2, w // 2)

    def __repr__(self) -> str:
        return "MaxPool2d(2)"


class Flatten(Layer):
    kind = _FLATTEN

    def out_shape(self, shape: tuple) -> tuple:
        return (int(np.prod(shape)),)


class L2Normalize(Layer):
    """Row-wise x / max(||x||, 1e-12), as torch.nn.functional.normalize."""

    kind = _L2NORM


def _infer_input_shape(layers: Sequence[Layer]) -> tuple:
    """The input shape, from the first layer and the first Linear after a Flatten
    (square images assumed)."""
    first = layers[0]
    if isinstance(first, Linear):
        return (first.in_features,)
    if isinstance(first, Conv2d):
        for size in range(1, 2049):
            shape: tuple = (first.in_channels, size, size)
            try:
                for layer in layers:
                    if isinstance(layer, Linear) and len(shape) == 1:
                        if layer.in_features != shape[0]:
                            raise ValueError
                        return (first.in_channels, size, size)
                    if len(shape) == 3 and min(shape[1:]) < 1:
                        raise ValueError
                    shape = layer.out_shape(shape)
            except ValueError:
                continue
    raise ValueError("input_shape: cannot infer the input shape from the layers; pass "
                     "input_shape=(channels, height, width)")


class Sequential:
    """A sequential network whose memory the C core plans once.

    ``input_shape`` is (C, H, W) for images or (D,) for vectors; if omitted it is
    inferred from the first Linear after a Flatten (square images).
    """

    def __init__(self, layers: Iterable[Layer], input_shape: Sequence[int] | None = None):
        layers = list(layers)
        if not layers:
            raise ValueError("layers: expected at least one layer, got none")
        for i, layer in enumerate(layers):
            if not isinstance(layer, Layer):
                raise TypeError(f"layers[{i}]: expected an adaloss layer, got "
                                f"{type(layer).__name__}")
            if getattr(layer, "_owner", None) is not None:
                raise ValueError(f"layers[{i}]: this {type(layer).__name__} already belongs to "
                                 "another Sequential")
        if input_shape is None:
            input_shape = _infer_input_shape(layers)
        input_shape = tuple(int(v) for v in input_shape)
        if len(input_shape) not in (1, 3) or min(input_shape) < 1:
            raise ValueError(f"input_shape: expected (C, H, W) or (D,) of positive sizes, got "
                             f"{input_shape}")
        self.input_shape = input_shape
        self.layers = layers
        self._flat = len(input_shape) == 1
        c_shape = (input_shape[0], 0, 0) if self._flat else input_shape
        self._handle = _core.net_create([layer.spec() for layer in layers], c_shape)
        self._info = _core.net_info(self._handle)
        params, grads = _core.net_arrays(self._handle)
        self._param_arena, self._grad_arena = params, grads
        self._parameters: list[Parameter] = []
        for i, (layer, info) in enumerate(zip(layers, self._info)):
            if not info["weight_size"]:
                continue
            old = layer.params
            views, gviews = {}, {}
            for name, off, size in (("weight", info["weight_offset"], info["weight_size"]),
                                    ("bias", info["bias_offset"], info["bias_size"])):
                views[name] = params[off:off + size].reshape(old[name].shape)
                gviews[name] = grads[off:off + size].reshape(old[name].shape)
                views[name][...] = old[name]
                self._parameters.append(Parameter(f"{i}.{name}", views[name], gviews[name]))
            layer.params, layer.grads = views, gviews
            layer._owner = self
        last = self._info[-1]["out_shape"]
        self.output_dim = int(np.prod(last))

    # ---- the contract
    def forward(self, x: np.ndarray) -> np.ndarray:
        """Embeddings (N, D) of a batch: uint8 images are scaled as (x/255 - 0.5)/0.5."""
        return _core.net_forward(self._handle, x, self._flat)

    __call__ = forward

    def backward(self, d_emb: np.ndarray) -> np.ndarray:
        """Input gradient of the last forward's batch; accumulates parameter gradients."""
        return _core.net_backward(self._handle, d_emb, self._flat)

    def parameters(self) -> list[Parameter]:
        return list(self._parameters)

    def zero_grad(self) -> None:
        self._grad_arena.fill(0.0)

    def state_dict(self) -> dict[str, np.ndarray]:
        return {p.name: p.data.copy() for p in self._parameters}

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        """Copy weights in; keys and shapes must match exactly (torch.nn.Sequential names)."""
        if not isinstance(state, Mapping):
            raise TypeError(f"state: expected a dict of arrays, got {type(state).__name__}")
        expected = {p.name: p for p in self._parameters}
        missing, unexpected = set(expected) - set(state), set(state) - set(expected)
        if missing or unexpected:
            raise ValueError(f"state: keys do not match the network (missing {sorted(missing)}, "
                             f"unexpected {sorted(unexpected)})")
        arrays = {}
        for name, p in expected.items():
            value = state[name]
            if hasattr(value, "detach"):  # a torch tensor
                value = value.detach().cpu().numpy()
            arr = np.asarray(value)
            if arr.shape != p.data.shape:
                raise ValueError(f"state[{name!r}]: expected shape {p.data.shape}, got {arr.shape}")
            arrays[name] = _check_float32_array(f"state[{name!r}]", arr)
        for name, arr in arrays.items():  # all checked first: never half-loaded
            np.copyto(expected[name].data, arr, casting="same_kind")

    def num_parameters(self) -> int:
        return sum(p.data.size for p in self._parameters)

    def __repr__(self) -> str:
        inner = ",\n  ".join(repr(layer) for layer in self.layers)
        return f"Sequential(\n  {inner}\n)"


# ----------------------------------------------------------------- heads

class _Head:
    """Common handle of the loss heads. ``weight`` (num_classes, embedding_dim) is
    a writable view of the C head's class weights."""

    _kind = "Softmax"
    _has_quality = False        # AdaFace: a per-example quality q and running statistics
    _has_target_angle = True    # the C head reports theta_y (not Softmax: no normalisation)

    def __init__(self, num_classes: int, embedding_dim: int, s: float = 1.0, m: float = 0.0,
                 h: float = 0.333, t_alpha: float = 0.01, variant: str = "paper",
                 rng: np.random.Generator | None = None):
        self.num_classes = _check_int("num_classes", num_classes)
        self.embedding_dim = _check_int("embedding_dim", embedding_dim)
        if not isinstance(variant, str) or variant not in _VARIANTS:
            raise ValueError(f"variant: expected 'paper' or 'report', got {variant!r}")
        # ranges are checked by the C core (ada_head_create) below
        self.s, self.m = _number("s", s), _number("m", m)
        self.h, self.t_alpha = _number("h", h), _number("t_alpha", t_alpha)
        self.variant = variant
        self.training = True
        self._handle = _core.head_create(_HEAD_KINDS[self._kind], _VARIANTS[variant],
                                         self.num_classes, self.embedding_dim, self.s, self.m,
                                         self.h, self.t_alpha)
        w, g = _core.head_arrays(self._handle)
        self._weight = w.reshape(self.num_classes, self.embedding_dim)
        self.weight_grad = g.reshape(self.num_classes, self.embedding_dim)
        xavier_uniform_(self._weight, rng or _rng)
        self._param = Parameter("weight", self._weight, self.weight_grad)

    @property
    def kind(self) -> str:
        """The head's name: "Softmax", "CosFace", "ArcFace" or "AdaFace"."""
        return self._kind

    @property
    def has_quality(self) -> bool:
        """True when ``last_batch()["quality"]`` is AdaFace's quality q and the
        head keeps running statistics (``running_mean``, ``running_std``)."""
        return self._has_quality

    @property
    def has_target_angle(self) -> bool:
        """True when ``last_batch()["target_angle"]`` is the angle theta_y between
        embedding and class weight (Softmax's logits hold no angle)."""
        return self._has_target_angle

    @property
    def weight(self) -> np.ndarray:
        return self._weight

    @weight.setter
    def weight(self, value) -> None:
        arr = np.asarray(value)
        if arr.shape != self._weight.shape:
            raise ValueError(f"weight: expected shape {self._weight.shape}, got {arr.shape}")
        if not np.issubdtype(arr.dtype, np.floating):
            raise ValueError("weight: expected a finite float array")
        arr = _check_float32_array("weight", arr)
        np.copyto(self._weight, arr, casting="same_kind")

    def parameters(self) -> list[Parameter]:
        return [self._param]

    def zero_grad(self) -> None:
        self.weight_grad.fill(0.0)

    def train(self, mode: bool = True) -> "_Head":
        self.training = bool(mode)
        return self

    def eval(self) -> "_Head":
        return self.train(False)

    def forward(self, emb: np.ndarray, labels: np.ndarray) -> float:
        """Mean cross-entropy of the margin logits over the batch."""
        return _core.head_forward(self._handle, emb, labels, self.training)

    __call__ = forward

    def backward(self, accumulate_weight_grad: bool = True) -> np.ndarray:
        """Gradient w.r.t. the last forward's embedding; adds into weight_grad."""
        return _core.head_backward(self._handle, accumulate_weight_grad)

    def logits(self, emb: np.ndarray, labels: np.ndarray | None = None,
               rule: str = "plain") -> np.ndarray:
        """Scores (N, num_classes) used for prediction. rule='plain' is margin-free;
        rule='report' is the report's own evaluation (variant='report' only)."""
        if rule not in _RULES:
            raise ValueError(f"rule: expected 'plain' or 'report', got {rule!r}")
        return _core.head_logits(self._handle, emb, labels, _RULES[rule])

    def predict(self, emb: np.ndarray, labels: np.ndarray | None = None,
                rule: str = "plain") -> np.ndarray:
        return np.argmax(self.logits(emb, labels, rule), axis=1).astype(np.int64)

    def set_m(self, m: float) -> None:
        """Change the margin m (CosFace, ArcFace, AdaFace; in [0, pi]) from the
        next forward on, e.g. for a margin warm-up. Softmax has no margin and
        CombinedMargin takes ``set_margins(m1, m2, m3)``."""
        m = _check_float("m", m, 0.0, math.pi)
        _core.head_set_m(self._handle, m)
        self.m = m

    def last_batch(self) -> dict:
        """The last forward's target angle theta_y (radians) and, for AdaFace, q."""
        state = _core.head_state(self._handle)
        return {"target_angle": state["target_angle"], "quality": state["quality"]}

    def __repr__(self) -> str:
        return (f"{self._kind}(num_classes={self.num_classes}, embedding_dim={self.embedding_dim}, "
                f"s={self.s}, m={self.m}, variant={self.variant!r})")


class Softmax(_Head):
    """Plain linear classifier (no bias) with cross-entropy: the no-margin baseline."""

    _kind = "Softmax"
    _has_target_angle = False

    def __init__(self, num_classes: int, embedding_dim: int,
                 rng: np.random.Generator | None = None):
        super().__init__(num_classes, embedding_dim, s=1.0, m=0.0, rng=rng)

    def set_m(self, m: float) -> None:
        raise TypeError("Softmax has no margin to set")

    def __repr__(self) -> str:
        return f"Softmax(num_classes={self.num_classes}, embedding_dim={self.embedding_dim})"


class CosFace(_Head):
    """CosFace (Wang et al. 2018): s (cos theta_y - m)."""

    _kind = "CosFace"

    def __init__(self, num_classes: int, embedding_dim: int, s: float = 64.0, m: float = 0.4,
                 rng: np.random.Generator | None = None):
        super().__init__(num_classes, embedding_dim, s=s, m=m, rng=rng)


class ArcFace(_Head):
    """ArcFace (Deng et al. 2019): s cos(theta_y + m). variant='report' is the
    report's unnormalised s (clamp(e . w, -1, 1) - m).

    ``rule`` (paper variant only) says what the target becomes where theta + m
    nears or passes pi:

    - ``"fallback"`` (default, insightface's original): cos(theta + m) where
      cos theta > cos(pi - m), else cos theta - m sin m;
    - ``"easy"`` (insightface's easy_margin): cos(theta + m) where cos theta > 0,
      else cos theta;
    - ``"clip"`` (as the AdaFace code clips its angle): cos(clip(theta + m, eps,
      pi - eps)) with eps = 1e-3, no gradient where it clips;
    - ``"straight-through"`` (insightface's arcface_torch): the value
      cos(theta + m), the gradient of cos theta (the margin has no gradient).
    """

    _kind = "ArcFace"

    def __init__(self, num_classes: int, embedding_dim: int, s: float = 64.0, m: float = 0.5,
                 variant: str = "paper", rng: np.random.Generator | None = None,
                 rule: str = "fallback"):
        if not isinstance(rule, str) or rule not in _MARGIN_RULES:
            raise ValueError(f"rule: expected one of {', '.join(map(repr, _MARGIN_RULES))}, "
                             f"got {rule!r}")
        super().__init__(num_classes, embedding_dim, s=s, m=m, variant=variant, rng=rng)
        _core.head_set_margin(self._handle, _MARGIN_RULES[rule], 1.0, 0.0, 0.0)
        self._rule = rule

    @property
    def rule(self) -> str:
        """The margin rule, fixed at construction."""
        return self._rule

    def __repr__(self) -> str:
        return (f"ArcFace(num_classes={self.num_classes}, embedding_dim={self.embedding_dim}, "
                f"s={self.s}, m={self.m}, variant={self.variant!r}, rule={self.rule!r})")


class CombinedMargin(_Head):
    """insightface's combined margin: target logit s (cos(m1 theta_y + m2) - m3),
    other logits s cos theta_j. (1, m, 0) is ArcFace, (1, 0, m) CosFace,
    (m1 > 1, 0, 0) SphereFace-like; mixes such as (1, 0.3, 0.2) are allowed.

    Where m1 theta + m2 passes pi the target continues as SphereFace's psi,
    (-1)^k cos(m1 theta + m2) - 2k - m3 with k = floor((m1 theta + m2) / pi), so it
    keeps decreasing with theta (insightface's code lets the cosine rise again).
    Ranges (checked by the C core): m1 in (0, 10], m2 and m3 in [0, pi].
    """

    _kind = "CombinedMargin"

    def __init__(self, num_classes: int, embedding_dim: int, s: float = 64.0, m1: float = 1.0,
                 m2: float = 0.5, m3: float = 0.0, rng: np.random.Generator | None = None):
        for name, value in (("m1", m1), ("m2", m2), ("m3", m3)):
            if not isinstance(value, numbers.Real) or isinstance(value, bool):
                raise TypeError(f"{name}: expected a number, got {type(value).__name__}")
        super().__init__(num_classes, embedding_dim, s=s, m=0.0, rng=rng)
        _core.head_set_margin(self._handle, _core.MARGIN_FALLBACK, m1, m2, m3)
        self._margins = (float(m1), float(m2), float(m3))

    # the margins are fixed at construction
    m1 = property(lambda self: self._margins[0], doc="multiplicative angular margin")
    m2 = property(lambda self: self._margins[1], doc="additive angular margin")
    m3 = property(lambda self: self._margins[2], doc="additive cosine margin")

    def set_margins(self, m1: float, m2: float, m3: float) -> None:
        """Change (m1, m2, m3) from the next forward on, e.g. for a margin
        warm-up; the C core checks the ranges and changes nothing on error."""
        for name, value in (("m1", m1), ("m2", m2), ("m3", m3)):
            if not isinstance(value, numbers.Real) or isinstance(value, bool):
                raise TypeError(f"{name}: expected a number, got {type(value).__name__}")
        _core.head_set_margin(self._handle, _core.MARGIN_FALLBACK, m1, m2, m3)
        self._margins = (float(m1), float(m2), float(m3))

    def set_m(self, m: float) -> None:
        raise TypeError("CombinedMargin has three margins: use set_margins(m1, m2, m3)")

    def __repr__(self) -> str:
        return (f"CombinedMargin(num_classes={self.num_classes}, "
                f"embedding_dim={self.embedding_dim}, s={self.s}, m1={self.m1}, m2={self.m2}, "
                f"m3={self.m3})")


class AdaFace(_Head):
    """AdaFace (Kim et al. 2022): a margin that adapts to the feature norm.
    variant='report' is the report's head, whose quality q is rounding noise."""

    _kind = "AdaFace"
    _has_quality = True

    def __init__(self, num_classes: int, embedding_dim: int, s: float = 64.0, m: float = 0.4,
                 h: float = 0.333, t_alpha: float = 0.01, variant: str = "paper",
                 rng: np.random.Generator | None = None):
        super().__init__(num_classes, embedding_dim, s=s, m=m, h=h, t_alpha=t_alpha,
                         variant=variant, rng=rng)

    @property
    def running_mean(self) -> float:
        return _core.head_state(self._handle)["running_mean"]

    @property
    def running_std(self) -> float:
        return _core.head_state(self._handle)["running_std"]

    def set_running_stats(self, mean: float, std: float) -> None:
        _core.head_set_stats(self._handle, *_check_running_stats(mean, std))


# ----------------------------------------------------------------- Adam

class Adam:
    """torch.optim.Adam semantics: bias correction, L2 weight_decay added to the gradient."""

    def __init__(self, params: Iterable[Parameter], lr: float = 1e-3,
                 betas: tuple = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0):
        params = list(params)
        for i, p in enumerate(params):
            if not isinstance(p, Parameter):
                raise TypeError(f"params[{i}]: expected an adaloss Parameter, got "
                                f"{type(p).__name__}")
        if len({id(p.data) for p in params}) != len(params):
            raise ValueError("params: a parameter appears twice")
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"betas: expected a pair (beta1, beta2), got {betas!r}")
        self.params = params
        # ranges are checked by the C core (ada_adam_create) below
        lr, b1, b2 = _number("lr", lr), _number("betas[0]", betas[0]), _number("betas[1]", betas[1])
        eps, weight_decay = _number("eps", eps), _number("weight_decay", weight_decay)
        self._handle = _core.adam_create([(p.data.reshape(-1), p.grad.reshape(-1)) for p in params],
                                         lr, b1, b2, eps, weight_decay)
        self.betas, self.eps, self.weight_decay = (b1, b2), eps, weight_decay

    def step(self) -> None:
        _core.adam_step(self._handle)

    def zero_grad(self) -> None:
        _core.adam_zero_grad(self._handle)

    @property
    def lr(self) -> float:
        return _core.adam_state(self._handle)["lr"]

    @lr.setter
    def lr(self, value: float) -> None:
        _core.adam_set(self._handle, self.step_count, _number("lr", value))

    @property
    def step_count(self) -> int:
        return _core.adam_state(self._handle)["step"]

    def state_dict(self) -> dict:
        st = _core.adam_state(self._handle)
        return {"step": st["step"], "lr": st["lr"], "exp_avg": st["exp_avg"].copy(),
                "exp_avg_sq": st["exp_avg_sq"].copy()}

    def load_state_dict(self, state: Mapping) -> None:
        st = _core.adam_state(self._handle)
        state = _check_adam_state(state, st["exp_avg"].size)   # all checked before any copy
        st["exp_avg"][...] = state["exp_avg"]
        st["exp_avg_sq"][...] = state["exp_avg_sq"]
        _core.adam_set(self._handle, state["step"], state["lr"])


# ----------------------------------------------------------------- Trainer

class Trainer:
    """The whole training step (input conversion, forward, loss, backward, Adam)
    in one C call that releases the GIL."""

    def __init__(self, net: Sequential, head: _Head, optimizer: Adam):
        if not isinstance(net, Sequential):
            raise TypeError(f"net: expected an adaloss.Sequential, got {type(net).__name__}")
        if not isinstance(head, _Head):
            raise TypeError(f"head: expected an adaloss head, got {type(head).__name__}")
        if not isinstance(optimizer, Adam):
            raise TypeError(f"optimizer: expected an adaloss.Adam, got {type(optimizer).__name__}")
        if net.output_dim != head.embedding_dim:
            raise ValueError(f"head: embedding_dim {head.embedding_dim} differs from the "
                             f"network's output size {net.output_dim}")
        def where(params) -> set:
            return {(p.data.ctypes.data, p.data.size) for p in params}

        held, own, head_own = (where(optimizer.params), where(net.parameters()),
                               where(head.parameters()))
        if held not in (own, own | head_own):
            foreign = len(held - own - head_own)
            missing = len(own - held)
            raise ValueError(
                "optimizer: expected the network's parameters (and optionally the head's), got "
                + ", ".join(part for part in (
                    f"{foreign} parameter(s) of another network or head" if foreign else "",
                    f"{missing} of the network's {len(own)} parameter(s) missing" if missing
                    else "") if part)
                + "; build it as Adam(net.parameters() + head.parameters())")
        self._net, self._head, self._optimizer = net, head, optimizer
        # the report's presets keep the class weights out of the optimizer
        self.head_trained = bool(head_own & held)

    def _read_only(name: str):
        def get(self):
            return getattr(self, f"_{name}")

        def set_(self, value):
            raise AttributeError(f"Trainer.{name} is read-only: the trainer's step is bound to "
                                 "its network, head and optimizer; build a new "
                                 "Trainer(net, head, optimizer) instead")

        return property(get, set_, doc=f"The trainer's {name} (read-only).")

    net = _read_only("net")
    head = _read_only("head")
    optimizer = _read_only("optimizer")
    del _read_only

    def step(self, x: np.ndarray, labels: np.ndarray) -> float:
        """One step on a batch (uint8 images or float32); returns the mean loss."""
        return _core.train_step(self.net._handle, self.head._handle, self.optimizer._handle,
                                x, labels, self.net._flat, self.head_trained)

    def embed(self, x: np.ndarray, batch_size: int = 1024) -> np.ndarray:
        """Embeddings of any number of examples, in batches."""
        return _embed(self.net, x, batch_size)


def _embed(net: Sequential, x: np.ndarray, batch_size: int) -> np.ndarray:
    """The network's embeddings of any number of examples, `batch_size` at a time."""
    if len(x) == 0:
        return np.zeros((0, net.output_dim), np.float32)
    return np.concatenate([net.forward(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])


# ----------------------------------------------------------------- saved state
# Checks for values that come from a file (checkpoint.load, load_state_dict):
# the same validators the constructors use, plus what float32 C memory can hold.

_FLOAT32_MAX = float(np.finfo(np.float32).max)
_MAX_STEP = 1 << 53   # Adam's step count: a C int64, and exact in JSON


def _check_float32_array(name: str, value) -> np.ndarray:
    """A finite float array whose values fit float32: a float64 1e39 would be
    stored as inf."""
    arr = np.asarray(value)
    if not np.issubdtype(arr.dtype, np.floating):
        raise TypeError(f"{name}: expected a float array, got dtype {arr.dtype}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or inf")
    if arr.size and arr.dtype.itemsize > 4:   # float32 and float16 always fit
        largest = max(float(arr.max()), -float(arr.min()))
        if largest > _FLOAT32_MAX:
            raise ValueError(f"{name}: values up to {largest:.3g} in magnitude overflow float32 "
                             f"(largest {_FLOAT32_MAX:.3g})")
    return arr


def _check_running_stats(mean, std) -> tuple[float, float]:
    """AdaFace's running mean and std of the feature norm, as float32 can hold them."""
    return (_check_float("running_mean", mean, -_FLOAT32_MAX, _FLOAT32_MAX),
            _check_float("running_std", std, 0.0, _FLOAT32_MAX))


def _check_adam_state(state: Mapping, size: int) -> dict:
    """A saved Adam state {step, lr, exp_avg, exp_avg_sq} for `size` parameters:
    lr as Adam() checks it, step a non-negative int, the moments finite float32
    of that size and exp_avg_sq (a mean of squares) non-negative."""
    step = _check_int("step", state["step"], 0, _MAX_STEP)
    lr = Adam([], lr=state["lr"]).lr   # the constructor's own check of lr
    moments = {}
    for key in ("exp_avg", "exp_avg_sq"):
        arr = _check_float32_array(key, state[key])
        if arr.shape != (size,):
            raise ValueError(f"{key}: expected shape ({size},), got {arr.shape}")
        moments[key] = arr
    if np.any(moments["exp_avg_sq"] < 0):
        raise ValueError("exp_avg_sq: expected values >= 0 (a running mean of squared "
                         "gradients), found negative ones")
    return {"step": step, "lr": lr, **moments}


# ----------------------------------------------------------------- pickling
# A handle holds C memory (a PyCapsule), which pickle cannot copy. As torch
# modules do, handles pickle as what rebuilds them: layer specs and settings,
# then the state (weights, gradients, Adam moments, running statistics).

def _layer_from_spec(spec: Sequence[int]) -> Layer:
    kind, a, b, c, d = spec
    rng = np.random.default_rng(0)   # the weights are overwritten; the global generator is untouched
    if kind == _CONV:
        return Conv2d(a, b, kernel_size=c, padding=d, rng=rng)
    if kind == _LINEAR:
        return Linear(a, b, rng=rng)
    return {_RELU: ReLU, _POOL: MaxPool2d, _FLATTEN: Flatten, _L2NORM: L2Normalize}[kind]()


def _rebuild_sequential(specs: list, input_shape: tuple, state: dict,
                        grads: np.ndarray) -> Sequential:
    net = Sequential([_layer_from_spec(spec) for spec in specs], input_shape)
    net.load_state_dict(state)
    net._grad_arena[...] = grads
    return net


def _reduce_sequential(net: Sequential):
    return (_rebuild_sequential, ([layer.spec() for layer in net.layers], net.input_shape,
                                  net.state_dict(), net._grad_arena.copy()))


def _rebuild_head(cls: type, config: dict, weight: np.ndarray, weight_grad: np.ndarray,
                  training: bool, stats: tuple | None, margin: tuple | None = None) -> _Head:
    head = cls.__new__(cls)
    _Head.__init__(head, **config, rng=np.random.default_rng(0))
    if margin is not None:   # (rule, m1, m2, m3): ArcFace's rule, CombinedMargin's margins
        rule, m1, m2, m3 = margin
        _core.head_set_margin(head._handle, _MARGIN_RULES[rule], m1, m2, m3)
        if isinstance(head, ArcFace):
            head._rule = rule
        else:
            head._margins = (m1, m2, m3)
    head.weight = weight
    head.weight_grad[...] = weight_grad
    head.training = training
    if stats is not None:
        head.set_running_stats(*stats)
    return head


def _reduce_head(head: _Head):
    config = {"num_classes": head.num_classes, "embedding_dim": head.embedding_dim, "s": head.s,
              "m": head.m, "h": head.h, "t_alpha": head.t_alpha, "variant": head.variant}
    stats = (head.running_mean, head.running_std) if isinstance(head, AdaFace) else None
    margin = None
    if isinstance(head, ArcFace):
        margin = (head.rule, 1.0, 0.0, 0.0)
    elif isinstance(head, CombinedMargin):
        margin = ("fallback", head.m1, head.m2, head.m3)
    return (_rebuild_head, (type(head), config, head.weight.copy(), head.weight_grad.copy(),
                            head.training, stats, margin))


def _reduce_adam(optimizer: Adam):
    raise TypeError("Adam cannot be pickled or copied on its own: its parameters are views of a "
                    "network's and head's memory. Pickle or copy.deepcopy the Trainer (network, "
                    "head and optimizer together), or save with adaloss.checkpoint.save(path, "
                    "net, head, optimizer) or Adam.state_dict()")


def _rebuild_trainer(net: Sequential, head: _Head, index: list, hyper: dict,
                     state: dict) -> Trainer:
    owned = net.parameters() + head.parameters()
    optimizer = Adam([owned[i] for i in index], **hyper)
    optimizer.load_state_dict(state)
    return Trainer(net, head, optimizer)


def _reduce_trainer(trainer: Trainer):
    owned = trainer.net.parameters() + trainer.head.parameters()
    index = []
    for p in trainer.optimizer.params:
        found = [i for i, q in enumerate(owned) if q is p]
        if not found:
            raise TypeError(f"Trainer: optimizer parameter {p.name!r} belongs to neither the "
                            "network nor the head, so a copy could not share it; save with "
                            "adaloss.checkpoint.save instead")
        index.append(found[0])
    opt = trainer.optimizer
    hyper = {"lr": opt.lr, "betas": opt.betas, "eps": opt.eps, "weight_decay": opt.weight_decay}
    return (_rebuild_trainer, (trainer.net, trainer.head, index, hyper, opt.state_dict()))


Sequential.__reduce__ = _reduce_sequential
_Head.__reduce__ = _reduce_head
Adam.__reduce__ = _reduce_adam
Trainer.__reduce__ = _reduce_trainer
