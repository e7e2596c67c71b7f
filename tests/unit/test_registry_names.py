"""Model names, aliases and checksums are matched whole: a trailing newline or other extra text is refused."""

from __future__ import annotations

import pytest

from modelforge_registry.errors import InvalidAlias, InvalidModelName
from modelforge_registry.registry import check_alias, check_model_name


@pytest.mark.parametrize("name", ["a", "resnet-50", "m" * 63])
def test_good_model_names_pass(name: str) -> None:
    assert check_model_name(name) == name


@pytest.mark.parametrize("name", ["", "resnet\n", "Resnet", "1model", "model-", "m" * 64, "a_b"])
def test_bad_model_names_are_refused(name: str) -> None:
    with pytest.raises(InvalidModelName):
        check_model_name(name)


@pytest.mark.parametrize("alias", ["production\n", "", "Prod", "9lives", "a" * 64])
def test_bad_aliases_are_refused(alias: str) -> None:
    with pytest.raises(InvalidAlias):
        check_alias(alias)
