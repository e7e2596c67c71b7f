"""Which models a job can split into items, read from the signature alone."""

from __future__ import annotations

import pytest

from modelforge_jobs.domain import itemization
from modelforge_jobs.errors import BatchSizeFixed

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
        ([((1, ""),), BATCH], {"y": BATCH}, 1, ()),  # one input fixed at 1 makes every call 1 item
        ([((1, ""),), ((2, ""),)], {"y": BATCH}, None, ()),  # inputs fixed at sizes that disagree fix nothing
        (
            [BATCH],
            {"gram": ((-1, "batch"), (-1, "batch"))},  # x @ x.T
            None,
            (("gram", "has the items' dimension 'batch' at axis 1 too"),),
        ),
        (
            [BATCH],
            {"y": ((-1, ""), (3, ""), (-1, "batch"))},
            None,
            (("y", "has the items' dimension 'batch' at axis 2 too"),),
        ),
    ],
)
def test_itemization(inputs, outputs, fixed, unitemized) -> None:
    assert itemization(inputs, outputs) == (fixed, unitemized)


def test_the_refusal_of_a_batch_size_says_what_to_change() -> None:
    asked = BatchSizeFixed("m", 1, batch_size=5, fixed=1, items=5)
    assert "batch_size is 5; submit with batch_size 1 (or 0, which picks it)" in str(asked)
    uneven = BatchSizeFixed("m", 1, batch_size=0, fixed=2, items=5)
    assert "the job's 5 items do not divide into batches of 2; submit a multiple of 2 items (4 or 6)" in str(uneven)
    assert "submit a multiple of 4 items (4), padding" in str(BatchSizeFixed("m", 1, batch_size=0, fixed=4, items=3))
