"""Robust global alignment (the search) and the self-check's verdict (issue 11)."""

import json
import warnings

import numpy as np
import pytest
import torch
from neuralreg_eval import knee

from neuralreg import Image, RegistrationConfig, RegistrationWarning, register_pair
from neuralreg.cli import main
from neuralreg.geometry.coordinates import grid_corners_world
from neuralreg.io import write_image
from neuralreg.metrics import dice
from neuralreg.optim.search import global_search, prefer_small_rotation, rotation_matrix
from neuralreg.phantoms import knee_phantom_pair
from neuralreg.quality import judge

CONFIG = dict(steps=150, points=4096, regularizer_points=1024, affine_steps=100)


@pytest.fixture(scope="module")
def phantom():
    return knee_phantom_pair(0, shape=(32, 48, 48))


def _moved(image: Image, world: np.ndarray) -> Image:
    """The same voxels under a new pose: world coordinates x -> world @ x."""
    return Image(image.data, world @ image.affine)


def _tilt(angle_deg=20.0, axis=(1.0, 0.3, 0.2), offset=(40.0, -25.0, 15.0)) -> np.ndarray:
    m = np.eye(4)
    m[:3, :3] = knee._rotation(np.asarray(axis), np.deg2rad(angle_deg))
    m[:3, 3] = offset
    return m


def _bone_dice(reg, moving_labels, fixed_labels):
    return dice(reg.warp(moving_labels, mode="nearest").data, fixed_labels.data, [1, 3])["mean"]


def test_rotation_matrix_conventions():
    np.testing.assert_allclose(rotation_matrix([90.0]), [[0, -1], [1, 0]], atol=1e-12)
    r = rotation_matrix([10.0, -20.0, 30.0])
    np.testing.assert_allclose(r @ r.T, np.eye(3), atol=1e-12)
    assert np.linalg.det(r) == pytest.approx(1.0)


def test_search_recovers_a_large_rigid_motion(phantom):
    """30 deg about one axis and 60 mm: the best candidate maps fixed points within a few mm of the truth."""
    truth = _tilt(30.0, (0.0, 0.0, 1.0), (60.0, -45.0, 30.0))
    moving = _moved(phantom["fixed"], truth)
    best = global_search(moving, phantom["fixed"])[0]
    corners = grid_corners_world(phantom["fixed"].shape, phantom["fixed"].affine) * 0.5
    # the search's map takes fixed points to where the moved image has them: truth @ x
    err = np.linalg.norm(
        (best.matrix[:3, :3] @ corners.T).T + best.matrix[:3, 3] - (corners @ truth[:3, :3].T + truth[:3, 3]), axis=1
    )
    assert err.max() < 8.0, err
    assert best.score > 0.8 and best.overlap > 0.9


def test_the_physical_orientation_is_always_a_candidate(phantom):
    """A 30 deg tilt: the search's best candidates are rotated, and the scanners' own orientation
    (no rotation, refined by half a step at most) is among the candidates too."""
    truth = _tilt(30.0, (0.0, 0.0, 1.0), (20.0, -15.0, 10.0))
    candidates = global_search(_moved(phantom["fixed"], truth), phantom["fixed"], keep=2)
    assert len(candidates) <= 3
    assert max(abs(a) for a in candidates[0].angles_deg) >= 20.0
    assert any(max(abs(a) for a in c.angles_deg) <= 10.0 for c in candidates)


def test_a_large_rotation_wins_only_by_a_clear_margin():
    """Losses within 20 % of the best: the start rotated at least 15 deg less wins; beyond, the best loss."""
    # (loss, rotation): the lowest loss is 60 deg away; a 10 deg start is 10 % worse
    assert prefer_small_rotation([0, 1], [-0.129, -0.116], [60.0, 10.0]) == 1
    assert prefer_small_rotation([0, 1], [-0.129, -0.090], [60.0, 10.0]) == 0  # 30 % worse: the loss decides
    assert prefer_small_rotation([0, 1], [-0.70, -0.69], [8.0, 0.0]) == 0  # 8 deg apart: the loss decides
    assert prefer_small_rotation([0, 1, 2], [1.0, 1.1, 1.15], [40.0, 20.0, 5.0]) == 1  # the best of those near
    assert prefer_small_rotation([2], [9.0, 9.0, 1.0], [0.0, 0.0, 30.0]) == 2  # only candidates listed count


@pytest.fixture(scope="module")
def oblique_registration(phantom):
    world = _tilt()
    moving = _moved(phantom["moving"], world)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RegistrationWarning)  # a good result raises no warning
        reg = register_pair(moving, phantom["fixed"], RegistrationConfig(**CONFIG))
    return reg, _moved(phantom["moving_labels"], world)


def test_oblique_tilt_and_offset_register(oblique_registration, phantom):
    """A 20 deg oblique tilt and a 40 mm offset (the moving scan's own pose): bone Dice > 0.9."""
    reg, moving_labels = oblique_registration
    assert knee.physical_bone_dice(moving_labels, phantom["fixed_labels"]) < 0.3  # far apart to start with
    assert _bone_dice(reg, moving_labels, phantom["fixed_labels"]) > 0.9
    q = reg.info["quality"]
    assert q["verdict"] == "good" and q["reasons"] == []
    assert q["measures"]["lncc_final"] > q["measures"]["lncc_affine"] > q["measures"]["lncc_identity"]
    assert reg.info["search"]["overlap"] > 0.5


def test_starts_are_judged_by_their_fitted_similarity_not_the_search_order(phantom, monkeypatch):
    """The search ranks a wrong start first (60 deg off); fitted as affines and judged at the
    finest affine level, the right start wins, and the registration keeps the winner's frame."""
    from neuralreg.optim import search

    truth = _tilt()
    moving, moving_labels = _moved(phantom["moving"], truth), _moved(phantom["moving_labels"], truth)
    centre = np.eye(4)
    centre[:3, 3] = grid_corners_world(phantom["fixed"].shape, phantom["fixed"].affine).mean(0)
    off = np.eye(4)
    off[:3, :3] = rotation_matrix([60.0, 0.0, 0.0])
    wrong = truth @ centre @ off @ np.linalg.inv(centre)
    starts = [
        search.SearchResult(wrong, 0.9, np.nan, 1.0, (60.0, 0.0, 0.0)),
        search.SearchResult(truth, 0.5, np.nan, 1.0, (0.0,) * 3),
    ]
    monkeypatch.setattr(search, "global_search", lambda *args, **kwargs: starts)
    config = RegistrationConfig(**{**CONFIG, "steps": 30})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RegistrationWarning)
        reg = register_pair(moving, phantom["fixed"], config)
    facts = reg.info["search"]
    assert facts["chosen"] == 1 and facts["distinct_starts"] == 2
    losses = facts["candidate_losses"]
    assert losses[1] < losses[0] and facts["runner_up_loss_gap"] == pytest.approx(losses[0] - losses[1])
    assert facts["runner_up_distance_mm"] > 10.0
    assert len([h for h in reg.history if h["part"] == "affine"]) == config.affine_steps  # the winner's fit only
    np.testing.assert_allclose(reg.prealign, truth)
    assert _bone_dice(reg, moving_labels, phantom["fixed_labels"]) > 0.85


def test_starts_that_converge_to_one_map_are_fitted_once(phantom, monkeypatch):
    """Two starts 1 deg apart end on the same map: only the one the search ranked first is fitted on."""
    from neuralreg.optim import search

    truth = _tilt()
    moving = _moved(phantom["moving"], truth)
    nudge = np.eye(4)
    nudge[:3, :3] = rotation_matrix([1.0, 0.0, 0.0])
    starts = [
        search.SearchResult(truth, 0.9, np.nan, 1.0, (0.0,) * 3),
        search.SearchResult(truth @ nudge, 0.8, np.nan, 1.0, (1.0, 0.0, 0.0)),
    ]
    monkeypatch.setattr(search, "global_search", lambda *args, **kwargs: starts)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RegistrationWarning)
        reg = register_pair(moving, phantom["fixed"], RegistrationConfig(**{**CONFIG, "steps": 10}))
    facts = reg.info["search"]
    assert facts["distinct_starts"] == 1 and facts["chosen"] == 0
    assert np.isfinite(facts["candidate_losses"][0]) and facts["candidate_losses"][1] is None
    assert all(np.isfinite(facts["candidate_coarse_losses"]))
    assert facts["runner_up_loss_gap"] is None


def _in_air(image: Image, pad: int = 10) -> Image:
    """The image padded with ``pad`` voxels of air (0) on every side, the world unchanged."""
    shift = np.eye(4)
    shift[:3, 3] = -pad
    return Image(torch.nn.functional.pad(image.data.float(), (pad,) * 6), image.affine @ shift)


def test_fits_draw_inside_the_body_the_regularizer_everywhere(phantom):
    """Knees in air under a 20 deg tilt and 40 mm offset: each start is fitted drawing from the
    body's interior, and again with the outline on the coarsest level; the fields' similarity
    points come from the interior too, their regularizer points from everywhere; the self-check
    scores inside the body; the bones are aligned. (A 48 mm phantom has no interior 12 mm deep:
    6 mm here.) ``affine_interior_mm=0`` fits the starts once, and everything from everywhere."""
    from neuralreg.optim.registration import PairRegistration

    truth = _tilt()
    moving = _moved(_in_air(phantom["moving"]), truth)
    moving_labels = _moved(_in_air(phantom["moving_labels"]), truth)
    fixed, fixed_labels = _in_air(phantom["fixed"]), _in_air(phantom["fixed_labels"])
    stages = []

    class Watched(PairRegistration):  # records the fields' stages
        def field_stage(self, s):
            stages.append(super().field_stage(s))
            return stages[-1]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RegistrationWarning)
        reg = Watched(moving, fixed, RegistrationConfig(**CONFIG, affine_interior_mm=6.0)).run()  # a small knee
    shares = reg.info["affine_interior"]
    assert 0.05 < shares["moving"] < 0.95 and 0.05 < shares["fixed"] < 0.95
    ways = reg.info["search"]["candidate_outline_first"]
    assert ways == sorted(ways) and set(ways) == {0, 1} and len(ways) == 2 * ways.count(1)
    assert len(stages) == len(CONFIG.get("pyramid", RegistrationConfig().pyramid))  # the fields' stages
    for stage in stages:
        inside = [stage.moving_sampler.mask_voxels, stage.fixed_sampler.mask_voxels]
        assert all(v is not None for v in inside)  # similarity: inside the body
        assert all(r.mask_voxels is None for r in stage.regularizer_samplers)  # regularizer: everywhere
    assert reg.info["quality"]["measures"]["scored_inside_mask"] is True
    assert _bone_dice(reg, moving_labels, fixed_labels) > 0.85

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RegistrationWarning)
        plain = register_pair(moving, fixed, RegistrationConfig(**{**CONFIG, "steps": 1, "affine_interior_mm": 0}))
    assert plain.info["affine_interior"] is None
    assert set(plain.info["search"]["candidate_outline_first"]) == {0}
    assert plain.info["quality"]["measures"]["scored_inside_mask"] is False
    with pytest.raises(ValueError, match="affine_interior_mm"):
        RegistrationConfig(affine_interior_mm=-1.0)


def test_far_origins_register_with_a_warning(phantom, tmp_path, capsys):
    """Scanner origins 1000 mm apart: aligned all the same, and the headers' disagreement is reported."""
    far = np.eye(4)
    far[:3, 3] = [1000.0, -300.0, 150.0]
    moving, moving_labels = _moved(phantom["moving"], far), _moved(phantom["moving_labels"], far)
    for key, img in (("fixed", phantom["fixed"]), ("moving", moving)):
        write_image(img, tmp_path / f"{key}.nii.gz")
    write_image(phantom["fixed_labels"], tmp_path / "fixed_labels.nii.gz")
    write_image(moving_labels, tmp_path / "moving_labels.nii.gz")
    out = tmp_path / "out"
    code = main(
        ["register", "--fixed", str(tmp_path / "fixed.nii.gz"), "--moving", str(tmp_path / "moving.nii.gz")]
        + ["--fixed-labels", str(tmp_path / "fixed_labels.nii.gz")]
        + ["--moving-labels", str(tmp_path / "moving_labels.nii.gz"), "--out", str(out), "--quiet"]
        + ["--steps", "150", "--points", "4096", "--affine-steps", "100"]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 0
    assert len(err) == 1 and err[0].startswith("neuralreg: warning: check this registration:"), err
    assert "do not overlap in world space (centres 1" in err[0]
    report = json.loads((out / "report.json").read_text())
    assert report["quality"]["verdict"] == "check"
    assert report["dice_after"]["per_label"]["1"] > 0.9  # registered all the same: the warped image is not empty
    import nibabel as nib

    assert np.abs(nib.load(out / "warped.nii.gz").get_fdata()).mean() > 0.1


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


def _measures(**changes) -> dict:
    """Measures of canonical knee pair 9005132-9006723 with the defaults (bone Dice 0.970)."""
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
        "nmi_final": 1.15,
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


def test_gross_failure_rule():
    assert knee.gross_failure(0.84)
    assert not knee.gross_failure(0.9)
    assert knee.gross_failure(0.88, affine_bone=0.92)  # the fields undid a better affine start
    assert not knee.gross_failure(0.91, affine_bone=0.92)  # within 0.02 of it: no loss to speak of
    assert not knee.gross_failure(0.93, affine_bone=0.92)
    assert knee.gross_failure(0.95, cartilage=0.29)  # bones in place, cartilage lost
    assert not knee.gross_failure(0.95, cartilage=0.31)
    assert not knee.gross_failure(0.93, affine_bone=float("nan"))


def test_realistic_pairs_keep_scanner_geometry(shared_data):
    files = sorted((shared_data / "oai_zib_labels").glob("*_labels.nii.gz"))
    pair = knee.realistic_pair(files[0], files[1], seed=0, shape=(40, 96, 96))
    fl, ml = pair["fixed_labels"], pair["moving_labels"]
    assert fl.shape != ml.shape  # fields of view differ
    assert not np.allclose(fl.affine, ml.affine)
    # oblique: the grid axes are not the world axes
    for lab in (fl, ml):
        cosines = np.abs(lab.affine[:3, :3] / np.linalg.norm(lab.affine[:3, :3], axis=0))
        assert cosines.max(0).min() < 0.999
    assert knee.physical_bone_dice(ml, fl) < 0.5  # the scanners' positions disagree
    # tissue intensities are the subject's own: the same tissue differs between the two images
    for key in ("fixed", "moving"):
        assert 0 <= float(pair[key].data.min()) and float(pair[key].data.max()) <= 1
    femur = [float(pair[k].data[pair[f"{k}_labels"].data == 1].mean()) for k in ("fixed", "moving")]
    background = [float(pair[k].data[pair[f"{k}_labels"].data == 0].mean()) for k in ("fixed", "moving")]
    assert abs(femur[0] - femur[1]) > 0.01 or abs(background[0] - background[1]) > 0.01
    assert set(torch.unique(ml.data).tolist()) >= {0, 1, 2, 3, 4}


def test_watchdog_flags_a_jump_not_noise():
    from neuralreg.optim.watchdog import Watchdog

    rng = np.random.default_rng(0)
    calm = Watchdog(0.25, relative=False)
    assert not any(calm.update(0.4 + 0.03 * rng.standard_normal(), 0.4) for _ in range(300))
    jump = Watchdog(0.25, relative=False)
    series = [0.42] * 5 + [0.47, 0.73, 0.92, 0.99, 0.98, 0.96]  # the real knee pair's sim_ba
    fired = [jump.update(0.4, v) for v in series]
    assert fired.index(True) == 8 and jump.healthy()  # fired, then the window restarts
    mse = Watchdog(0.5, relative=True)  # relative to its best: 1e-3 -> 1.6e-3 is a jump, +0.2 of nothing
    assert [mse.update(v) for v in [1e-3] * 5 + [1.6e-3] * 5].index(True) == 9


def test_a_field_that_jumps_away_is_rolled_back(phantom):
    """A constant 30 % shift of Phi_BA injected mid-run (GradICON cannot see it): rolled back, maps consistent."""
    from neuralreg.optim.adam import Adam
    from neuralreg.optim.registration import PairRegistration

    def run(tolerance):
        calls = {"n": 0}

        class Kicked(Adam):  # the run's optimizer, with a kick at the fields' 100th step
            def step(self):
                super().step()
                if len(self.params) > 2:  # the fields' optimizer, not the affine one
                    calls["n"] += 1
                    if calls["n"] == 100:
                        with torch.no_grad():
                            self.params[-1].add_(0.3)  # last bias of Phi_BA: a constant displacement

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RegistrationWarning)
            cfg = RegistrationConfig(**{**CONFIG, "divergence_tolerance": tolerance, "affine_init": "centroid"})
            return PairRegistration(phantom["moving"], phantom["fixed"], cfg, optimizer=Kicked).run()

    guarded, unguarded = run(0.25), run(0.0)
    assert guarded.info["rollbacks"] >= 1 and unguarded.info["rollbacks"] == 0
    assert guarded.info["quality"]["verdict"] == "good"
    assert unguarded.info["quality"]["verdict"] == "failed"  # the self-check sees what the watchdog prevents
    assert guarded.inverse_consistency_error() < 2.0 < unguarded.inverse_consistency_error()


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


def test_shared_affine_draws_change_no_bit(phantom):
    """The starts' fits replay each other's draws (``SharedDraws``): the same registration, bit
    for bit, as every fit drawing its own points; and the replays happen."""
    from neuralreg.optim.registration import PairRegistration

    moving = _moved(phantom["moving"], _tilt(15.0))
    cfg = RegistrationConfig(**{**CONFIG, "steps": 20, "affine_steps": 40, "search_starts": 3})
    runs = [PairRegistration(moving, phantom["fixed"], cfg, share_draws=share) for share in (True, False)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RegistrationWarning)
        shared, alone = (run.run() for run in runs)
    assert runs[0].draws.replays >= 3  # fits of both ways and their judging replayed draws
    assert runs[1].draws.replays == 0 and not runs[1].draws.levels
    for a, b in ((shared.phi_ab, alone.phi_ab), (shared.phi_ba, alone.phi_ba)):
        for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
            assert torch.equal(x, y), name
    assert np.array_equal(shared.prealign, alone.prealign)
    assert torch.equal(shared.affine.matrix(), alone.affine.matrix())
    assert shared.info["search"]["candidate_losses"] == alone.info["search"]["candidate_losses"]


def test_a_fit_replaying_shared_draws_is_the_fit_drawing_its_own(phantom):
    """Level by level, a fit that replays another's draws ends where drawing them itself would
    have left it: the same affine and the same generator state (the fields draw on from it)."""
    from neuralreg.geometry.coordinates import NormalizedBox
    from neuralreg.optim.alignment import AffineFit, SharedDraws
    from neuralreg.optim.stage import PairData

    cfg = RegistrationConfig(**{**CONFIG, "affine_steps": 30})
    moving, fixed = phantom["moving"], phantom["fixed"]
    box = NormalizedBox.around([(moving.shape, moving.affine), (fixed.shape, fixed.affine)], cfg.margin)
    pair = PairData(cfg, moving, fixed, None, None, box, torch.device("cpu"), True, 4096)
    draws = SharedDraws()
    first, replay = (AffineFit(pair, draws=draws) for _ in range(2))
    alone = AffineFit(pair)
    for fit in (first, replay, alone):
        fit.run(range(len(cfg.affine_pyramid)))
    assert len(draws.levels) == len(cfg.affine_pyramid)  # the replay recorded nothing new
    assert torch.equal(replay.affine.matrix(), alone.affine.matrix())
    assert torch.equal(replay.generator.get_state(), alone.generator.get_state())
    assert replay.loss(1) == alone.loss(1) and len(draws.levels) == len(cfg.affine_pyramid) + 1


def test_measures_stored_under_the_old_round_trip_names_are_judged_alike():
    """registration.pt files hold the self-check's measures: those written before the round
    trip's rename (``inverse_consistency_error_mm`` there) are judged as the new ones."""
    new = _measures(round_trip_fixed_mm=7.5)
    old = {k: v for k, v in new.items() if not k.startswith("round_trip")}
    old |= {"inverse_consistency_error_mm": 7.5, "inverse_consistency_limit_mm": 2.0}
    assert judge(old).verdict == judge(new).verdict == "failed"
    assert judge(old).reasons == judge(new).reasons
    assert "round trip Phi_BA(Phi_AB(x)) misses by 7.5 mm (limit 2.0 mm)" in judge(new).reasons[0]
