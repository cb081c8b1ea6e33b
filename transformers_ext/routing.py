"""How one routed run is set (`RoutingSetting`), and the defaults its early-exit fields take from the model
folder: each default is defined once, here or beside the code that uses it (`inference.DEFAULT_EXIT_THRESHOLD`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

from .cascade import Cascade
from .inference import DEFAULT_EXIT_THRESHOLD, default_off_ramps

# The depths run_glue.py trains by default (--depth_mult_list): without saved or given off-ramps, the
# off-ramps sit after the last layer of each of them below 1.
TRAINED_DEPTHS = (0.5, 0.75, 1.0)


MODES = ("static", "w_dynamic", "d_dynamic", "wd_dynamic")
CASCADE_MODE = "cascade"  # not a boolean mode flag: --cascade takes the stages


@dataclass(frozen=True)
class RoutingSetting:
    """One inference setting, built once from the flags: the gates choose among `class_to_width` (one width
    per gate class, as listed), or every example runs `fixed_width` (no gate run; then `class_to_width` only
    names the widths in reports); the first rnd(depth_mult*L) layers; with `early_exit`, an example leaves at
    the first off-ramp where its prediction entropy is below `exit_threshold`. `mode` is one of MODES, as
    the report names it. With `cascade` (mode CASCADE_MODE) its static subnets run instead, `class_to_width`
    naming the stages' widths (`cascade.Cascade`)."""

    class_to_width: Sequence[float] | None = None
    fixed_width: float | None = None
    depth_mult: float = 1.0
    early_exit: bool = False
    exit_threshold: float = DEFAULT_EXIT_THRESHOLD
    off_ramps: Sequence[int] = ()
    mode: str = "static"
    cascade: Cascade | None = None

    def forward_kwargs(self) -> dict:
        """The keyword arguments of `inference.dynamic_forward` for this setting (not a cascade's)."""
        kwargs = asdict(self)
        del kwargs["mode"], kwargs["cascade"]
        return kwargs


def routing_defaults(config, exit_threshold: float | None = None, off_ramps: Sequence[int] | None = None
                     ) -> tuple[float, list[int]]:
    """(exit threshold, off-ramps) of a run: the given value, else the model folder's saved one (a gate
    folder's config.json), else the default: DEFAULT_EXIT_THRESHOLD, and off-ramps after the last layer of
    each depth below 1 the backbone was trained with (`trained_depths`)."""
    if exit_threshold is None:
        saved = getattr(config, "exit_threshold", None)
        exit_threshold = DEFAULT_EXIT_THRESHOLD if saved is None else float(saved)
    if off_ramps is None:
        off_ramps = getattr(config, "off_ramps", None) or default_off_ramps(config.num_hidden_layers,
                                                                            trained_depths(config))
    return exit_threshold, list(off_ramps)


# The config.json key of the depths a backbone was trained with (named after run_glue.py's flag).
TRAINED_DEPTHS_KEY = "depth_mult_list"


def record_trained_depths(config, depths: Sequence[float] | None) -> None:
    """Save in `config` the depths the model is trained with (run_glue.py's depth stages); None (a stage that
    trains full depth only) drops a list inherited from the input model, which no longer describes it."""
    if depths is not None:
        setattr(config, TRAINED_DEPTHS_KEY, [float(d) for d in depths])
    elif hasattr(config, TRAINED_DEPTHS_KEY):
        delattr(config, TRAINED_DEPTHS_KEY)


def trained_depths(config) -> list[float]:
    """The depths a backbone was trained with: saved in its config.json by run_glue.py's depth stages
    (`record_trained_depths`); a folder without them (older runs, other tools) is taken to have
    `TRAINED_DEPTHS`."""
    return list(getattr(config, TRAINED_DEPTHS_KEY, None) or TRAINED_DEPTHS)
