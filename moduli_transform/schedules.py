"""Sparsity schedules: how much to prune, and when (step -> sparsity).

A schedule is any callable ``schedule(step: int) -> float`` giving the target sparsity
after ``step`` calls of ``handle.step()`` (step 0 = before any pruning step).
With final sparsity ``s`` and ``K = total_steps``:

* ``linear`` (the paper's ramp): ``s * min(k, K-1) / (K-1)``: with one ``step()`` per
  epoch, epoch ``k`` trains at the paper's ``s*k/(K-1)`` and the last of K epochs at ``s``;
  with ``K == 1`` the first step prunes to ``s``.
* ``cubic`` (Zhu & Gupta 2017): ``s * (1 - (1 - min(k, K)/K)^3)``.
* ``oneshot``: ``0`` before step ``K``, ``s`` from step ``K`` on (train dense, prune once).

Example:
    >>> schedule = get_schedule("linear", final_sparsity=0.9, total_steps=4)
    >>> [round(schedule(k), 2) for k in range(5)]
    [0.0, 0.3, 0.6, 0.9, 0.9]
"""

from __future__ import annotations

from typing import Callable

__all__ = ["SCHEDULES", "register_schedule", "get_schedule", "Schedule"]

Schedule = Callable[[int], float]
SCHEDULES: dict[str, Callable[[float, int], Schedule]] = {}


def register_schedule(name: str):
    """Decorator adding a schedule factory ``(final_sparsity, total_steps) -> Schedule``."""

    def decorate(factory):
        SCHEDULES[name] = factory
        return factory

    return decorate


@register_schedule("linear")
def linear(final_sparsity: float, total_steps: int) -> Schedule:
    if total_steps == 1:
        return lambda step: final_sparsity if step >= 1 else 0.0
    return lambda step: final_sparsity * min(step, total_steps - 1) / (total_steps - 1)


@register_schedule("cubic")
def cubic(final_sparsity: float, total_steps: int) -> Schedule:
    return lambda step: final_sparsity * (1.0 - (1.0 - min(step, total_steps) / total_steps) ** 3)


@register_schedule("oneshot")
def oneshot(final_sparsity: float, total_steps: int) -> Schedule:
    return lambda step: final_sparsity if step >= total_steps else 0.0


def get_schedule(schedule: str | Schedule, final_sparsity: float, total_steps: int) -> Schedule:
    """Resolve a schedule name or callable.

    Raises:
        ValueError: unknown name, listing the registered ones.
    """
    if callable(schedule):
        return schedule
    if schedule not in SCHEDULES:
        raise ValueError(
            f"unknown schedule {schedule!r}; expected one of {', '.join(sorted(SCHEDULES))} "
            "or a callable step -> sparsity"
        )
    return SCHEDULES[schedule](float(final_sparsity), int(total_steps))
