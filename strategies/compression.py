"""Message compressors for compressed gossip (CHOCO): encode, decode and count wire bytes.

A compressor turns one tensor into a few plain arrays (``suffix -> array``); a parameter dict
``{name: x}`` travels as ``{f"{name}/{suffix}": array}``, so a message stays a plain
``dict[str, np.ndarray]``. Shapes and dtypes are not sent: the receiver decodes with its own
parameters as the template, which every node shares.

Values are sent in the parameter's own dtype (float32 for the models, float64 in the numpy
tests), indices as int32 and quantisation scales as float32.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping

import numpy as np

from strategies.base import Params
from strategies.registry import ConfigError, Registry

Parts = dict[str, np.ndarray]

COMPRESSORS: Registry = Registry("compressor")

_INDEX_DTYPE = np.int32
_SCALE_DTYPE = np.float32
_INT8_MAX = 127


class Compressor(ABC):
    """Q(x) for one tensor: ``decode(encode(x))`` is what sender and receivers both apply."""

    name: str = ""
    # Names of the arrays ``encode`` returns; the receiver looks up exactly these.
    parts: tuple[str, ...] = ()

    @abstractmethod
    def encode(self, x: np.ndarray, rng: np.random.Generator) -> Parts:
        """The arrays that carry Q(x) (``rng`` is used only by randomised compressors)."""

    @abstractmethod
    def decode(self, parts: Mapping[str, np.ndarray], like: np.ndarray) -> np.ndarray:
        """Q(x) as a dense array shaped and typed like ``like``."""

    @abstractmethod
    def wire_bytes(self, size: int, itemsize: int) -> int:
        """Exact bytes ``encode`` sends for ``size`` items of ``itemsize`` bytes each."""


class Identity(Compressor):
    """No compression: Q(x) = x, sent densely."""

    name = "none"
    parts = ("val",)

    def encode(self, x: np.ndarray, rng: np.random.Generator) -> Parts:
        """The tensor itself, copied so later in-place updates of ``x`` cannot leak in."""
        return {"val": np.array(x, copy=True)}

    def decode(self, parts: Mapping[str, np.ndarray], like: np.ndarray) -> np.ndarray:
        """The dense values."""
        return np.asarray(parts["val"], dtype=like.dtype).reshape(like.shape)

    def wire_bytes(self, size: int, itemsize: int) -> int:
        """``size`` values."""
        return size * itemsize


def kept_count(size: int, fraction: float) -> int:
    """ceil(fraction * size), at least 1; robust to float noise (0.28 * 25 is 7.000000000000001)."""
    return min(size, max(1, math.ceil(round(fraction * size, 9))))


class _Sparsifier(Compressor):
    """Keeps ``kept_count(size, fraction)`` entries; sends their flat indices and values."""

    parts = ("idx", "val")

    def __init__(self, fraction: float) -> None:
        if not 0.0 < fraction <= 1.0:
            raise ConfigError("compress-fraction", fraction, "a fraction in (0, 1]")
        self.fraction = fraction

    @abstractmethod
    def _select(self, flat: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
        """Flat indices of the k kept entries."""

    def encode(self, x: np.ndarray, rng: np.random.Generator) -> Parts:
        """Sorted int32 flat indices and the values there."""
        flat = x.reshape(-1)
        if flat.size >= np.iinfo(_INDEX_DTYPE).max:
            raise ValueError(f"{flat.size} entries do not fit int32 indices")
        idx = np.sort(self._select(flat, kept_count(flat.size, self.fraction), rng))
        return {"idx": idx.astype(_INDEX_DTYPE), "val": flat[idx].copy()}

    def decode(self, parts: Mapping[str, np.ndarray], like: np.ndarray) -> np.ndarray:
        """Zeros except at the sent indices."""
        out = np.zeros(like.size, dtype=like.dtype)
        out[parts["idx"]] = parts["val"]
        return out.reshape(like.shape)

    def wire_bytes(self, size: int, itemsize: int) -> int:
        """K int32 indices plus k values."""
        k = kept_count(size, self.fraction)
        return k * (np.dtype(_INDEX_DTYPE).itemsize + itemsize)


class TopK(_Sparsifier):
    """The fraction of entries with the largest magnitudes (per tensor); deterministic."""

    name = "top-k"

    def _select(self, flat: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
        return np.argpartition(np.abs(flat), flat.size - k)[flat.size - k :]


class RandomK(_Sparsifier):
    """A uniformly random fraction of entries (per tensor), *not* rescaled by size / k.

    CHOCO needs a contraction, E||Q(x) - x||^2 <= (1 - delta) ||x||^2: unscaled random-k is one
    with delta = k / size. The rescaled, unbiased version has variance (size / k - 1) ||x||^2,
    larger than ||x||^2 once k < size / 2, and makes CHOCO diverge at a fixed gamma.
    """

    name = "random-k"

    def _select(self, flat: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
        return rng.choice(flat.size, size=k, replace=False)


class EightBit(Compressor):
    """Symmetric 8-bit quantisation with one float32 scale per tensor: x ~ scale * int8.

    scale = max|x| / 127 and round-to-nearest, so |Q(x) - x| <= scale / 2 = max|x| / 254 per
    entry, and never more than |x| itself: a contraction, as CHOCO requires.
    """

    name = "8bit"
    parts = ("q", "scale")

    def encode(self, x: np.ndarray, rng: np.random.Generator) -> Parts:
        """int8 codes and the float32 scale."""
        peak = float(np.max(np.abs(x))) if x.size else 0.0
        scale = np.array([peak / _INT8_MAX], dtype=_SCALE_DTYPE)
        if scale[0] == 0.0:
            codes = np.zeros(x.shape, dtype=np.int8)
        else:
            codes = np.clip(np.rint(x / scale[0]), -_INT8_MAX, _INT8_MAX).astype(np.int8)
        return {"q": codes, "scale": scale}

    def decode(self, parts: Mapping[str, np.ndarray], like: np.ndarray) -> np.ndarray:
        """Codes * scale in the template's dtype."""
        scale = parts["scale"].astype(like.dtype)[0]
        return (parts["q"].astype(like.dtype) * scale).reshape(like.shape)

    def wire_bytes(self, size: int, itemsize: int) -> int:
        """One byte per entry plus the 4-byte scale."""
        return size + np.dtype(_SCALE_DTYPE).itemsize


COMPRESSORS.register("none")(lambda fraction: Identity())
COMPRESSORS.register("top-k")(TopK)
COMPRESSORS.register("random-k")(RandomK)
COMPRESSORS.register("8bit")(lambda fraction: EightBit())


def create_compressor(name: str, fraction: float = 0.1) -> Compressor:
    """The compressor registered as ``name``; ``fraction`` is used by the sparsifiers only."""
    return COMPRESSORS.get(name)(fraction)


def encode_params(compressor: Compressor, params: Params, rng: np.random.Generator) -> Params:
    """Q(x) of every tensor as one flat message, keys ``<name>/<part>``."""
    return {
        f"{name}/{part}": arr
        for name, x in params.items()
        for part, arr in compressor.encode(x, rng).items()
    }


def decode_params(
    compressor: Compressor, message: Mapping[str, np.ndarray], like: Params
) -> Params:
    """Dense Q(x) per tensor, with the receiver's own ``like`` giving names, shapes, dtypes."""
    return {
        name: compressor.decode({p: message[f"{name}/{p}"] for p in compressor.parts}, template)
        for name, template in like.items()
    }


def message_bytes(message: Mapping[str, np.ndarray]) -> int:
    """Bytes a message's arrays occupy (payload only, no framing)."""
    return sum(int(arr.nbytes) for arr in message.values())


def expected_bytes(compressor: Compressor, like: Params) -> int:
    """Bytes ``encode_params`` will send for parameters shaped like ``like`` (no encoding)."""
    return sum(compressor.wire_bytes(x.size, x.dtype.itemsize) for x in like.values())
