"""Teacher caches: top-k teacher outputs of many sequences in one memory-mappable file.

A cache stores, for every token of every sequence, the teacher's top-k vocabulary entries and
their log-probabilities (:class:`fastkd.TopKTeacher`), so that distillation can run without the
teacher. The file is a standard `safetensors <https://github.com/huggingface/safetensors>`_ file:

==============  ==================  =======================================================
tensor          dtype               shape
==============  ==================  =======================================================
``indices``     I32                 ``[num_tokens, k]``
``logprobs``    BF16 or F16         ``[num_tokens, k]``
``offsets``     I64                 ``[num_sequences + 1]``: sequence i is rows
                                    ``offsets[i]:offsets[i + 1]``
==============  ==================  =======================================================

and header metadata ``format="fastkd.teacher_cache"``, ``version``, ``k``, ``vocab_size``,
``temperature`` (the T_src the logprobs were taken at), ``logprob_dtype``, ``num_sequences``,
``num_tokens`` and any user entries (e.g. ``model``). That is ``k * (4 + 2)`` bytes per token
(384 for k = 64) plus 8 bytes per sequence.

The format is simple enough (8-byte header length, JSON header, raw little-endian data) that
this module reads and writes it itself: no dependency beyond torch and numpy, the writer can
stream (see :class:`CacheWriter`) and the reader memory-maps the tensors with numpy (zero copy:
rows are read from disk when touched). Any safetensors reader (``safetensors.safe_open``) reads
the files too.

Command line (runs a Hugging Face ``transformers`` causal LM over a token file)::

    python -m fastkd.teacher_cache --model Qwen/Qwen2.5-0.5B --tokens tokens.npy \\
        --k 64 --temperature 1.0 --out cache.safetensors [--batch-size 8] [--max-seqs N] \\
        [--max-length L] [--separator EOS_ID] [--dtype bf16|fp16] [--device cuda]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import struct
import sys
import time

import numpy as np
import torch

from fastkd import _checks
from fastkd.logit.topk_teacher import TopKTeacher

__all__ = ["CacheWriter", "TeacherCache", "save_cache", "load_cache", "read_tokens",
           "write_cache_from_model", "load_hf_model", "main"]

FORMAT = "fastkd.teacher_cache"
VERSION = "1"
# dtype name -> (torch dtype, safetensors dtype code, numpy dtype of the same bytes)
_LOGPROB_DTYPES = {"bf16": (torch.bfloat16, "BF16", np.uint16),
                   "fp16": (torch.float16, "F16", np.float16)}
_ALIASES = {"bf16": "bf16", "bfloat16": "bf16", torch.bfloat16: "bf16",
            "fp16": "fp16", "float16": "fp16", "half": "fp16", torch.float16: "fp16"}
# Placeholder for the numbers unknown until close (shapes, offsets): as many digits as any
# int64 can have, so the header reserved at open always fits the final one.
_BIG = 10 ** 19
_COPY_CHUNK = 1 << 24


def _logprob_dtype_name(dtype) -> str:
    try:
        return _ALIASES[dtype]
    except (KeyError, TypeError):
        raise ValueError(f"logprob_dtype must be 'bf16' (torch.bfloat16) or 'fp16' "
                         f"(torch.float16), got {dtype!r}") from None


def _header(meta: dict, k: int, num_tokens: int, num_seqs: int, lp_code: str) -> bytes:
    n_idx = num_tokens * k * 4
    n_lp = num_tokens * k * 2
    header = {
        "__metadata__": meta,
        "indices": {"dtype": "I32", "shape": [num_tokens, k], "data_offsets": [0, n_idx]},
        "logprobs": {"dtype": lp_code, "shape": [num_tokens, k],
                     "data_offsets": [n_idx, n_idx + n_lp]},
        "offsets": {"dtype": "I64", "shape": [num_seqs + 1],
                    "data_offsets": [n_idx + n_lp, n_idx + n_lp + 8 * (num_seqs + 1)]},
    }
    return json.dumps(header, separators=(",", ":")).encode()


class CacheWriter:
    r"""Writes a teacher cache one sequence at a time, streaming to disk.

    Memory stays O(one sequence) however long the teacher run. Safetensors needs the header
    (which holds the shapes) first and each tensor contiguous, so the writer reserves the
    header's largest possible size up front, appends ``indices`` straight into the output file
    behind it, ``logprobs`` into a side file, and at :meth:`close` appends the side file and the
    offsets and writes the final header into the reserved space (padded with spaces, which the
    format allows). The cost is one extra sequential copy of the logprobs (a third of the data);
    the file appears at ``path`` only when complete (written as ``path + ".partial"``, then
    renamed). Use as a context manager: an exception discards the partial files.

    Args:
        path: output file (conventionally ``*.safetensors``).
        k: entries per token.
        vocab_size: V of the teacher (indices must lie in ``[0, V)``).
        temperature: T_src, the temperature the logprobs were taken at (> 0).
        logprob_dtype: ``"bf16"`` (default) or ``"fp16"`` (or the torch dtypes).
        metadata: extra ``str -> str`` header entries (e.g. ``{"model": name}``).
        check: validate each sequence's data (indices in range, logprobs <= 0, not NaN).
    """

    def __init__(self, path, *, k: int, vocab_size: int, temperature: float,
                 logprob_dtype="bf16", metadata: dict | None = None, check: bool = True):
        for name, v in (("k", k), ("vocab_size", vocab_size)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if k > vocab_size:
            raise ValueError(f"k = {k} must be <= vocab_size = {vocab_size}")
        self.path = os.fspath(path)
        self.k, self.vocab_size = k, vocab_size
        self.temperature = _checks.check_finite_number("temperature", temperature, positive=True)
        self.logprob_dtype = _logprob_dtype_name(logprob_dtype)
        self._torch_lp, self._lp_code, _ = _LOGPROB_DTYPES[self.logprob_dtype]
        self.check = check
        self.metadata = {"format": FORMAT, "version": VERSION, "k": str(k),
                         "vocab_size": str(vocab_size), "temperature": repr(self.temperature),
                         "logprob_dtype": self.logprob_dtype}
        for key, value in (metadata or {}).items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise TypeError(f"metadata must map str to str, got {key!r}: {value!r}")
            if key in self.metadata or key in ("num_sequences", "num_tokens"):
                raise ValueError(f"metadata key {key!r} is reserved")
            self.metadata[key] = value
        self._offsets = [0]
        self._reserved = self._header_for(_BIG, _BIG)
        self._reserved = (len(self._reserved) + 7) // 8 * 8  # data then starts 8-byte aligned
        self._partial = self.path + ".partial"
        self._side = self.path + ".logprobs.partial"
        self._f = open(self._partial, "wb")
        self._g = open(self._side, "wb")
        self._f.write(b"\0" * (8 + self._reserved))
        self.closed = False

    def _header_for(self, num_tokens, num_seqs) -> bytes:
        meta = dict(self.metadata, num_sequences=str(num_seqs), num_tokens=str(num_tokens))
        return _header(meta, self.k, num_tokens, num_seqs, self._lp_code)

    @property
    def num_sequences(self) -> int:
        return len(self._offsets) - 1

    @property
    def num_tokens(self) -> int:
        return self._offsets[-1]

    def add(self, indices, logprobs=None) -> None:
        """Append one sequence: a :class:`TopKTeacher` or ``indices, logprobs`` ``[L, k]`` (any
        leading shape is flattened to L rows; L = 0 is allowed). Logprobs are rounded to the
        cache's dtype. A TopKTeacher with a temperature must have the cache's temperature."""
        if self.closed:
            raise ValueError("add() on a closed CacheWriter")
        if isinstance(indices, TopKTeacher):
            if logprobs is not None:
                raise TypeError("give a TopKTeacher or (indices, logprobs), not both")
            teacher = indices
            if teacher.temperature is not None and teacher.temperature != self.temperature:
                raise ValueError(f"the teacher's temperature {teacher.temperature} differs from "
                                 f"the cache's {self.temperature}")
        else:
            teacher = TopKTeacher(indices, logprobs, check=False)
        if teacher.k != self.k:
            raise ValueError(f"the sequence has k = {teacher.k} entries per token, the cache "
                             f"k = {self.k}")
        idx = teacher.indices.detach().reshape(-1, self.k)
        lp = teacher.logprobs.detach().reshape(-1, self.k)
        if self.check and idx.numel():
            TopKTeacher(idx, lp, check=True)  # the teacher's own data checks
            if int(idx.max()) >= self.vocab_size:
                raise ValueError(f"indices must lie in [0, vocab_size = {self.vocab_size})")
        self._f.write(idx.to(device="cpu", dtype=torch.int32).contiguous().numpy().tobytes())
        self._g.write(lp.to(device="cpu", dtype=self._torch_lp).contiguous()
                      .view(torch.int16).numpy().tobytes())
        self._offsets.append(self._offsets[-1] + idx.shape[0])

    def close(self) -> str:
        """Finish the file; returns its path."""
        if self.closed:
            return self.path
        self._g.close()
        with open(self._side, "rb") as g:
            shutil.copyfileobj(g, self._f, _COPY_CHUNK)
        self._f.write(np.asarray(self._offsets, dtype="<i8").tobytes())
        header = self._header_for(self.num_tokens, self.num_sequences)
        assert len(header) <= self._reserved
        self._f.seek(0)
        self._f.write(struct.pack("<Q", self._reserved) + header.ljust(self._reserved, b" "))
        self._f.close()
        os.replace(self._partial, self.path)
        os.remove(self._side)
        self.closed = True
        return self.path

    def abort(self) -> None:
        """Discard the partial files."""
        for fh in (self._f, self._g):
            fh.close()
        for p in (self._partial, self._side):
            if os.path.exists(p):
                os.remove(p)
        self.closed = True

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        elif not self.closed:
            self.abort()
        return False


def save_cache(path, teachers, *, vocab_size: int, temperature: float | None = None,
               logprob_dtype="bf16", metadata: dict | None = None, check: bool = True) -> str:
    """Write the sequences ``teachers`` (an iterable of :class:`TopKTeacher` or
    ``(indices, logprobs)`` pairs, each ``[L, k]``) to a cache at ``path`` (streaming, through
    :class:`CacheWriter`). ``temperature`` defaults to that of the first TopKTeacher; k is
    taken from the first sequence (an empty iterable needs no k and writes k = 1). Returns
    ``path``."""
    items = iter(teachers)
    first = next(items, None)
    pair = first if first is None or isinstance(first, TopKTeacher) else TopKTeacher(*first,
                                                                                  check=False)
    if temperature is None:
        temperature = getattr(pair, "temperature", None)
        if temperature is None:
            raise ValueError("temperature is None: give the temperature the logprobs were taken "
                             "at (or TopKTeachers that carry it)")
    k = pair.k if pair is not None else 1
    with CacheWriter(path, k=k, vocab_size=vocab_size, temperature=temperature,
                     logprob_dtype=logprob_dtype, metadata=metadata, check=check) as w:
        if pair is not None:
            w.add(pair)
        for item in items:
            w.add(item) if isinstance(item, TopKTeacher) else w.add(*item)
    return os.fspath(path)


class TeacherCache:
    """A loaded teacher cache (:func:`load_cache`): a sequence of :class:`TopKTeacher`.

    ``cache[i]`` is sequence i as a TopKTeacher with ``indices [L_i, k]`` int32 and ``logprobs
    [L_i, k]`` bf16/fp16 (zero-copy views of the file when memory-mapped) and
    ``temperature = cache.temperature``; ``len(cache)`` is the number of sequences. Attributes:
    ``indices``, ``logprobs`` (all tokens, ``[num_tokens, k]``), ``offsets`` (int64
    ``[num_sequences + 1]``), ``lengths``, ``k``, ``vocab_size``, ``temperature``,
    ``num_tokens``, ``logprob_dtype``, ``metadata`` (the header's str -> str dict), ``path``.
    The views are writable copy-on-write pages: writing to them never changes the file.
    """

    def __init__(self, path, indices, logprobs, offsets, metadata):
        self.path = path
        self.indices, self.logprobs, self.offsets = indices, logprobs, offsets
        self.metadata = metadata
        self.k = int(metadata["k"])
        self.vocab_size = int(metadata["vocab_size"])
        self.temperature = float(metadata["temperature"])
        self.logprob_dtype = metadata["logprob_dtype"]
        self._bounds = offsets.tolist()

    @property
    def num_tokens(self) -> int:
        return self.indices.shape[0]

    @property
    def lengths(self) -> torch.Tensor:
        return self.offsets[1:] - self.offsets[:-1]

    def __len__(self) -> int:
        return len(self._bounds) - 1

    def __getitem__(self, i: int) -> TopKTeacher:
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
            raise TypeError(f"cache index must be an int, got {type(i).__name__}")
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"sequence {i} out of range for a cache of {n} sequences")
        i = int(i) % n
        return self.tokens(self._bounds[i], self._bounds[i + 1])

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def tokens(self, start: int, stop: int) -> TopKTeacher:
        """Token rows ``start:stop`` of the whole cache (across sequences) as a TopKTeacher."""
        return TopKTeacher(self.indices[start:stop], self.logprobs[start:stop],
                           self.temperature, check=False)

    def stack(self, ids) -> TopKTeacher:
        """Sequences ``ids`` (of equal length L) stacked into a ``[len(ids), L, k]`` teacher
        (a copy), e.g. to match a ``[B, L, V]`` student batch."""
        parts = [self[i] for i in ids]
        if not parts:
            raise ValueError("ids is empty")
        if len({p.indices.shape[0] for p in parts}) != 1:
            raise ValueError(f"sequences {list(ids)} have different lengths "
                             f"{[p.indices.shape[0] for p in parts]}: stack needs equal lengths")
        return TopKTeacher(torch.stack([p.indices for p in parts]),
                           torch.stack([p.logprobs for p in parts]), self.temperature,
                           check=False)

    def __repr__(self) -> str:
        return (f"TeacherCache({self.path!r}, sequences={len(self)}, tokens={self.num_tokens}, "
                f"k={self.k}, vocab_size={self.vocab_size}, temperature={self.temperature:g}, "
                f"logprobs={self.logprob_dtype})")


def _read_header(path):
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path} is not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", raw)
        if n > 100 * 2 ** 20:
            raise ValueError(f"{path} is not a safetensors file (header length {n})")
        header = json.loads(f.read(n))
    return header, 8 + n


def load_cache(path, mmap: bool = True) -> TeacherCache:
    """Open a teacher cache written by :class:`CacheWriter` / :func:`save_cache` / the CLI.

    Args:
        path: the ``.safetensors`` file.
        mmap: memory-map ``indices`` and ``logprobs`` (default): opening costs only the header,
            and rows are paged in from disk when read. ``False`` reads everything into memory.

    Returns:
        A :class:`TeacherCache`.
    """
    path = os.fspath(path)
    header, data_start = _read_header(path)
    meta = header.get("__metadata__", {})
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a fastkd teacher cache (metadata format = "
                         f"{meta.get('format')!r})")
    if meta.get("version") != VERSION:
        raise ValueError(f"{path}: unsupported teacher cache version {meta.get('version')!r} "
                         f"(this fastkd reads version {VERSION})")
    lp_name = _logprob_dtype_name(meta.get("logprob_dtype"))
    torch_lp, lp_code, np_lp = _LOGPROB_DTYPES[lp_name]
    specs = {"indices": ("I32", np.dtype("<i4")), "logprobs": (lp_code, np.dtype(np_lp)),
             "offsets": ("I64", np.dtype("<i8"))}
    arrays = {}
    for name, (code, np_dtype) in specs.items():
        entry = header.get(name)
        if entry is None or entry["dtype"] != code:
            raise ValueError(f"{path}: tensor {name!r} missing or not {code}")
        shape = tuple(entry["shape"])
        begin, end = entry["data_offsets"]
        if end - begin != math.prod(shape) * np_dtype.itemsize:
            raise ValueError(f"{path}: tensor {name!r} has {end - begin} bytes for shape {shape}")
        offset = data_start + begin
        if mmap and name != "offsets" and math.prod(shape) > 0:
            # Copy-on-write: the tensors are writable (torch wants that) but never write back.
            arr = np.memmap(path, dtype=np_dtype, mode="c", offset=offset, shape=shape)
        else:  # the offsets are small (8 bytes per sequence): read them
            arr = np.fromfile(path, dtype=np_dtype, count=math.prod(shape),
                              offset=offset).reshape(shape)
        arrays[name] = torch.from_numpy(arr)
    indices, offsets = arrays["indices"], arrays["offsets"]
    logprobs = arrays["logprobs"].view(torch_lp) if lp_name == "bf16" else arrays["logprobs"]
    k = int(meta["k"])
    if indices.shape[1:] != (k,) or logprobs.shape != indices.shape:
        raise ValueError(f"{path}: indices {tuple(indices.shape)} / logprobs "
                         f"{tuple(logprobs.shape)} do not match k = {k}")
    if (offsets.numel() < 1 or offsets[0] != 0 or offsets[-1] != indices.shape[0]
            or bool((offsets[1:] < offsets[:-1]).any())):
        raise ValueError(f"{path}: offsets must rise from 0 to num_tokens = {indices.shape[0]}")
    return TeacherCache(path, indices, logprobs, offsets, dict(meta))


# --------------------------------------------------------------------------------------------
# Running a teacher model over a token file


def read_tokens(path, *, separator: int | None = None, max_length: int | None = None,
                max_seqs: int | None = None) -> list[np.ndarray]:
    """Token sequences from a ``.npy`` (memory-mapped) or ``.pt`` file of integer token ids.

    A 2-D array ``[num_seqs, seq_len]`` gives one sequence per row. A 1-D array is one stream:
    with ``separator`` it is split *after* each separator token (the separator, e.g. EOS, ends
    its sequence, as in training), else it is one sequence. ``max_length`` then cuts every
    sequence into consecutive pieces of at most that many tokens; empty sequences are dropped;
    ``max_seqs`` keeps the first ones. Returns 1-D integer numpy arrays (views when possible).
    """
    path = os.fspath(path)
    if path.endswith(".npy"):
        arr = np.load(path, mmap_mode="r")
    elif path.endswith((".pt", ".pth")):
        t = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{path} must hold one tensor of token ids, got {type(t).__name__}")
        arr = t.numpy()
    else:
        raise ValueError(f"tokens file must be .npy or .pt, got {path!r}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{path}: token ids must be integers, got dtype {arr.dtype}")
    if arr.ndim == 2:
        seqs = list(arr)
    elif arr.ndim == 1:
        if separator is None:
            seqs = [arr]
        else:
            cuts = np.flatnonzero(arr == separator) + 1
            seqs = np.split(arr, cuts)
    else:
        raise ValueError(f"{path}: token ids must be 1-D (a stream) or 2-D [num_seqs, seq_len], "
                         f"got shape {arr.shape}")
    if max_length is not None:
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        seqs = [s[i:i + max_length] for s in seqs for i in range(0, len(s), max_length)]
    seqs = [s for s in seqs if len(s)]
    return seqs[:max_seqs] if max_seqs is not None else seqs


class _Progress:
    """tqdm when installed, else a line on stderr every ~10%."""

    def __init__(self, total, enabled):
        self.total, self.done, self.enabled, self._next = total, 0, enabled, 0.1
        self._bar, self._t0 = None, time.perf_counter()
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                pass
            else:
                self._bar = tqdm(total=total, unit="tok", unit_scale=True, desc="teacher cache")

    def update(self, n):
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
        elif self.enabled and self.total and self.done >= self._next * self.total:
            rate = self.done / max(time.perf_counter() - self._t0, 1e-9)
            print(f"teacher cache: {self.done}/{self.total} tokens ({rate:,.0f} tok/s)",
                  file=sys.stderr, flush=True)
            self._next = math.floor(self.done / self.total * 10 + 1) / 10

    def close(self):
        if self._bar is not None:
            self._bar.close()


def write_cache_from_model(model, sequences, out, *, k: int = 64, temperature: float = 1.0,
                           batch_size: int = 8, device="cpu", logprob_dtype="bf16",
                           metadata: dict | None = None, progress: bool = True) -> str:
    """Run a causal language model over ``sequences`` and write the top-k cache to ``out``.

    Args:
        model: any callable mapping ``input_ids [B, L]`` (int64, on ``device``) to logits
            ``[B, L, V]`` (or to an object with a ``.logits`` attribute, as transformers models
            return). It must be causal: batches are right-padded (with token 0) and no attention
            mask is passed, which leaves a causal model's logits at the real positions unchanged.
        sequences: 1-D integer token sequences (numpy arrays or tensors), e.g. from
            :func:`read_tokens`; written in this order.
        out: output path. k, temperature, logprob_dtype, metadata: as in :class:`CacheWriter`;
            V is the logits' last dimension.
        batch_size: sequences per forward pass. device: where the model runs.
        progress: show a progress bar (tqdm if installed, else lines on stderr).

    Returns:
        ``out``.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    seqs = [torch.as_tensor(np.asarray(s)).to(torch.int64) for s in sequences]
    bar = _Progress(sum(len(s) for s in seqs), progress)
    writer = None
    try:
        with torch.inference_mode():
            for b in range(0, len(seqs), batch_size):
                batch = seqs[b:b + batch_size]
                width = max(len(s) for s in batch)
                ids = torch.zeros(len(batch), width, dtype=torch.int64)
                for i, s in enumerate(batch):
                    ids[i, :len(s)] = s
                logits = model(ids.to(device))
                logits = getattr(logits, "logits", logits)
                if writer is None:  # V is known from the first logits
                    writer = CacheWriter(out, k=k, vocab_size=logits.shape[-1],
                                         temperature=temperature, logprob_dtype=logprob_dtype,
                                         metadata=metadata, check=False)
                top = TopKTeacher.from_logits(logits, k, temperature, index_dtype=torch.int32,
                                              logprob_dtype=writer._torch_lp)
                for i, s in enumerate(batch):
                    writer.add(top.indices[i, :len(s)], top.logprobs[i, :len(s)])
                bar.update(sum(len(s) for s in batch))
        if writer is None:
            raise ValueError("no token sequences to run the teacher on")
        return writer.close()
    except BaseException:
        if writer is not None and not writer.closed:
            writer.abort()
        raise
    finally:
        bar.close()


def load_hf_model(name: str, device="cpu", dtype: str = "auto"):
    """A ``transformers`` causal LM (hub name or local directory) as a callable
    ``input_ids -> logits``, in eval mode on ``device``."""
    try:
        import transformers
    except ImportError:
        raise ImportError("the teacher-cache command runs a Hugging Face model: "
                          "pip install transformers") from None
    torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    # `dtype=` replaced `torch_dtype=` in transformers 4.56.
    kw = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
    model = transformers.AutoModelForCausalLM.from_pretrained(name, **{kw: torch_dtype})
    model.to(device).eval()
    return lambda ids: model(input_ids=ids, use_cache=False).logits


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fastkd.teacher_cache",
        description="Run a causal LM teacher over a token file and write its top-k "
                    "log-probabilities to a teacher cache (safetensors).")
    p.add_argument("--model", required=True, help="transformers model name or local directory")
    p.add_argument("--tokens", required=True,
                   help=".npy or .pt file of int token ids: 2-D [num_seqs, seq_len] or 1-D "
                        "(split with --separator)")
    p.add_argument("--out", required=True, help="output cache file (.safetensors)")
    p.add_argument("--k", type=int, default=64, help="entries kept per token (default 64)")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="temperature of the stored log-probabilities (default 1.0)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass")
    p.add_argument("--max-seqs", type=int, default=None, help="only the first N sequences")
    p.add_argument("--max-length", type=int, default=None,
                   help="cut sequences into pieces of at most this many tokens")
    p.add_argument("--separator", type=int, default=None,
                   help="token id ending each sequence in a 1-D token file (e.g. EOS)")
    p.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16",
                   help="stored logprob dtype (default bf16)")
    p.add_argument("--model-dtype", default="auto",
                   choices=("auto", "float32", "bfloat16", "float16"),
                   help="dtype the model is loaded in (default: its checkpoint's)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv=None, *, load_model=None) -> int:
    """The command line (``python -m fastkd.teacher_cache --help``). ``load_model(name, device,
    dtype)`` returns the callable model (default :func:`load_hf_model`); tests inject a tiny
    one."""
    args = _parser().parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    seqs = read_tokens(args.tokens, separator=args.separator, max_length=args.max_length,
                       max_seqs=args.max_seqs)
    model = (load_model or load_hf_model)(args.model, device, args.model_dtype)
    t0 = time.perf_counter()
    out = write_cache_from_model(
        model, seqs, args.out, k=args.k, temperature=args.temperature,
        batch_size=args.batch_size, device=device, logprob_dtype=args.dtype,
        metadata={"model": str(args.model), "tokens": os.path.basename(args.tokens)},
        progress=not args.no_progress)
    cache = load_cache(out)
    size = os.path.getsize(out)
    print(f"wrote {out}: {len(cache)} sequences, {cache.num_tokens} tokens, k={cache.k}, "
          f"V={cache.vocab_size}, {size / max(cache.num_tokens, 1):.1f} bytes/token, "
          f"{time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
