import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from ich_model.dicom_io import (
    analyzability,
    geometry_warnings,
    load_series,
    load_study,
    scan,
    slice_normal,
    to_hu,
)
from ich_model.series import SeriesLoadError
from tests.dicomfactory import SHARED_DATA, ct_series, ct_slice


def _warnings():
    out: list[str] = []
    return out, out.append


def test_sorts_by_position_not_file_name(tmp_path):
    uid = generate_uid()
    zs = [20.0, 0.0, 10.0, 5.0, 15.0]
    for k, z in enumerate(zs):
        ct_slice(tmp_path / f"a{k}.dcm", series_uid=uid, z=z, instance=10 - k, hu=z)
    [s] = load_study(tmp_path)
    assert s.positions == (0.0, 5.0, 10.0, 15.0, 20.0)
    np.testing.assert_allclose(s.hu[:, 0, 0], [0, 5, 10, 15, 20])
    assert not [w for w in s.warnings if "InstanceNumber" in w]


def test_sorts_along_the_normal_of_a_tilted_plane(tmp_path):
    uid = generate_uid()
    o = (1, 0, 0, 0, np.cos(0.3), -np.sin(0.3))  # tilted about x
    n = slice_normal(o)
    for k, d in enumerate([3, 1, 2, 0]):
        p = n * d * 5.0
        ct_slice(
            tmp_path / f"b{k}.dcm",
            series_uid=uid,
            z=float(p[2]),
            xy=(float(p[0]), float(p[1])),
            orientation=o,
            hu=float(d),
        )
    [s] = load_study(tmp_path)
    np.testing.assert_allclose(s.hu[:, 0, 0], [0, 1, 2, 3])


def test_instance_number_fallback_warns(tmp_path):
    uid = generate_uid()
    for k, inst in enumerate([3, 1, 2]):
        ct_slice(tmp_path / f"c{k}.dcm", series_uid=uid, z=None, instance=inst, hu=float(inst))
    [s] = load_study(tmp_path)
    np.testing.assert_allclose(s.hu[:, 0, 0], [1, 2, 3])
    assert any("sorted by InstanceNumber" in w for w in s.warnings)


def test_groups_by_series_and_splits_matrix_sizes(tmp_path):
    ct_series(tmp_path / "one", n=3)
    uid = generate_uid()
    for k in range(4):
        ct_slice(tmp_path / "two" / f"{k}.dcm", series_uid=uid, z=k * 5.0, rows=32, cols=32)
    ct_slice(tmp_path / "two" / "odd.dcm", series_uid=uid, z=100.0, rows=16, cols=16)
    warns, warn = _warnings()
    infos = scan(tmp_path, warn)
    sizes = sorted(i.n_slices for i in infos)
    assert sizes == [1, 3, 4]
    assert any("split into 2 series" in w for w in warns)
    keys = {i.key for i in infos if i.series_uid == uid}
    assert keys == {uid, f"{uid}#2"}


def test_splits_orientations(tmp_path):
    uid = generate_uid()
    for k in range(3):
        ct_slice(tmp_path / f"ax{k}.dcm", series_uid=uid, z=k * 5.0)
    for k in range(2):
        ct_slice(
            tmp_path / f"cor{k}.dcm",
            series_uid=uid,
            z=0.0,
            xy=(0.0, k * 5.0),
            orientation=(1, 0, 0, 0, 0, -1),
        )
    infos = scan(tmp_path)
    assert sorted(i.n_slices for i in infos) == [2, 3]
    coronal = load_series(min(infos, key=lambda i: i.n_slices))
    assert any("axial" in r for r in analyzability(coronal))


def test_bad_files_are_left_out_with_reasons(tmp_path):
    good = ct_series(tmp_path, n=3)
    (tmp_path / "empty.dcm").write_bytes(b"")
    (tmp_path / "notes.dcm").write_text("this is not DICOM\n" * 20)
    (tmp_path / "picture.dcm").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 300)
    trunc = tmp_path / "truncated.dcm"
    trunc.write_bytes(good[0].read_bytes()[:200])
    ct_slice(tmp_path / "nopixels.dcm", series_uid=generate_uid(), with_pixels=False)
    ct_slice(
        tmp_path / "sr.dcm",
        series_uid=generate_uid(),
        sop_class="1.2.840.10008.5.1.4.1.1.88.33",
        with_pixels=False,
        modality="SR",
    )
    ct_slice(
        tmp_path / "pr.dcm",
        series_uid=generate_uid(),
        sop_class="1.2.840.10008.5.1.4.1.1.11.1",
        with_pixels=False,
        modality="PR",
    )
    ds = pydicom.dcmread(good[0])
    ct_slice(
        tmp_path / "scout.dcm",
        series_uid=ds.SeriesInstanceUID,
        z=500.0,
        image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"),
    )
    warns, warn = _warnings()
    series = load_study(tmp_path, warn)
    assert len(series) == 1 and series[0].n_slices == 3
    text = "\n".join(warns)
    for name, why in [
        ("empty.dcm", "left out"),
        ("notes.dcm", "not a DICOM"),
        ("picture.dcm", "left out"),
        ("truncated.dcm", "left out"),
        ("nopixels.dcm", "no pixel data"),
        ("sr.dcm", "structured report"),
        ("pr.dcm", "presentation state"),
        ("scout.dcm", "localizer"),
    ]:
        assert any(name in w and why in w for w in warns), f"{name}: {why} not in\n{text}"


def test_truncated_pixel_data_drops_the_slice(tmp_path):
    files = ct_series(tmp_path, n=4)
    raw = files[2].read_bytes()
    files[2].write_bytes(raw[: len(raw) - 500])
    warns, warn = _warnings()
    [s] = load_study(tmp_path, warn)
    assert s.n_slices in (3, 4)  # pydicom may refuse the header or the pixels
    if s.n_slices == 3:
        assert any(files[2].name in w for w in list(s.warnings) + warns)


def test_nothing_loadable_raises_series_load_error(tmp_path):
    files = ct_series(tmp_path, n=2)
    infos = scan(tmp_path)
    for f in files:
        raw = f.read_bytes()
        f.write_bytes(raw[: len(raw) - 1000])
    with pytest.raises(SeriesLoadError) as exc:
        load_series(infos[0])
    assert "could be decoded" in str(exc.value)
    assert exc.value.paths


def test_empty_folder_warns(tmp_path):
    warns, warn = _warnings()
    assert scan(tmp_path, warn) == []
    assert any("no DICOM files" in w for w in warns)


def test_duplicate_positions_are_left_out(tmp_path):
    uid = generate_uid()
    for k, z in enumerate([0.0, 5.0, 5.0, 10.0]):
        ct_slice(tmp_path / f"d{k}.dcm", series_uid=uid, z=z)
    [s] = load_study(tmp_path)
    assert s.n_slices == 3
    assert any("duplicate slice position" in w for w in s.warnings)


def test_to_hu_modality_lut_and_padding():
    stored = np.array([[0, 1024, 1064, -2000]], dtype=np.int16)
    hu = to_hu(stored, 1.0, -1024.0, padding_value=-2000)
    np.testing.assert_allclose(hu, [[-1024, 0, 40, -1024]])
    # padding below air is air even without PixelPaddingValue
    np.testing.assert_allclose(to_hu(np.array([-3024.0]), 1.0, 0.0), [-1024])
    np.testing.assert_allclose(to_hu(np.array([100]), 2.0, -10.0), [190])


def test_rsna_wrap_fix():
    # 12-bit unsigned data whose intercept says 0 but whose values wrapped: stored value v
    # means HU (v + 1000) mod 4096 - 1000.
    stored = np.array([24, 1040, 3500], dtype=np.uint16)
    hu = to_hu(stored, 1.0, 0.0, bits_stored=12, pixel_representation=0)
    np.testing.assert_allclose(hu, [24, 1040, (3500 + 1000 - 4096) - 1000])
    # not applied when the intercept is already the usual -1024
    np.testing.assert_allclose(to_hu(stored, 1.0, -1024.0, 12, 0), stored - 1024.0)


def test_rsna_wrap_fix_through_the_loader(tmp_path):
    ct_slice(
        tmp_path / "w.dcm",
        series_uid=generate_uid(),
        stored=np.full((8, 8), 1040),
        intercept=0.0,
        bits_stored=12,
        pixel_representation=0,
    )
    [s] = load_study(tmp_path)
    np.testing.assert_allclose(s.hu, 1040.0)


def test_geometry_warnings_gap_uneven_tilt():
    assert any("gap" in w for w in geometry_warnings([0, 5, 10, 20, 25], None, None, "s"))
    assert any("uneven" in w for w in geometry_warnings([0, 5, 9, 15, 20], None, None, "s"))
    o = (1, 0, 0, 0, 1, 0)
    xyz = [(0, k * 0.9, k * 5.0) for k in range(5)]
    assert any("tilt" in w for w in geometry_warnings([k * 5.0 for k in range(5)], o, xyz, "s"))


def test_dicomdir(tmp_path):
    from pydicom.fileset import FileSet

    files = ct_series(tmp_path / "src", n=3)
    fs = FileSet()
    for f in files:
        fs.add(pydicom.dcmread(f))
    fs.write(tmp_path / "media")
    [s] = load_study(tmp_path / "media" / "DICOMDIR")
    assert s.n_slices == 3
    np.testing.assert_allclose(s.hu[:, 0, 0], [0, 10, 20])


def _textured_series(folder):
    """Two slices with real texture and padding (negative stored values), so a decoder that
    loses the sign or a bit shows up."""
    uid = generate_uid()
    rng = np.random.default_rng(0)
    out = []
    for k in range(2):
        stored = rng.integers(0, 2600, (32, 32)) + 10 * k
        stored[:4, :4] = -2000
        out.append(
            ct_slice(folder / f"t{k}.dcm", series_uid=uid, z=5.0 * k, instance=k + 1, stored=stored)
        )
    return out


@pytest.mark.parametrize("syntax", ["RLELossless", "JPEG2000Lossless", "JPEGLSLossless"])
def test_compressed_transfer_syntaxes(tmp_path, syntax):
    import pydicom.uid

    _textured_series(tmp_path / "ref")
    [ref] = load_study(tmp_path / "ref")
    shutil.copytree(tmp_path / "ref", tmp_path / "c")
    files = sorted((tmp_path / "c").glob("*.dcm"))
    for f in files:
        ds = pydicom.dcmread(f)
        try:
            ds.compress(getattr(pydicom.uid, syntax))
        except (RuntimeError, NotImplementedError) as exc:
            pytest.skip(f"no encoder for {syntax} here: {exc}")
        ds.save_as(f)
    [s] = load_study(tmp_path / "c")
    np.testing.assert_array_equal(s.hu, ref.hu)


@pytest.mark.parametrize("syntax", ["JPEGLSLossless", "JPEG2000Lossless"])
def test_compressed_stream_cut_short_is_refused(tmp_path, syntax):
    # pylibjpeg decodes a JPEG / JPEG-LS stream that stops half-way into a wrong picture with
    # no error; the loader refuses a stream without its end marker and names the file
    import pydicom.uid
    from pydicom.encaps import encapsulate, get_frame

    [good, cut] = _textured_series(tmp_path)
    for f in (good, cut):
        ds = pydicom.dcmread(f)
        try:
            ds.compress(getattr(pydicom.uid, syntax))
        except (RuntimeError, NotImplementedError) as exc:
            pytest.skip(f"no encoder for {syntax} here: {exc}")
        if f == cut:
            frame = bytes(get_frame(ds.PixelData, 0, number_of_frames=1))
            ds.PixelData = encapsulate([frame[: len(frame) // 2]])
        ds.save_as(f)
    [s] = load_study(tmp_path)
    assert s.n_slices == 1 and list(s.files) == [good]
    [warning] = [w for w in s.warnings if str(cut) in w]
    assert "ends before its end marker" in warning


@pytest.mark.skipif(shutil.which("dcmcjpeg") is None, reason="dcmcjpeg (dcmtk) not installed")
@pytest.mark.parametrize("option", ["+e1", "+el"])  # JPEG Lossless SV1 (.70), process 14 (.57)
def test_jpeg_lossless_from_dcmtk(tmp_path, option):
    import subprocess

    _textured_series(tmp_path / "ref")
    [ref] = load_study(tmp_path / "ref")
    for f in sorted((tmp_path / "ref").glob("*.dcm")):
        subprocess.run(["dcmcjpeg", option, str(f), str(tmp_path / f.name)], check=True)
    ts = pydicom.dcmread(tmp_path / "t0.dcm", stop_before_pixels=True).file_meta
    assert ts.TransferSyntaxUID.startswith("1.2.840.10008.1.2.4.")
    [s] = load_study([tmp_path / "t0.dcm", tmp_path / "t1.dcm"])
    np.testing.assert_array_equal(s.hu, ref.hu)


# ------------------------------------------------------------------- real data

needs_data = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"{SHARED_DATA} is absent")


@needs_data
@pytest.mark.realdata
def test_cq500_mixed_is_two_series_sorted_with_warnings():
    folder = SHARED_DATA / "cq500-mixed"
    infos = scan(folder)
    assert sorted(i.n_slices for i in infos) == [1, 238]
    big = next(i for i in infos if i.n_slices == 238)
    s = load_series(big)
    assert s.hu.shape == (238, 512, 512)
    assert all(b > a for a, b in zip(s.positions, s.positions[1:], strict=False))
    text = " ".join(s.warnings)
    assert "gantry tilt of 8.5 degrees" in text
    assert "1 gap(s)" in text
    brain = s.hu[120, 200:300, 200:300]
    assert 15 < float(np.median(brain)) < 50  # parenchyma in HU
    assert s.hu.min() >= -1024


@needs_data
@pytest.mark.realdata
def test_rsna_dicoms_all_load():
    folder = SHARED_DATA / "rsna-dcm"
    files = sorted(folder.glob("*.dcm"))
    assert len(files) == 5
    series = load_study(files)
    assert len(series) == 5
    for s in series:
        assert s.hu.shape == (1, 512, 512)
        assert s.hu.min() >= -1024
        assert 15 < float(np.median(s.hu[0][s.hu[0] > 0])) < 80


@needs_data
@pytest.mark.realdata
def test_rsna_dicoms_copied_in_one_folder(tmp_path):
    for f in (SHARED_DATA / "rsna-dcm").glob("*.dcm"):
        shutil.copy(f, tmp_path / f.name)
    assert len(scan(tmp_path)) == 5
    assert all(isinstance(p, Path) for i in scan(tmp_path) for p in i.files)
