"""The model cfgs of tests/data/cfg (AlexeyAB's cfg folder, see its README) and their weighted variants."""

from __future__ import annotations

import re
from pathlib import Path

from darkspec.reference.network import parse_network

CFG_DIR = Path(__file__).resolve().parent / "data" / "cfg"
#: resnet50.cfg is pjreddie's: AlexeyAB's parser refuses its strided shortcuts.
PJREDDIE_MODELS = {"resnet50.cfg"}
#: Models small enough (under 8 million values) for a test to write a whole weights file of.
SMALL_MODELS = ("efficientnet-lite3.cfg", "efficientnet_b0.cfg", "enet-coco.cfg", "yolov3-tiny-prn.cfg",
                "yolov4-tiny.cfg", "yolov7-tiny.cfg")


def model_names() -> list[str]:
    return sorted(path.name for path in CFG_DIR.glob("*.cfg"))


def model_text(name: str) -> str:
    return (CFG_DIR / name).read_text()


def model_network(name: str, text: str | None = None):
    """The layer table of a model (or of ``text``, a variant of it) under the library it is written for."""
    return parse_network(model_text(name) if text is None else text,
                         "pjreddie" if name in PJREDDIE_MODELS else "alexeyab")


def weighted_variant(text: str, weights_type: str = "per_channel", normalization: str = "relu") -> str:
    """The cfg with every [shortcut] given weights_type and weights_normalization."""
    return re.sub(r"^\[shortcut\][ \t]*$", f"[shortcut]\nweights_type={weights_type}\n"
                  f"weights_normalization={normalization}", text, flags=re.MULTILINE)
