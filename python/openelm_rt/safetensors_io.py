"""Minimal safetensors reader and writer in pure NumPy, plus bfloat16 bit conversions.

File layout (huggingface/safetensors): u64 LE header length N, N bytes of JSON
{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {str: str}}, then the data;
offsets are relative to the end of the header. Only what OpenELM checkpoints need: reading maps
the file (no copies); arrays come back as F32 -> float32, F16 -> float16, BF16 -> uint16 bits.
Not a general replacement for the `safetensors` package (no torch, no other dtypes on .get()).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Callable, Iterable, Mapping

import numpy as np

from .hf_config import ExportError

# Element sizes of every safetensors dtype, so any valid header validates; only the first three
# can be read as arrays (_NUMPY below).
_ITEMSIZE = {
    "F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I64": 8, "U64": 8, "I32": 4, "U32": 4,
    "I16": 2, "U16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E5M2": 1, "F8_E4M3": 1,
}
_NUMPY = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2")}

# The safetensors library refuses headers above 100 MB (MAX_HEADER_SIZE in safetensors/src/tensor.rs);
# a larger value here means a corrupt or non-safetensors file.
_MAX_HEADER = 100_000_000


# ----------------------------------------------------------------------------- bfloat16

def bf16_to_f32(u16: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) -> float32, exactly (bf16 is the upper half of an f32)."""
    return (np.asarray(u16, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(f32: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounding to nearest, ties to even.

    NaNs stay NaN (sign kept, made quiet) instead of rounding into infinity; finite values too
    large for bf16 round to +-inf as IEEE rounding requires.
    """
    bits = np.ascontiguousarray(f32, dtype=np.float32).view(np.uint32)
    # Add 0x7FFF plus the lowest kept bit: carries into the kept half exactly when the dropped
    # half is above one half, or exactly one half with an odd kept half (ties to even).
    # Wrap-around only happens for bit patterns >= 0xFFFF8001, which are all NaNs, fixed below.
    rounded = ((bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16).astype(np.uint16)
    is_nan = (bits & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    if is_nan.any():
        rounded[is_nan] = ((bits[is_nan] >> 16) | np.uint32(0x0040)).astype(np.uint16)
    return rounded.reshape(np.shape(f32))


# ----------------------------------------------------------------------------- reading

class SafetensorsFile:
    """A validated, memory-mapped .safetensors file. Arrays from .get() are read-only views."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    self._fail(f"file is {size} bytes, too short for a safetensors header")
                n = int.from_bytes(head, "little")
                if n < 2 or n > _MAX_HEADER or 8 + n > size:
                    self._fail(f"header length field says {n} bytes but the file is {size} "
                               f"bytes; the file is truncated or not a safetensors file")
                raw = f.read(n)
        except OSError as e:
            raise ExportError(f"cannot read {self.path}: {e.strerror or e}") from e
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            self._fail(f"header is not valid UTF-8 JSON ({e}); the file is corrupt")
        if not isinstance(header, dict):
            self._fail("header JSON is not an object")
        self.metadata: dict = header.pop("__metadata__", None) or {}
        self._data_start = 8 + n
        data_len = size - self._data_start
        self._info: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
        for name, info in header.items():
            self._info[name] = self._check_entry(name, info, data_len)
        spans = sorted((b, e, name) for name, (_, _, b, e) in self._info.items() if e > b)
        for (_, e1, n1), (b2, _, n2) in zip(spans, spans[1:]):
            if b2 < e1:
                self._fail(f"tensors {n1!r} and {n2!r} overlap (bytes up to {e1} and from {b2})")
        self._map = np.memmap(self.path, dtype=np.uint8, mode="r") if size else None

    def _fail(self, problem: str):
        raise ExportError(f"{self.path}: invalid safetensors file: {problem}. Re-download or "
                          f"re-save the checkpoint.")

    def _check_entry(self, name: str, info, data_len: int):
        if not isinstance(info, dict):
            self._fail(f"entry {name!r} is not an object")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype not in _ITEMSIZE:
            self._fail(f"tensor {name!r} has unknown dtype {dtype!r}")
        if not (isinstance(shape, list)
                and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
            self._fail(f"tensor {name!r} has invalid shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2
                and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
            self._fail(f"tensor {name!r} has invalid data_offsets {offsets!r}")
        begin, end = offsets
        if not 0 <= begin <= end <= data_len:
            self._fail(f"tensor {name!r} data_offsets [{begin}, {end}] lie outside the "
                       f"{data_len}-byte data section")
        want = math.prod(shape) * _ITEMSIZE[dtype]
        if end - begin != want:
            self._fail(f"tensor {name!r} ({dtype} {shape}) needs {want} bytes but data_offsets "
                       f"[{begin}, {end}] span {end - begin}")
        return dtype, tuple(shape), begin, end

    def keys(self) -> list[str]:
        return list(self._info)

    def __contains__(self, name: str) -> bool:
        return name in self._info

    def dtype(self, name: str) -> str:
        """The safetensors dtype string, e.g. "F32", "BF16", "F16"."""
        return self._info[name][0]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._info[name][1]

    def nbytes(self, name: str) -> int:
        _, _, begin, end = self._info[name]
        return end - begin

    def get(self, name: str) -> np.ndarray:
        """Read-only array view: F32 -> float32, F16 -> float16, BF16 -> uint16 (raw bits)."""
        dtype, shape, begin, end = self._info[name]
        if dtype not in _NUMPY:
            raise ExportError(f"{self.path}: tensor {name!r} has dtype {dtype}; only F32, BF16 "
                              f"and F16 tensors can be read (OpenELM checkpoints use F32 or BF16)")
        if end == begin:
            return np.zeros(shape, dtype=_NUMPY[dtype])
        raw = self._map[self._data_start + begin:self._data_start + end]
        return raw.view(_NUMPY[dtype]).reshape(shape)

    def close(self) -> None:
        self._map = None  # the mapping closes when the last view of it is gone

    def __enter__(self) -> "SafetensorsFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ----------------------------------------------------------------------------- writing

def _numpy_to_st(arr: np.ndarray, name: str) -> str:
    for st, dt in (("F32", np.float32), ("F16", np.float16)):
        if arr.dtype == dt:
            return st
    raise ValueError(f"tensor {name!r}: dtype {arr.dtype} cannot be written; use float32, "
                     f"float16, or uint16 bit patterns with dtypes[{name!r}] = 'BF16'")


def write_safetensors_streaming(path: str | os.PathLike,
                                entries: Iterable[tuple[str, str, tuple[int, ...]]],
                                make: Callable[[str], np.ndarray],
                                metadata: Mapping[str, str] | None = None,
                                on_written: Callable[[int], None] | None = None) -> int:
    """Write a safetensors file one tensor at a time; returns the file size.

    entries: (name, safetensors dtype, shape) for every tensor; make(name) is called once per
    tensor, in file order, and must return an array of that shape (float32 for F32, float16 for
    F16, uint16 bits for BF16). Tensors are laid out like the safetensors library does it
    (largest element size first, then by name), and the JSON header is padded with spaces to a
    multiple of 8 bytes so every tensor is 8-byte aligned. on_written(n) is told of each n bytes.
    """
    entries = sorted(entries, key=lambda e: (-_ITEMSIZE[e[1]], e[0]))
    header: dict = {"__metadata__": dict({"format": "pt"} if metadata is None else metadata)}
    if not header["__metadata__"]:
        del header["__metadata__"]
    offset = 0
    for name, dtype, shape in entries:
        if dtype not in _NUMPY:
            raise ValueError(f"tensor {name!r}: dtype {dtype!r} is not one of {sorted(_NUMPY)}")
        n = math.prod(shape) * _ITEMSIZE[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for name, dtype, shape in entries:
            arr = np.ascontiguousarray(make(name))
            if arr.shape != tuple(shape) or arr.dtype != _NUMPY[dtype]:
                raise ValueError(f"tensor {name!r}: got {arr.dtype} {arr.shape}, expected "
                                 f"{_NUMPY[dtype]} {tuple(shape)} for {dtype}")
            f.write(arr.reshape(-1).view(np.uint8).data)
            if on_written:
                on_written(arr.nbytes)
    return 8 + len(blob) + offset


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, np.ndarray],
                      dtypes: Mapping[str, str] | None = None,
                      metadata: Mapping[str, str] | None = None) -> int:
    """Write arrays to a safetensors file; returns its size.

    float32 -> F32, float16 -> F16; a uint16 array is written as BF16 when dtypes[name] == "BF16"
    (it holds bf16 bit patterns, see f32_to_bf16). metadata defaults to {"format": "pt"}, what
    PyTorch's save_file writes (pass {} for none).
    """
    dtypes = dict(dtypes or {})
    entries = []
    for name, arr in tensors.items():
        arr = np.asarray(arr)
        if dtypes.get(name) == "BF16":
            if arr.dtype != np.uint16:
                raise ValueError(f"tensor {name!r}: BF16 needs uint16 bit patterns, got "
                                 f"{arr.dtype}; convert with f32_to_bf16 first")
            entries.append((name, "BF16", arr.shape))
        else:
            st = _numpy_to_st(arr, name)
            if name in dtypes and dtypes[name] != st:
                raise ValueError(f"tensor {name!r}: dtypes says {dtypes[name]!r} but the array "
                                 f"is {arr.dtype}")
            entries.append((name, st, arr.shape))
    return write_safetensors_streaming(path, entries, lambda n: np.asarray(tensors[n]), metadata)
