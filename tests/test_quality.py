"""The self-check: its measures on registrations, and its verdict from measures of the knee families."""

import warnings

import pytest
import torch
from knee_poses import CONFIG

from neuralreg import Image, RegistrationConfig, RegistrationWarning, register_pair
from neuralreg.quality import judge


def test_hopeless_pair_is_flagged(phantom):
    """Two unrelated images: the fit runs, but the verdict says it failed, and a warning is raised."""
    g = torch.Generator().manual_seed(3)
    noise = torch.nn.functional.interpolate(
        torch.rand(1, 1, 8, 12, 12, generator=g), size=(32, 48, 48), mode="trilinear"
    )
    unrelated = Image(noise[0, 0], phantom["moving"].affine)
    with pytest.warns(RegistrationWarning, match="registration quality failed"):
        reg = register_pair(unrelated, phantom["fixed"], RegistrationConfig(**CONFIG))
    q = reg.info["quality"]
    assert q["verdict"] == "failed"
    assert any("share almost no information" in r for r in q["reasons"])


def test_an_image_registered_to_itself_is_good(phantom):
    """Nothing to improve on the physical alignment is no reason to look: an image against itself is good."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", RegistrationWarning)
        reg = register_pair(phantom["fixed"], phantom["fixed"], RegistrationConfig(**{**CONFIG, "steps": 30}))
    q = reg.info["quality"]
    assert q["verdict"] == "good", q["reasons"]
    assert q["measures"]["lncc_identity"] == pytest.approx(1.0, abs=1e-3)


def test_the_self_check_measures_how_far_the_fields_move_beyond_the_affine_part(phantom):
    """New fields are the identity: Phi = A and the correction is 0; a constant field
    displacement b (normalized units) moves every point by |b| * box.scale mm."""
    from neuralreg import NeuralField
    from neuralreg.geometry.coordinates import NormalizedBox
    from neuralreg.quality import assess
    from neuralreg.result import Registration

    moving, fixed = phantom["moving"], phantom["fixed"]
    box = NormalizedBox.around([(moving.shape, moving.affine), (fixed.shape, fixed.affine)])
    fields = [NeuralField(3) for _ in range(2)]
    reg = Registration(*fields, box, (fixed.shape, fixed.affine), (moving.shape, moving.affine), RegistrationConfig())
    assert assess(reg, moving, fixed).measures["field_correction_mm"] == pytest.approx(0.0, abs=1e-4)
    with torch.no_grad():
        fields[0].mlp[-1].bias.copy_(torch.tensor([0.003, 0.0, 0.004]))
    moved = assess(reg, moving, fixed).measures["field_correction_mm"]
    assert moved == pytest.approx(0.005 * box.scale, rel=1e-3)


def _measures(**changes) -> dict:
    """Measures of canonical knee pair 9005132-9006723 with the defaults (bone Dice 0.970); the
    normalized MI below the line where the NCC lines give way (1.15), as for knees of two subjects."""
    m = {
        "ncc_identity": 0.41,
        "ncc_affine": 0.78,
        "ncc_final": 0.90,
        "lncc_identity": 0.02,
        "lncc_affine": 0.049,
        "lncc_final": 0.227,
        "overlap_identity": 1.0,
        "overlap_final": 1.0,
        "round_trip_fixed_mm": 0.45,
        "round_trip_limit_mm": 2.0,
        "world_boxes_overlap": True,
        "centre_distance_mm": 3.0,
        "percent_folds": 0.0,
        "nmi_final": 1.12,
        "field_correction_mm": 5.0,
    }
    return {**m, **changes}


def test_low_affine_local_ncc_is_overruled_by_a_good_final_similarity():
    """A right affine part on non-corresponding soft tissue can score local NCC 0.049: not a failure
    when the fields bring the global NCC to 0.90; a reason to look when the final NCC stays lower."""
    assert judge(_measures()).verdict == "good"
    q = judge(_measures(ncc_final=0.80))
    assert q.verdict == "check"
    assert "after the global (affine) alignment the images hardly correlate (local NCC 0.049)" in q.reasons


def test_scored_inside_the_body_the_ncc_line_is_lower():
    """Inside the body (field_interior) good hard knee pairs score NCC 0.841-0.855: good there,
    worth a look on the whole grid."""
    inside = {"scored_inside_mask": True}
    assert judge(_measures(ncc_final=0.841, **inside)).verdict == "good"
    wrong = judge(_measures(ncc_final=0.739, **inside))
    assert wrong.verdict == "check" and "correlate only moderately (NCC 0.739 < 0.8)" in wrong.reasons[0]
    assert judge(_measures(ncc_final=0.841)).verdict == "check"  # the whole grid keeps its line


# measured (2026-12-04): knee pairs whose soft tissue fills the field of view (filled family)
# and whose contrasts differ (contrast family), registered with the defaults
FILLED_GOOD = dict(ncc_final=0.712, nmi_final=1.091, lncc_affine=0.122, lncc_final=0.327, field_correction_mm=6.5)


CONTRAST_GOOD = dict(ncc_final=0.705, nmi_final=1.080, lncc_affine=0.144, lncc_final=0.298, field_correction_mm=5.9)


CONTRAST_LOST = dict(ncc_final=0.338, nmi_final=1.018, lncc_affine=0.026, lncc_final=0.218, field_correction_mm=6.6)


FILLED_MISPLACED = dict(ncc_final=0.443, nmi_final=1.028, lncc_affine=-0.02, lncc_final=0.216, field_correction_mm=18.0)


def test_good_registrations_of_non_corresponding_tissue_or_contrast_are_not_failed():
    """Bone Dice 0.954 and 0.911: the NCC is moderate (a look), the information shared is high."""
    for good in (FILLED_GOOD, CONTRAST_GOOD):
        q = judge(_measures(**good))
        assert q.verdict == "check"
        assert q.reasons == [f"the registered images correlate only moderately (NCC {good['ncc_final']:.3f} < 0.85)"]


def test_lost_or_misplaced_knees_are_never_good():
    """Cartilage Dice 0.012 (contrast, bones lost): failed on the information shared; cartilage 0.235
    (filled, the fields moved points 18 mm to half repair a wrong start): at least a look."""
    lost = judge(_measures(**CONTRAST_LOST))
    assert lost.verdict == "failed"
    assert lost.reasons[0] == (
        "the registered images share almost no information (normalized mutual information 1.018 < 1.03): "
        "unrelated images, or a global alignment that failed"
    )
    misplaced = judge(_measures(**FILLED_MISPLACED))
    assert misplaced.verdict != "good"
    assert (
        "the fields move points 18.0 mm beyond the global alignment on average (more than 9 mm): the global "
        "alignment was probably off"
    ) in misplaced.reasons


def test_unrelated_images_fail_on_information_not_on_correlation():
    """A brain against a knee, noise against a knee phantom: NMI 1.007-1.009 fails them, whatever their NCC."""
    for nmi, ncc in ((1.007, 0.114), (1.009, 0.602)):
        q = judge(_measures(nmi_final=nmi, ncc_final=ncc, lncc_affine=0.1, lncc_final=0.2))
        assert q.verdict == "failed"


def test_measures_stored_under_the_old_round_trip_names_are_judged_alike():
    """registration.pt files hold the self-check's measures: those written before the round
    trip's rename (``inverse_consistency_error_mm`` there) are judged as the new ones."""
    new = _measures(round_trip_fixed_mm=7.5)
    old = {k: v for k, v in new.items() if not k.startswith("round_trip")}
    old |= {"inverse_consistency_error_mm": 7.5, "inverse_consistency_limit_mm": 2.0}
    assert judge(old).verdict == judge(new).verdict == "failed"
    assert judge(old).reasons == judge(new).reasons
    assert "round trip Phi_BA(Phi_AB(x)) misses by 7.5 mm (more than 3.0 mm)" in judge(new).reasons[0]


# measured (2026-12-07): a `contrast` knee pair of two subjects registered with mind_mi, bone Dice
# 0.929 in view (9007827-9008561): its maps' round trip 3.16 mm against a limit of 2.96 mm
MIND_MI_GOOD = dict(FILLED_GOOD, round_trip_fixed_mm=3.16, round_trip_limit_mm=2.96)


def test_a_round_trip_just_over_its_limit_asks_for_a_look_and_far_over_it_fails():
    """Good mind_mi registrations end up to 1.6 times over the round trip's limit: a look. Beyond 1.5
    times it the maps disagree: failed, with the line that was crossed."""
    rough = judge(_measures(**MIND_MI_GOOD))
    assert rough.verdict == "check"
    assert (
        "a round trip Phi_BA(Phi_AB(x)) misses by 3.2 mm (more than 3.0 mm): the two maps agree only roughly"
    ) in rough.reasons
    assert judge(_measures(**dict(MIND_MI_GOOD, round_trip_fixed_mm=4.43))).verdict == "check"  # 1.5 x 2.96 = 4.44
    far = judge(_measures(**dict(MIND_MI_GOOD, round_trip_fixed_mm=4.45)))
    assert far.verdict == "failed"
    assert far.reasons[0] == (
        "a round trip Phi_BA(Phi_AB(x)) misses by 4.5 mm (more than 4.4 mm): the two maps disagree"
    )
    assert judge(_measures(**dict(MIND_MI_GOOD, round_trip_fixed_mm=float("nan")))).verdict == "failed"
    assert judge(_measures(round_trip_fixed_mm=2.0)).verdict == "good"  # at the limit


# measured (2026-12-05): IXI heads against deformed copies of themselves in another contrast
# (examples/header_benchmark.py --contrast), registered to within 0.43 mm, scored inside the head
OTHER_CONTRAST_INVERTED = dict(
    ncc_identity=0.073,
    ncc_affine=-0.276,
    ncc_final=-0.293,
    lncc_identity=0.032,
    lncc_affine=-0.212,
    lncc_final=-0.23,
    nmi_identity=1.004,
    nmi_final=1.185,
    field_correction_mm=0.76,
    round_trip_fixed_mm=0.26,
    round_trip_limit_mm=4.0,
    scored_inside_mask=True,
)
OTHER_CONTRAST_FLAT = dict(
    OTHER_CONTRAST_INVERTED,
    ncc_final=0.309,
    lncc_affine=0.039,
    lncc_final=0.022,
    lncc_identity=0.041,
    nmi_identity=1.003,
    nmi_final=1.199,
)
# the same scans in one contrast, the true map shifted 4 mm (scored as the self-check does): DESS, IXI
FOUR_MM_OFF = (
    dict(ncc_final=0.80, nmi_final=1.129, lncc_final=0.26),
    dict(ncc_final=0.74, nmi_final=1.086, lncc_final=0.47),
)


def test_a_scan_in_another_contrast_registered_well_is_good():
    """Global NCC -0.29 (the contrast inverts) or 0.31, local NCC below the physical alignment's:
    NCC's lines mean nothing here; normalized MI 1.19-1.20 says the images are registered."""
    for measures in (OTHER_CONTRAST_INVERTED, OTHER_CONTRAST_FLAT):
        q = judge(_measures(**measures))
        assert q.verdict == "good", q.reasons
    # it still has to beat the physical alignment, in the information shared
    q = judge(_measures(**{**OTHER_CONTRAST_FLAT, "nmi_identity": 1.20}))
    assert q.verdict == "check"
    assert q.reasons == ["no better than the images' physical alignment (normalized mutual information 1.199 vs 1.200)"]


def test_same_contrast_scans_a_few_millimetres_off_still_ask_for_a_look():
    """Shifted 4 mm off the true map, scans in one contrast keep normalized MI at 1.09-1.13: under
    the line, so their moderate NCC still asks for a look."""
    for off in FOUR_MM_OFF:
        q = judge(_measures(lncc_affine=0.2, **off))
        assert q.verdict == "check"
        assert q.reasons[0].startswith("the registered images correlate only moderately")
