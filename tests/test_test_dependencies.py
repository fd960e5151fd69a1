"""Under CI=true a missing test dependency fails the run; on a developer's machine it skips."""

from __future__ import annotations

import pytest
from conftest import needed

pytestmark = pytest.mark.floors


def test_a_missing_test_dependency_fails_under_ci_and_skips_elsewhere(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="no_such_module is missing under CI=true"):
        needed("no_such_module")
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="pip install"):
        needed("no_such_module")
    assert needed("json").dumps([]) == "[]"  # an installed one is imported either way
