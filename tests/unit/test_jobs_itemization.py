"""Which models a job can split into items, read from the signature alone."""

from __future__ import annotations

import pytest

from modelforge_jobs.domain import itemization

BATCH = ((-1, "batch"), (4, ""))


@pytest.mark.parametrize(
    ("inputs", "outputs", "fixed", "unitemized"),
    [
        ([BATCH], {"y": BATCH}, None, ()),
        ([((-1, ""), (4, ""))], {"y": ((-1, ""),)}, None, ()),  # unnamed dimensions follow the inputs
        ([BATCH], {"y": ((-1, "N"),)}, None, (("y", "has first dimension 'N', not the items' 'batch'"),)),
        ([BATCH], {"s": ()}, None, (("s", "is a scalar"),)),
        ([BATCH], {"y": ((1, ""), (8, ""))}, None, (("y", "has its first dimension fixed at 1"),)),
        ([((1, ""), (4, ""))], {"y": ((1, ""), (8, ""))}, 1, ()),  # exported for batch 1
        ([((1, ""), (4, ""))], {"y": ((-1, ""),)}, 1, ()),
        (
            [((2, ""), (4, ""))],
            {"y": ((1, ""),)},
            2,
            (("y", "has its first dimension fixed at 1, where the inputs take 2 item(s) per call"),),
        ),
        ([((1, ""),), BATCH], {"y": BATCH}, None, ()),  # inputs that disagree fix nothing
    ],
)
def test_itemization(inputs, outputs, fixed, unitemized) -> None:
    assert itemization(inputs, outputs) == (fixed, unitemized)
