from .hf import to_hf
from .hub import from_pretrained
from .weights import (
    LAYOUTS,
    CheckpointMismatchError,
    LoadReport,
    convert_to_layout,
    detect_layout,
    export_state_dict,
    load_weights,
    read_state_dict,
    save_weights,
)

__all__ = [
    "LAYOUTS",
    "CheckpointMismatchError",
    "LoadReport",
    "convert_to_layout",
    "detect_layout",
    "export_state_dict",
    "from_pretrained",
    "load_weights",
    "read_state_dict",
    "save_weights",
    "to_hf",
]
