"""Real training text with no download: the running Python's own standard-library sources, read as bytes.

Every Python installation carries a few megabytes of real, varied, human-written text in its standard library, so the
CLI, the examples and the convergence tests can train a language model on real data offline, in CI, and in a container.

Determinism: files are read in sorted relative-path order (compared component by component), so the corpus depends only on the
Python installation, not on the file system's listing order. The corpus differs between Python versions; results are
comparable across opt levels of one run, which is what this data set is for.

What is read: ``*.py`` files under ``sysconfig.get_paths()["stdlib"]``, skipping ``site-packages`` /
``dist-packages`` (installed third-party code, which differs from machine to machine), ``__pycache__``, and the
stdlib's own test suites (``test``, ``tests``, ``idle_test``: slim Python images leave them out, so skipping them keeps
the corpus the same across such installs). Reading stops at ``max_bytes``; the last file is truncated to fit.

The split is contiguous: the first ``1 - val_fraction`` of the bytes train, the rest validate, so validation text
comes mostly from files the model never trained on.
"""

from __future__ import annotations

import functools
import os
import sysconfig
from dataclasses import dataclass, field
from typing import Iterator

import torch

__all__ = ["BatchSampler", "ByteCorpus", "load_stdlib_corpus", "read_stdlib_bytes", "stdlib_files"]

DEFAULT_MAX_BYTES = 4 * 1024 * 1024
SKIPPED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"})


def stdlib_root() -> str:
    """The directory of the running interpreter's standard library."""
    return sysconfig.get_paths()["stdlib"]


def stdlib_files(root: str | os.PathLike | None = None) -> list[str]:
    """Paths of the ``.py`` files under ``root`` (default: the stdlib), relative to it, in deterministic order."""
    root = os.fspath(root if root is not None else stdlib_root())
    found: list[str] = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in SKIPPED_DIRS]  # in place: os.walk then skips them
        rel_dir = os.path.relpath(directory, root)
        for name in sorted(files):
            if name.endswith(".py"):
                found.append(os.path.normpath(os.path.join(rel_dir, name)))
    found.sort(key=lambda path: path.split(os.sep))  # listing order is file-system dependent; this is not
    if not found:
        raise FileNotFoundError(
            f"No .py files under {root!r}; this Python installation has no standard-library sources to train on. "
            "Pass a directory of text files as root=... instead."
        )
    return found


@functools.lru_cache(maxsize=4)
def read_stdlib_bytes(max_bytes: int = DEFAULT_MAX_BYTES, root: str | None = None) -> tuple[bytes, tuple[str, ...]]:
    """Concatenate the sources (in :func:`stdlib_files` order) up to ``max_bytes``.

    Returns the bytes and the relative paths that contributed (the last one possibly truncated). Cached: the CLI
    and the tests read the same corpus many times.
    """
    if max_bytes < 2:
        raise ValueError(f"max_bytes must be at least 2 (an input and a target byte), got {max_bytes}.")
    base = root if root is not None else stdlib_root()
    chunks: list[bytes] = []
    used: list[str] = []
    total = 0
    for rel_path in stdlib_files(base):
        with open(os.path.join(base, rel_path), "rb") as handle:
            content = handle.read(max_bytes - total)
        if not content:
            continue
        chunks.append(content)
        used.append(rel_path)
        total += len(content)
        if total >= max_bytes:
            break
    return b"".join(chunks), tuple(used)


@dataclass(frozen=True)
class ByteCorpus:
    """A byte corpus split into train and validation token tensors (``torch.uint8``, one token per byte)."""

    train: torch.Tensor
    val: torch.Tensor
    files: tuple[str, ...] = field(default=())

    @property
    def num_bytes(self) -> int:
        return self.train.numel() + self.val.numel()


def load_stdlib_corpus(
    max_bytes: int = DEFAULT_MAX_BYTES, val_fraction: float = 0.1, root: str | None = None
) -> ByteCorpus:
    """Read the stdlib sources (see the module docstring) and split them contiguously into train / validation."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be strictly between 0 and 1, got {val_fraction}.")
    raw, files = read_stdlib_bytes(max_bytes, root)
    tokens = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    split = int(round(tokens.numel() * (1.0 - val_fraction)))
    return ByteCorpus(train=tokens[:split].clone(), val=tokens[split:].clone(), files=files)


class BatchSampler:
    """Random windows of a token tensor as ``(inputs, targets)`` pairs, targets shifted by one position.

    All randomness comes from the ``generator`` passed in (a CPU ``torch.Generator``), so two samplers with equally
    seeded generators yield the same batches — which is how every opt level in a comparison sees the same data.
    Batches are ``int64`` tensors of shape ``(batch_size, block_size)`` on ``device``.
    """

    def __init__(
        self,
        tokens: torch.Tensor,
        batch_size: int,
        block_size: int,
        generator: torch.Generator,
        device: torch.device | str = "cpu",
    ) -> None:
        if tokens.dim() != 1:
            raise ValueError(f"tokens must be a 1-D tensor, got shape {tuple(tokens.shape)}.")
        if batch_size < 1 or block_size < 1:
            raise ValueError(f"batch_size and block_size must be >= 1, got {batch_size} and {block_size}.")
        if tokens.numel() < block_size + 1:
            raise ValueError(
                f"The text has {tokens.numel()} tokens, too few for block_size={block_size} (needs block_size + 1); "
                "lower block_size or read more text (max_bytes)."
            )
        self.tokens = tokens
        self.batch_size = batch_size
        self.block_size = block_size
        self.generator = generator
        self.device = torch.device(device)
        self._offsets = torch.arange(block_size + 1)

    def sample(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One batch ``(x, y)`` with ``y[:, t] == x[:, t + 1]`` along the text."""
        high = self.tokens.numel() - self.block_size  # exclusive: start + block_size is the last target's index
        starts = torch.randint(0, high, (self.batch_size,), generator=self.generator)
        windows = self.tokens[starts[:, None] + self._offsets].long()
        x, y = windows[:, :-1].contiguous(), windows[:, 1:].contiguous()
        return x.to(self.device), y.to(self.device)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.sample()
