"""The synthetic head CT: anatomy in HU, hemorrhages where they belong, labels that match
the pixels, and DICOM that our own loader reads back as one sorted series."""

from __future__ import annotations

import csv
import re
import shutil
import subprocess
import time
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest

from ich_model.dicom_io import load_series, scan
from ich_model.labels import LABELS
from ich_model.phantom import (
    BLOOD_TISSUE,
    DEFAULT_FOV_MM,
    SUBTYPES,
    PhantomSpec,
    Tissue,
    labels_from_tissue,
    make_phantom_dataset,
    render_slice,
    render_slice_with_tissue,
    render_volume,
    render_volume_with_tissue,
    write_labels_csv,
    write_series,
)

T = Tissue
VENTRICLES = (T.VENTRICLE_LEFT, T.VENTRICLE_RIGHT)
_KERNEL = np.ones((3, 3), np.uint8)


def small(subtypes: tuple[str, ...] = (), seed: int = 0, n_slices: int = 12) -> PhantomSpec:
    return PhantomSpec.for_matrix(128, subtypes=subtypes, n_slices=n_slices, seed=seed)


def dilate(mask: np.ndarray, px: int) -> np.ndarray:
    """Dilate each slice of a [z, y, x] (or one [y, x]) mask by ``px`` pixels."""
    m = mask[None] if mask.ndim == 2 else mask
    out = np.stack([cv2.dilate(s.astype(np.uint8), _KERNEL, iterations=px) for s in m])
    return out.astype(bool).reshape(mask.shape)


# ----------------------------------------------------------------------------- volumes


def test_render_volume_shapes_and_dtypes() -> None:
    hu, labels = render_volume(small(SUBTYPES))
    assert hu.shape == (12, 128, 128) and hu.dtype == np.float32
    assert labels.shape == (12, len(LABELS)) and labels.dtype == np.uint8
    assert set(np.unique(labels)) <= {0, 1}
    assert np.array_equal(labels[:, 5], labels[:, :5].max(axis=1))
    assert np.isfinite(hu).all()


def test_default_spec_is_a_512_matrix_head_ct() -> None:
    spec = PhantomSpec()
    assert (spec.matrix, spec.n_slices, spec.pixel_spacing, spec.slice_thickness) == (
        512,
        40,
        0.45,
        5.0,
    )
    assert PhantomSpec.for_matrix(128).pixel_spacing == pytest.approx(DEFAULT_FOV_MM / 128)
    assert np.all(np.diff(spec.levels) > 0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_normal_head_has_no_labels_and_no_blood(seed: int) -> None:
    _, labels, tissue = render_volume_with_tissue(small(seed=seed))
    assert not labels.any()
    assert tissue.max() < min(BLOOD_TISSUE.values())


@pytest.mark.parametrize("subtype", SUBTYPES)
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_each_subtype_shows_and_only_it(subtype: str, seed: int) -> None:
    hu, labels, tissue = render_volume_with_tissue(small((subtype,), seed=seed, n_slices=10))
    j = LABELS.index(subtype)
    positive = labels[:, j].astype(bool)
    assert positive.any(), f"{subtype} not visible with seed {seed}"
    others = [i for i in range(5) if i != j]
    assert not labels[:, others].any()
    assert np.array_equal(labels[:, 5], labels[:, j])
    blood = tissue == BLOOD_TISSUE[subtype]
    for z in np.flatnonzero(positive):  # labelled slices carry blood-density pixels
        assert np.median(hu[z][blood[z]]) > 40.0  # small ones lose contrast to blur
    biggest = int(np.argmax(blood.sum(axis=(1, 2))))
    assert np.median(hu[biggest][blood[biggest]]) > 50.0


@pytest.mark.parametrize("seed", [0, 5])
def test_labels_are_counted_from_the_blood_pixels(seed: int) -> None:
    spec = small(SUBTYPES, seed=seed)
    _, labels, tissue = render_volume_with_tissue(spec)
    for z in range(spec.n_slices):
        assert np.array_equal(labels[z], labels_from_tissue(tissue[z], spec.pixel_spacing))
    # a blob below the area threshold does not count, one above does
    t = np.zeros((512, 512), np.uint8)
    t[:4, :4] = T.SUBDURAL  # 16 px at 0.45 mm: under 20 px
    assert not labels_from_tissue(t, 0.45).any()
    t[:5, :4] = T.SUBDURAL
    assert labels_from_tissue(t, 0.45).tolist() == [0, 0, 0, 0, 1, 1]


def test_tissue_hu_ranges() -> None:
    hu, _, tissue = render_volume_with_tissue(small(seed=3))
    skull = np.isin(tissue, [T.BONE, T.DIPLOE])
    assert np.median(hu[skull]) > 700
    assert np.median(hu[tissue == T.BONE]) > 1000
    for brain in (T.GREY, T.WHITE):
        assert 20 <= np.median(hu[tissue == brain]) <= 45
    assert np.median(hu[tissue == T.GREY]) > np.median(hu[tissue == T.WHITE])
    assert np.median(hu[np.isin(tissue, VENTRICLES)]) < 15
    assert 20 <= np.median(hu[tissue == T.SCALP]) <= 70
    corners = hu[:, :10, :10]
    assert abs(float(np.median(corners)) + 1000) < 3
    assert hu.min() >= -1024
    noise = float(np.std(corners))
    assert 1.0 < noise < 8.0


def test_head_shrinks_toward_the_vertex_and_skull_base_is_bony() -> None:
    spec = small(n_slices=20)
    _, _, tissue = render_volume_with_tissue(spec)
    area = (tissue != T.AIR).sum(axis=(1, 2))
    widest = int(np.argmax(area))
    assert 0 < widest < spec.n_slices - 1
    assert area[-1] < 0.7 * area[widest]
    bone_share = np.isin(tissue, [T.BONE, T.DIPLOE]).sum(axis=(1, 2)) / np.maximum(area, 1)
    assert bone_share[1] > bone_share[widest]
    ventricles = np.isin(tissue, VENTRICLES).sum(axis=(1, 2))
    assert ventricles[widest - 2 : widest + 4].max() > 0
    assert ventricles[0] == 0 and ventricles[-1] == 0


@pytest.mark.parametrize("seed", range(4))
def test_extra_axial_blood_lies_on_the_inner_table(seed: int) -> None:
    _, labels, tissue = render_volume_with_tissue(small(("epidural", "subdural"), seed=seed))
    bone = tissue == T.BONE
    for subtype in ("epidural", "subdural"):
        blood = tissue == BLOOD_TISSUE[subtype]
        for z in np.flatnonzero(labels[:, LABELS.index(subtype)]):
            assert (dilate(blood[z], 2) & bone[z]).any(), f"{subtype} off the skull, slice {z}"


@pytest.mark.parametrize("seed", range(4))
def test_parenchymal_blood_is_inside_the_brain(seed: int) -> None:
    _, _, tissue = render_volume_with_tissue(small(("intraparenchymal",), seed=seed))
    blood = tissue == T.INTRAPARENCHYMAL
    assert blood.any()
    assert not (dilate(blood, 2) & np.isin(tissue, [T.BONE, T.DIPLOE, T.AIR])).any()


@pytest.mark.parametrize("seed", range(4))
def test_lesions_change_the_head_only_where_the_blood_is(seed: int) -> None:
    """Same seed with and without blood: same anatomy and noise (paired examples)."""
    subtypes = ("epidural", "intraparenchymal", "intraventricular", "subdural")
    hu0, _, t0 = render_volume_with_tissue(small(seed=seed))
    hu1, _, t1 = render_volume_with_tissue(small(subtypes, seed=seed))
    changed = t1 != t0
    assert np.isin(t1[changed], [*BLOOD_TISSUE.values(), T.OEDEMA]).all()
    assert np.array_equal(hu0[~dilate(changed, 3)], hu1[~dilate(changed, 3)])


@pytest.mark.parametrize("seed", range(4))
def test_intraventricular_blood_layers_in_the_ventricle(seed: int) -> None:
    _, _, normal = render_volume_with_tissue(small(seed=seed))
    _, labels, tissue = render_volume_with_tissue(small(("intraventricular",), seed=seed))
    ivh = tissue == T.INTRAVENTRICULAR
    ventricle = np.isin(normal, VENTRICLES)
    assert ivh.any() and not (ivh & ~ventricle).any()
    rows = np.broadcast_to(np.arange(128)[:, None], (128, 128))  # posterior is down
    for z in np.flatnonzero(labels[:, LABELS.index("intraventricular")]):
        # the dependent part fills: a fluid level with CSF above and blood below it
        level = rows[ivh[z]].min()
        sides = {int(v) for v in normal[z][ivh[z]]}
        below = np.isin(normal[z], list(sides)) & (rows >= level)
        assert ivh[z][below].all()
        assert rows[ivh[z]].mean() > rows[ventricle[z]].mean()


@pytest.mark.parametrize("seed", range(4))
def test_subarachnoid_blood_fills_sulci_and_cisterns(seed: int) -> None:
    _, _, normal = render_volume_with_tissue(small(seed=seed))
    _, _, tissue = render_volume_with_tissue(small(("subarachnoid",), seed=seed))
    sah = tissue == T.SUBARACHNOID
    spaces = dilate(np.isin(normal, [T.SULCUS, T.CISTERN, T.CSF]), 2)
    assert sah.any()
    assert (sah & spaces).sum() / sah.sum() > 0.75
    assert not (sah & np.isin(normal, [*VENTRICLES, T.BONE, T.DIPLOE])).any()


def test_render_volume_is_deterministic() -> None:
    a = render_volume(small(("subdural",), seed=9))
    b = render_volume(small(("subdural",), seed=9))
    c = render_volume(small(("subdural",), seed=10))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


def test_spec_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="Did you mean 'subdural'"):
        PhantomSpec(subtypes=("subdurall",))
    with pytest.raises(ValueError, match="subtype"):
        PhantomSpec(subtypes=("any",))
    with pytest.raises(ValueError, match="n_slices"):
        PhantomSpec(n_slices=0)
    assert PhantomSpec(subtypes=("subdural", "subdural")).subtypes == ("subdural",)


# ----------------------------------------------------------------------------- slices


@pytest.mark.parametrize("size", [64, 256])
def test_render_slice_shapes_and_labels(size: int) -> None:
    rng = np.random.default_rng(0)
    hu, labels = render_slice(rng, size, ["subdural"])
    assert hu.shape == (size, size) and hu.dtype == np.float32
    assert labels.shape == (6,) and labels.dtype == np.uint8
    assert labels[5] == labels[:5].max()
    assert not labels[[0, 1, 2, 3]].any()


def test_render_slice_labels_match_pixels() -> None:
    rng = np.random.default_rng(1)
    shown, asked = np.zeros(5), np.zeros(5)
    for i in range(40):
        subtypes = [SUBTYPES[i % 5], SUBTYPES[(i * 2 + 1) % 5]]
        asked[[SUBTYPES.index(s) for s in set(subtypes)]] += 1
        hu, labels, tissue = render_slice_with_tissue(rng, 128, subtypes)
        assert labels[5] == labels[:5].max()
        for j, s in enumerate(SUBTYPES):
            present = int((tissue == BLOOD_TISSUE[s]).sum())
            # at 128 px any field of view the slices use (215-245 mm) needs 2 px of blood
            assert labels[j] == (present >= 2)
            if s not in subtypes:
                assert present == 0
            elif labels[j]:
                shown[j] += 1
                assert np.median(hu[tissue == BLOOD_TISSUE[s]]) > 40
    assert (shown >= 0.8 * asked).all(), (shown, asked)  # random levels find the blood


def test_render_slice_level_where_the_blood_cannot_be() -> None:
    rng = np.random.default_rng(2)
    for _ in range(5):
        _, labels, tissue = render_slice_with_tissue(rng, 96, ["intraventricular"], level=0.97)
        assert not labels.any() and not (tissue == T.INTRAVENTRICULAR).any()
    hu, labels = render_slice(rng, 96, [], level=0.5)
    assert not labels.any() and np.median(hu[:3, :3]) < -990  # air around the head
    with pytest.raises(ValueError, match="level"):
        render_slice(rng, 96, [], level=1.5)
    with pytest.raises(ValueError, match="Did you mean"):
        render_slice(rng, 96, ["epidurall"])


def test_render_slice_is_fast() -> None:
    rng = np.random.default_rng(3)
    render_slice(rng, 256, SUBTYPES)
    start = time.perf_counter()
    for _ in range(50):
        render_slice(rng, 256, SUBTYPES)
    per_slice = (time.perf_counter() - start) / 50
    assert per_slice < 0.04, f"{per_slice * 1000:.1f} ms per 256 x 256 slice"


# ----------------------------------------------------------------------------- DICOM


def test_write_series_loads_back_as_one_sorted_series(tmp_path: Path) -> None:
    spec = PhantomSpec.for_matrix(128, subtypes=("subdural", "intraventricular"), n_slices=8)
    written = write_series(tmp_path / "s", spec)
    assert [f.name for f in written.files] == [f"IM{i:04d}.dcm" for i in range(1, 9)]
    infos = scan(tmp_path)
    assert len(infos) == 1 and infos[0].n_slices == 8 and not infos[0].warnings
    series = load_series(infos[0])
    hu, labels = render_volume(spec)
    assert series.hu.shape == hu.shape
    assert np.abs(series.hu - hu).max() <= 0.5 + 1e-3
    assert np.all(np.diff(series.positions) == pytest.approx(5.0))
    assert series.sop_uids == written.sop_uids
    assert series.files == written.files
    assert series.study_uid == written.study_uid and series.series_uid == written.series_uid
    assert series.pixel_spacing == pytest.approx((spec.pixel_spacing,) * 2)
    assert series.slice_thickness == 5.0 and not series.warnings
    assert np.array_equal(written.labels, labels)
    assert series.metadata["SeriesDescription"] == "Phantom head 5mm: IVH+SDH"  # LABELS order
    assert series.metadata["StudyDescription"] == "CT HEAD (phantom)"


def test_written_headers(tmp_path: Path) -> None:
    spec = PhantomSpec.for_matrix(64, n_slices=3, seed=4)
    written = write_series(tmp_path, spec, patient_id="P-7", patient_name="Test^Head")
    raw = written.files[1].read_bytes()
    assert raw[:128] == b"\0" * 128 and raw[128:132] == b"DICM"
    ds = pydicom.dcmread(written.files[1])
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2" == ds.file_meta.MediaStorageSOPClassUID
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert ds.Modality == "CT" and ds.PatientID == "P-7" and str(ds.PatientName) == "Test^Head"
    assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation) == (16, 16, 15, 1)
    assert (float(ds.RescaleIntercept), float(ds.RescaleSlope)) == (-1024.0, 1.0)
    assert ds.PhotometricInterpretation == "MONOCHROME2" and ds.SamplesPerPixel == 1
    assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
    x0 = -(64 - 1) / 2 * spec.pixel_spacing
    pos = [float(v) for v in ds.ImagePositionPatient]
    assert pos[:2] == pytest.approx([x0, x0], abs=1e-3) and pos[2] == float(ds.SliceLocation)
    assert ds.InstanceNumber == 2 and float(ds.SpacingBetweenSlices) == 5.0
    assert list(ds.ImageType) == ["ORIGINAL", "PRIMARY", "AXIAL"]
    assert (float(ds.WindowCenter), float(ds.WindowWidth)) == (40.0, 80.0)
    assert ds.Manufacturer == "ICH second opinion phantom" and ds.BodyPartExamined == "HEAD"
    assert ds.SeriesDescription == "Phantom head 5mm: normal"
    for tag in ("FrameOfReferenceUID", "StudyDate", "PatientBirthDate", "PatientSex", "KVP"):
        assert tag in ds
    assert ds.pixel_array.dtype == np.int16


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (dicom3tools) not installed")
def test_written_files_pass_dciodvfy(tmp_path: Path) -> None:
    written = write_series(tmp_path, PhantomSpec.for_matrix(64, n_slices=2, seed=5))
    report = subprocess.run(
        ["dciodvfy", str(written.files[0])], capture_output=True, text=True, timeout=60
    )
    text = report.stdout + report.stderr  # dciodvfy reports on stderr
    assert text.startswith("CTImage")
    assert [ln for ln in text.splitlines() if ln.startswith("Error")] == []


def test_write_series_uids_are_deterministic(tmp_path: Path) -> None:
    spec = PhantomSpec.for_matrix(64, n_slices=3, seed=11)
    a = write_series(tmp_path / "a", spec)
    b = write_series(tmp_path / "b", spec)
    c = write_series(tmp_path / "c", PhantomSpec.for_matrix(64, n_slices=3, seed=12))
    d = write_series(tmp_path / "d", spec, study_uid=a.study_uid, series_description="second")
    assert (a.study_uid, a.series_uid, a.sop_uids) == (b.study_uid, b.series_uid, b.sop_uids)
    assert a.study_uid != c.study_uid and set(a.sop_uids).isdisjoint(c.sop_uids)
    assert d.study_uid == a.study_uid and d.series_uid != a.series_uid
    assert len(set(a.sop_uids)) == 3
    assert all(pydicom.uid.UID(u).is_valid for u in (*a.sop_uids, a.study_uid, a.series_uid))


def test_write_labels_csv(tmp_path: Path) -> None:
    written = write_series(tmp_path / "s", small(("epidural",), n_slices=8))
    out = tmp_path / "labels.csv"
    write_labels_csv(out, [written])
    lines = out.read_text().splitlines()
    assert len(lines) == 8 * 6 + 1 and lines[0] == "ID,Label"
    pattern = re.compile(
        r"^ID_[0-9.]+_(epidural|intraparenchymal|intraventricular|"
        r"subarachnoid|subdural|any),[01]$"
    )
    assert all(pattern.match(line) for line in lines[1:])
    rows = list(csv.reader(lines[1:]))
    for i, sop in enumerate(written.sop_uids):
        block = rows[i * 6 : i * 6 + 6]
        assert [r[0] for r in block] == [f"ID_{sop}_{label}" for label in LABELS]
        assert [int(r[1]) for r in block] == written.labels[i].tolist()


def test_make_phantom_dataset(tmp_path: Path) -> None:
    a = make_phantom_dataset(tmp_path / "a", n_studies=7, n_slices=8, matrix=64, seed=3)
    b = make_phantom_dataset(tmp_path / "b", n_studies=7, n_slices=8, matrix=64, seed=3)
    c = make_phantom_dataset(tmp_path / "c", n_studies=2, n_slices=8, matrix=64, seed=4)
    assert [s.sop_uids for s in a] == [s.sop_uids for s in b]
    assert all(np.array_equal(x.labels, y.labels) for x, y in zip(a, b, strict=True))
    assert a[0].study_uid != c[0].study_uid
    assert len({s.study_uid for s in a}) == 7
    assert a[0].folder == tmp_path / "a" / "PHANTOM-0001" / "CT"
    per_study = np.stack([s.labels.max(axis=0) for s in a])
    assert per_study[:, :5].max(axis=0).all()  # every subtype somewhere
    assert (per_study.sum(axis=1) == 0).any()  # and a normal head
    rows = (tmp_path / "a" / "labels.csv").read_text().splitlines()
    assert len(rows) == 7 * 8 * 6 + 1
    infos = scan(tmp_path / "a")  # labels.csv is skipped with a warning
    assert sorted(i.n_slices for i in infos) == [8] * 7
    with pytest.raises(ValueError, match="Did you mean 'balanced'"):
        make_phantom_dataset(tmp_path / "d", 1, subtype_mix="balance")


def test_random_mix_is_deterministic(tmp_path: Path) -> None:
    a = make_phantom_dataset(tmp_path / "a", 4, n_slices=4, matrix=32, subtype_mix="random")
    b = make_phantom_dataset(tmp_path / "b", 4, n_slices=4, matrix=32, subtype_mix="random")
    assert [s.series_uid for s in a] == [s.series_uid for s in b]
