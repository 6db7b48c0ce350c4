"""pytest, for the package's `>>>` examples (`--doctest-modules`): each runs in a temporary folder of its own, so
that the files it writes (`out/...`) go there, and on one intra-op thread, as the tests do (tests/conftest.py)."""

from __future__ import annotations

import pytest
import torch
from _pytest.doctest import DoctestItem


@pytest.fixture(autouse=True)
def _examples_in_a_temporary_folder(request):
    if not isinstance(request.node, DoctestItem):
        yield
        return
    request.getfixturevalue("monkeypatch").chdir(request.getfixturevalue("tmp_path"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
