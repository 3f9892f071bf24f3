"""Independent references for the tests: float64 NumPy forwards (for finite
differences) and PyTorch re-implementations of every head and of the report's
four networks. Nothing here imports adaloss's internals."""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np

# ------------------------------------------------------------ NumPy float64


def rel_err(actual, expected) -> float:
    """max |actual - expected| / max |expected| (0 when both are zero)."""
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    scale = np.max(np.abs(expected)) if expected.size else 0.0
    diff = np.max(np.abs(actual - expected)) if expected.size else 0.0
    return float(diff / scale) if scale > 0 else float(diff)


def normalize(x):
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def np_head_loss(kind, variant, emb, weight, labels, s, m, h=0.333, eps=1e-3, quality=None,
                 running=(20.0, 100.0)):
    """Mean cross-entropy of a head in float64. `quality` fixes AdaFace's q (it
    carries no gradient); for the paper variant `running` are the statistics
    after this batch's update."""
    n = len(labels)
    rows = np.arange(n)
    if kind == "softmax":
        logits = emb @ weight.T
    elif kind == "arcface" and variant == "report":
        c = np.clip(emb @ weight.T, -1, 1)
        logits = c.copy()
        logits[rows, labels] -= m
        logits *= s
    else:
        c = normalize(emb) @ normalize(weight).T
        logits = c.copy()
        t = c[rows, labels]
        if kind == "cosface":
            logits[rows, labels] = t - m
        elif kind == "arcface":
            c = np.clip(c, -1, 1)
            logits = c.copy()
            t = c[rows, labels]
            sine = np.sqrt(np.maximum(1 - t * t, 1e-12))
            phi = t * math.cos(m) - sine * math.sin(m)
            logits[rows, labels] = np.where(t > math.cos(math.pi - m), phi, t - m * math.sin(m))
        elif kind == "adaface":
            lim = 0.9999 if variant == "report" else 1 - eps
            c = np.clip(c, -lim, lim)
            logits = c.copy()
            q = quality
            if q is None:
                norms = np.clip(np.linalg.norm(emb, axis=1), 0.001, 100)
                mean, std = running
                q = np.clip((norms - mean) / (std + eps) * h, -1, 1)
            theta = np.arccos(c[rows, labels])
            g = theta - m * q
            if variant == "paper":
                g = np.clip(g, eps, math.pi - eps)
            logits[rows, labels] = np.cos(g) - (m + m * q)
        logits = logits * s
    logits = logits - logits.max(axis=1, keepdims=True)
    lse = np.log(np.exp(logits).sum(axis=1))
    return float(np.mean(lse - logits[rows, labels]))


def finite_difference(f, x, h=1e-6):
    """Central differences of the scalar f at x (float64), every coordinate."""
    x = np.array(x, np.float64)
    grad = np.zeros_like(x)
    flat, gflat = x.reshape(-1), grad.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + h
        up = f(x)
        flat[i] = old - h
        down = f(x)
        flat[i] = old
        gflat[i] = (up - down) / (2 * h)
    return grad


def np_conv2d(x, w, b, pad):
    n, c, hh, ww = x.shape
    oc, _, k, _ = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    oh, ow = hh + 2 * pad - k + 1, ww + 2 * pad - k + 1
    out = np.zeros((n, oc, oh, ow))
    for ki in range(k):
        for kj in range(k):
            patch = xp[:, :, ki:ki + oh, kj:kj + ow]  # (n, c, oh, ow)
            out += np.einsum("nchw,oc->nohw", patch, w[:, :, ki, kj])
    return out + b[None, :, None, None]


def np_maxpool(x):
    n, c, h, w = x.shape
    x = x[:, :, :h // 2 * 2, :w // 2 * 2]
    return x.reshape(n, c, h // 2, 2, w // 2, 2).max(axis=(3, 5))


# ------------------------------------------------------------ PyTorch


def torch_head_loss(torch, kind, variant, emb, weight, labels, s, m, h=0.333, t_alpha=0.01,
                    eps=1e-3, quality=None, state=None):
    """The head's loss in PyTorch on tensors emb and weight (requires_grad as the
    caller wants). `state` is a dict with AdaFace paper's batch_mean/batch_std
    buffers, updated in place as the official head does."""
    F = torch.nn.functional
    n = emb.shape[0]
    one_hot = F.one_hot(labels, weight.shape[0]).to(emb.dtype)
    if kind == "softmax":
        logits = emb @ weight.T
    elif kind == "arcface" and variant == "report":
        logits = s * (torch.clamp(emb @ weight.T, -1, 1) - m * one_hot)
    elif kind == "cosface":
        cos = F.normalize(emb) @ F.normalize(weight).T
        logits = s * (cos - m * one_hot)
    elif kind == "arcface":
        cos = torch.clamp(F.normalize(emb) @ F.normalize(weight).T, -1, 1)
        sine = torch.sqrt(torch.clamp(1 - cos * cos, min=1e-12))
        phi = cos * math.cos(m) - sine * math.sin(m)
        phi = torch.where(cos > math.cos(math.pi - m), phi, cos - m * math.sin(m))
        logits = s * (one_hot * phi + (1 - one_hot) * cos)
    elif kind == "adaface" and variant == "paper":
        # the official head (mk-minchul/AdaFace, head.py), fed the backbone's
        # l2-normalised output and its norm, as the official backbone returns them
        norms = torch.norm(emb, 2, 1, True)
        embeddings = emb / norms
        kernel_norm = F.normalize(weight, dim=1).T
        cosine = torch.mm(embeddings, kernel_norm).clamp(-1 + eps, 1 - eps)
        safe_norms = torch.clip(norms, min=0.001, max=100).clone().detach()
        with torch.no_grad():
            mean = safe_norms.mean().detach()
            std = safe_norms.std().detach()
            state["batch_mean"] = mean * t_alpha + (1 - t_alpha) * state["batch_mean"]
            state["batch_std"] = std * t_alpha + (1 - t_alpha) * state["batch_std"]
        margin_scaler = (safe_norms - state["batch_mean"]) / (state["batch_std"] + eps)
        margin_scaler = torch.clip(margin_scaler * h, -1, 1)
        m_arc = one_hot * (m * margin_scaler * -1)
        theta = cosine.acos()
        theta_m = torch.clip(theta + m_arc, min=eps, max=math.pi - eps)
        cosine = theta_m.cos()
        m_cos = one_hot * (m + m * margin_scaler)
        logits = (cosine - m_cos) * s
    else:  # adaface report
        en = F.normalize(emb)
        if quality is None:
            norms = torch.norm(en, dim=1, keepdim=True)
            quality = torch.clamp((norms - norms.mean()) / ((norms.std() + 1e-7) / h), -1, 1)
        q = quality.detach().reshape(n, 1)
        cos = torch.clamp(en @ F.normalize(weight).T, -0.9999, 0.9999)
        theta = torch.acos(cos)
        target = torch.cos(theta - m * q) - (m * q + m)
        logits = s * (one_hot * target + (1 - one_hot) * cos)
    return F.cross_entropy(logits, labels)


# the report's four networks, as PyTorch Sequential, in adaloss's layer terms
REPORT_NETS = {
    "mnist-arcface": (1, 28, [("conv", 1, 32), ("relu",), ("pool",), ("conv", 32, 64), ("relu",),
                              ("pool",), ("flatten",), ("linear", 3136, 128), ("relu",)]),
    "mnist-adaface": (1, 28, [("conv", 1, 32), ("relu",), ("conv", 32, 64), ("relu",), ("pool",),
                              ("flatten",), ("linear", 12544, 256), ("relu",),
                              ("linear", 256, 128), ("l2norm",)]),
    "cifar10-arcface": (3, 32, [("conv", 3, 64), ("relu",), ("pool",), ("conv", 64, 128),
                                ("relu",), ("pool",), ("conv", 128, 256), ("relu",), ("pool",),
                                ("flatten",), ("linear", 4096, 128), ("relu",)]),
    "cifar10-adaface": (3, 32, [("conv", 3, 32), ("relu",), ("conv", 32, 64), ("relu",),
                                ("pool",), ("flatten",), ("linear", 16384, 256), ("relu",),
                                ("linear", 256, 128), ("l2norm",)]),
}


def torch_net(torch, layers):
    nn = torch.nn
    mods = []
    for spec in layers:
        if spec[0] == "conv":
            mods.append(nn.Conv2d(spec[1], spec[2], 3, padding=1))
        elif spec[0] == "linear":
            mods.append(nn.Linear(spec[1], spec[2]))
        elif spec[0] == "relu":
            mods.append(nn.ReLU())
        elif spec[0] == "pool":
            mods.append(nn.MaxPool2d(2))
        elif spec[0] == "flatten":
            mods.append(nn.Flatten())
        elif spec[0] == "l2norm":
            mods.append(L2Norm(torch))
    return nn.Sequential(*mods)


def L2Norm(torch):
    class _L2Norm(torch.nn.Module):
        def forward(self, x):
            return torch.nn.functional.normalize(x)

    return _L2Norm()


def adaloss_net(adaloss, layers, input_shape=None):
    from adaloss.presets import build_net

    return build_net(layers, input_shape)


def make_head(adaloss, kind, variant, num_classes, dim, s, m, h=0.333):
    if kind == "softmax":
        return adaloss.Softmax(num_classes, dim)
    if kind == "cosface":
        return adaloss.CosFace(num_classes, dim, s=s, m=m)
    if kind == "arcface":
        return adaloss.ArcFace(num_classes, dim, s=s, m=m, variant=variant)
    return adaloss.AdaFace(num_classes, dim, s=s, m=m, h=h, variant=variant)


def benchmark_module(name: str):
    """benchmarks/<name>.py imported as a module (the scripts are not a package)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
