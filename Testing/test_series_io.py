"""Series manifests and filling the time-point table from volume names."""
import json

import pytest

from CoRXRegistrationLib.series_io import SeriesError, find_series, hours_from_name, read_series, series_from_names


@pytest.mark.parametrize("name, hours", [("SPECT 24h", 24.0), ("ct_004h", 4.0), ("CT 4.5 hours", 4.5),
                                         ("Lu177 SPECT day 2 48 h", 48.0), ("CT thorax", None), ("hhh", None)])
def test_hours_from_name(name, hours):
    assert hours_from_name(name) == hours


def test_series_from_names_pairs_ct_and_spect_by_hours():
    names = ["SPECT 24h", "CT 24h", "CT 4h", "SPECT 4h", "SPECT 120h", "CT 48h", "NM 48h", "CT 120h",
             "CT 120 h copy", "segmentation"]
    # 120 h has two CTs: ambiguous, left out rather than guessed
    assert series_from_names(names) == [(4.0, "CT 4h", "SPECT 4h"), (24.0, "CT 24h", "SPECT 24h"),
                                        (48.0, "CT 48h", "NM 48h")]


def test_manifest_errors_name_the_problem(tmp_path):
    (tmp_path / "a.nii.gz").write_bytes(b"")
    bad = {"format": "corx-series/1", "time_points": [{"hours": 24, "ct": "a.nii.gz", "spect": "a.nii.gz"},
                                                      {"hours": 4, "ct": "a.nii.gz", "spect": "a.nii.gz"}]}
    (tmp_path / "series.json").write_text(json.dumps(bad))
    with pytest.raises(SeriesError, match="strictly increasing"):
        read_series(tmp_path)
    bad["time_points"][1] = {"hours": 48, "ct": "missing.nii.gz", "spect": "a.nii.gz"}
    (tmp_path / "series.json").write_text(json.dumps(bad))
    with pytest.raises(SeriesError, match="missing.nii.gz"):
        read_series(tmp_path / "series.json")
    with pytest.raises(SeriesError, match="no series.json"):
        find_series(tmp_path / "nowhere")
