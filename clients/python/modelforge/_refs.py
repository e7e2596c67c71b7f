"""Model references: which model, and which of its versions, a call is about.

A reference names a model and at most one selector:

* ``name``: the newest READY version of the model;
* ``name:3``: version 3 exactly;
* ``name@production``: the version the alias ``production`` points at.

The same string form is accepted by the SDK, the ``modelforge`` command and the
Open Inference Protocol's ``model_version`` field (where the name travels in
``model_name`` and ``model_version`` holds ``"3"``, ``"production"`` or ``""``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = [
    "MAX_VERSION",
    "ModelRef",
    "parse_version_field",
    "validate_alias",
    "validate_model_name",
    "validate_version",
]

_NAME = re.compile(r"[a-z]([a-z0-9-]{0,61}[a-z0-9])?")  # the registry's rule
_ALIAS = re.compile(r"[a-z][a-z0-9_-]{0,62}")
_VERSION = re.compile(r"[0-9]+")


def validate_model_name(name: str) -> str:
    """Checks that ``name`` is a valid model name and returns it.

    Model names are lowercase DNS labels: 1 to 63 characters from ``a-z``,
    ``0-9`` and ``-``, starting with a letter and ending with a letter or digit.

    Raises:
        ValueError: the name is empty or has a character or length not allowed.
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(
            f"invalid model name {name!r}: use 1-63 lowercase letters, digits and '-', "
            "starting with a letter and ending with a letter or digit (for example 'fraud-detector')"
        )
    return name


def validate_alias(alias: str) -> str:
    """Checks that ``alias`` is a valid alias name and returns it.

    Aliases are 1 to 63 characters from ``a-z``, ``0-9``, ``_`` and ``-``,
    starting with a letter (``production``, ``canary_2``).

    Raises:
        ValueError: the alias is empty or has a character or length not allowed.
    """
    if not isinstance(alias, str) or not _ALIAS.fullmatch(alias):
        raise ValueError(
            f"invalid alias {alias!r}: use 1-63 lowercase letters, digits, '_' and '-', "
            "starting with a letter (for example 'production')"
        )
    return alias


MAX_VERSION = (1 << 63) - 1  # versions travel as int64


def _version_number(digits: str) -> int:
    """A string of digits as a version number; one too long to be a version is refused before it is converted
    (Python refuses to convert more than 4,300 digits, with advice about its own limits)."""
    if len(digits.lstrip("0")) > len(str(MAX_VERSION)):
        shown = digits if len(digits) <= 40 else f"{digits[:20]}…({len(digits)} digits)"
        raise ValueError(f"invalid version {shown}: versions are whole numbers from 1 to {MAX_VERSION}")
    return validate_version(int(digits.lstrip("0") or "0"))


def validate_version(version: int) -> int:
    """Checks that ``version`` is a version number (a whole number from 1, within int64) and returns it.

    Raises:
        ValueError: it is not.
    """
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= MAX_VERSION:
        raise ValueError(f"invalid version {version!r}: versions are whole numbers from 1 to {MAX_VERSION}")
    return version


@dataclass(frozen=True, slots=True)
class ModelRef:
    """A reference to a model version: by number, by alias, or the newest READY one.

    Attributes:
        name: The model name (a lowercase DNS label).
        version: A version number (1 or more), or None.
        alias: An alias name, or None. At most one of ``version`` and ``alias`` is set;
            when neither is, the reference means the newest READY version.

    Example:
        >>> ModelRef.parse("fraud@production")
        ModelRef(name='fraud', version=None, alias='production')
        >>> str(ModelRef("fraud", version=3))
        'fraud:3'
    """

    name: str
    version: int | None = None
    alias: str | None = None

    def __post_init__(self) -> None:
        validate_model_name(self.name)
        if self.version is not None and self.alias is not None:
            raise ValueError(
                f"a model reference takes a version or an alias, not both "
                f"(got version {self.version!r} and alias {self.alias!r})"
            )
        if self.version is not None:
            validate_version(self.version)
        if self.alias is not None:
            validate_alias(self.alias)

    @classmethod
    def parse(cls, ref: str | ModelRef) -> ModelRef:
        """Parses ``"name"``, ``"name:3"`` or ``"name@alias"``.

        Args:
            ref: The string form, or a ModelRef (returned unchanged).

        Returns:
            The reference.

        Raises:
            ValueError: the string is not one of the three forms, or a part is invalid.
        """
        if isinstance(ref, ModelRef):
            return ref
        if not isinstance(ref, str):
            raise ValueError(f"a model reference is a string like 'name', 'name:3' or 'name@alias', not {ref!r}")
        if ref.count(":") + ref.count("@") > 1:
            raise ValueError(
                f"invalid model reference {ref!r}: use 'name', 'name:VERSION' or 'name@ALIAS' "
                "(one ':' or one '@' at most)"
            )
        if ":" in ref:
            name, _, number = ref.partition(":")
            if not _VERSION.fullmatch(number):
                alias = f"; use '{name}@{number}' for an alias" if _ALIAS.fullmatch(number) else ""
                raise ValueError(
                    f"invalid model reference {ref!r}: the part after ':' must be a version number such as "
                    f"'{name}:3'{alias}"
                )
            return cls(name, version=_version_number(number))
        if "@" in ref:
            name, _, alias = ref.partition("@")
            return cls(name, alias=alias)
        return cls(ref)

    @classmethod
    def from_parts(cls, name: str, version_field: str) -> ModelRef:
        """Builds a reference from a name and a V2 ``model_version`` string.

        Args:
            name: The model name (V2 ``model_name``).
            version_field: ``"3"``, ``"production"`` or ``""`` (see :func:`parse_version_field`).

        Raises:
            ValueError: the name or the version field is invalid.
        """
        version, alias = parse_version_field(version_field)
        return cls(name, version=version, alias=alias)

    @property
    def selector(self) -> str:
        """The version part alone, as the V2 ``model_version`` field carries it: ``"3"``, ``"production"`` or ``""``."""
        if self.version is not None:
            return str(self.version)
        return self.alias or ""

    @property
    def is_latest(self) -> bool:
        """True when the reference names neither a version nor an alias (the newest READY version)."""
        return self.version is None and self.alias is None

    def __str__(self) -> str:
        if self.version is not None:
            return f"{self.name}:{self.version}"
        if self.alias is not None:
            return f"{self.name}@{self.alias}"
        return self.name


def parse_version_field(value: str) -> tuple[int | None, str | None]:
    """Parses a V2 ``model_version`` field: a version number, an alias, or empty.

    Args:
        value: ``"3"`` (version 3), ``"production"`` (an alias) or ``""`` (the newest READY version).

    Returns:
        ``(version, alias)`` with at most one of them set.

    Raises:
        ValueError: the value is neither a version number (1 or more) nor a valid alias.
    """
    if value == "":
        return None, None
    if _VERSION.fullmatch(value):
        return _version_number(value), None
    if _ALIAS.fullmatch(value):
        return None, value
    raise ValueError(
        f"invalid model_version {value!r}: use a version number such as '3', an alias such as "
        "'production', or leave it empty for the newest READY version"
    )
