"""Doctests of the application packages, imported under their installed names.

``tasks/`` and ``export/`` install as ``moduli_transform.tasks`` and
``moduli_transform.export``; collecting them by folder would import a second copy under
the top-level names ``tasks``/``export``, so their doctests run from here instead.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import moduli_transform.export
import moduli_transform.tasks


def _module_names() -> list[str]:
    names = []
    for package in (moduli_transform.tasks, moduli_transform.export):
        names.append(package.__name__)
        names += [f"{package.__name__}.{info.name}"
                  for info in pkgutil.iter_modules(package.__path__)]
    return sorted(names)


@pytest.mark.parametrize("module_name", _module_names())
def test_module_doctests(module_name: str) -> None:
    module = importlib.import_module(module_name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE,
                             verbose=False, report=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} doctests failed in {module_name}"
