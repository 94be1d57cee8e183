"""The global alignment of a registration: starts fitted as affines and judged, inside the body, with shared draws."""

import json
import warnings

import numpy as np
import pytest
import torch
from knee_poses import CONFIG, bone_dice, in_air, moved, tilt
from neuralreg_eval import knee

from neuralreg import RegistrationConfig, RegistrationWarning, register_pair
from neuralreg.cli import main
from neuralreg.geometry.coordinates import NormalizedBox, grid_corners_world
from neuralreg.io import write_image
from neuralreg.optim.search import rotation_matrix


@pytest.fixture(scope="module")
def oblique_registration(phantom):
    world = tilt()
    moving = moved(phantom["moving"], world)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RegistrationWarning)  # a good result raises no warning
        reg = register_pair(moving, phantom["fixed"], RegistrationConfig(**CONFIG))
    return reg, moved(phantom["moving_labels"], world)


def test_oblique_tilt_and_offset_register(oblique_registration, phantom):
    """A 20 deg oblique tilt and a 40 mm offset (the moving scan's own pose): bone Dice > 0.9."""
    reg, moving_labels = oblique_registration
    assert knee.physical_bone_dice(moving_labels, phantom["fixed_labels"]) < 0.3  # far apart to start with
    assert bone_dice(reg, moving_labels, phantom["fixed_labels"]) > 0.9
    q = reg.info["quality"]
    assert q["verdict"] == "good" and q["reasons"] == []
    assert q["measures"]["lncc_final"] > q["measures"]["lncc_affine"] > q["measures"]["lncc_identity"]
    assert reg.info["search"]["overlap"] > 0.5


def test_starts_are_judged_by_their_fitted_similarity_not_the_search_order(phantom, monkeypatch):
    """The search ranks a wrong start first (60 deg off); fitted as affines and judged at the
    finest affine level, the right start wins, and the registration keeps the winner's frame."""
    from neuralreg.optim import search

    truth = tilt()
    moving, moving_labels = moved(phantom["moving"], truth), moved(phantom["moving_labels"], truth)
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
    monkeypatch.setattr(search, "centre_starts", lambda *args, **kwargs: [])
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
    assert bone_dice(reg, moving_labels, phantom["fixed_labels"]) > 0.85


def test_starts_that_converge_to_one_map_are_fitted_once(phantom, monkeypatch):
    """Two starts 1 deg apart end on the same map: only the one the search ranked first is fitted on."""
    from neuralreg.optim import search

    truth = tilt()
    moving = moved(phantom["moving"], truth)
    nudge = np.eye(4)
    nudge[:3, :3] = rotation_matrix([1.0, 0.0, 0.0])
    starts = [
        search.SearchResult(truth, 0.9, np.nan, 1.0, (0.0,) * 3),
        search.SearchResult(truth @ nudge, 0.8, np.nan, 1.0, (1.0, 0.0, 0.0)),
    ]
    monkeypatch.setattr(search, "global_search", lambda *args, **kwargs: starts)
    monkeypatch.setattr(search, "centre_starts", lambda *args, **kwargs: [])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RegistrationWarning)
        reg = register_pair(moving, phantom["fixed"], RegistrationConfig(**{**CONFIG, "steps": 10}))
    facts = reg.info["search"]
    assert facts["distinct_starts"] == 1 and facts["chosen"] == 0
    assert np.isfinite(facts["candidate_losses"][0]) and facts["candidate_losses"][1] is None
    assert all(np.isfinite(facts["candidate_coarse_losses"]))
    assert facts["runner_up_loss_gap"] is None


def test_fits_draw_inside_the_body_the_regularizer_everywhere(phantom):
    """Knees in air under a 20 deg tilt and 40 mm offset: each start is fitted drawing from the
    body's interior, and again with the outline on the coarsest level; the fields' similarity
    points come from the interior too, their regularizer points from everywhere; the self-check
    scores inside the body; the bones are aligned. (A 48 mm phantom has no interior 12 mm deep:
    6 mm here.) ``affine_interior_mm=0`` fits the starts once, and everything from everywhere."""
    from neuralreg.optim.registration import PairRegistration

    truth = tilt()
    moving = moved(in_air(phantom["moving"]), truth)
    moving_labels = moved(in_air(phantom["moving_labels"]), truth)
    fixed, fixed_labels = in_air(phantom["fixed"]), in_air(phantom["fixed_labels"])
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
    assert bone_dice(reg, moving_labels, fixed_labels) > 0.85

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
    moving, moving_labels = moved(phantom["moving"], far), moved(phantom["moving_labels"], far)
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


def _fits(phantom, cfg, starts):
    """``AffineFit`` s of the phantom pair from rigid starts (world matrices, fixed -> moving)."""
    from neuralreg.optim.alignment import _start_fit
    from neuralreg.optim.stage import PairData

    moving, fixed = phantom["moving"], phantom["fixed"]
    box = NormalizedBox.around([(moving.shape, moving.affine), (fixed.shape, fixed.affine)], cfg.margin)
    pair = PairData(cfg, moving, fixed, None, None, box, torch.device("cpu"), True, 4096)
    return [_start_fit(pair, start, 0) for start in starts]


def test_fits_stepping_together_end_where_each_alone_ends(phantom):
    """Lockstep (``fit_together``: one draw, one batch of terms, one backward and one Adam step
    for all) gives each start the fit it gets alone: its affine, its history, its generator
    state (the fields draw on from it) and its judged loss."""
    from neuralreg.optim.alignment import fit_together, judge

    cfg = RegistrationConfig(**{**CONFIG, "affine_steps": 30})
    starts = [np.eye(4), tilt(10.0), tilt(-20.0)]
    together = _fits(phantom, cfg, starts)
    fit_together(together, range(len(cfg.affine_pyramid)))
    for fit, start in zip(together, starts, strict=True):
        (alone,) = _fits(phantom, cfg, [start])
        alone.run(range(len(cfg.affine_pyramid)))
        torch.testing.assert_close(fit.affine.matrix(), alone.affine.matrix(), rtol=1e-5, atol=1e-6)
        assert torch.equal(fit.generator.get_state(), alone.generator.get_state())
        assert [h["step"] for h in fit.history] == [h["step"] for h in alone.history]
        np.testing.assert_allclose([h["loss"] for h in fit.history], [h["loss"] for h in alone.history], rtol=1e-4)
        assert fit.loss(1) == pytest.approx(alone.loss(1), rel=1e-5)
    assert judge(together, 1) == pytest.approx([fit.loss(1) for fit in together], rel=1e-6)


def test_fits_that_draw_apart_step_together_as_each_alone(phantom):
    """Fits whose draws differ (here a generator seeded apart; in ``choose_start`` the
    interior-only fits and those that drew from everything on the coarsest level) step in
    one batch, each group drawing its own points: each fit ends exactly where it ends alone."""
    from neuralreg.optim.alignment import fit_together

    cfg = RegistrationConfig(**{**CONFIG, "affine_steps": 30})
    starts = [np.eye(4), tilt(10.0), tilt(-20.0)]
    together = _fits(phantom, cfg, starts)
    together[1].generator.manual_seed(cfg.seed + 1)
    keys = {fit.draw_key(0) for fit in together}
    assert len(keys) == 2
    fit_together(together, range(len(cfg.affine_pyramid)))
    for k, (fit, start) in enumerate(zip(together, starts, strict=True)):
        (alone,) = _fits(phantom, cfg, [start])
        if k == 1:
            alone.generator.manual_seed(cfg.seed + 1)
        alone.run(range(len(cfg.affine_pyramid)))
        assert torch.equal(fit.affine.matrix(), alone.affine.matrix())
        assert torch.equal(fit.generator.get_state(), alone.generator.get_state())
        assert [h["loss"] for h in fit.history] == [h["loss"] for h in alone.history]


def test_fits_stepping_together_dispatch_about_the_operations_of_one(phantom):
    """Three starts in lockstep: well under twice the aten operations of one start's fit
    (alone they would be three times): the step's cost is its operations, not its points."""
    from neuralreg.optim.alignment import fit_together
    from neuralreg.testing import OpCounter

    cfg = RegistrationConfig(**{**CONFIG, "affine_steps": 20})
    counts = []
    for starts in ([np.eye(4)], [np.eye(4), tilt(10.0), tilt(-20.0)]):
        fits = _fits(phantom, cfg, starts)
        with OpCounter() as counter:
            fit_together(fits, range(len(cfg.affine_pyramid)))
        counts.append(sum(counter.ops.values()))
    assert counts[1] < 1.6 * counts[0], counts


def test_inverted_contrast_fits_the_first_stage_with_mutual_information(phantom):
    """Where the images anti-correlate after the global part (tissues swap order), local NCC
    would pull the first field stage the wrong way: it fits mutual information instead, and
    says so; the same pair in one contrast keeps local NCC. (A real head in another contrast,
    81 mm off -> 0.39 mm with the switch: docs/benchmarks.md.) The fixed image against itself,
    physically aligned (no global part), so that only the contrast differs; the image against
    itself keeps local NCC's first stage (it loses no shared information once the first steps'
    jitter settles: the first 5 steps of Adam cost it 27 % of the shared NMI, 38 steps 0.9 %)."""
    fixed = phantom["fixed"]
    x = fixed.data
    inverted = fixed.with_data(torch.where(x > 0.05, 1.05 - x, x))  # tissues swap order
    runs = {}
    for name, moving in (("same", fixed), ("inverted", inverted)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RegistrationWarning)
            config = RegistrationConfig(**{**CONFIG, "affine_steps": 0})
            runs[name] = register_pair(moving, fixed, config, run={"progress": False})
    same, inv = runs["same"].info["contrast"], runs["inverted"].info["contrast"]
    assert same["first_stage_similarity"] == "lncc" and same["ncc_after_global"] > 0.9
    assert "first_stage_refit" not in same and same["nmi_after_first_stage"] > 0.99 * same["nmi_after_global"]
    assert inv["first_stage_similarity"] == "mi" and inv["ncc_after_global"] < -0.5
    assert runs["inverted"].config.similarity == "mi"  # what was fitted is what the result records
    assert runs["same"].config.similarity == "lncc"


def test_inverted_contrast_checks_run_where_the_fields_fit_mind_mi(phantom):
    """The contrast checks run for every later similarity that holds across contrasts
    (``losses.CROSS_CONTRAST``): with ``fine_similarity="mind_mi"``, an inverted pair's first
    stage fits mutual information (``FIRST_STAGE_FALLBACK``), not the local NCC that would pull
    it the wrong way, and the later stages keep ``mind_mi``."""
    fixed = phantom["fixed"]
    x = fixed.data
    inverted = fixed.with_data(torch.where(x > 0.05, 1.05 - x, x))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RegistrationWarning)
        config = RegistrationConfig(**{**CONFIG, "affine_steps": 0, "fine_similarity": "mind_mi"})
        reg = register_pair(inverted, fixed, config, run={"progress": False})
    assert reg.info["contrast"]["first_stage_similarity"] == "mi" and reg.info["contrast"]["ncc_after_global"] < -0.5
    assert reg.config.similarity == "mi" and reg.config.fine_similarity == "mind_mi"


def test_one_anatomy_in_one_contrast_keeps_local_ncc_after_the_first_stage(phantom):
    """The phantom pair (one knee, deformed) in one contrast: after the local-NCC first stage
    the windows correlate almost perfectly (``ONE_CONTRAST_LNCC``), so the later stages fit
    local NCC too, on edge points in every stage; the same moving knee in another contrast
    (intensities cubed: related, not linearly) stays below the line and the later stages fit
    mutual information on the defaults' points. ``contrast`` says which, and the result's
    config records what was fitted."""
    from neuralreg.optim import registration

    runs = {}
    for name, moving in (
        ("one", phantom["moving"]),
        ("other", phantom["moving"].with_data(phantom["moving"].data ** 3)),
    ):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RegistrationWarning)
            runs[name] = register_pair(moving, phantom["fixed"], RegistrationConfig(**CONFIG), run={"progress": False})
    one, other = runs["one"].info["contrast"], runs["other"].info["contrast"]
    assert one["lncc_after_first_stage"] >= registration.ONE_CONTRAST_LNCC > other["lncc_after_first_stage"] > 0.8
    assert one["later_similarity"] == "lncc" and other["later_similarity"] == "mi"
    assert (runs["one"].config.fine_similarity, runs["one"].config.middle_edge_fraction) == ("lncc", None)
    assert (runs["other"].config.fine_similarity, runs["other"].config.middle_edge_fraction) == ("mi", 0.0)


def contrast_pair(shared_data) -> dict:
    """Benchmark family ``contrast``, pair 9003430-9004175 (seed 11, 80x192x192): two knees,
    each in its own soft-tissue contrast, the moving one in thick slices."""
    from neuralreg_eval import families

    files = sorted((shared_data / "oai_zib_labels").glob("*_labels.nii.gz"))
    names = [f.name.split("_")[0] for f in files]
    return families.family_pair(
        "contrast", files[names.index("9003430")], files[names.index("9004175")], 11, (80, 192, 192)
    )


def test_affine_fits_draw_uniform_points_across_contrasts(shared_data):
    """Two subjects' knees, each in its own soft-tissue contrast, with rings of texture that
    follow the distance from its bones (benchmark family ``contrast``, pair 9003430-9004175,
    thick slices, a field of view that cuts the femur): the global part alone places the bones
    with the affine fits drawing uniform points (``affine_edge_fraction=0``, the default),
    and loses them drawing on edges, most of which are the texture's (0.54 when measured:
    docs/benchmarks.md)."""
    from neuralreg.geometry.transforms import AffineTransform

    pair = contrast_pair(shared_data)
    bone = {}
    for edges in (0.0, 1.0):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RegistrationWarning)
            config = RegistrationConfig(steps=1, affine_edge_fraction=edges)  # the global part; one field step
            reg = register_pair(pair["moving"], pair["fixed"], config, run={"threads": 2, "progress": False})
        world = AffineTransform(reg.affine_world())
        bone[edges] = knee.score_maps(world, None, pair["moving_labels"], pair["fixed_labels"])["bone"]
    assert RegistrationConfig().affine_edge_fraction == 0.0
    assert bone[0.0] > 0.75 and bone[0.0] > bone[1.0] + 0.1, bone


def test_a_first_stage_that_loses_shared_information_is_refit_with_mutual_information(shared_data, monkeypatch):
    """The same two knees in their own soft-tissue contrasts (benchmark family ``contrast``,
    pair 9003430-9004175): local NCC's first field stage follows the layered fat, which
    does not correspond, and moves the bones from the global part's 0.81 bone Dice to 0.50.
    It loses normalized MI against the global part as it does (a measure it does not
    optimize), so the stage is fitted again from the new fields with mutual information,
    which moves them less (0.70 when measured). Only the first stage is run (its 125
    default steps, then one)."""
    from neuralreg.optim import registration

    pair = contrast_pair(shared_data)

    def bone(reg_or_run) -> float:
        forward = knee.registration_maps(reg_or_run)[0]
        return knee.score_maps(forward, None, pair["moving_labels"], pair["fixed_labels"])["bone"]

    before_refit = {}
    refit = registration.PairRegistration._refit_first_stage

    def spy(self, start, n_steps):  # the local-NCC stage's bones, before they are fitted again
        before_refit["bone"] = bone(self.result())
        refit(self, start, n_steps)

    monkeypatch.setattr(registration.PairRegistration, "_refit_first_stage", spy)
    config = RegistrationConfig(steps=126, stage_fractions=(0.99, 0.005, 0.005))  # 125 first-stage steps, 1 more
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RegistrationWarning)
        reg = register_pair(pair["moving"], pair["fixed"], config, run={"threads": 2, "progress": False})
    contrast = reg.info["contrast"]
    assert contrast["first_stage_refit"] and contrast["first_stage_similarity"] == "mi", contrast
    before, after = contrast["nmi_after_global"], contrast["nmi_after_first_stage"]
    assert before - after > max(registration.LOST_NMI, registration.LOST_NMI_SHARE * (before - 1))
    assert reg.config.similarity == "mi"  # what was fitted last is what the result records
    assert before_refit["bone"] < 0.6 and bone(reg) > before_refit["bone"] + 0.1, (before_refit, bone(reg))


def test_the_refit_first_stage_starts_from_the_new_fields(phantom, monkeypatch):
    """Forced (any loss of shared information counts, and none is needed): after the local-NCC
    first stage the fields are put back to the new fields (the identity) and the stage is fitted
    again with mutual information, its steps on top of ``steps``; the later stages follow."""
    from neuralreg.optim import registration

    monkeypatch.setattr(registration, "LOST_NMI", -1.0)
    monkeypatch.setattr(registration, "LOST_NMI_SHARE", -1.0)
    entries = []
    fit_stage = registration.PairRegistration.fit_stage

    def spy(self, s, n_steps):
        table = [p.detach().clone() for p in self.phi_ab.parameters()]
        entries.append((s, n_steps, self.config.similarity, table))
        fit_stage(self, s, n_steps)

    monkeypatch.setattr(registration.PairRegistration, "fit_stage", spy)
    config = RegistrationConfig(**{**CONFIG, "steps": 40, "affine_steps": 0})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RegistrationWarning)
        reg = register_pair(phantom["moving"], phantom["fixed"], config, run={"progress": False})
    assert [e[:3] for e in entries] == [(0, 10, "lncc"), (0, 10, "mi"), (1, 10, "mi"), (2, 20, "mi")]
    first, again, later = entries[0][3], entries[1][3], entries[2][3]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))  # back to the new fields
    assert not all(torch.equal(a, b) for a, b in zip(again, later, strict=True))  # and fitted again
    assert reg.info["contrast"]["first_stage_refit"] is True
    assert [h["stage"] for h in reg.history if h["part"] == "fields"].count(0) == 20
