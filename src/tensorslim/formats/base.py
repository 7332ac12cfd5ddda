"""Format specs and compressed weights: the two halves of every storage format.

A *format* is a frozen, validated spec (``IntGroup(bits=4, group_size=64)``). Without encoding anything it answers
``nbytes(shape)`` (every stored byte: codes, scales, zeros, masks, factors, permutations) and ``supports(shape)`` (a
reason string when the shape cannot take the format). A *compressed weight* is a frozen dataclass of named tensors
produced for one matrix; ``decode()`` is the reference dense matrix every kernel and test compares against.

Compressed weights are (de)serialized generically from their dataclass fields: a ``torch.Tensor`` field is a stored
tensor, a ``CompressedWeight`` field is a nested part stored under ``"<field>."``, ``None`` means absent. The stored
tensors are exactly what ``nbytes`` counts, so a checkpoint holds what the report says.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from typing import Any, ClassVar, Self

import torch

from ..errors import ConfigError, UnsupportedLayerError

Shape = tuple[int, int]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Format(ABC):
    """A storage format spec. Subclasses are frozen kw_only dataclasses with a unique ``family`` name."""

    family: ClassVar[str] = ""

    @abstractmethod
    def nbytes(self, shape: Shape) -> int:
        """Exact stored bytes of a ``[out, in]`` matrix in this format."""

    def supports(self, shape: Shape) -> str | None:
        """``None`` if ``shape`` can take this format, else a reason naming the shape and a fix."""
        return None

    @abstractmethod
    def spec(self) -> str:
        """The canonical CLI string of this format (``int4:g64``); ``parse_format(f.spec()) == f``."""

    def bits_per_weight(self, shape: Shape) -> float:
        return 8.0 * self.nbytes(shape) / (shape[0] * shape[1])

    def check(self, shape: Shape, layer: str = "<layer>") -> None:
        """Raise :class:`UnsupportedLayerError` naming ``layer`` when ``shape`` cannot take this format."""
        reason = self.supports(shape)
        if reason is not None:
            raise UnsupportedLayerError(f"layer {layer!r} with shape {tuple(shape)} cannot use {self.spec()}: {reason}")

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"family": self.family}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = v.to_dict() if isinstance(v, Format) else v
        return out

    def __str__(self) -> str:
        return self.spec()


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class CompressedWeight(ABC):
    """One matrix in a format: named tensors plus the spec and the dense shape ``[out, in]``."""

    format: Format
    shape: Shape

    def __post_init__(self) -> None:
        # Stored tensors are data, never part of an autograd graph: a weight quantized from a parameter that requires
        # grad would otherwise keep the graph, and with it fp32 copies of the dense matrix, alive as long as it lives.
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor) and (v.requires_grad or v.grad_fn is not None):
                object.__setattr__(self, f.name, v.detach())

    @abstractmethod
    def decode(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The reference dense ``[out, in]`` matrix."""

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``x @ W^T + bias``. The reference path decodes; fast formats override or are dispatched to kernels."""
        if x.is_cuda:  # kernels load lazily, on the first CUDA call; CPU behaviour is unchanged
            from ..kernels.dispatch import linear as kernel_linear

            return kernel_linear(self, x, bias)
        w = self.decode(x.dtype)
        return torch.nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))

    # -- generic storage -------------------------------------------------------------------------------------------
    def tensors(self) -> dict[str, torch.Tensor]:
        """Every stored tensor by name (nested parts as ``part.name``); exactly what is saved and counted."""
        out: dict[str, torch.Tensor] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                out[f.name] = v
            elif isinstance(v, CompressedWeight):
                out.update({f"{f.name}.{k}": t for k, t in v.tensors().items()})
        return out

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.nbytes / self.numel

    @property
    def device(self) -> torch.device:
        return next(iter(self.tensors().values())).device

    def to(self, device: torch.device | str) -> Self:
        changes: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, (torch.Tensor, CompressedWeight)):
                changes[f.name] = v.to(device)
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_tensors(cls, fmt: Format, shape: Shape, tensors: dict[str, torch.Tensor]) -> Self:
        """Rebuild from ``tensors()`` output. Subclasses with nested parts override :meth:`_part_format`."""
        kwargs: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name in ("format", "shape"):
                continue
            if f.name in tensors:
                kwargs[f.name] = tensors[f.name]
                continue
            prefix = f.name + "."
            sub = {k[len(prefix):]: t for k, t in tensors.items() if k.startswith(prefix)}
            if sub:
                part_fmt, part_shape = cls._part_format(fmt, shape, f.name)
                kwargs[f.name] = weight_class(part_fmt).from_tensors(part_fmt, part_shape, sub)
            elif f.default is dataclasses.MISSING:
                raise ConfigError(f"{cls.__name__}: stored tensors lack {f.name!r} (have {sorted(tensors)})")
        out = cls(format=fmt, shape=tuple(shape), **kwargs)  # type: ignore[call-arg]
        out.validate()
        return out

    @classmethod
    def _part_format(cls, fmt: Format, shape: Shape, part: str) -> tuple[Format, Shape]:
        raise ConfigError(f"{cls.__name__} has no nested part {part!r}")

    def validate(self) -> None:
        """Check stored tensors against the spec (shapes, dtypes, byte count); raise ConfigError if inconsistent."""
        expected = self.format.nbytes(self.shape)
        if self.nbytes != expected:
            raise ConfigError(
                f"{type(self).__name__} {self.format.spec()} {self.shape}: stored {self.nbytes} bytes, "
                f"the format needs {expected}"
            )


_WEIGHT_CLASSES: dict[type[Format], type[CompressedWeight]] = {}


def register_weight_class(fmt_cls: type[Format], weight_cls: type[CompressedWeight]) -> None:
    """Bind a format spec type to the compressed-weight type it produces (called once per format module)."""
    _WEIGHT_CLASSES[fmt_cls] = weight_cls


def weight_class(fmt: Format) -> type[CompressedWeight]:
    try:
        return _WEIGHT_CLASSES[type(fmt)]
    except KeyError as e:
        raise ConfigError(f"no compressed-weight type registered for format {type(fmt).__name__}") from e


def check_weight(w: torch.Tensor, layer: str = "<layer>") -> None:
    """Methods call this first: a 2-D finite float matrix, else a typed error naming the layer."""
    if w.ndim != 2:
        raise UnsupportedLayerError(f"layer {layer!r}: expected a 2-D weight [out, in], got shape {tuple(w.shape)}")
    if not torch.isfinite(w).all():
        bad = int((~torch.isfinite(w)).sum())
        raise UnsupportedLayerError(
            f"layer {layer!r}: weight has {bad} non-finite values (NaN/Inf); fix the checkpoint or ignore the layer"
        )
