"""A text data set that is always there: the ``.py`` sources of Python's standard library.

Nothing is downloaded. The files are found through ``sysconfig.get_paths()["stdlib"]``,
read in sorted order (so every machine with the same Python reads the same bytes),
decoded as UTF-8 (undecodable bytes become U+FFFD) and re-encoded, so every byte is a
token id in ``0..255``: a byte-level vocabulary of 256, no tokenizer needed.

:class:`ByteBatches` cuts random windows out of that stream; which windows, and in what
order, depends only on the seed, so runs that share a seed see identical batches.
"""

from __future__ import annotations

import os
import sysconfig
from pathlib import Path

import torch

VOCAB_SIZE = 256

# Directories skipped when walking the stdlib: installed third-party packages (not the
# standard library, and different on every machine), the test suites (huge, and full of
# deliberately odd files), caches.
_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"})


def stdlib_root() -> Path:
    """The directory that holds Python's standard library sources."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_sources(root: str | os.PathLike | None = None) -> list[Path]:
    """Every ``.py`` file under ``root`` (default: the stdlib), sorted by relative path,
    skipping third-party packages, test suites and unreadable directories."""
    base = Path(root) if root is not None else stdlib_root()
    found: list[tuple[str, Path]] = []
    # os.walk ignores directories it cannot list (onerror=None) instead of failing.
    for dirpath, dirnames, filenames in os.walk(base, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
        for name in filenames:
            if name.endswith(".py"):
                path = Path(dirpath) / name
                found.append((path.relative_to(base).as_posix(), path))
    found.sort(key=lambda item: item[0])
    return [path for _, path in found]


def load_text_bytes(
    root: str | os.PathLike | None = None, *, max_bytes: int | None = None
) -> torch.Tensor:
    """The concatenated sources as a 1-D ``uint8`` tensor of token ids (one per byte).

    Files are joined with a blank line, in sorted-path order; files that cannot be read
    are skipped. Reading stops once ``max_bytes`` bytes are collected (the result is cut
    to exactly that many). Raises ``RuntimeError`` if nothing could be read.
    """
    if max_bytes is not None and max_bytes <= 0:
        raise ValueError(f"max_bytes must be positive, got {max_bytes!r}")
    chunks: list[bytes] = []
    total = 0
    for path in stdlib_sources(root):
        try:
            raw = path.read_bytes()
        except OSError:  # permissions, broken links, files vanishing mid-walk
            continue
        if not raw.strip():
            continue
        data = raw.decode("utf-8", errors="replace").encode("utf-8") + b"\n\n"
        chunks.append(data)
        total += len(data)
        if max_bytes is not None and total >= max_bytes:
            break
    if not chunks:
        where = root if root is not None else stdlib_root()
        raise RuntimeError(f"no readable .py files found under {where}")
    blob = b"".join(chunks)
    if max_bytes is not None:
        blob = blob[:max_bytes]
    return torch.frombuffer(bytearray(blob), dtype=torch.uint8)


class ByteBatches:
    """Seeded random windows of a byte stream, as ``int64`` token-id batches.

    ``batches[i]`` is the ``i``-th batch, shape ``[batch_size, seq_len]``; it depends only
    on ``(data, seq_len, batch_size, seed, i)``, so two runs with the same seed train on
    exactly the same data in exactly the same order, whatever else they do with the RNG.
    """

    def __init__(self, data: torch.Tensor, *, seq_len: int, batch_size: int, steps: int, seed: int = 0):
        if data.dim() != 1:
            raise ValueError("data must be a 1-D tensor of token ids")
        if data.numel() <= seq_len:
            raise ValueError(f"need more than seq_len={seq_len} tokens, got {data.numel()}")
        self.data = data
        self.seq_len = seq_len
        self.batch_size = batch_size
        gen = torch.Generator().manual_seed(seed)
        self.starts = torch.randint(0, data.numel() - seq_len + 1, (steps, batch_size), generator=gen)
        self._window = torch.arange(seq_len)

    def __len__(self) -> int:
        return self.starts.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        idx = self.starts[i][:, None] + self._window[None, :]
        return self.data[idx].long()

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]
