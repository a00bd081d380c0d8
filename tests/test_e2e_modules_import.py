"""Every end-to-end test module imports: a broken import shows in `make unit`, not only after the
e2e session has started a cluster."""

import importlib
import pkgutil

import pytest

import e2e.tests


@pytest.mark.parametrize("name", sorted(m.name for m in pkgutil.iter_modules(e2e.tests.__path__)))
def test_the_e2e_module_imports(name):
    importlib.import_module(f"e2e.tests.{name}")
