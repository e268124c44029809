"""benchmarks/gap.py switches steps off by patching the library: each patch must still
name something real, or the variant would silently measure the full transaction."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import gap

from pipeline_common import PipelineState


@pytest.mark.parametrize("variant", gap.variants(), ids=lambda v: v[0])
def test_each_variant_patches_real_names_and_still_commits(
    variant: gap.Variant, tmp_path: Path
) -> None:
    name, _what, factory, kwargs = variant
    state = PipelineState(tmp_path / "s.json")
    state.write({"counter": 0, "n": None})
    with factory(), state.transaction(**kwargs) as txn:
        txn.data["counter"] = 1
    assert state.read()["counter"] == 1, name
