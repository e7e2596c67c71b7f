from __future__ import annotations

import dataclasses

import pytest

from modelforge._refs import ModelRef, parse_version_field, validate_alias, validate_model_name


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("fraud", ModelRef("fraud")),
        ("fraud:3", ModelRef("fraud", version=3)),
        ("fraud@production", ModelRef("fraud", alias="production")),
        ("a", ModelRef("a")),
        ("resnet-50-0", ModelRef("resnet-50-0")),
        ("m:1", ModelRef("m", version=1)),
        ("m@canary_2-b", ModelRef("m", alias="canary_2-b")),
        ("x" * 63, ModelRef("x" * 63)),
    ],
)
def test_parse_accepts_the_three_forms(text: str, expected: ModelRef) -> None:
    assert ModelRef.parse(text) == expected


@pytest.mark.parametrize("text", ["fraud", "fraud:3", "fraud@production", "m:12345678901"])
def test_str_round_trips(text: str) -> None:
    assert str(ModelRef.parse(text)) == text


def test_str_is_canonical_for_leading_zeros() -> None:
    assert str(ModelRef.parse("fraud:007")) == "fraud:7"


def test_parse_returns_a_ref_unchanged() -> None:
    ref = ModelRef("fraud", version=2)
    assert ModelRef.parse(ref) is ref


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "invalid model name ''"),
        ("Fraud", "invalid model name 'Fraud'"),
        ("-fraud", "invalid model name"),
        ("0-resnet-50", "starting with a letter"),  # as the registry names models
        ("fraud-", "invalid model name"),
        ("fraud_detector", "invalid model name"),
        ("x" * 64, "invalid model name"),
        ("fraud:", "must be a version number"),
        ("fraud:0", "versions are whole numbers from 1 to 9223372036854775807"),
        ("fraud:9223372036854775808", "versions are whole numbers from 1"),  # past int64, as versions travel
        ("fraud:-1", "must be a version number"),
        ("fraud:v3", "use 'fraud@v3' for an alias"),
        ("fraud@", "invalid alias ''"),
        ("fraud@Prod", "invalid alias 'Prod'"),
        ("fraud@1st", "invalid alias '1st'"),
        ("fraud@" + "a" * 64, "invalid alias"),
        ("fraud:3@prod", "one ':' or one '@' at most"),
        ("fraud@prod:3", "one ':' or one '@' at most"),
        (":3", "invalid model name ''"),
        ("fraud:3:4", "one ':' or one '@' at most"),
    ],
)
def test_parse_rejects_bad_references_saying_why(text: str, fragment: str) -> None:
    with pytest.raises(ValueError) as caught:
        ModelRef.parse(text)
    assert fragment in str(caught.value)


@pytest.mark.parametrize("text", ["fraud:", "fraud:-1", "fraud:V3"])
def test_a_bad_version_suggests_an_alias_only_where_it_is_one(text: str) -> None:
    with pytest.raises(ValueError) as caught:
        ModelRef.parse(text)
    assert "for an alias" not in str(caught.value)


def test_parse_rejects_non_strings() -> None:
    with pytest.raises(ValueError, match="a model reference is a string"):
        ModelRef.parse(3)  # type: ignore[arg-type]


def test_constructor_rejects_version_and_alias_together() -> None:
    with pytest.raises(ValueError, match="a version or an alias, not both"):
        ModelRef("fraud", version=1, alias="production")


@pytest.mark.parametrize("version", [0, -2, True, 1.0, 1 << 63])
def test_constructor_rejects_bad_versions(version: object) -> None:
    with pytest.raises(ValueError, match="versions are whole numbers from 1 to"):
        ModelRef("fraud", version=version)  # type: ignore[arg-type]


def test_ref_is_frozen_and_hashable() -> None:
    ref = ModelRef("fraud", alias="production")
    with pytest.raises(dataclasses.FrozenInstanceError):
        ref.name = "other"  # type: ignore[misc]
    assert {ref, ModelRef.parse("fraud@production")} == {ref}


def test_selector_and_is_latest() -> None:
    assert ModelRef("m").selector == ""
    assert ModelRef("m").is_latest
    assert ModelRef("m", version=4).selector == "4"
    assert ModelRef("m", alias="prod").selector == "prod"
    assert not ModelRef("m", alias="prod").is_latest


@pytest.mark.parametrize(
    ("value", "expected"),
    [("", (None, None)), ("3", (3, None)), ("production", (None, "production")), ("12", (12, None))],
)
def test_parse_version_field(value: str, expected: tuple[int | None, str | None]) -> None:
    assert parse_version_field(value) == expected


@pytest.mark.parametrize("value", ["0", "-1", "Prod", "1st", " 3", "3 ", "a" * 64])
def test_parse_version_field_rejects_garbage(value: str) -> None:
    with pytest.raises(ValueError, match="invalid"):
        parse_version_field(value)


@pytest.mark.parametrize("parse", [parse_version_field, lambda digits: ModelRef.parse(f"m:{digits}")])
def test_a_version_of_thousands_of_digits_is_refused_as_out_of_range_not_by_pythons_limits(parse) -> None:
    with pytest.raises(ValueError) as caught:
        parse("9" * 5000)
    message = str(caught.value)
    assert "versions are whole numbers from 1 to 9223372036854775807" in message and "(5000 digits)" in message
    assert "int_max_str_digits" not in message and len(message) < 200
    assert parse_version_field("0" * 5000 + "7") == (7, None)  # leading zeros are no digits of the number


def test_from_parts_builds_refs_from_v2_fields() -> None:
    assert ModelRef.from_parts("m", "") == ModelRef("m")
    assert ModelRef.from_parts("m", "7") == ModelRef("m", version=7)
    assert ModelRef.from_parts("m", "production") == ModelRef("m", alias="production")
    with pytest.raises(ValueError, match="invalid model name"):
        ModelRef.from_parts("M", "")


def test_validators_return_their_argument() -> None:
    assert validate_model_name("abc") == "abc"
    assert validate_alias("prod") == "prod"
