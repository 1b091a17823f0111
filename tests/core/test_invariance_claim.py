"""Which CPU a version's batch invariance was measured on, read from its provenance."""

from __future__ import annotations

import json

from appliance.cpu import cpu_description
from appliance.invariance_claim import measured_on_another_cpu


def _version(tmp_path, provenance: object):
    (tmp_path / "provenance.json").write_text(json.dumps(provenance))
    return tmp_path


def test_a_measurement_on_this_cpu_or_none_at_all_raises_no_doubt(tmp_path):
    here = cpu_description()
    assert measured_on_another_cpu(_version(tmp_path, {"parity": {"batch_invariance": {"cpu": here}}})) is None
    assert measured_on_another_cpu(_version(tmp_path, {"parity": {}})) is None  # a version the build did not measure
    assert measured_on_another_cpu(_version(tmp_path, ["not", "a", "record"])) is None
    assert measured_on_another_cpu(_version(tmp_path, {"parity": {"batch_invariance": {"cpu": "x86"}}})) is None
    (tmp_path / "provenance.json").write_text("{broken")
    assert measured_on_another_cpu(tmp_path) is None
    assert measured_on_another_cpu(tmp_path / "missing") is None


def test_a_measurement_with_other_vector_extensions_is_named(tmp_path):
    other = {"model": "Some Xeon", "vector_extensions": [*cpu_description()["vector_extensions"], "avx512_vnni9"]}
    version = _version(tmp_path, {"parity": {"batch_invariance": {"cpu": other}}})
    assert measured_on_another_cpu(version) == f"Some Xeon [{' '.join(other['vector_extensions'])}]"
