"""attach() end to end on every model style of the zoo: discover, regularize, prune, train.

Only the recurrent block of each weight may lose entries; the rest of the matrix (the
input columns of an ``i2h`` on ``cat([x, h])``, say) must be left as trained.
"""

from __future__ import annotations

import pytest
import torch

import moduli_transform as mt
from model_zoo import EXPORT_REFUSES, ZOO

# orthogonal's zeros in `original` are not zeros of the weight: attach refuses to prune
# through it (tests/test_parametrized.py)
CASES = [case for case in ZOO if any(kind != "elementwise" for _, kind, *_ in case.expected)
         and case.name != "orthogonal_parametrized"]


def _loss(model, case, inputs):
    output = case.driver(model, *inputs) if case.driver else getattr(model, case.method)(*inputs)
    output = output[0] if isinstance(output, tuple) else output
    return output.float().pow(2).mean()


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_attach_prunes_only_the_recurrent_block(case):
    torch.manual_seed(0)
    model = case.factory()
    handle = mt.attach(model, example_inputs=case.inputs(), method=case.method, driver=case.driver,
                       sparsity=0.5, total_steps=1, auto=True, strength=0.01)
    _train_and_check(model, handle, case)


WAYS_OUT = [case for case in EXPORT_REFUSES
            if any(kind != "elementwise" for _, kind, *_ in case.expected)]


@pytest.mark.parametrize("case", WAYS_OUT, ids=lambda c: c.name)
def test_the_way_out_works_where_export_cannot_capture(case):
    """The models torch.export cannot capture: the way out without tracing (targets='types',
    names) gives the ground truth too and trains and prunes like the others."""
    torch.manual_seed(0)
    model = case.factory()
    handle = mt.attach(model, targets=case.targets, sparsity=0.5, total_steps=1, auto=True,
                       strength=0.01)
    assert {(t.name, t.kind, t.gates) for t in handle.targets} == {
        (name, kind, gates) for name, kind, _, _, gates in case.expected}
    _train_and_check(model, handle, case)


def _train_and_check(model, handle, case):
    inputs = case.inputs()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    for _ in range(2):
        optimizer.zero_grad()
        _loss(model, case, inputs).backward()
        optimizer.step()
    parameters = dict(model.named_parameters())
    for target in handle.targets:
        if target.kind == "elementwise":
            continue
        weight = parameters[target.name].detach()
        block = target.block(weight)
        assert int((block == 0).sum()) == round(0.5 * block.numel()), target.name
        outside = torch.ones_like(weight, dtype=torch.bool)
        target.block(outside).fill_(False)
        assert not bool((weight[outside] == 0).any()), f"{target.name}: pruned outside its block"
        assert not torch.equal(weight, before[target.name])
