"""One training run: dense, then gradually pruned, then (optionally) a lottery-ticket retrain.

A run has three phases, then an optional fourth:

* ``dense``: train with the task loss plus the moduli penalty;
* ``prune``: same loss while the sparsity ramps up to ``sparsity``;
* ``finetune``: same loss at the final sparsity, masks fixed by magnitude;
* ``lottery`` (``lottery=True``): ``handle.lottery("random")`` re-initialises the weights,
  keeps the masks fixed, and trains again with a fresh optimizer: the task loss plus the
  penalty (``preset.lottery_penalty``, the authors') with the same C or a newly drawn
  embedding (``preset.lottery_embedding``, overridden by ``RunConfig.lottery_embedding``),
  or the task loss alone.

The preset's ``schedule`` sets the lengths and the ramp: ``"phases"`` (fractions of
``steps``, a linear ramp per step, :class:`LinearRamp`) or ``"epochs"`` (the authors':
epoch 0 dense, ``final * e / (epochs - 1)`` from the start of epoch ``e``, then the
stabilizer epochs, :class:`EpochRamp`).

The metric is measured on the test split at three points: ``dense_metric`` (end of the
dense phase, before any pruning), ``sparse_metric`` (end of fine-tuning) and
``lottery_metric`` (end of the lottery retrain). ``sparse_tail_metric`` and
``lottery_tail_metric`` are the means of the last ``preset.tail_fraction`` of the periodic
validation evaluations of those phases (the number the tables report: one evaluation is noisy).

The run directory holds ``config.json`` (the resolved configuration), ``metrics.jsonl``
(one record per log/eval: step, phase, kind, loss, metric, sparsity),
``weights.safetensors`` (model ``state_dict`` plus ``mask/<param>`` for every mask),
``summary.json`` and ``checkpoints/``. Checkpoints hold everything that moves during
training (weights, optimizer, handle, task state, every RNG), so ``resume=True`` ends
with bit-identical weights and masks to an uninterrupted run.

Example:
    >>> config = RunConfig(task="adding", preset="test", out="runs/example")
    >>> RunConfig.from_json(config.to_json()) == config
    True
    >>> RunConfig(task="adding", regularizer="l2")
    Traceback (most recent call last):
    ...
    moduli_transform.tasks.runner.RunConfigError: unknown regularizer 'l2'; expected one of moduli, l1, l1-mean, l1-matched, shuffled, none
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy
import torch
from safetensors.torch import save_file
from torch.nn.parallel import DistributedDataParallel

from moduli_transform.config import GRANULARITIES
from moduli_transform.device import exact_float32, resolve_device, to_device
from moduli_transform.distributed import (backend_for, barrier, decorrelate_ranks, gather_rank_rng_states,
                                          init_distributed_from_env, is_main_process, restore_rank_rng_states,
                                          shard_batch, sync_handle)

from . import LOTTERY_EMBEDDINGS, TASKS, Preset, Task, get_task
from .checkpoint import (capture_training_state, flatten_state, load_checkpoint, restore_training_state,
                         save_checkpoint, unflatten_state)
from .prefetch import BatchPrefetcher
from .progress import progress_bar, resolve_mode
from .run_folder import RunFolderError, claim_run_folder, holds_run, lock_run_folder

__all__ = ["RunConfig", "RunConfigError", "RunInterrupted", "Phases", "LinearRamp", "EpochRamp", "run",
           "initial_embeddings", "tail_mean", "SUMMARY_KEYS", "METRIC_KEYS", "REGULARIZERS"]

# Run regularizer -> (handle control, L1 constant): "l1" is the authors' "standard" L1
# (coefficient 1), "l1-mean" their --regpower mean, "l1-matched" ours (same mean as moduli's C).
REGULARIZERS = {"moduli": ("moduli", "matched"), "l1": ("l1", "one"), "l1-mean": ("l1", "mean"),
                "l1-matched": ("l1", "matched"), "shuffled": ("shuffled", "matched"), "none": ("none", "matched")}
EMBEDDINGS = ("fixed", "trained")
SUMMARY_KEYS = ("task", "preset", "regularizer", "manifold", "inhibitor", "embedding", "sparsity", "seed",
                "metric_name", "higher_is_better", "dense_metric", "sparse_metric", "lottery_metric",
                "sparse_tail_metric", "lottery_tail_metric", "wall_time_s", "data_time_fraction", "steps")
METRIC_KEYS = ("step", "phase", "kind", "loss", "metric", "sparsity")
WEIGHTS_FILE = "weights.safetensors"
EMBEDDINGS_FILE = "embeddings.safetensors"


class RunConfigError(ValueError):
    """A run option with a bad value."""


class RunInterrupted(RuntimeError):
    """Raised by :func:`run` when ``stop_after`` is reached (a simulated crash)."""


def _choice(option: str, value: Any, choices: Any) -> None:
    if value not in choices:
        raise RunConfigError(f"unknown {option} {value!r}; expected one of {', '.join(choices)}")


@dataclass
class RunConfig:
    """Everything that defines a run; validated on creation, JSON round trip.

    ``strength``, ``steps`` and ``checkpoint_every`` override the preset when given;
    ``threads`` sets ``torch.set_num_threads`` for the run (small models on a busy machine
    train far faster on one thread; part of the identity, since results depend on it);
    ``out`` defaults to ``runs/<task>-<preset>-<regularizer>-<manifold>-<sparsity>-s<seed>``.
    """

    task: str
    preset: str = "cpu"
    manifold: str = "torus"
    inhibitor: str = "dog"
    regularizer: str = "moduli"
    embedding: str = "fixed"
    sparsity: float = 0.9
    lottery: bool = False
    seed: int = 0
    out: str | None = None
    strength: float | None = None
    steps: int | None = None
    resume: bool = False
    data: str | None = None
    checkpoint_every: int | None = None
    threads: int | None = None
    granularity: str = "element"
    lottery_embedding: str | None = None

    def __post_init__(self) -> None:
        _choice("task", self.task, sorted(TASKS))
        _choice(f"preset for task {self.task!r}", self.preset, list(TASKS[self.task].presets))
        _choice("regularizer", self.regularizer, REGULARIZERS)
        _choice("embedding", self.embedding, EMBEDDINGS)
        _choice("granularity", self.granularity, GRANULARITIES)
        if self.lottery_embedding is not None:
            _choice("lottery_embedding", self.lottery_embedding, LOTTERY_EMBEDDINGS)
        if not isinstance(self.manifold, str) or not isinstance(self.inhibitor, str):
            raise RunConfigError("manifold and inhibitor must be registry names (str) so runs are recorded in JSON")
        if not 0.0 <= float(self.sparsity) < 1.0:
            raise RunConfigError(f"sparsity must be in [0, 1), got {self.sparsity}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise RunConfigError(f"seed must be an int >= 0, got {self.seed!r}")
        if self.strength is not None and float(self.strength) < 0:
            raise RunConfigError(f"strength must be >= 0, got {self.strength}")
        if self.steps is not None and int(self.steps) < 3:
            raise RunConfigError(f"steps must be >= 3 (dense, prune, fine-tune), got {self.steps}")
        if self.threads is not None and int(self.threads) < 1:
            raise RunConfigError(f"threads must be >= 1, got {self.threads}")
        if self.checkpoint_every is not None and int(self.checkpoint_every) < 1:
            raise RunConfigError(f"checkpoint_every must be >= 1, got {self.checkpoint_every}")
        self.sparsity = float(self.sparsity)
        if self.out is None:
            self.out = str(Path("runs") / f"{self.task}-{self.preset}-{self.regularizer}-{self.manifold}-"
                                          f"{self.sparsity:g}-s{self.seed}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise RunConfigError(f"unknown run config keys {unknown}; expected some of {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> "RunConfig":
        return cls.from_dict(json.loads(text))

    def identity(self) -> dict[str, Any]:
        """The fields that must match for a checkpoint to be resumed (all but ``resume``)."""
        return {k: v for k, v in self.to_dict().items() if k != "resume"}


@dataclass(frozen=True)
class Phases:
    """Step counts of the phases; steps are numbered globally from 0."""

    dense: int
    prune: int
    finetune: int
    lottery: int

    @classmethod
    def plan(cls, steps: int, dense_fraction: float, prune_fraction: float, lottery: int) -> "Phases":
        dense = max(1, round(steps * dense_fraction))
        prune = max(1, min(round(steps * prune_fraction), steps - dense - 1))
        return cls(dense, prune, steps - dense - prune, lottery)

    @classmethod
    def for_preset(cls, preset: Preset, steps: int | None, lottery: bool, epoch: int = 0) -> "Phases":
        """The phases of ``preset``; ``epoch`` is the epoch length when the preset's
        ``steps_per_epoch`` is 0.

        ``steps`` overrides the training length (dense, prune and fine-tune phases): in the
        phases schedule directly, in the epochs schedule by shortening every epoch to
        ``steps // (epochs + stabilizer_epochs)`` steps, so the ramp keeps its shape.

        Example:
            >>> from moduli_transform.tasks.adding import PRESETS
            >>> Phases.for_preset(PRESETS["paper"], 1100, lottery=False)
            Phases(dense=10, prune=990, finetune=100, lottery=0)
        """
        if preset.schedule == "epochs":
            epoch = preset.steps_per_epoch or epoch
            if steps:
                epoch = max(1, steps // (preset.epochs + preset.stabilizer_epochs))
            if epoch < 1:
                raise ValueError(f"epochs schedule with an epoch of {epoch} steps")
            return cls(epoch, (preset.epochs - 1) * epoch, preset.stabilizer_epochs * epoch,
                       preset.lottery_epochs * epoch if lottery else 0)
        steps = steps or preset.steps
        return cls.plan(steps, preset.dense_fraction, preset.prune_fraction,
                        (preset.lottery_steps or steps) if lottery else 0)

    @property
    def sparse_end(self) -> int:
        return self.dense + self.prune + self.finetune

    @property
    def total(self) -> int:
        return self.sparse_end + self.lottery

    def at(self, step: int) -> tuple[str, int]:
        """``(phase name, step within the phase)`` of global step ``step``."""
        start = 0
        for name in ("dense", "prune", "finetune", "lottery"):
            length = getattr(self, name)
            if step < start + length:
                return name, step - start
            start += length
        raise ValueError(f"step {step} is past the run's {self.total} steps")


class LinearRamp:
    """Sparsity schedule ``final * clamp((k - start) / length, 0, 1)`` after ``k`` handle steps.

    Zero through the dense phase, linear over the prune phase, ``final`` afterwards.

    Example:
        >>> ramp = LinearRamp(0.9, start=2, length=3)
        >>> [round(ramp(k), 2) for k in range(7)]
        [0.0, 0.0, 0.0, 0.3, 0.6, 0.9, 0.9]
    """

    def __init__(self, final: float, start: int, length: int) -> None:
        self.final, self.start, self.length = float(final), int(start), int(length)
        self.spec = {"schedule": "linear_ramp", "final": self.final, "start": self.start, "length": self.length}

    def __call__(self, step: int) -> float:
        return self.final * min(max((step - self.start) / self.length, 0.0), 1.0)


class EpochRamp:
    """The authors' per-epoch ramp: after ``k`` handle steps, in epoch ``e = k // steps_per_epoch``,
    ``final * (min(e, n - 1) + offset) / (n - 1 + offset)`` for ``e >= 1``, and 0 in epoch 0.

    Epoch 0 is dense; the target of epoch ``e`` holds from its first step (the handle prunes
    after each step to the target of the next one). Offset 0 is the adding problem's
    ``e/(n-1)`` (adding_problem/main.py:200-204, 15ef708), offset 1 the language model's
    ``(e+1)/n`` (word_example/main.py:283-287, epochs counted from 1 there).

    Example:
        >>> ramp = EpochRamp(0.9, steps_per_epoch=2, epochs=4)
        >>> [round(ramp(k), 2) for k in range(0, 10, 2)]
        [0.0, 0.3, 0.6, 0.9, 0.9]
        >>> ramp(1), ramp(3)
        (0.0, 0.3)
        >>> [round(EpochRamp(0.8, 1, 4, offset=1)(k), 2) for k in range(5)]
        [0.0, 0.4, 0.6, 0.8, 0.8]
    """

    def __init__(self, final: float, steps_per_epoch: int, epochs: int, offset: int = 0) -> None:
        self.final, self.steps_per_epoch, self.epochs = float(final), int(steps_per_epoch), int(epochs)
        self.offset = int(offset)
        self.spec = {"schedule": "epoch_ramp", "final": self.final, "steps_per_epoch": self.steps_per_epoch,
                     "epochs": self.epochs, "offset": self.offset}

    def __call__(self, step: int) -> float:
        epoch = min(step // self.steps_per_epoch, self.epochs - 1)
        if epoch == 0:
            return 0.0
        return self.final * (epoch + self.offset) / (self.epochs - 1 + self.offset)


def tail_mean(values: list[float], fraction: float) -> float | None:
    """Mean of the last ``max(1, round(fraction * len(values)))`` values; None when empty.

    Example:
        >>> tail_mean([9.0] * 19 + [1.0], 0.05), tail_mean([], 0.05)
        (1.0, None)
    """
    if not values:
        return None
    count = max(1, round(fraction * len(values)))
    return sum(values[-count:]) / count


def seed_everything(seed: int) -> None:
    random.seed(seed)
    numpy.random.seed(seed)
    torch.manual_seed(seed)


def _atomic_json(path: Path, data: Any) -> None:
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    temporary.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    os.replace(temporary, path)


def _save_weights(path: Path, model: torch.nn.Module, masks: dict[str, torch.Tensor]) -> None:
    tensors = {name: tensor.detach().cpu().clone().contiguous() for name, tensor in model.state_dict().items()}
    tensors.update({f"mask/{name}": mask.detach().cpu().clone().contiguous() for name, mask in masks.items()})
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file(tensors, str(temporary), metadata={"format": "moduli-transform-run"})
    os.replace(temporary, path)


def _save_embeddings(path: Path, handle: Any) -> None:
    """Each target's neuron coordinates: ``<param>/rows`` and ``<param>/cols``."""
    tensors = {}
    for name, regularizer in handle.regularizers.items():
        tensors[f"{name}/rows"] = regularizer.row_embedding.detach().cpu().contiguous().clone()
        tensors[f"{name}/cols"] = regularizer.col_embedding.detach().cpu().contiguous().clone()
    temporary = path.with_suffix(".tmp")
    save_file(tensors, str(temporary), metadata={"manifold": json.dumps(handle.config.to_dict()["manifold"])})
    os.replace(temporary, path)


@dataclass
class _Progress:
    """What the loop accumulates; all of it goes into checkpoints."""

    step: int = 0
    results: dict[str, Any] = field(default_factory=dict)
    wall_time_s: float = 0.0
    data_time_s: float = 0.0
    step_time_s: float = 0.0
    metrics_bytes: int = 0
    evaluations: list = field(default_factory=list)  # [phase, validation metric] per periodic evaluation


class _Run:
    """The state of one run while it trains (kept off the public API)."""

    def __init__(self, config: RunConfig, device: torch.device = torch.device("cpu"), prefetch: bool = True) -> None:
        import moduli_transform as mt

        self.config = config
        self.device = device
        self.prefetch = prefetch
        self._batches: BatchPrefetcher | None = None
        self.out = Path(config.out)
        task_class = get_task(config.task)
        self.preset = task_class.get_preset(config.preset).with_overrides(
            strength=config.strength, checkpoint_every=config.checkpoint_every)
        self.task: Task = task_class(self.preset, data=config.data).to(device)
        epoch = self.task.epoch_steps() if self.preset.schedule == "epochs" and not self.preset.steps_per_epoch else 0
        self.phases = Phases.for_preset(self.preset, config.steps, config.lottery, epoch)
        self.lottery_embedding = config.lottery_embedding or self.preset.lottery_embedding
        seed_everything(config.seed)
        # Initialised on the CPU (the same weights on every device), then moved, then attached:
        # the handle's embeddings, coefficients and masks follow the parameters' device.
        self.model = self.task.build_model().to(device)
        control, l1_coefficient = REGULARIZERS[config.regularizer]
        self.handle = mt.attach(
            self.model, example_inputs=to_device(self.task.example_inputs(), device), manifold=config.manifold,
            inhibitor=config.inhibitor, strength=self.preset.strength, embedding=config.embedding, control=control,
            l1_coefficient=l1_coefficient, sparsity=config.sparsity, schedule=self._schedule(),
            total_steps=self.phases.prune, seed=config.seed, granularity=config.granularity, scope=self.preset.scope,
            prune_also=self.preset.prune_also)
        self._parameters = dict(self.model.named_parameters())
        unknown = [name for name in self.preset.l1_also if name not in self._parameters]
        if unknown:
            raise RunConfigError(f"preset l1_also names {unknown}, not parameters of the model; it has "
                                 f"{', '.join(self._parameters)}")
        self.optimizer = self.task.make_optimizer(self.model)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.progress = _Progress()
        # Under torchrun: train through DDP, keep the bare model for evaluation and files.
        # The backend follows the device (nccl for cuda, gloo for the CPU even on a GPU
        # machine); on cuda each rank holds its own GPU, cuda:LOCAL_RANK (resolve_device).
        self.train_model: torch.nn.Module = self.model
        if init_distributed_from_env(backend_for(device))[1] > 1:
            device_ids = [device.index] if device.type == "cuda" else None
            self.train_model = DistributedDataParallel(self.model, device_ids=device_ids)
            sync_handle(self.handle)
            decorrelate_ranks(config.seed)   # each rank its own dropout masks

    def _schedule(self) -> LinearRamp | EpochRamp:
        if self.preset.schedule == "epochs":
            return EpochRamp(self.config.sparsity, self.phases.dense, self.preset.epochs, self.preset.ramp_offset)
        return LinearRamp(self.config.sparsity, self.phases.dense, self.phases.prune)

    # -- checkpoints ----------------------------------------------------------------------
    @property
    def checkpoints(self) -> Path:
        return self.out / "checkpoints"

    def save_checkpoint(self) -> None:
        task_tensors, task_state = flatten_state(self.task.state_dict(), "task")
        step = self.progress.step
        phase = self.phases.at(step)[0] if step < self.phases.total else "done"
        extra = {"config": self.config.identity(), "progress": asdict(self.progress), "task": task_state,
                 "phase": phase}
        tensors, state = capture_training_state(self.progress.step, self.model, self.optimizer, self.handle,
                                                {"data": self.generator}, extra)
        tensors.update(task_tensors)
        tensors.update(gather_rank_rng_states())   # collective: each rank's own generators (DDP)
        if is_main_process():
            save_checkpoint(self.checkpoints, tensors, state)

    def restore(self) -> bool:
        """Load the newest checkpoint; False when there is none."""
        # Loaded on the CPU, whichever device wrote it: the model, the handle and the task copy
        # their tensors onto this run's device, and the optimizers place their state by their
        # parameters' devices, except Adam's step counts, which then stay on the CPU as in a
        # fresh run (loaded onto a GPU, each step paid one GPU-to-CPU sync per parameter).
        loaded = load_checkpoint(self.checkpoints)
        if loaded is None:
            return False
        tensors, state = loaded
        saved = state["extra"]["config"]
        if saved != self.config.identity():
            changed = sorted(k for k in saved if saved[k] != self.config.identity().get(k))
            raise RunConfigError(f"cannot resume {self.out}: the checkpoint was made with other settings "
                                 f"({', '.join(changed)}); use another --out or the same options")
        restore_training_state(tensors, state, self.model, self.optimizer, self.handle, {"data": self.generator})
        restore_rank_rng_states(tensors)   # under DDP each rank's own, not rank 0's
        self.task.load_state_dict(unflatten_state(state["extra"]["task"], tensors))
        self.progress = _Progress(**state["extra"]["progress"])
        return True

    # -- training -------------------------------------------------------------------------
    def log(self, file: Any, phase: str, kind: str, loss: float | None, metric: float) -> None:
        record = {"step": self.progress.step, "phase": phase, "kind": kind, "loss": loss, "metric": metric,
                  "sparsity": self.handle.sparsity()["overall"]}
        file.write(json.dumps(record) + "\n")

    def penalty(self) -> torch.Tensor:
        """The handle's penalty plus the preset's plain L1 terms (``l1_also``)."""
        total = self.handle.penalty()
        for name in self.preset.l1_also:
            total = total + self.preset.strength * self._parameters[name].abs().mean()
        return total

    def train_step(self, phase: str, phase_step: int) -> tuple[float, float | Callable[[], float]]:
        started = time.perf_counter()
        # Every rank draws the same global batch and trains on its equal slice.
        if self._batches is not None:
            batch = to_device(self._batches.next(), self.device)
        else:
            batch = to_device(self.task.train_batch(phase_step, self.generator), self.device)
        batch = shard_batch(batch, dim=getattr(self.task, "batch_dim", 0))
        data_done = time.perf_counter()
        self.model.train()
        loss, metric = self.task.loss(self.train_model, batch)
        # The lottery ticket retrains with masks fixed, with the penalty or without it (preset).
        total = loss if phase == "lottery" and not self.preset.lottery_penalty else loss + self.penalty()
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        if self.preset.clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.preset.clip)
        self.optimizer.step()
        self.handle.step()
        finished = time.perf_counter()
        self.progress.data_time_s += data_done - started
        self.progress.step_time_s += finished - started
        return float(total.detach()), metric

    def evaluate(self, split: str) -> float:
        self.model.eval()
        try:
            return self.task.evaluate(self.model, split)
        finally:
            self.model.train()

    def after_step(self, file: Any, phase: str, loss: float, metric: float | Callable[[], float]) -> float | None:
        """Logging, evaluations and phase transitions after step ``progress.step``; returns a validation metric.

        ``metric`` is the training batch's metric, or the task's function computing it
        (:meth:`Task.loss`), called only on logged steps.
        """
        step, results, phases = self.progress.step, self.progress.results, self.phases
        if step % self.preset.log_every == 0:
            self.log(file, phase, "train", loss, metric() if callable(metric) else metric)
        valid = None
        every = self.phases.dense if self.preset.schedule == "epochs" else self.preset.eval_every
        if step % every == 0:
            valid = self.evaluate("valid")
            self.task.after_evaluate(valid, self.optimizer)
            self.log(file, phase, "valid", None, valid)
            self.progress.evaluations.append([phase, valid])
        marks = {phases.dense: "dense_metric", phases.sparse_end: "sparse_metric"}
        if phases.lottery:
            marks[phases.total] = "lottery_metric"
        if step in marks:
            results[marks[step]] = self.evaluate("test")
            results[marks[step].replace("metric", "sparsity")] = self.handle.sparsity()["overall"]
            self.log(file, phase, "test", None, results[marks[step]])
        if step == phases.sparse_end and phases.lottery:
            self.handle.lottery("random")
            if self.lottery_embedding == "redraw":
                generator = torch.Generator().manual_seed(self.config.seed + 2)
                for regularizer in self.handle.regularizers.values():
                    regularizer.redraw_embedding(generator)
            self.optimizer = self.task.make_optimizer(self.model)
            self.task.reset()
        return valid

    def train(self, progress: bool | str, stop_after: int | None) -> None:
        metrics_path = self.out / "metrics.jsonl"
        main = is_main_process()
        with (open(metrics_path, "r+" if metrics_path.exists() else "w") if main else io.StringIO()) as file:
            file.truncate(self.progress.metrics_bytes)
            file.seek(self.progress.metrics_bytes)
            bar = progress_bar(self.phases.total, initial=self.progress.step, mode=progress if main else "off",
                               desc=f"{self.config.task}/{self.config.regularizer}")
            # Batches drawn ahead from where the loop's generator stands now (after a restore:
            # where the checkpoint left it), so a resumed run sees the same batches.
            if self.prefetch and self.task.prefetch_batches:
                self._batches = BatchPrefetcher(lambda generator: self.task.train_batch(0, generator), self.generator)
            with bar, self._stop_prefetching_on_exit():
                resumed_at = time.perf_counter() - self.progress.wall_time_s
                while self.progress.step < self.phases.total:
                    if stop_after is not None and self.progress.step >= stop_after:
                        raise RunInterrupted(f"stopped after step {self.progress.step} (stop_after)")
                    phase, phase_step = self.phases.at(self.progress.step)
                    loss, metric = self.train_step(phase, phase_step)
                    self.progress.step += 1
                    valid = self.after_step(file, phase, loss, metric)
                    bar.update(1)
                    if valid is not None:
                        bar.set_postfix(phase=phase, **{self.task.metric_name: f"{valid:.4g}"})
                    self.progress.wall_time_s = time.perf_counter() - resumed_at
                    if self.progress.step % self.preset.checkpoint_every == 0 or self.progress.step == self.phases.total:
                        file.flush()
                        self.progress.metrics_bytes = file.tell()
                        self.save_checkpoint()

    @contextlib.contextmanager
    def _stop_prefetching_on_exit(self) -> Iterator[None]:
        """Close the batch producer when the loop ends; a later train_step draws in series."""
        try:
            yield
        finally:
            if self._batches is not None:
                self._batches.close()
                self._batches = None

    def tail_metric(self, phases: tuple[str, ...]) -> float | None:
        values = [metric for phase, metric in self.progress.evaluations if phase in phases]
        return tail_mean(values, self.preset.tail_fraction)

    def summary(self) -> dict[str, Any]:
        results, config, progress = self.progress.results, self.config, self.progress
        return {
            "task": config.task, "preset": config.preset, "regularizer": config.regularizer,
            "manifold": config.manifold, "inhibitor": config.inhibitor, "embedding": config.embedding,
            "sparsity": config.sparsity, "seed": config.seed, "strength": self.preset.strength,
            "metric_name": self.task.metric_name, "higher_is_better": self.task.higher_is_better,
            "dense_metric": results.get("dense_metric"), "sparse_metric": results.get("sparse_metric"),
            "lottery_metric": results.get("lottery_metric"),
            "sparse_tail_metric": self.tail_metric(("dense", "prune", "finetune")),
            "lottery_tail_metric": self.tail_metric(("lottery",)) if self.phases.lottery else None,
            "dense_sparsity": results.get("dense_sparsity"), "sparse_sparsity": results.get("sparse_sparsity"),
            "lottery_sparsity": results.get("lottery_sparsity"),
            "wall_time_s": progress.wall_time_s,
            "data_time_fraction": progress.data_time_s / progress.step_time_s if progress.step_time_s else 0.0,
            "steps": progress.step,
            "device": str(self.device),
            "phases": {"dense": self.phases.dense, "prune": self.phases.prune, "finetune": self.phases.finetune,
                       "lottery": self.phases.lottery},
        }

    def resolved_config(self) -> dict[str, Any]:
        return {"run": self.config.to_dict(), "preset": self.preset.to_dict(),
                "phases": self.summary()["phases"], "moduli": self.handle.config.to_dict(),
                "task": self.task.describe(), "torch": torch.__version__}


def run(config: RunConfig, *, progress: bool | str = True, stop_after: int | None = None,
        overwrite: bool = False, device: str | torch.device = "cpu", prefetch: bool = True) -> dict[str, Any]:
    """Train, prune and (optionally) retrain the lottery ticket; write the run directory.

    A run folder is never cleared: ``config.out`` must be missing or empty, or hold this
    very run (``config.resume``), or be moved aside first (``overwrite``).

    Args:
        config: the run. With ``config.resume`` the newest checkpoint in
            ``<out>/checkpoints`` is continued (a fresh start when there is none).
        progress: ``True``/``"auto"``: a tqdm bar with the latest validation metric when
            stderr is a terminal, else a log line every 10% or 30 s; ``"bar"``, ``"log"``,
            or ``False``/``"off"`` (see :mod:`moduli_transform.tasks.progress`).
        stop_after: stop (raise :class:`RunInterrupted`) once this many steps are done,
            as a crash would; checkpoints already written stay. For tests.
        overwrite: move a run already in ``out`` aside to ``<out>.old-<timestamp>`` (never deleted).
        device: where to train (:func:`moduli_transform.device.resolve_device`: ``"auto"``,
            ``"cpu"``, ``"cuda"``, ``"cuda:N"``). Not part of the run's identity (not in
            ``config``): a run started on one device resumes on another, and a finished run
            is reused whatever device asks for it. The summary records it (``"device"``).
        prefetch: draw the next training batches in a background thread while the model
            trains (tasks with ``prefetch_batches``: navigation, adding). Bit-exact either
            way (:mod:`moduli_transform.tasks.prefetch`), so not part of the run's identity.

    Returns:
        The summary (also written to ``<out>/summary.json``; keys :data:`SUMMARY_KEYS`
        and the measured sparsity at each evaluation point).

    Raises:
        RunFolderError: ``out`` already holds a run and neither ``resume`` nor ``overwrite``
            is given (the message names both), or ``out`` is a file.
        RunConfigError: resuming a run made with other options.
        DeviceError: an unknown device, or CUDA asked for where there is none.

    Example:
        >>> import tempfile
        >>> out = Path(tempfile.mkdtemp()) / "r1"
        >>> _ = out.mkdir(), (out / "summary.json").write_text("{}")
        >>> run(RunConfig(task="adding", preset="test", out=str(out)), progress=False)
        Traceback (most recent call last):
        ...
        moduli_transform.tasks.run_folder.RunFolderError: ... already holds a run; pass --resume ...
    """
    resolved = resolve_device(device)
    quiet = resolve_mode(progress, sys.stderr) == "off"  # an unknown mode fails before any work
    owner = os.environ.get("RANK", "0") == "0"  # torchrun: rank 0 alone owns the folder
    with _claimed_run_folder(config, overwrite, quiet) if owner else contextlib.nullcontext():
        threads = torch.get_num_threads()
        if config.threads:
            torch.set_num_threads(config.threads)
        try:
            with exact_float32(resolved):   # cuDNN's RNNs in IEEE float32 on a GPU, as on the CPU
                return _run(config, progress, stop_after, resolved, prefetch)
        finally:
            torch.set_num_threads(threads)


@contextlib.contextmanager
def _claimed_run_folder(config: RunConfig, overwrite: bool, quiet: bool) -> Iterator[None]:
    """The run-folder rule, under the folder's lock (:func:`lock_run_folder`) for the whole
    run: a folder another process trains is neither moved aside nor trained into."""
    out = Path(config.out)
    with lock_run_folder(out) if out.is_dir() else contextlib.nullcontext():
        _check_run_folder(config, overwrite, quiet)   # may move the folder (and this lock) aside
    with lock_run_folder(out):
        # a run that another process made between the two locks is not replaced either
        _check_run_folder(config, overwrite=False, quiet=True)
        yield


def _check_run_folder(config: RunConfig, overwrite: bool, quiet: bool) -> None:
    """The run-folder rule before any work (:func:`~moduli_transform.tasks.run_folder.claim_run_folder`);
    on ``resume`` the folder's recorded settings must be the run's."""
    out = Path(config.out)
    if config.resume:
        if overwrite:
            raise RunFolderError("resume and overwrite contradict each other; pass one of them")
        recorded = _recorded_config(out)
        if holds_run(out) and recorded != config.identity():
            what = "records no readable settings (config.json)" if recorded is None else \
                "was made with other settings (" + ", ".join(
                    sorted(k for k, v in config.identity().items() if recorded.get(k) != v)) + ")"
            raise RunConfigError(f"cannot resume {out}: it {what}; use another --out or the same options")
        return
    for note in claim_run_folder(out, config.identity(), resume=False, overwrite=overwrite):
        if not quiet:
            print(note, file=sys.stderr)


def _recorded_config(out: Path) -> dict[str, Any] | None:
    """The identity of the run recorded in ``out/config.json``, fields added since at their defaults."""
    try:
        return RunConfig.from_dict(json.loads((out / "config.json").read_text())["run"]).identity()
    except (OSError, ValueError, KeyError, TypeError):
        return None


def initial_embeddings(config: RunConfig) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Each target's neuron coordinates ``(rows, cols)`` as run ``config`` starts.

    With fixed embeddings these are the ones the run regularizes and prunes with; the
    lottery may redraw them (``lottery_embedding="redraw"``), after which the run's
    ``embeddings.safetensors`` holds the new ones. Rebuilt from the run's seed (the model
    and handle are built as :func:`run` builds them; nothing is trained or written).
    """
    state = _Run(config)
    try:
        return {name: (regularizer.row_embedding.detach().clone(), regularizer.col_embedding.detach().clone())
                for name, regularizer in state.handle.regularizers.items()}
    finally:
        state.handle.remove()


def _run(config: RunConfig, progress: bool | str, stop_after: int | None, device: torch.device,
         prefetch: bool = True) -> dict[str, Any]:
    state = _Run(config, device, prefetch)
    main = is_main_process()  # rank 0 alone writes the run directory
    if main:
        state.out.mkdir(parents=True, exist_ok=True)
    try:
        resumed = config.resume and state.restore()
        barrier()  # no rank reads the metrics file rank 0 is about to restart
        if main and not resumed:  # a fresh start: the folder is empty or this run's own, without a checkpoint
            (state.out / "metrics.jsonl").unlink(missing_ok=True)
        if main:
            _atomic_json(state.out / "config.json", state.resolved_config())
        state.train(progress, stop_after)
        summary = state.summary()
        if main:
            _save_weights(state.out / WEIGHTS_FILE, state.model, state.handle.masks)
            _save_embeddings(state.out / EMBEDDINGS_FILE, state.handle)
            (state.out / "handle.txt").write_text(state.handle.summary() + "\n")
            _atomic_json(state.out / "summary.json", summary)
        return summary
    finally:
        # The handle's optimizer hook is global; leave no hooks behind for later runs.
        state.handle.remove()
