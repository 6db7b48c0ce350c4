"""The package's `>>>` examples run under `--doctest-modules` (`addopts` in setup.cfg), each in a temporary folder of
its own (the root's conftest.py). What that run cannot see is checked here: a module whose examples are all marked
`# doctest: +SKIP` passes it without running one."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import hf_gradtools


def package_modules() -> list[str]:
    found = pkgutil.walk_packages(hf_gradtools.__path__, f"{hf_gradtools.__name__}.")
    return [hf_gradtools.__name__, *(m.name for m in found if not m.name.endswith(".__main__"))]


def test_every_module_with_examples_runs_some():
    finder = doctest.DocTestFinder()
    examples = {
        name: [e for test in finder.find(importlib.import_module(name)) for e in test.examples]
        for name in package_modules()
    }
    assert any(examples.values())
    only_skipped = [
        name for name, found in examples.items() if found and all(e.options.get(doctest.SKIP) for e in found)
    ]
    assert only_skipped == []
