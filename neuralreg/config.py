"""Configuration dataclasses: what a registration optimizes (``RegistrationConfig``, with its
``FieldConfig`` and ``HashGridConfig``) and how a run executes (``RunConfig``).

Every default is written here once. Options with a fixed set of values are typed as
``Literal``s (``choices``); options with a command-line flag carry it, with its help, in
their field's metadata (``flag``), from which the CLI builds its parser. Every option is
validated once, when its dataclass is made. The measurements behind the defaults are in
docs/configuration.md.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from neuralreg.cpus import shares_cpus_by_default
from neuralreg.errors import ConfigError
from neuralreg.losses.similarity import WINDOWED

MAX_STEPS = 1_000_000  # steps and affine_steps: a million steps of a knee pair take about 10 hours on a CPU
MAX_POINTS = 1 << 21  # points per field and step (the knee grid's default is 16384)
MAX_SAMPLES = 1 << 23  # image samples per field and step: points x lncc_patch_points for "lncc"


def _fail(key: str, message: str):
    raise ConfigError(key, message)


def _int(obj, key: str, low: int, high: int | None = None, optional: bool = False) -> None:
    """``obj.key`` must be an integer (not a bool) in [low, high], or None where ``optional``."""
    value = getattr(obj, key)
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(key, f"must be an integer{' or null' if optional else ''}, not {value!r}")
    if value < low or (high is not None and value > high):
        _fail(key, f"must be in [{low}, {high}], not {value}" if high is not None else f"must be >= {low}, not {value}")


def _float(obj, key: str, low: float, high: float = math.inf, low_open: bool = False, optional: bool = False) -> None:
    """``obj.key`` must be a finite number in [low, high] ((low, high] where ``low_open``), or
    None where ``optional``; stored as float."""
    value = getattr(obj, key)
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int | float):
        _fail(key, f"must be a number, not {value!r}")
    if not math.isfinite(value):
        _fail(key, f"must be a finite number, not {value}")
    if value < low or (low_open and value == low) or value > high:
        lo, hi = "(" if low_open else "[", "]" if math.isfinite(high) else ")"
        _fail(key, f"must be in {lo}{low:g}, {high:g}{hi}, not {value:g}")
    setattr(obj, key, float(value))


Similarity = Literal["mse", "ncc", "lncc", "mi", "lncc_mi", "mind", "mind_mi"]  # the names of losses.SIMILARITIES
Regularizer = Literal["gradicon", "gradicon_fd", "icon", "diffusion", "bending", "none"]  # losses.REGULARIZERS
Backend = Literal["auto", "torch", "native", "tcnn"]
Activation = Literal["relu", "silu", "softplus", "tanh"]
Interpolation = Literal["Linear", "Smoothstep"]
Jacobian = Literal["autograd", "analytic"]
AffineInit = Literal["search", "centroid", "identity"]
SearchSimilarity = Literal["ncc", "mi", "ncc_mi"]  # search.global_search's measures, "_"-joined


def choices(cls, key: str) -> tuple:
    """The values a ``Literal``-typed option ``key`` of the dataclass ``cls`` takes, else ()."""
    return choices_of_hint(typing.get_type_hints(cls)[key])


def choices_of_hint(hint) -> tuple:
    """The values of a ``Literal`` type hint (also inside ``X | None``), else ()."""
    if typing.get_origin(hint) is Literal:
        return typing.get_args(hint)
    inner = [h for h in typing.get_args(hint) if h is not type(None)]
    return choices_of_hint(inner[0]) if len(inner) == 1 else ()


def flag(name: str, help: str) -> dict:
    """Field metadata: the option's command-line flag and its help (``{default}`` is filled in)."""
    return {"flag": name, "help": help}


def _choice(obj, key: str) -> None:
    """``obj.key`` must be one of its ``Literal`` type's values."""
    value, allowed = getattr(obj, key), choices(type(obj), key)
    if not isinstance(value, str) or value not in allowed:
        _fail(key, f"must be one of {', '.join(map(str, allowed))}, not {value!r}")


def _bool(obj, key: str) -> None:
    if not isinstance(getattr(obj, key), bool):
        _fail(key, f"must be true or false, not {getattr(obj, key)!r}")


def _sequence(obj, key: str, kind: type, low: float, high: float = math.inf, optional: bool = False) -> None:
    """``obj.key`` must be a non-empty list or tuple of ``kind`` values in [low, high]; stored as a tuple."""
    value = getattr(obj, key)
    if value is None and optional:
        return
    if not isinstance(value, list | tuple) or not value:
        _fail(key, f"must be a non-empty list of numbers{' or null' if optional else ''}, not {value!r}")
    for v in value:
        ok = not isinstance(v, bool) and (isinstance(v, int) if kind is int else isinstance(v, int | float))
        if not ok or not math.isfinite(v) or not low <= v <= high:
            what = "integers" if kind is int else "finite numbers"
            _fail(key, f"must hold {what} in [{low:g}, {high:g}], not {v!r}")
    setattr(obj, key, tuple(kind(v) for v in value))


def _nested(cls, value, key: str):
    """A nested config from itself or a dict of its keys; errors are named ``key.<its key>``."""
    if isinstance(value, cls):
        return value
    if not isinstance(value, dict):
        _fail(key, f"must be an object of {cls.__name__} keys, not {value!r}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(value) - names)
    if unknown:
        _fail(key, f"unknown key(s) {', '.join(map(repr, unknown))}")
    try:
        return cls(**value)
    except ConfigError as exc:
        raise ConfigError(f"{key}.{exc.key}", str(exc).split(": ", 1)[1]) from None


@dataclass
class HashGridConfig:
    """Multiresolution hash-grid encoding, with tiny-cuda-nn's ``HashGrid`` keys and meaning.

    Attributes:
        n_levels: number of resolution levels L.
        n_features_per_level: features F per level (output width is L*F).
        log2_hashmap_size: log2 of the table size T of each hashed level.
        base_resolution: grid vertices per axis on the coarsest level.
        per_level_scale: resolution growth factor b between levels.
        interpolation: ``"Linear"`` or ``"Smoothstep"`` (C1 in the input).
    """

    n_levels: int = 8
    n_features_per_level: int = 2
    log2_hashmap_size: int = 16
    base_resolution: int = 4
    per_level_scale: float = 1.7
    interpolation: Interpolation = "Linear"

    def __post_init__(self):
        _int(self, "n_levels", 1, 32)
        _int(self, "n_features_per_level", 1, 8)
        _int(self, "log2_hashmap_size", 1, 24)
        _int(self, "base_resolution", 2, 1 << 16)
        _float(self, "per_level_scale", 1.0, 4.0)
        _choice(self, "interpolation")

    def to_tcnn(self) -> dict:
        """The same encoding as a tiny-cuda-nn config dictionary."""
        return {
            "otype": "HashGrid",
            "n_levels": self.n_levels,
            "n_features_per_level": self.n_features_per_level,
            "log2_hashmap_size": self.log2_hashmap_size,
            "base_resolution": self.base_resolution,
            "per_level_scale": self.per_level_scale,
            "interpolation": self.interpolation,
        }


@dataclass
class FieldConfig:
    """A neural displacement field: hash-grid encoding followed by an MLP.

    Attributes:
        encoding: the hash-grid encoding.
        hidden_width: neurons per hidden layer.
        hidden_layers: number of hidden layers. One: the hash grid holds the detail and
            the MLP decodes it (a second layer costs time and accuracy); 0 is a linear
            read-out of the features (no decoding of hash collisions).
        activation: the MLP's nonlinearity.
        backend: hash-grid implementation: ``"torch"`` (reference), ``"native"``,
            ``"tcnn"`` or ``"auto"`` (fastest available).
    """

    encoding: HashGridConfig = field(default_factory=HashGridConfig)
    hidden_width: int = 64
    hidden_layers: int = 1
    activation: Activation = "relu"
    backend: Backend = dataclasses.field(
        default="auto", metadata=flag("--backend", "hash-grid backend (default: {default})")
    )

    def __post_init__(self):
        self.encoding = _nested(HashGridConfig, self.encoding, "encoding")
        _int(self, "hidden_width", 1, 1024)
        _int(self, "hidden_layers", 0, 16)
        _choice(self, "activation")
        _choice(self, "backend")


AUTO_POINTS = (4096, 16384)  # the range of ``points=None``
AFFINE_POINTS_SHARE = 0.5  # share of ``points`` per direction and step of the affine fits (``affine_points=None``)


def similarity_points(config: RegistrationConfig, fixed_shape) -> int:
    """Similarity points per field and step: ``config.points``, or when None one per
    ``config.voxels_per_point`` voxels of the fixed grid, clipped to ``AUTO_POINTS``."""
    if config.points is not None:
        return config.points
    low, high = AUTO_POINTS
    return int(min(high, max(low, round(math.prod(fixed_shape) / config.voxels_per_point))))


def stage_point_shares(config: RegistrationConfig) -> tuple:
    """Share of the similarity points drawn per step in each pyramid stage: ``config.stage_points``,
    or when None all of them in every stage."""
    if config.stage_points is not None:
        return config.stage_points
    return (1.0,) * len(config.pyramid)


def affine_fit_points(config: RegistrationConfig, similarity_count: int) -> int:
    """Points per direction and step of the affine fits: ``config.affine_points``, or when None
    ``AFFINE_POINTS_SHARE`` of the ``similarity_count`` similarity points (at least 8)."""
    if config.affine_points is not None:
        return config.affine_points
    return max(8, round(similarity_count * AFFINE_POINTS_SHARE))


def stage_similarity(config: RegistrationConfig, stage: int) -> str:
    """The fields' similarity in pyramid stage ``stage``: ``config.similarity`` in the first
    (coarsest), ``config.fine_similarity`` in the later ones (``similarity`` where it is None)."""
    if stage == 0 or config.fine_similarity is None:
        return config.similarity
    return config.fine_similarity


def stage_edge_fraction(config: RegistrationConfig, stage: int) -> float:
    """The share of the fields' similarity points drawn on edges in pyramid stage ``stage``:
    ``config.middle_edge_fraction`` in the stages between the first and the last (where
    it is not None), ``config.edge_fraction`` in the others."""
    middle = 0 < stage < len(config.pyramid) - 1
    if middle and config.middle_edge_fraction is not None:
        return config.middle_edge_fraction
    return config.edge_fraction


def regularizer_points(config: RegistrationConfig, similarity_count: int) -> int:
    """Regularizer points per step: ``config.regularizer_points``, or when None one per 8 of
    the ``similarity_count`` similarity points (at least 2)."""
    if config.regularizer_points is not None:
        return config.regularizer_points
    return max(2, similarity_count // 8)


@dataclass
class RunConfig:
    """How a run executes, apart from what it optimizes: the device, the CPU threads, what
    it shows, how often the host reads the loss. On one device a run's result does not
    depend on ``progress``, and on ``threads`` only by rounding (sums split across threads:
    a few thousandths of a millimetre); the same run on the same thread count repeats
    exactly.

    Attributes:
        device: ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        threads: CPU threads for torch during the run (None: leave torch's count); the
            caller's count is restored after.
        progress: show tqdm progress bars with the loss terms.
        check_every: steps between reads of the loss terms by the host (NaN check,
            watchdog, history, progress bar); None: every step on the CPU, where reading is
            free, every 10 on a GPU, whose steps then run without host synchronisation.
        share_cpus: on the CPU with more than one thread, run on fewer while other
            processes keep this process's CPUs busy (``optim.threads.CpuShare``: waiting
            threads spin, which collapses beside a busy process), recorded in
            ``info["threads"]``; False keeps the count fixed, for a run that repeats to the
            last bit whatever else the machine does. Default: on, unless the environment
            sets ``NEURALREG_SHARE_CPUS=0``.
    """

    device: str = dataclasses.field(
        default="cpu", metadata=flag("--device", "cpu, cuda or cuda:N (default: {default})")
    )
    threads: int | None = dataclasses.field(
        default=None, metadata=flag("--threads", "CPU threads (default: the CPUs this process may use)")
    )
    progress: bool = True
    check_every: int | None = None
    share_cpus: bool = dataclasses.field(default_factory=shares_cpus_by_default)

    def __post_init__(self):
        if not isinstance(self.device, str) or not re.fullmatch(r"cpu|cuda(:\d+)?", self.device):
            _fail("device", f"must be cpu, cuda or cuda:N, not {self.device!r}")
        _int(self, "threads", 1, 1024, optional=True)
        _bool(self, "progress")
        _int(self, "check_every", 1, MAX_STEPS, optional=True)
        _bool(self, "share_cpus")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        """A run config from a dict of its keys; ``ConfigError`` names a bad key."""
        return _from_dict(cls, d)


RUN_KEYS = tuple(f.name for f in dataclasses.fields(RunConfig))


@dataclass
class RegistrationConfig:
    """What one pair's registration optimizes (``RunConfig`` says how the run executes).

    Attributes:
        field: the neural field (both directions use the same architecture).
        similarity: the fields' similarity: ``"mse"``, ``"ncc"`` (global), ``"lncc"``
            (local windows of sampled points), ``"mi"`` (mutual information),
            ``"lncc_mi"`` (both added: ``losses.similarity``), ``"mind"`` (MIND-SSC
            descriptors: where structures lie, whatever their intensities) or
            ``"mind_mi"`` (mutual information plus the descriptors:
            ``losses.descriptors``; they hold 12 more floats per voxel of each image and
            level, stored channel-last for the fused warp), in the first
            (coarsest) pyramid stage, and in every stage where ``fine_similarity`` is None.
        fine_similarity: the fields' similarity in the pyramid stages after the first; None:
            ``similarity`` (``stage_similarity``). Local NCC in the coarsest stage pulls the
            bones in from an imperfect global alignment; mutual information after it keeps
            the fields off soft tissue that does not correspond between two knees (fat
            layers, other contrasts), which local NCC follows. On knees of every family this
            scored higher than either alone; on same-contrast brains local NCC throughout
            (``"lncc"``) scores higher (docs/benchmarks.md, "The fields' similarity"). Where
            a local-NCC first stage leaves the images' windows correlating almost perfectly
            (one anatomy in one contrast: ``registration.ONE_CONTRAST_LNCC``), the later
            stages fit local NCC in its place (``report.json``: ``contrast``); that check,
            and the first stage's switch to mutual information where contrasts are
            inverted or it loses shared information, run with ``"mi"`` or ``"mind_mi"`` here.
            ``"mind_mi"`` scored higher on every knee family and failed less (gross
            failures in view 6 -> 2 over 60 pairs of two subjects, canonical knees equal,
            brains +0.011 Dice) at up to 1.4x the time; its fields fold more (up to 0.8 %
            of the voxels against 0.2 %), so it is an option (docs/benchmarks.md, "Whole
            families with mind_mi"). Its two maps agree less than mutual information's: the
            self-check's round-trip line of a failure (``quality.ROUND_TRIP_FAILED``) is set
            on its runs.
        regularizer: ``"gradicon"`` (autograd Jacobian), ``"gradicon_fd"`` (finite
            differences), ``"icon"``, ``"diffusion"``, ``"bending"`` or ``"none"``.
        regularizer_weight: lambda multiplying the regularizer.
        volume_weight: weight of the fields' squared log volume change, mean (log det
            J_field)^2 over the regularizer points, added to ``gradicon`` inside lambda's
            term (``losses.regularizers.log_volume_penalty``): the fields pay for
            shrinking or growing a structure beyond what the global affine part does.
            Needs ``regularizer="gradicon"`` with ``jacobian="analytic"`` (the Jacobians
            it reads are that term's own).
        jacobian: how ``gradicon`` takes the spatial Jacobian: ``"autograd"``
            (``torch.autograd.grad(create_graph=True)``, the definition) or ``"analytic"``
            (pushed forward through the MLP: the same value and parameter gradients,
            tested to 1e-8 against ``"autograd"``, and faster).
        steps: optimizer steps of the fields in total, spread over the pyramid stages.
        learning_rate: Adam learning rate (tables and MLP alike).
        final_lr_fraction: the learning rate decays (cosine) over the last pyramid stage to
            this fraction of ``learning_rate``; 1 keeps it constant.
        points: similarity points per field and step; None: one per ``voxels_per_point``
            voxels of the fixed image, between 4096 and 16384 (``similarity_points``).
        voxels_per_point: fixed-image voxels per similarity point when ``points`` is None.
        regularizer_points: points per step of the regularizer (uniform); None: one per 8
            similarity points (``regularizer_points``).
        edge_fraction: share of the similarity points (window centres for ``lncc``) drawn
            with probability proportional to the target image's gradient magnitude at the
            stage's resolution, the rest uniformly: more points where alignment is decided.
        middle_edge_fraction: ``edge_fraction`` of the pyramid stages between the first and
            the last (``stage_edge_fraction``); None: ``edge_fraction``. The middle stages
            (mutual information by default) move the bones from where the global part put
            them to where the fields finish: edge-drawn points fill mutual information's
            histogram with whatever has edges, between two subjects mostly soft-tissue
            texture that does not correspond, and the fields follow it. The first stage's
            local NCC windows and the last stage, which places the cartilage, keep their
            edges (docs/benchmarks.md, "Uniform points in the middle stage").
        edge_power: the edge weights are the gradient magnitude to this power; below 1 weak
            edges (bone against muscle) are drawn nearly as often as strong ones.
        lncc_window: side of the local NCC window, in voxels of the image sampled.
        lncc_patch_points: points per local window.
        fd_step_mm: finite-difference step of ``gradicon_fd`` (mm).
        pyramid: image down-sampling factor of each stage, coarse to fine; the hash levels
            are switched on stage by stage.
        stage_fractions: share of ``steps`` per stage (same length as ``pyramid``).
        stage_points: share of ``points`` drawn per step in each stage; None: all of them in
            every stage (the coarse stages decide the capture and need their points).
        affine_steps: steps of the global affine part, fitted before the fields (0: no
            affine part, the fields alone).
        affine_learning_rate: Adam learning rate of the affine part (cosine-decayed).
        affine_pyramid: down-sampling factors of the affine fit, coarse to fine (steps
            split evenly).
        affine_points: similarity points per direction and step of the affine fit; None:
            half the similarity points (``affine_fit_points``). The starts are judged with
            all the similarity points whatever this is.
        affine_edge_fraction: ``edge_fraction`` of the affine fits and of the choice between
            starts. Uniform points (0) keep the joint histogram of mutual information
            representative: edge-weighted draws fill it with the texture of soft tissue,
            whose edges do not correspond between subjects or contrasts (docs/benchmarks.md).
        affine_similarity: similarity of the affine fits and of the choice between starts:
            ``"mi"`` holds where the soft tissue of two subjects has intensities of its own,
            and across contrasts (docs/configuration.md).
        affine_overlap: the affine fits' mutual information counts only the points inside
            both images' fields of view (not in a scan's zero padding, not outside its grid),
            times their share (``losses.similarity.overlap_mi``): counted as intensities,
            the padding lets the fit scale the anatomy away where fields of view differ.
            False: every point, padding as intensity 0 (``mi``).
        affine_init: how the global alignment starts: ``"search"`` (rotations and, by FFT,
            translations at a coarse resolution; each of the best ``search_starts`` rigid
            candidates fitted as an affine, one chosen: ``alignment.choose_start``),
            ``"centroid"`` (translation between intensity centroids) or ``"identity"``.
        search_max_angle: rotations searched per axis, -max..max degrees (``"search"``).
        search_starts: rigid candidates of the search fitted as affines (per measure).
        search_similarity: what the search scores shifts by: ``"ncc"`` (masked NCC: the
            intensities must correspond), ``"mi"`` (normalized mutual information: holds
            across contrasts) or ``"ncc_mi"`` (each searches, the candidates of both are
            fitted and judged: ``search.global_search``'s ``measures``).
        affine_interior_mm: the affine fits (and the choice between starts) draw their
            points at least this deep inside the body, away from its outline
            (``points.interior_mask``; within a mask given); 0: everywhere. Between subjects
            the outline and the fat under the skin differ while the anatomy inside
            corresponds. Images without a background are fitted from everywhere.
        field_interior: the fields' similarity points are drawn inside the body too; their
            regularizer points stay everywhere. False: the fields draw from everywhere.
        margin: margin added to each side of the pair's world box, as a fraction of its extent.
        seed: seeds the fields' initialization and every point drawn (deterministic on a CPU).
        max_recoveries: NaN/Inf losses recovered from (restore, halve the learning rate)
            before the run is declared diverged; also the most rollbacks for a jump.
        divergence_tolerance: a similarity term whose 5-step running mean rises this far
            above its best within a pyramid stage (in units of 1 - NCC; for
            ``losses.DATA_SCALED`` (``mse``, ``mind``) as a fraction of its best) rolls both
            fields back to the last healthy snapshot at half the learning rate (0: off).
    """

    field: FieldConfig = field(default_factory=FieldConfig)
    similarity: Similarity = dataclasses.field(
        default="lncc", metadata=flag("--similarity", "similarity measure (default: {default})")
    )
    fine_similarity: Similarity | None = dataclasses.field(
        default="mi",
        metadata=flag("--fine-similarity", "similarity of the pyramid stages after the first (default: {default})"),
    )
    regularizer: Regularizer = dataclasses.field(
        default="gradicon", metadata=flag("--regularizer", "regularizer (default: {default})")
    )
    regularizer_weight: float = dataclasses.field(
        default=1.0, metadata=flag("--lambda", "regularizer weight (default: {default})")
    )
    volume_weight: float = dataclasses.field(
        default=0.0,
        metadata=flag(
            "--volume-weight", "weight of the fields' local volume change in the regularizer (default: {default})"
        ),
    )
    jacobian: Jacobian = "analytic"
    steps: int = dataclasses.field(default=500, metadata=flag("--steps", "optimization steps (default: {default})"))
    learning_rate: float = dataclasses.field(
        default=2e-3, metadata=flag("--learning-rate", "Adam learning rate (default: {default})")
    )
    final_lr_fraction: float = 0.1
    points: int | None = dataclasses.field(
        default=None,
        metadata=flag(
            "--points", "similarity points per field and step (default: one per 180 fixed voxels, 4096-16384)"
        ),
    )
    voxels_per_point: float = 180.0
    regularizer_points: int | None = None
    edge_fraction: float = dataclasses.field(
        default=1.0,
        metadata=flag(
            "--edge-fraction", "share of similarity points drawn on image edges, the rest uniform (default: {default})"
        ),
    )
    middle_edge_fraction: float | None = dataclasses.field(
        default=0.0,
        metadata=flag(
            "--middle-edge-fraction",
            "edge share of the pyramid stages between the first and the last (default: {default})",
        ),
    )
    edge_power: float = dataclasses.field(
        default=1.0,
        metadata=flag(
            "--edge-power",
            "edge points are drawn by gradient magnitude to this power; below 1 weak edges count more "
            "(default: {default})",
        ),
    )
    lncc_window: float = 7.0
    lncc_patch_points: int = 32
    fd_step_mm: float = 0.5
    pyramid: tuple = (4, 2, 1)
    stage_fractions: tuple = (0.25, 0.25, 0.5)
    stage_points: tuple | None = None
    affine_steps: int = dataclasses.field(
        default=200,
        metadata=flag(
            "--affine-steps", "steps of the global affine part fitted first; 0 turns it off (default: {default})"
        ),
    )
    affine_learning_rate: float = 5e-3
    affine_pyramid: tuple = (4, 2)
    affine_points: int | None = None
    affine_edge_fraction: float = 0.0
    affine_similarity: Similarity = "mi"
    affine_overlap: bool = True
    affine_init: AffineInit = "search"
    search_max_angle: float = 40.0
    search_starts: int = 4
    search_similarity: SearchSimilarity = "ncc"
    affine_interior_mm: float = 12.0
    field_interior: bool = True
    margin: float = 0.15
    seed: int = dataclasses.field(default=0, metadata=flag("--seed", "random seed (default: {default})"))
    max_recoveries: int = 3
    divergence_tolerance: float = 0.25

    def __post_init__(self):
        self.field = _nested(FieldConfig, self.field, "field")
        self._check_optimization()
        self._check_sampling()
        self._check_pyramid()
        self._check_global()

    def _check_optimization(self) -> None:
        _choice(self, "similarity")
        if self.fine_similarity is not None:
            _choice(self, "fine_similarity")
        _choice(self, "regularizer")
        _float(self, "regularizer_weight", 0.0, 1e6)
        _float(self, "volume_weight", 0.0, 1e6)
        _choice(self, "jacobian")
        if self.volume_weight and (self.regularizer, self.jacobian) != ("gradicon", "analytic"):
            _fail("volume_weight", 'needs regularizer "gradicon" with jacobian "analytic" (it reads their Jacobians)')
        _int(self, "steps", 1, MAX_STEPS)
        _float(self, "learning_rate", 0.0, 10.0, low_open=True)
        _float(self, "final_lr_fraction", 0.0, 1.0)
        _float(self, "fd_step_mm", 0.0, 1e3, low_open=True)
        _int(self, "max_recoveries", 0, 100)
        _float(self, "divergence_tolerance", 0.0, 1e6)
        _int(self, "seed", 0, 2**63 - 1)

    def _check_sampling(self) -> None:
        _int(self, "points", 8, MAX_POINTS, optional=True)
        _float(self, "voxels_per_point", 0.0, 1e9, low_open=True)
        _int(self, "regularizer_points", 1, MAX_POINTS, optional=True)
        _float(self, "edge_fraction", 0.0, 1.0)
        _float(self, "affine_edge_fraction", 0.0, 1.0)
        _float(self, "middle_edge_fraction", 0.0, 1.0, optional=True)
        _float(self, "edge_power", 0.0, 4.0, low_open=True)
        _float(self, "lncc_window", 1.0, 256.0)
        _int(self, "lncc_patch_points", 1, 4096)
        used = {self.similarity, self.fine_similarity, self.affine_similarity}
        per_point = self.lncc_patch_points if used & set(WINDOWED) else 1
        most = max(self.points or AUTO_POINTS[1], self.affine_points or 0) * per_point
        if most > MAX_SAMPLES:
            _fail(
                "points",
                f"{most} image samples per field and step (points x lncc_patch_points) exceed {MAX_SAMPLES}",
            )

    def _check_pyramid(self) -> None:
        _sequence(self, "pyramid", int, 1, 64)
        _sequence(self, "stage_fractions", float, 0.0, 1.0)
        if len(self.stage_fractions) != len(self.pyramid):
            _fail(
                "stage_fractions",
                f"needs one share per pyramid stage ({len(self.pyramid)}), not {len(self.stage_fractions)}",
            )
        if abs(sum(self.stage_fractions) - 1.0) > 1e-6:
            _fail("stage_fractions", f"must add up to 1, not {sum(self.stage_fractions):g}")
        _sequence(self, "stage_points", float, 0.0, 1.0, optional=True)
        if self.stage_points is not None and (
            len(self.stage_points) != len(self.pyramid) or not all(f > 0 for f in self.stage_points)
        ):
            _fail("stage_points", "must hold one share in (0, 1] per pyramid stage, or be null")

    def _check_global(self) -> None:
        _int(self, "affine_steps", 0, MAX_STEPS)
        _float(self, "affine_learning_rate", 0.0, 10.0, low_open=True)
        _sequence(self, "affine_pyramid", int, 1, 64)
        _int(self, "affine_points", 8, MAX_POINTS, optional=True)
        _choice(self, "affine_similarity")
        _choice(self, "affine_init")
        _float(self, "search_max_angle", 0.0, 180.0)
        _int(self, "search_starts", 1, 64)
        _choice(self, "search_similarity")
        _float(self, "affine_interior_mm", 0.0, 1e4)
        _bool(self, "field_interior")
        _bool(self, "affine_overlap")
        _float(self, "margin", 0.0, 10.0)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RegistrationConfig:
        """A config from a dict of its keys (nested ones as dicts); ``ConfigError`` names a bad
        key, and says where a ``RunConfig`` key given here belongs."""
        return _from_dict(cls, d)

    @classmethod
    def from_json(cls, path) -> RegistrationConfig:
        with open(path) as f:
            return cls.from_dict(json.load(f))


def _from_dict(cls, d):
    """``cls(**d)`` for a dict of ``cls``'s keys; ``ConfigError`` for anything else."""
    if not isinstance(d, dict):
        raise ConfigError("config", f"must be an object of {cls.__name__} keys, not {d!r}")
    unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
    if cls is RegistrationConfig and unknown and unknown[0] in RUN_KEYS:
        raise ConfigError(unknown[0], "is how a run executes, not what it optimizes: a RunConfig key (or its flag)")
    if unknown:
        raise ConfigError(unknown[0], f"unknown configuration key(s) {', '.join(map(repr, unknown))}")
    return cls(**d)
