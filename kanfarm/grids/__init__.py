"""Grid specs: TOML grids of runs, validated and expanded into RunConfigs, plus the study's presets."""
from kanfarm.grids.spec import (
    KNOWN_INTRINSIC_DIM,
    GridSpec,
    load_spec,
    parse_spec,
    preset_names,
)

#: Built-in spec names, one per kanfarm/grids/presets/<name>.toml.
PRESETS: tuple[str, ...] = preset_names()

__all__ = ["GridSpec", "KNOWN_INTRINSIC_DIM", "PRESETS", "load_spec", "parse_spec", "preset_names"]
