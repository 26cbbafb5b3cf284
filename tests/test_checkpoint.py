"""moduli_transform.tasks.checkpoint: atomic safetensors + JSON checkpoints, verification, fallback, resume."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import numpy
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from torch import nn

from moduli_transform.tasks.checkpoint import (
    CheckpointError, capture_rng_state, capture_training_state, flatten_state, list_checkpoints,
    load_checkpoint, read_checkpoint, restore_rng_state, restore_training_state, save_checkpoint,
    unflatten_state,
)

ROOT = Path(__file__).resolve().parents[1]


def sample_tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "float32": torch.randn(4, 3, generator=generator),
        "float64": torch.randn(5, generator=generator, dtype=torch.float64),
        "bfloat16": torch.randn(2, 2, generator=generator).bfloat16(),
        "bool": torch.rand(3, 3, generator=generator) > 0.5,
        "int64": torch.arange(-3, 3),
        "uint8": torch.arange(7, dtype=torch.uint8),
        "scalar": torch.tensor(3.25),
        "empty": torch.zeros(0, 4),
        "strided": torch.randn(4, 6, generator=generator)[:, ::2],
        "special": torch.tensor([float("nan"), float("inf"), -0.0]),
    }


def assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        # Bitwise: NaN == NaN and -0.0 != 0.0 at the byte level.
        assert a[name].contiguous().reshape(-1).view(torch.uint8).equal(b[name].contiguous().reshape(-1).view(torch.uint8)), name


# -- format and round trip ------------------------------------------------------------------
def test_round_trip_is_bit_identical(tmp_path):
    tensors = sample_tensors()
    state = {"step": 3, "loss": 0.1 + 0.2, "nested": {"a": [1, 2.5, None, "x"]}, "flag": True}
    path = save_checkpoint(tmp_path, tensors, state)
    assert path == tmp_path / "ckpt-00000003.json"
    loaded_tensors, loaded_state = load_checkpoint(tmp_path)
    assert_identical(tensors, loaded_tensors)
    assert loaded_state == state


def test_files_record_checksum_and_leave_no_temporaries(tmp_path):
    save_checkpoint(tmp_path, sample_tensors(), {"step": 12})
    record = json.loads((tmp_path / "ckpt-00000012.json").read_text())
    import hashlib
    assert record["sha256"] == hashlib.sha256((tmp_path / "ckpt-00000012.safetensors").read_bytes()).hexdigest()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-00000012.json", "ckpt-00000012.safetensors"]
    # The tensor file is plain safetensors, readable without this module.
    assert_identical(load_file(tmp_path / "ckpt-00000012.safetensors"),
                     {k: v.contiguous() for k, v in sample_tensors().items()})


def test_keeps_last_two_checkpoints(tmp_path):
    for step in range(5):
        save_checkpoint(tmp_path, {"w": torch.full((2,), float(step))}, {}, step=step)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [3, 4]
    assert len(list(tmp_path.iterdir())) == 4
    tensors, _ = load_checkpoint(tmp_path)
    assert tensors["w"].tolist() == [4.0, 4.0]


def test_saving_an_earlier_step_drops_the_abandoned_future(tmp_path):
    for step in (10, 20, 30):
        save_checkpoint(tmp_path, {}, {"step": step})
    save_checkpoint(tmp_path, {}, {"step": 21})  # resumed from 20, the old 30 is a dead branch
    assert [s for s, _ in list_checkpoints(tmp_path)] == [20, 21]


def test_empty_or_missing_directory_gives_none(tmp_path):
    assert load_checkpoint(tmp_path) is None
    assert load_checkpoint(tmp_path / "nope") is None


@pytest.mark.parametrize("kwargs, state, match", [
    ({}, {}, "step"),
    ({"step": -1}, {}, "step"),
    ({"step": 1, "keep": 0}, {}, "keep"),
    ({"step": 1}, {"bad": object()}, "JSON"),
])
def test_bad_arguments_raise_value_error(tmp_path, kwargs, state, match):
    with pytest.raises(ValueError, match=match):
        save_checkpoint(tmp_path, {}, state, **kwargs)


# -- corruption and fallback ----------------------------------------------------------------
def two_checkpoints(directory: Path) -> None:
    save_checkpoint(directory, {"w": torch.arange(6.0)}, {"step": 1, "note": "old"})
    save_checkpoint(directory, {"w": torch.arange(6.0) * 2}, {"step": 2, "note": "new"})


@pytest.mark.parametrize("suffix", [".safetensors", ".json"])
def test_truncated_newest_is_refused_and_previous_is_loaded(tmp_path, suffix):
    two_checkpoints(tmp_path)
    victim = tmp_path / f"ckpt-00000002{suffix}"
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="ckpt-00000002"):
        read_checkpoint(victim)
    with pytest.warns(RuntimeWarning, match="skipping checkpoint step 2"):
        tensors, state = load_checkpoint(tmp_path)
    assert state["note"] == "old" and tensors["w"].tolist() == list(range(6))


def test_missing_tensor_file_and_all_corrupt(tmp_path):
    two_checkpoints(tmp_path)
    (tmp_path / "ckpt-00000002.safetensors").unlink()
    (tmp_path / "ckpt-00000001.json").write_text("{}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert load_checkpoint(tmp_path) is None
    assert len(caught) == 2


def test_crash_between_tensor_file_and_marker_is_ignored(tmp_path):
    two_checkpoints(tmp_path)
    # A writer killed after the tensor file but before its marker, and one killed mid-write.
    (tmp_path / "ckpt-00000003.safetensors").write_bytes(b"partial")
    (tmp_path / ".ckpt-00000003.json.tmp-999").write_bytes(b"{")
    _, state = load_checkpoint(tmp_path)
    assert state["note"] == "new"
    save_checkpoint(tmp_path, {}, {"step": 3})
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "ckpt-00000002.json", "ckpt-00000002.safetensors", "ckpt-00000003.json", "ckpt-00000003.safetensors"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(suffix=st.sampled_from([".safetensors", ".json"]), position=st.floats(0, 1, exclude_max=True),
       flip=st.integers(1, 255))
def test_random_byte_flip_is_detected_or_harmless(tmp_path_factory, suffix, position, flip):
    directory = tmp_path_factory.mktemp("flip")
    two_checkpoints(directory)
    expected = read_checkpoint(directory / "ckpt-00000002.json")
    victim = directory / f"ckpt-00000002{suffix}"
    data = bytearray(victim.read_bytes())
    data[int(position * len(data))] ^= flip
    victim.write_bytes(bytes(data))
    try:
        corrupt = read_checkpoint(victim)
    except CheckpointError:
        with pytest.warns(RuntimeWarning):
            _, state = load_checkpoint(directory)
        assert state["note"] == "old"
    else:
        # Only a flip inside JSON whitespace can pass, and then nothing changed.
        assert suffix == ".json" and corrupt.state == expected.state
        assert_identical(corrupt.tensors, expected.tensors)


# -- nested state, optimizer, RNG -------------------------------------------------------------
def test_flatten_state_round_trip_keeps_types():
    tree = {"state": {0: {"step": torch.tensor(2.0), "m": torch.ones(3)}}, "betas": (0.9, 0.999),
            "none": None, "__odd": 1, "inf": float("inf"), "list": [torch.zeros(1), "s"]}
    tensors, encoded = flatten_state(tree, "opt")
    json.dumps(encoded, allow_nan=False)
    assert all(name.startswith("opt/") for name in tensors)
    restored = unflatten_state(json.loads(json.dumps(encoded)), tensors)
    assert restored["betas"] == (0.9, 0.999) and list(restored["state"]) == [0]
    assert restored["inf"] == float("inf") and restored["__odd"] == 1
    assert restored["state"][0]["m"].equal(torch.ones(3))


def test_flatten_state_names_unsupported_values():
    with pytest.raises(ValueError, match="set at 'x/a'"):
        flatten_state({"a": {1, 2}}, "x")
    with pytest.raises(CheckpointError, match="lacks"):
        unflatten_state({"__tensor__": "missing"}, {})


def test_rng_states_round_trip():
    generator = torch.Generator().manual_seed(5)
    tensors, state = capture_rng_state({"data": generator})
    json.dumps(state)

    def draw():
        return (torch.rand(3).tolist(), random.random(), numpy.random.rand(2).tolist(),
                torch.rand(2, generator=generator).tolist())

    first = draw()
    restore_rng_state(tensors, state, {"data": generator})
    assert draw() == first
    with pytest.raises(CheckpointError, match="other"):
        restore_rng_state(tensors, state, {"other": torch.Generator()})


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.RNN(3, 16, batch_first=True)
        self.drop = nn.Dropout(0.2)
        self.head = nn.Linear(16, 1)

    def forward(self, x):
        return self.head(self.drop(self.rnn(x)[0][:, -1])).squeeze(-1)


def train_steps(model, optimizer, generator, steps):
    for _ in range(steps):
        x = torch.randn(8, 5, 3, generator=generator)
        noise = random.random() + numpy.random.rand()
        loss = ((model(x) - x.sum((1, 2)) * 0.1 - noise) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def make(seed: int = 0):
    torch.manual_seed(seed)
    model = Net()
    return model, torch.optim.Adam(model.parameters(), lr=1e-2), torch.Generator().manual_seed(seed)


def test_adam_resume_is_bit_identical(tmp_path):
    random.seed(1)
    numpy.random.seed(1)
    model, optimizer, generator = make()
    train_steps(model, optimizer, generator, 4)
    save_checkpoint(tmp_path, *capture_training_state(4, model, optimizer, generators={"data": generator}))
    train_steps(model, optimizer, generator, 4)

    fresh, fresh_optimizer, fresh_generator = make(seed=123)  # different init, RNGs moved on
    random.seed(9)
    tensors, state = load_checkpoint(tmp_path)
    step = restore_training_state(tensors, state, fresh, fresh_optimizer, generators={"data": fresh_generator})
    assert step == 4
    train_steps(fresh, fresh_optimizer, fresh_generator, 4)
    assert_identical(model.state_dict(), fresh.state_dict())
    ref_state, new_state = optimizer.state_dict(), fresh_optimizer.state_dict()
    assert ref_state["param_groups"] == new_state["param_groups"]
    for index in ref_state["state"]:
        assert_identical(ref_state["state"][index], new_state["state"][index])


# -- map_location: resume on another device ---------------------------------------------------
@pytest.mark.parametrize("map_location", ["cpu", torch.device("cpu")])
def test_map_location_cpu_loads_the_same_tensors_and_rng_states(tmp_path, map_location):
    save_checkpoint(tmp_path, sample_tensors(), {"step": 1})
    tensors, _ = load_checkpoint(tmp_path, map_location=map_location)
    assert_identical(tensors, load_checkpoint(tmp_path)[0])
    assert all(t.device.type == "cpu" for t in tensors.values())

    random.seed(1)
    numpy.random.seed(1)
    model, optimizer, generator = make()
    train_steps(model, optimizer, generator, 3)
    save_checkpoint(tmp_path / "run", *capture_training_state(3, model, optimizer, generators={"data": generator}))
    train_steps(model, optimizer, generator, 3)
    fresh, fresh_optimizer, fresh_generator = make(seed=7)
    checkpoint = read_checkpoint(list_checkpoints(tmp_path / "run")[-1][1], map_location=map_location)
    restore_training_state(checkpoint.tensors, checkpoint.state, fresh, fresh_optimizer,
                           generators={"data": fresh_generator})
    train_steps(fresh, fresh_optimizer, fresh_generator, 3)  # dropout, batches and noise all draw the same
    assert_identical(model.state_dict(), fresh.state_dict())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_cpu_checkpoint_resumes_on_cuda_and_back(tmp_path):
    model, optimizer, generator = make()
    train_steps(model, optimizer, generator, 3)
    save_checkpoint(tmp_path / "cpu", *capture_training_state(3, model, optimizer, generators={"data": generator}))
    on_gpu, gpu_optimizer, gpu_generator = make(seed=7)
    on_gpu.cuda()
    tensors, state = load_checkpoint(tmp_path / "cpu", map_location="cuda")
    assert all(t.is_cuda for t in tensors.values())
    restore_training_state(tensors, state, on_gpu, gpu_optimizer, generators={"data": gpu_generator})
    assert torch.equal(gpu_generator.get_state(), generator.get_state())  # RNG states set from CPU copies
    assert all(torch.equal(a.cpu(), b) for a, b in zip(on_gpu.state_dict().values(), model.state_dict().values()))
    save_checkpoint(tmp_path / "gpu", *capture_training_state(3, on_gpu, gpu_optimizer,
                                                              generators={"data": gpu_generator}))
    back, back_optimizer, back_generator = make(seed=8)
    restore_training_state(*load_checkpoint(tmp_path / "gpu", map_location="cpu"), back, back_optimizer,
                           generators={"data": back_generator})
    assert_identical(back.state_dict(), model.state_dict())


# -- SIGKILL and resume in a subprocess -------------------------------------------------------
SCRIPT = textwrap.dedent('''
    import sys, time
    import torch
    from torch import nn
    from safetensors.torch import save_file
    from moduli_transform.tasks.checkpoint import (capture_training_state, load_checkpoint, restore_training_state,
                                  save_checkpoint)

    directory, out, total, every, delay = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
    try:
        import moduli_transform as mt
        mt.attach
    except (ImportError, AttributeError):
        mt = None

    torch.manual_seed(0)
    model = nn.Sequential()
    model.rnn = nn.RNN(2, 16, batch_first=True)
    model.head = nn.Linear(16, 1)
    handle = mt.attach(model, manifold="torus", sparsity=0.8, total_steps=total, seed=0,
                       embedding="trained") if mt else None
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    step = 0
    found = load_checkpoint(directory)
    if found is not None:
        step = restore_training_state(*found, model, optimizer, handle, {"data": generator})
    while step < total:
        x = torch.rand(8, 6, 2, generator=generator)
        out_seq, _ = model.rnn(x)
        loss = ((model.head(out_seq[:, -1]).squeeze(-1) - x[..., 0].sum(1) * 0.2) ** 2).mean()
        if handle is not None:
            loss = loss + handle.penalty()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if handle is not None:
            handle.step()
        step += 1
        if step % every == 0:
            save_checkpoint(directory, *capture_training_state(step, model, optimizer, handle, {"data": generator}))
        time.sleep(delay)
    result = {f"model/{k}": v.contiguous() for k, v in model.state_dict().items()}
    if handle is not None:
        result.update({f"mask/{k}": v for k, v in handle.masks.items()})
    save_file(result, out)
''')


def core_available() -> bool:
    try:
        import moduli_transform as mt
        mt.attach  # noqa: B018
    except (ImportError, AttributeError):
        return False
    return True


def run_script(script: Path, directory: Path, out: Path, delay: float) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, str(script), str(directory), str(out), "120", "7", str(delay)],
                            env=env, cwd=ROOT, stderr=subprocess.PIPE)


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    reference = run_script(script, tmp_path / "reference", tmp_path / "reference.safetensors", 0.0)
    _, error = reference.communicate(timeout=50)
    assert reference.returncode == 0, error.decode()

    directory, out = tmp_path / "killed", tmp_path / "resumed.safetensors"
    victim = run_script(script, directory, out, 0.005)
    deadline = time.monotonic() + 30
    while not list_checkpoints(directory) and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert list_checkpoints(directory), "no checkpoint appeared before the deadline"
    time.sleep(random.uniform(0.0, 0.3))
    victim.send_signal(signal.SIGKILL)
    victim.communicate(timeout=10)
    assert victim.returncode == -signal.SIGKILL and not out.exists()

    resumed = run_script(script, directory, out, 0.0)
    _, error = resumed.communicate(timeout=50)
    assert resumed.returncode == 0, error.decode()
    reference_tensors = load_file(tmp_path / "reference.safetensors")
    assert_identical(reference_tensors, load_file(out))
    if core_available():
        mask = reference_tensors["mask/rnn.weight_hh_l0"]
        assert 0 < float(mask.float().mean()) < 1  # the handle pruned, and its masks resumed too
