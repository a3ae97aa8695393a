"""The weighted shortcuts of a trained model: what its ``.weights`` file gives each input under each AlexeyAB path
(spec/check.md#trained-weights).

For every ``[shortcut]`` with ``weights_type``: the raw weights as a ``[slot, k]`` table (slot 0 the previous layer,
then the ``from`` layers; ``k`` the channel, or 0 per_feature), the normalized weights in CPU training, GPU training
and inference (folded), the inputs that are dead (normalized to 0 in CPU training: a raw weight at or below 0 under
relu, exactly 0 without normalization) or at the 0.001 floor (GPU and inference), how far the fusion is from the
uniform one, and where CPU training and inference fuse with different weights.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

import numpy as np

from darkspec.reference.cfg import ShortcutSection
from darkspec.reference.contract import RELU_FLOOR, relu_floor_of
from darkspec.reference.network import Network
from darkspec.reference.shortcut import Normalization, normalize_weights
from darkspec.reference.weights import WeightsFile

DIALECTS = ("darknet-cpu", "darknet-gpu", "darknet-inference")
#: Normalized weights closer than this are the same weight (float32 rounding of the same formula is far below it).
SAME_WEIGHT = 1e-6


@dataclass(frozen=True)
class SlotWeights:
    slot: int
    layer: int
    #: The k (channels, or [0] per_feature) whose normalized weight is 0 in CPU training.
    dead: tuple[int, ...]
    #: The k clamped to the 0.001 floor in GPU training and inference (relu normalization only).
    at_floor: tuple[int, ...]


@dataclass(frozen=True)
class ShortcutWeights:
    index: int
    weights_type: str
    normalization: str
    raw: np.ndarray  # [slot, k]
    normalized: dict[str, np.ndarray]  # dialect -> [slot, k]
    slots: tuple[SlotWeights, ...]
    #: Total variation distance of the CPU-normalized weights from 1/(n+1) per input: mean and max over k (0: the
    #: uniform fusion; near 1: one input takes everything).
    uniform_distance: tuple[float, float]
    #: (slot, k) where CPU training and inference fuse with different weights, and the largest difference.
    fused_differently: tuple[tuple[int, int], ...]
    max_difference: float

    @property
    def per_input(self) -> int:
        return self.raw.shape[1]

    def dead_inputs(self) -> list[SlotWeights]:
        """The inputs dropped entirely in CPU training: every one of their weights is dead."""
        return [slot for slot in self.slots if len(slot.dead) == self.per_input]

    def to_json(self) -> dict:
        return {
            "index": self.index, "weights_type": self.weights_type, "weights_normalization": self.normalization,
            "raw": self.raw.tolist(), "normalized": {d: w.tolist() for d, w in self.normalized.items()},
            "inputs": [{"slot": s.slot, "layer": s.layer, "dead": list(s.dead), "at_floor": list(s.at_floor),
                        "dead_input": len(s.dead) == self.per_input} for s in self.slots],
            "uniform_distance": {"mean": self.uniform_distance[0], "max": self.uniform_distance[1]},
            "fused_differently": [list(p) for p in self.fused_differently], "max_difference": self.max_difference,
        }


def analyse(network: Network, weights: WeightsFile) -> list[ShortcutWeights]:
    """Every weighted shortcut of the network with the weights the file gives it."""
    found = []
    for layer in network.layers:
        op = layer.op
        if not isinstance(op, ShortcutSection) or layer.index not in weights.layers:
            continue
        raw = np.asarray(weights.layers[layer.index].arrays["weights"], np.float32).reshape(len(op.from_layers) + 1, -1)
        found.append(_analyse_one(layer.index, (layer.index - 1, *op.from_layers), raw, op.params))
    return found


def _analyse_one(index, inputs, raw, params) -> ShortcutWeights:
    normalization = params.weights_normalization
    normalized = {d: normalize_weights(raw, normalization, relu_floor=relu_floor_of(d)) for d in DIALECTS}
    cpu, inference = normalized["darknet-cpu"], normalized["darknet-inference"]
    relu = normalization == Normalization.RELU
    slots = tuple(
        SlotWeights(slot, layer, tuple(int(k) for k in np.flatnonzero(cpu[slot] == 0)),
                    tuple(int(k) for k in np.flatnonzero(raw[slot] <= np.float32(RELU_FLOOR))) if relu else ())
        for slot, layer in enumerate(inputs))
    uniform = 1.0 / raw.shape[0]
    distance = 0.5 * np.abs(cpu.astype(np.float64) - uniform).sum(axis=0)
    difference = np.abs(cpu.astype(np.float64) - inference.astype(np.float64))
    return ShortcutWeights(
        index, params.weights_type.value, normalization.value, raw, normalized, slots,
        (float(distance.mean()), float(distance.max())),
        tuple((int(s), int(k)) for s, k in zip(*np.nonzero(difference > SAME_WEIGHT))), float(difference.max()))


# --- the table and the heat-map -----------------------------------------------------------------------------------


def _counts(slots, attribute, per_input) -> str:
    parts = []
    for slot in slots:
        ks = getattr(slot, attribute)
        if ks:
            parts.append(f"{slot.layer}: {len(ks)}/{per_input}" + (" (all)" if len(ks) == per_input else ""))
    return ", ".join(parts) or "-"


def render(shortcuts: list[ShortcutWeights]) -> str:
    from tabulate import tabulate

    if not shortcuts:
        return "no [shortcut] with weights_type: nothing in the weights file to analyse"
    rows = [[s.index, ", ".join(str(slot.layer) for slot in s.slots), f"{s.weights_type}/{s.normalization}",
             _counts(s.slots, "dead", s.per_input), _counts(s.slots, "at_floor", s.per_input),
             f"{s.uniform_distance[0]:.3f} / {s.uniform_distance[1]:.3f}",
             f"{len(s.fused_differently)} (max {s.max_difference:.3g})" if s.fused_differently else "-"]
            for s in shortcuts]
    headers = ["layer", "inputs", "weights", "dead in CPU training", "at the 0.001 floor (GPU, inference)",
               "from uniform (mean / max)", "CPU training vs inference"]
    lines = ["weighted shortcuts (spec/check.md#trained-weights): input layer: weights dead or floored / weights of "
             "that input", tabulate(rows, headers=headers, maxcolwidths=[None, 14, None, 26, 26, None, 18])]
    dead = [(s.index, slot.layer) for s in shortcuts for slot in s.dead_inputs()]
    if dead:
        lines.append("dead inputs (dropped entirely in CPU training): "
                     + ", ".join(f"layer {layer} into {index}" for index, layer in dead))
    return "\n".join(lines)


def write_heatmap(shortcuts: list[ShortcutWeights], path, dialect: str = "darknet-cpu") -> str:
    """A PNG heat-map of each weighted shortcut's normalized weights (one row per input, one column per k): with
    matplotlib where it is installed (``darkspec[plot]``), else drawn here without labels. Returns the renderer."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        with open(path, "wb") as out:
            out.write(png_bytes(_heatmap_pixels(shortcuts, dialect)))
        return "builtin"
    _heatmap_matplotlib(shortcuts, path, dialect)
    return "matplotlib"


def png_bytes(rgb: np.ndarray) -> bytes:
    """An 8-bit RGB PNG of an (H, W, 3) uint8 array: signature, IHDR, one IDAT (zlib, filter 0 per row), IEND."""
    height, width, _ = rgb.shape

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = np.concatenate([np.zeros((height, 1), np.uint8), rgb.reshape(height, -1)], axis=1)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows.tobytes())) + chunk(b"IEND", b""))


def _colour(values: np.ndarray) -> np.ndarray:
    """Weights in [0, 1] as RGB from dark blue (0) to yellow (1)."""
    low, high = np.array([68, 1, 84], float), np.array([253, 231, 37], float)
    v = np.clip(values, 0, 1)[..., None]
    return (low + (high - low) * v).astype(np.uint8)


def _heatmap_pixels(shortcuts, dialect, cell: int = 6, gap: int = 6) -> np.ndarray:
    width = max(s.per_input for s in shortcuts) * cell
    blocks = []
    for s in shortcuts:
        image = np.repeat(np.repeat(_colour(s.normalized[dialect]), cell, axis=0), cell, axis=1)
        block = np.full((image.shape[0] + gap, width, 3), 255, np.uint8)
        block[:image.shape[0], :image.shape[1]] = image
        blocks.append(block)
    return np.concatenate(blocks, axis=0)


def _heatmap_matplotlib(shortcuts, path, dialect):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 0.6 + 0.45 * sum(len(s.slots) + 1 for s in shortcuts)), layout="constrained")
    canvas = FigureCanvasAgg(figure)
    axes = figure.subplots(len(shortcuts), 1, squeeze=False)[:, 0]
    for ax, s in zip(axes, shortcuts):
        image = ax.imshow(s.normalized[dialect], aspect="auto", vmin=0, vmax=1, cmap="viridis",
                          interpolation="nearest")
        ax.set_yticks(range(len(s.slots)), [f"layer {slot.layer}" for slot in s.slots])
        ax.set_title(f"[shortcut] layer {s.index}: {s.weights_type}/{s.normalization}, {dialect}", fontsize=9)
        ax.set_xlabel("channel" if s.per_input > 1 else "")
        figure.colorbar(image, ax=ax)
    canvas.print_png(str(path))
