"""How many entries a sparse delta gets: ``--density`` as a fraction, a count, or ``lora:R``.

- ``0.01``: that fraction of every adapted weight matrix (rounded, at least one entry each);
- ``250000``: that many entries in total, shared out in proportion to the matrices' sizes (exact total);
- ``lora:8``: as many entries as LoRA of rank 8 has parameters over the same matrices, ``8 * (out + in)`` each.
"""

from __future__ import annotations

from dataclasses import dataclass

from qft.errors import QftError

_FIX = "pass a fraction in (0, 1) such as 0.01, a whole count such as 250000, or lora:R such as lora:8"


@dataclass(frozen=True)
class Density:
    kind: str  # "fraction" | "count" | "lora"
    value: float  # the fraction, the total count, or the LoRA rank

    def __str__(self):
        if self.kind == "lora":
            return f"lora:{int(self.value)}"
        return str(int(self.value)) if self.kind == "count" else repr(self.value)

    def counts(self, shapes: list[tuple[int, int]]) -> list[int]:
        """Entries per matrix, for matrices of the given (out, in) shapes."""
        sizes = [o * i for o, i in shapes]
        if self.kind == "fraction":
            ks = [max(1, round(self.value * n)) for n in sizes]
        elif self.kind == "lora":
            ks = [int(self.value) * (o + i) for o, i in shapes]
        else:
            if self.value > sum(sizes):
                raise QftError(f"density {int(self.value)} asks for more entries than the adapted weights hold "
                               f"({sum(sizes)})", "pass a smaller count or a fraction such as 0.01")
            if self.value < len(sizes):
                raise QftError(f"density {int(self.value)} is fewer entries than there are adapted weights "
                               f"({len(sizes)}), so some would get none", _FIX)
            ks = allocate(int(self.value), sizes)
            if min(ks) == 0:
                raise QftError(f"density {int(self.value)} leaves some adapted weights with no entry",
                               "pass a larger count or a fraction such as 0.01")
        for k, n, shape in zip(ks, sizes, shapes):
            if k > n:
                raise QftError(f"density {self} gives a {shape[0]}x{shape[1]} weight {k} entries, more than it has",
                               "pass a smaller density")
        return ks


def parse_density(spec) -> Density:
    """Parse ``--density`` (a string from the CLI, or a number from Python) into a ``Density``."""
    if isinstance(spec, Density):
        return spec
    if spec is None:
        raise QftError("SpIEL needs a density", _FIX)
    text = str(spec).strip().lower()
    if text.startswith("lora:"):
        rank = text[5:]
        if not rank.isdigit() or int(rank) <= 0:
            raise QftError(f"density {spec!r} names no positive LoRA rank", _FIX)
        return Density("lora", int(rank))
    try:
        number = float(text)
    except ValueError:
        raise QftError(f"cannot read density {spec!r}", _FIX) from None
    if number != number or number <= 0:
        raise QftError(f"density must be positive, got {spec!r}", _FIX)
    if number < 1:
        return Density("fraction", number)
    if number == 1:
        raise QftError("density 1 trains every weight, which is full fine-tuning, not sparse", _FIX)
    if number != int(number):
        raise QftError(f"density {spec!r} is neither a fraction below 1 nor a whole count", _FIX)
    return Density("count", int(number))


def allocate(total: int, sizes: list[int]) -> list[int]:
    """Split ``total`` over bins in proportion to ``sizes`` (largest remainder): the parts sum to ``total``."""
    whole = sum(sizes)
    exact = [total * n / whole for n in sizes]
    parts = [int(e) for e in exact]
    by_remainder = sorted(range(len(sizes)), key=lambda i: exact[i] - parts[i], reverse=True)
    for i in by_remainder[: total - sum(parts)]:
        parts[i] += 1
    return parts
