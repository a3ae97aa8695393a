"""Darknet's ``.weights`` file, read and written against a cfg (spec/weights.md).

A weights file is a header, then the parameters of every layer that has any, in layer order, as raw float32
values with no separators: nothing in the file says where a layer starts, so only the cfg tells how to read it.
:func:`layer_blocks` is that rule for one layer (AlexeyAB's ``load_weights_upto``); :func:`read_weights` and
:func:`write_weights` apply it to a whole network.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from darkspec.errors import DarkspecError
from darkspec.reference.cfg import int_option, positive_option
from darkspec.reference.network import Layer, Network
from darkspec.reference.shortcut import weight_count

#: Darknet writes host byte order; every platform it runs on is little-endian.
FLOAT = np.dtype("<f4")
INT32 = np.dtype("<i4")
#: What a block holds before training, for the blocks a writer is not given (Darknet's initial values where it has
#: fixed ones: scales and variances 1, shortcut weights 1).
DEFAULT_FILL = {"biases": 0.0, "scales": 1.0, "rolling_mean": 0.0, "rolling_variance": 1.0, "weights": 0.0}
SHORTCUT_DEFAULT = 1.0


@dataclass(frozen=True)
class Header:
    """``major``, ``minor``, ``revision`` (int32) and ``seen``, the images trained on: uint64 when
    ``major * 10 + minor >= 2``, else uint32."""

    major: int = 0
    minor: int = 2
    revision: int = 0
    seen: int = 0

    @property
    def seen_bytes(self) -> int:
        return 8 if self.major * 10 + self.minor >= 2 else 4

    @property
    def size(self) -> int:
        return 3 * INT32.itemsize + self.seen_bytes

    @property
    def transposed(self) -> bool:
        """A version above 1000 marks ``[connected]`` weights stored transposed (Darknet transposes on load)."""
        return self.major > 1000 or self.minor > 1000

    def to_bytes(self) -> bytes:
        seen = np.array([self.seen], "<u8" if self.seen_bytes == 8 else "<u4")
        return np.array([self.major, self.minor, self.revision], INT32).tobytes() + seen.tobytes()


@dataclass(frozen=True)
class Block:
    """One run of float32 values of a layer: its name and how many there are."""

    name: str
    count: int


@dataclass(frozen=True)
class LayerWeights:
    index: int
    type: str
    #: Byte offset of the layer's first value in the file.
    offset: int
    arrays: dict[str, np.ndarray] = field(repr=False)


@dataclass(frozen=True)
class WeightsFile:
    header: Header
    #: The layers that have parameters, by layer index.
    layers: dict[int, LayerWeights]


def _batch_norm_blocks(layer: Layer, count: int) -> list[Block]:
    if not int_option(layer.section, layer.index, "batch_normalize", 0):
        return []
    if int_option(layer.section, layer.index, "dontloadscales", 0):
        return []  # Darknet neither reads nor writes them
    return [Block("scales", count), Block("rolling_mean", count), Block("rolling_variance", count)]


def layer_blocks(layer: Layer) -> tuple[Block, ...]:
    """The blocks Darknet reads for one layer, in file order (``()`` for a layer without parameters)."""
    section, index = layer.section, layer.index
    if int_option(section, index, "dontload", 0):
        return ()
    if layer.type in ("convolutional", "conv"):
        if "share_index" in section.options:
            return ()  # a layer sharing another's weights has none of its own
        filters, channels = layer.output_shape[0], layer.input_shape[0]
        groups = positive_option(section, index, "groups", 1)
        size = positive_option(section, index, "size", 1)
        return (Block("biases", filters), *_batch_norm_blocks(layer, filters),
                Block("weights", channels // groups * filters * size * size))
    if layer.type in ("connected", "conn"):
        outputs, inputs = layer.output_shape[0], int(np.prod(layer.input_shape))
        return (Block("biases", outputs), Block("weights", outputs * inputs), *_batch_norm_blocks(layer, outputs))
    if layer.type == "batchnorm":
        channels = layer.input_shape[0]
        return tuple(Block(name, channels) for name in ("biases", "scales", "rolling_mean", "rolling_variance"))
    if layer.type == "shortcut":
        op = layer.shortcut
        count = weight_count(op.params.weights_type, len(op.from_layers), layer.output_shape[0])
        return (Block("weights", count),) if count else ()
    return ()


def float_count(network: Network) -> int:
    """How many float32 values follow the header in a weights file of this cfg."""
    return sum(block.count for layer in network.layers for block in layer_blocks(layer))


def _describe(blocks) -> str:
    return " + ".join(f"{block.count} {block.name}" for block in blocks)


def _values(nbytes: int) -> str:
    """A byte count as float32 values (and the bytes left over, in a file that is not whole values)."""
    count, rest = divmod(nbytes, FLOAT.itemsize)
    return f"{count} float32 values" + (f" and {rest} byte(s)" if rest else "")


def read_header(data: bytes) -> Header:
    if len(data) < 3 * INT32.itemsize:
        raise DarkspecError("weights file header", f"{len(data)} bytes",
                            "at least 12 bytes: major, minor, revision (int32), then seen", code="weights-truncated")
    major, minor, revision = (int(v) for v in np.frombuffer(data, INT32, 3))
    header = Header(major, minor, revision)
    if len(data) < header.size:
        raise DarkspecError("weights file header", f"{len(data)} bytes",
                            f"{header.size} bytes: version {major}.{minor}.{revision} stores seen in "
                            f"{header.seen_bytes} bytes", code="weights-truncated")
    seen = np.frombuffer(data, "<u8" if header.seen_bytes == 8 else "<u4", 1, 3 * INT32.itemsize)[0]
    return Header(major, minor, revision, int(seen))


def read_weights(source: bytes | str | os.PathLike, network: Network) -> WeightsFile:
    """Every layer's parameters from a weights file (its bytes or its path), checked against the cfg: the file must
    hold exactly the values the cfg's layers read, no fewer (``weights-truncated``) and no more
    (``weights-size-mismatch``)."""
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    header = read_header(data)
    offset = header.size
    layers = {}
    for layer in network.layers:
        blocks = layer_blocks(layer)
        if not blocks:
            continue
        needed = sum(block.count for block in blocks) * FLOAT.itemsize
        if offset + needed > len(data):
            raise DarkspecError(
                f"{layer.section.where(layer.index)} weights", f"{_values(len(data) - offset)} left in the file",
                f"{needed // FLOAT.itemsize} values: {_describe(blocks)}", code="weights-truncated",
                reason=f"the file ends {needed - (len(data) - offset)} bytes short; it was written for another cfg "
                       "or cut off",
            )
        arrays, start = {}, offset
        for block in blocks:
            arrays[block.name] = np.frombuffer(data, FLOAT, block.count, offset).astype(np.float32, copy=False)
            offset += block.count * FLOAT.itemsize
        layers[layer.index] = LayerWeights(layer.index, layer.type, start, arrays)
    if offset != len(data):
        last = max(layers, default=None)
        where = f"the last layer with parameters, layer {last}" if last is not None else "no layer with parameters"
        raise DarkspecError(
            "weights file size", f"{_values(len(data) - header.size)} after the header",
            f"{float_count(network)} values, what the cfg's layers read ({where})", code="weights-size-mismatch",
            reason=f"{len(data) - offset} bytes are left after the last layer: the file belongs to another cfg "
                   "(another weights_type or from= in a [shortcut], another filters= or batch_normalize=)",
        )
    return WeightsFile(header, layers)


def write_weights(network: Network, values: dict[int, dict[str, np.ndarray]] | None = None,
                  header: Header = Header()) -> bytes:
    """A weights file for the cfg: ``values[layer index][block name]`` where given, else each block's default
    fill (``DEFAULT_FILL``; shortcut weights 1, Darknet's initial value)."""
    values = values or {}
    unknown = set(values) - {layer.index for layer in network.layers if layer_blocks(layer)}
    if unknown:
        raise DarkspecError("values", sorted(unknown), "indices of layers that have parameters",
                            code="weights-no-such-layer")
    chunks = [header.to_bytes()]
    for layer in network.layers:
        given = values.get(layer.index, {})
        blocks = layer_blocks(layer)
        extra = set(given) - {block.name for block in blocks}
        if extra:
            raise DarkspecError(f"{layer.section.where(layer.index)} values", sorted(extra),
                                _describe(blocks), code="weights-no-such-block")
        for block in blocks:
            fill = SHORTCUT_DEFAULT if layer.type == "shortcut" else DEFAULT_FILL[block.name]
            array = np.asarray(given.get(block.name, np.full(block.count, fill)), dtype=FLOAT).reshape(-1)
            if array.size != block.count:
                raise DarkspecError(f"{layer.section.where(layer.index)} {block.name}", f"{array.size} values",
                                    f"{block.count} values", code="weights-size-mismatch")
            chunks.append(array.tobytes())
    return b"".join(chunks)
