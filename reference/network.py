"""A cfg as a table of layers with their shapes, enough to resolve and check every [shortcut], [reorg3d] and
[reorg] in a real model (spec/cfg.md#shapes).

Shapes are (C, H, W) per sample. The layer types covered are those of the models in AlexeyAB's cfg folder; any
other type is refused by name, since a wrong shape would make every later check meaningless.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from darkspec.errors import DarkspecError
from darkspec.reference import reorg
from darkspec.reference.cfg import (
    LIBRARIES,
    Section,
    ShortcutSection,
    int_option,
    layer_indices,
    parse_shortcut,
    positive_option,
    read_sections,
)
from darkspec.reference.shortcut import pjreddie_index_map

Shape = tuple[int, int, int]


@dataclass(frozen=True)
class ReorgSection:
    index: int
    old: bool  # True for [reorg] (the pre-2018 layer YOLOv2 uses), False for [reorg3d]
    stride: int
    reverse: bool


@dataclass(frozen=True)
class Layer:
    index: int
    type: str
    input_shape: Shape
    output_shape: Shape
    section: Section = field(repr=False)
    op: ShortcutSection | ReorgSection | None = None

    @property
    def shortcut(self) -> ShortcutSection:
        """The settings of a [shortcut] layer."""
        if not isinstance(self.op, ShortcutSection):
            raise TypeError(f"layer {self.index} is a [{self.type}], not a [shortcut]")
        return self.op

    @property
    def reorg(self) -> ReorgSection:
        """The settings of a [reorg3d] or [reorg] layer."""
        if not isinstance(self.op, ReorgSection):
            raise TypeError(f"layer {self.index} is a [{self.type}], not a reorg")
        return self.op


@dataclass(frozen=True)
class Network:
    input_shape: Shape
    batch: int
    layers: tuple[Layer, ...]
    #: Deliberate differences from Darknet (codes of cfg.DELIBERATE_DIFFERENCES) this cfg relies on.
    deviations: tuple[str, ...] = ()


def _conv(section, index, shape):
    c, h, w = shape
    size = positive_option(section, index, "size", 1)
    stride = positive_option(section, index, "stride", 1)
    stride_x = positive_option(section, index, "stride_x", stride)
    stride_y = positive_option(section, index, "stride_y", stride)
    pad = size // 2 if int_option(section, index, "pad", 0) else int_option(section, index, "padding", 0)
    filters = int_option(section, index, "filters", 1)
    return filters, (h + 2 * pad - size) // stride_y + 1, (w + 2 * pad - size) // stride_x + 1


def _maxpool(section, index, shape):
    c, h, w = shape
    stride = positive_option(section, index, "stride", 1)
    size = positive_option(section, index, "size", stride)
    padding = int_option(section, index, "padding", size - 1)
    return c, (h + padding - size) // stride + 1, (w + padding - size) // stride + 1


def _upsample(section, index, shape):
    c, h, w = shape
    stride = int_option(section, index, "stride", 2)
    if stride == 0:
        raise DarkspecError(f"{section.where(index)} stride", 0, "a non-zero integer (negative: downsample)",
                            code="not-positive")
    return (c, h // -stride, w // -stride) if stride < 0 else (c, h * stride, w * stride)


def _route(section, index, shape, layers):
    refs = [layers[r].output_shape for r in layer_indices(section, index, "layers")]
    if any(r[1:] != refs[0][1:] for r in refs):
        raise DarkspecError(f"{section.where(index)} layers", [r for r in refs], "layers of one spatial size",
                            code="spatial-mismatch")
    groups = positive_option(section, index, "groups", 1)
    return sum(r[0] for r in refs) // groups, refs[0][1], refs[0][2]


def _from_shape(section, index, shape, layers):
    return layers[layer_indices(section, index, "from")[0]].output_shape


def _reorg(section, index, shape, old):
    stride = int_option(section, index, "stride", 1)
    reverse = bool(int_option(section, index, "reverse", 0))
    shape_rule = reorg.reorg_old_output_shape if old else reorg.reorg3d_output_shape
    return shape_rule((1, *shape), stride, reverse)[1:], ReorgSection(index, old, stride, reverse)


_SAME_SHAPE = {"dropout", "softmax", "cost", "yolo", "region", "sam", "batchnorm", "activation", "Gaussian_yolo"}
#: Sections only AlexeyAB's Darknet (and hank-ai's) knows: pjreddie's parser reports them as unknown.
ALEXEYAB_ONLY = {"reorg3d", "scale_channels", "sam", "Gaussian_yolo"}


def _check_shortcut_shapes(op: ShortcutSection, section, shape, layers, library):
    for source in op.from_layers:
        from_shape = layers[source].output_shape
        if library == "pjreddie":
            pjreddie_index_map((1, *from_shape), (1, *shape))
        elif from_shape[1:] != shape[1:]:
            raise DarkspecError(
                f"{section.where(op.index)} from", source, f"a layer of spatial size {shape[1]}x{shape[2]}",
                code="spatial-mismatch",
                reason=f"layer {source} is {from_shape[1]}x{from_shape[2]} (AlexeyAB's parser asserts equality)",
            )


def parse_network(text: str, library: str = "alexeyab") -> Network:
    """Parse a whole cfg: the ``[net]`` section, then every layer with its input and output shape."""
    if library not in LIBRARIES:
        raise DarkspecError("library", library, ", ".join(LIBRARIES), code="unknown-library")
    sections = read_sections(text)
    if not sections or sections[0].name not in ("net", "network"):
        raise DarkspecError("first section", sections[0].name if sections else None, "[net] or [network]",
                            code="no-net-section")
    net = sections[0]
    shape = shape_of_input(net)
    batch = int_option(net, None, "batch", 1) // max(int_option(net, None, "subdivisions", 1), 1)
    layers: list[Layer] = []
    deviations: set[str] = set()
    for index, section in enumerate(sections[1:]):
        try:
            layer = _layer(section, index, shape, layers, library)
        except DarkspecError as error:
            if error.setting.startswith("["):
                raise
            # the op's own rules know no cfg: say where in the cfg the refused value comes from
            raise DarkspecError(f"{section.where(index, error.setting)} {error.setting}", error.value, error.allowed,
                                code=error.code, reason=error.reason) from None
        if isinstance(layer.op, ShortcutSection):
            deviations.update(layer.op.deviations)
        layers.append(layer)
        shape = layer.output_shape
    two_d = any(layer.input_shape[1] > 1 and layer.input_shape[2] > 1 for layer in layers)
    if library == "alexeyab" and layers and not two_d:
        # AlexeyAB's parser averages the outputs of layers with w > 1 and h > 1 and divides by their count.
        deviations.add("darknet-no-2d-layer")
    return Network(shape_of_input(net), batch, tuple(layers), tuple(sorted(deviations)))


def _layer(section: Section, index: int, shape: Shape, layers: list[Layer], library: str) -> Layer:
    """One layer's shape rule (and, for the layers darkspec specifies, its typed parameters)."""
    op = None
    kind = section.name
    if library == "pjreddie" and kind in ALEXEYAB_ONLY:
        raise DarkspecError(f"{section.where(index)}", kind, "a layer type pjreddie's Darknet has",
                            code="unknown-layer-type", reason="only AlexeyAB's Darknet has this section")
    if kind in ("convolutional", "conv"):
        out = _conv(section, index, shape)
    elif kind in ("maxpool", "max"):
        out = _maxpool(section, index, shape)
    elif kind in ("avgpool", "avg"):
        out = (shape[0], 1, 1)
    elif kind in ("connected", "conn"):
        out = (positive_option(section, index, "output", 1), 1, 1)
    elif kind == "upsample":
        out = _upsample(section, index, shape)
    elif kind == "route":
        out = _route(section, index, shape, layers)
    elif kind == "scale_channels":
        out = _from_shape(section, index, shape, layers)
    elif kind == "shortcut":
        op = parse_shortcut(section, index, library)
        _check_shortcut_shapes(op, section, shape, layers, library)
        out = shape
    elif kind in ("reorg3d", "reorg"):
        out, op = _reorg(section, index, shape, old=kind == "reorg")
    elif kind in _SAME_SHAPE:
        out = shape
    else:
        raise DarkspecError(f"{section.where(index)}", kind, "a layer type darkspec knows the shape rule of: "
                            "convolutional, connected, maxpool, avgpool, upsample, route, scale_channels, shortcut, "
                            f"reorg3d, reorg, {', '.join(sorted(_SAME_SHAPE))}", code="unknown-layer-type")
    if any(size < 1 for size in out):
        raise DarkspecError(f"{section.where(index)} output shape", out, "positive sizes", code="empty-output")
    return Layer(index, kind, shape, tuple(out), section, op)


def shape_of_input(net: Section) -> Shape:
    """(channels, height, width) of the ``[net]`` section."""
    return (int_option(net, None, "channels", 0), int_option(net, None, "height", 0),
            int_option(net, None, "width", 0))
