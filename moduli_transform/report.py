"""Human-readable tables of targets and of a handle's state."""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from .targets import Target

if TYPE_CHECKING:
    from .handle import ModuliHandle

__all__ = ["format_bytes", "format_table", "format_targets", "format_summary"]


def format_bytes(count: int) -> str:
    """1536 -> '1.5 KiB'."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if count >= size:
            return f"{count / size:.2f} {unit}"
    return f"{count} B"


def format_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Plain-text table with columns padded to their widest cell."""
    cells = [list(map(str, header))] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_targets(targets: Sequence[Target]) -> str:
    """Table of discovered targets: name, kind, shape, slice, gates, evidence."""
    rows = [(t.name, t.kind, "x".join(map(str, t.shape)), t.describe_slices(),
             f"{t.gates} {''.join(t.gate_names)}".strip(), t.evidence) for t in targets]
    return format_table(["parameter", "kind", "shape", "slice", "gates", "why"], rows)


def format_summary(handle: "ModuliHandle") -> str:
    """The handle's targets with embedding, coefficient memory and sparsity."""
    sparsity = handle.sparsity()
    rows = []
    for t in handle.targets:
        reg = handle.regularizers.get(t.name)
        if reg is None:
            embedding = "-"
        else:
            embedding = f"{'shared' if reg.shared else 'rows+cols'} {'trained' if reg.trained else 'fixed'}"
        memory = format_bytes(reg.coefficient_bytes()) if reg is not None else "-"
        rows.append((t.name, t.kind, "x".join(map(str, t.shape)), t.describe_slices(), f"{t.gates} {''.join(t.gate_names)}".strip(),
                     embedding, memory, f"{100 * sparsity.get(t.name, 0.0):.1f}%"))
    config = handle.config.to_dict()
    head = (f"moduli-transform: manifold={config['manifold']} inhibitor={config['inhibitor']} "
            f"control={config['control']} strength={config['strength']} embedding={config['embedding']} "
            f"step={handle.step_count} target sparsity={config['sparsity']} "
            f"overall={100 * sparsity['overall']:.1f}%{' (lottery: masks frozen)' if handle.frozen else ''}")
    table = format_table(["parameter", "kind", "shape", "slice", "gates", "embedding", "C memory", "sparsity"], rows)
    return f"{head}\n{table}\ncoefficient memory: {format_bytes(handle.memory_bytes())}"
