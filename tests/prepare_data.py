#!/usr/bin/env python3
"""Build a data root that adaloss's loaders read directly from the project's
shared data folder, and print its path.

The shared folder holds MNIST in its official files (``mnist/``) and CIFAR-10
as JPEG (``cifar10-jpeg.tar.gz``) with its own conversion script
(``cifar10_jpeg_to_bin.py``). The library reads only the official layouts, so
this script makes, once, a root in a cache folder (default
``$XDG_CACHE_HOME/adaloss-test-data`` or ``~/.cache/adaloss-test-data``):
``mnist`` is a link to the shared folder's (used as is) and
``cifar-10-batches-bin/`` the conversion's output. The shared folder is only
read (its CI copy is read-only). A source that already holds both data sets
in the official layouts is printed unchanged.

    python tests/prepare_data.py [SOURCE] [--out DIR]
    export ADALOSS_DATA="$(python tests/prepare_data.py)"

SOURCE defaults to $ADALOSS_DATA, else shared/data beside the project (or
beside one of its parent folders). Used by tests/conftest.py and .ci/run.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT, ARCHIVE = "cifar10_jpeg_to_bin.py", "cifar10-jpeg.tar.gz"
CIFAR_FOLDERS = ("cifar-10-batches-bin", "cifar-10-batches-py")


def find_source() -> Path | None:
    """$ADALOSS_DATA, else the first shared/data beside the project or a parent."""
    env = os.environ.get("ADALOSS_DATA")
    if env:
        return Path(env)
    for base in (ROOT, *ROOT.parents):
        cand = base / "shared" / "data"
        if cand.is_dir():
            return cand
    return None


def default_out() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "adaloss-test-data"


def is_ready(root: Path) -> bool:
    """True when root holds mnist/ and CIFAR-10 in an official layout."""
    return (root / "mnist").is_dir() and any((root / f).is_dir() for f in CIFAR_FOLDERS)


def prepare(source: Path, out: Path | None = None) -> Path:
    """The data root for `source` (itself when it is ready already)."""
    source = Path(source).expanduser().resolve()
    if is_ready(source):
        return source
    if not (source / "mnist").is_dir():
        raise FileNotFoundError(f"source: {source} has no mnist/ folder")
    if not ((source / SCRIPT).is_file() and (source / ARCHIVE).is_file()):
        raise FileNotFoundError(f"source: {source} holds neither CIFAR-10 in an official layout "
                                f"({' or '.join(CIFAR_FOLDERS)}) nor {ARCHIVE} with {SCRIPT}")
    out = Path(out).expanduser() if out is not None else default_out()
    out.mkdir(parents=True, exist_ok=True)
    mnist = out / "mnist"
    if not mnist.exists():
        try:
            mnist.symlink_to(source / "mnist", target_is_directory=True)
        except FileExistsError:     # made by a concurrent run
            pass
    target = out / "cifar-10-batches-bin"
    if not (target / "test_batch.bin").exists():
        # convert into a temporary folder beside the target, then rename: a
        # concurrent or interrupted conversion never leaves a half-written folder
        tmp = Path(tempfile.mkdtemp(dir=out, prefix=".convert-"))
        try:
            print(f"converting CIFAR-10 from {source / ARCHIVE} into {target} (once)",
                  file=sys.stderr, flush=True)
            subprocess.run([sys.executable, str(source / SCRIPT), str(tmp)], check=True,
                           stdout=subprocess.DEVNULL)
            if target.exists() and not (target / "test_batch.bin").exists():
                shutil.rmtree(target)   # left by an older, interrupted layout
            try:
                os.replace(tmp / "cifar-10-batches-bin", target)
            except OSError:
                if not (target / "test_batch.bin").exists():   # not a concurrent run's
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("source", nargs="?", default=None,
                   help="the shared data folder (default: $ADALOSS_DATA, else shared/data "
                        "beside the project)")
    p.add_argument("--out", default=None, help=f"the root to build (default: {default_out()})")
    args = p.parse_args(argv)
    source = Path(args.source) if args.source else find_source()
    if source is None:
        print("prepare_data: no source folder: pass one, or set ADALOSS_DATA", file=sys.stderr)
        return 2
    try:
        print(prepare(source, args.out))
    except (FileNotFoundError, subprocess.CalledProcessError) as exc:
        print(f"prepare_data: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
