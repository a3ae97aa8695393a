"""Reading Darknet cfg text into sections, and [shortcut] sections into typed parameters (spec/cfg.md).

darkspec's parser reads what Darknet reads, but where Darknet silently does something the cfg's author cannot have
meant (a trailing comma adding layer 0, an activation typo becoming relu) it refuses with a ``DarkspecError``.
Every place where darkspec knowingly accepts or refuses differently from Darknet has a code in
``DELIBERATE_DIFFERENCES``; a parse that relies on one lists its code in ``deviations``.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field

from darkspec.errors import DarkspecError
from darkspec.reference import activations
from darkspec.reference.shortcut import Normalization, ShortcutParams, WeightsType

#: Where darkspec's parser differs from Darknet's on purpose: code -> the spec section that says why.
DELIBERATE_DIFFERENCES = {
    # darkspec refuses, Darknet accepts:
    "unknown-activation": "spec/cfg.md#activation",
    "from-empty-entry": "spec/cfg.md#from",
    "from-not-integer": "spec/cfg.md#from",
    "unknown-key": "spec/cfg.md#unknown-keys",
    "unknown-weights-normalization": "spec/cfg.md#weights_normalization",
    "pjreddie-single-from": "spec/cfg.md#pjreddie",
    "duplicate-key": "spec/cfg.md#reading-the-text",
    "bad-line": "spec/cfg.md#reading-the-text",
    "not-an-integer": "spec/cfg.md#reading-the-text",
    # darkspec accepts, Darknet refuses:
    "normalization-none-with-weights": "spec/cfg.md#weights_normalization",
    "normalization-2020-key": "spec/cfg.md#weights_normalization",
    "darknet-no-2d-layer": "spec/cfg.md#darknets-network-parser",
}

#: Keys Darknet reads for every layer after the layer's own parser (AlexeyAB).
GENERIC_LAYER_KEYS = frozenset(
    {"clip", "onlyforward", "dont_update", "burnin_update", "stopbackward", "train_only_bn", "dontload",
     "dontloadscales", "learning_rate"}
)
SHORTCUT_KEYS = {
    "alexeyab": frozenset({"from", "activation", "weights_type", "weights_normalization", "weights_normalizion"})
    | GENERIC_LAYER_KEYS,
    "pjreddie": frozenset({"from", "activation", "alpha", "beta", "truth", "onlyforward", "stopbackward", "dontsave",
                           "dontload", "numload", "dontloadscales", "learning_rate", "smooth"}),
}
WEIGHTS_TYPE_ALIASES = {"none": "none", "per_feature": "per_feature", "per_layer": "per_feature",
                        "per_channel": "per_channel"}
NORMALIZATION_ALIASES = {"none": "none", "relu": "relu", "avg_relu": "relu", "softmax": "softmax"}
LIBRARIES = ("alexeyab", "pjreddie")


@dataclass
class Section:
    """One ``[name]`` section: its options in file order and the line it starts on."""

    name: str
    line: int
    options: dict[str, str] = field(default_factory=dict)
    #: Keys given more than once (Darknet reads the first).
    repeated: list[str] = field(default_factory=list)
    #: The line of each key (its first occurrence).
    key_lines: dict[str, int] = field(default_factory=dict)

    def where(self, index: int | None = None, key: str | None = None) -> str:
        """The section, its layer index and the line of ``key`` (of the header without a key, or for a key it
        does not have)."""
        layer = f" (layer {index})" if index is not None else ""
        return f"[{self.name}]{layer} at line {self.key_lines.get(key or '', self.line)}"


@dataclass(frozen=True)
class ShortcutSection:
    """A parsed ``[shortcut]``: absolute from-layer indices in cfg order, the typed settings, and the deliberate
    differences from Darknet that this parse relied on."""

    index: int
    from_layers: tuple[int, ...]
    params: ShortcutParams
    deviations: tuple[str, ...] = ()


def cfg_text(cfg) -> str:
    """The cfg as text: a str, or bytes in UTF-8 (what a file holds)."""
    if isinstance(cfg, (bytes, bytearray)):
        try:
            return bytes(cfg).decode("utf-8")
        except UnicodeDecodeError as error:
            raise DarkspecError("cfg", f"bytes {bytes(cfg[:20])!r}...", "UTF-8 text", code="cfg-not-text",
                                reason=str(error)) from None
    if not isinstance(cfg, str):
        raise DarkspecError("cfg", type(cfg).__name__, "the cfg's text (str, or UTF-8 bytes)", code="cfg-not-text")
    return cfg


def read_sections(text: str | bytes) -> list[Section]:
    """Split cfg text into sections. Like Darknet, all whitespace inside a line is dropped, lines starting with
    ``#`` or ``;`` are comments, and of a repeated key the first counts. Unlike Darknet, a line that is not
    ``key=value`` is an error."""
    text = cfg_text(text)
    sections: list[Section] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = re.sub(r"\s+", "", raw)
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            if not line.endswith("]") or len(line) < 3:
                raise DarkspecError(f"line {number}", raw, "a section header like [shortcut]", code="bad-line")
            sections.append(Section(name=line[1:-1], line=number))
            continue
        key, sep, value = line.partition("=")
        if not sep or not key:
            raise DarkspecError(f"line {number}", raw, "key=value, a [section] header or a comment",
                                code="bad-line")
        if not sections:
            raise DarkspecError(f"line {number}", raw, "options only after a [section] header", code="bad-line")
        if key in sections[-1].options:
            sections[-1].repeated.append(key)
        else:
            sections[-1].options[key] = value
            sections[-1].key_lines[key] = number
    return sections


def check_keys(section: Section, index: int, allowed: frozenset[str]) -> None:
    """Refuse keys the section's layer does not read, and keys given twice."""
    for key in section.repeated:
        raise DarkspecError(f"{section.where(index, key)} {key}", section.options[key], f"one {key}= per section",
                            code="duplicate-key", reason="Darknet silently reads the first one")
    for key in section.options:
        if key not in allowed:
            raise DarkspecError(
                f"{section.where(index, key)} key", key, ", ".join(sorted(allowed)), code="unknown-key",
                reason="Darknet only warns about unused keys; darkspec refuses them so a typo cannot pass silently",
            )


def int_option(section: Section, index: int | None, key: str, default: int) -> int:
    """An integer option. A ``#`` after the digits starts a comment (Darknet's atoi stops there too; real cfgs
    write ``filters=40#32``)."""
    value = section.options.get(key)
    if value is None:
        return default
    match = re.fullmatch(r"([+-]?\d+)(#.*)?", value)
    if not match:
        raise DarkspecError(f"{section.where(index, key)} {key}", value, "an integer", code="not-an-integer")
    return _integer(match.group(1), f"{section.where(index, key)} {key}", "not-an-integer")


def _integer(digits: str, setting: str, code: str) -> int:
    """int(digits), refused where Python will not convert that many digits (a value no Darknet int holds)."""
    try:
        return int(digits)
    except ValueError:
        raise DarkspecError(setting, f"{digits[:12]}... ({len(digits)} digits)", "an integer of at most "
                            f"{sys.get_int_max_str_digits()} digits", code=code) from None


def positive_option(section: Section, index: int, key: str, default: int) -> int:
    """An integer option that must be at least 1 (a stride, a size, a group count)."""
    value = int_option(section, index, key, default)
    if value < 1:
        raise DarkspecError(f"{section.where(index, key)} {key}", value, "an integer >= 1", code="not-positive")
    return value


def float_option(section: Section, index: int, key: str, default: float) -> float:
    value = section.options.get(key)
    if value is None:
        return default
    if not re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?", value):
        raise DarkspecError(f"{section.where(index, key)} {key}", value, "a decimal number", code="not-a-number")
    return float(value)


def layer_indices(section: Section, index: int, key: str, *, missing_reason: str = "") -> tuple[int, ...]:
    """A comma-separated list of layers (``from=``, ``layers=``) as absolute indices: negative entries count back
    from this layer (-1 is the previous layer), others are absolute. Each must name an earlier layer."""
    where = section.where(index, key)
    text = section.options.get(key)
    if text is None:
        raise DarkspecError(f"{where} {key}", None, "a comma-separated list of layer indices",
                            code=f"{key}-missing", reason=missing_reason)
    resolved = []
    for entry in text.split(","):
        if entry == "":
            raise DarkspecError(f"{where} {key}", text, "layer indices without empty entries",
                                code="from-empty-entry",
                                reason="Darknet reads an empty entry (a trailing comma) as absolute layer 0")
        if not re.fullmatch(r"[+-]?\d+", entry):
            raise DarkspecError(f"{where} {key}", entry, "an integer layer index", code="from-not-integer")
        value = _integer(entry, f"{where} {key}", "from-not-integer")
        absolute = index + value if value < 0 else value
        if index == 0:
            raise DarkspecError(f"{where} {key}", entry, "an earlier layer, and none exists: this is the first "
                                "layer", code="from-out-of-range")
        if not 0 <= absolute < index:
            raise DarkspecError(
                f"{where} {key}", entry, f"an earlier layer: -1..-{index} or 0..{index - 1}",
                code="from-out-of-range", reason=f"it resolves to layer {absolute}",
            )
        resolved.append(absolute)
    return tuple(resolved)


def resolve_from(section: Section, index: int, library: str) -> tuple[int, ...]:
    """The ``from=`` list of a [shortcut] (pjreddie's takes exactly one layer)."""
    text = section.options.get("from", "")
    if library == "pjreddie" and "," in text:
        raise DarkspecError(f"{section.where(index, 'from')} from", text,
                            "a single layer index in the pjreddie dialect", code="pjreddie-single-from",
                            reason="pjreddie's parser silently reads only the first index")
    return layer_indices(section, index, "from", missing_reason="Darknet crashes on a [shortcut] without from=")


def parse_shortcut(section: Section, index: int, library: str = "alexeyab") -> ShortcutSection:
    """Typed parameters of one ``[shortcut]`` section that is layer ``index`` of its network."""
    if library not in LIBRARIES:
        raise DarkspecError("library", library, ", ".join(LIBRARIES), code="unknown-library")
    check_keys(section, index, SHORTCUT_KEYS[library])
    from_layers = resolve_from(section, index, library)
    activation = section.options.get("activation", "linear")
    activations.check_name(activation, library)
    if library == "pjreddie":
        params = ShortcutParams(activation=activation, alpha=float_option(section, index, "alpha", 1.0),
                                beta=float_option(section, index, "beta", 1.0))
        return ShortcutSection(index, from_layers, params)

    deviations = []
    weights_type_text = section.options.get("weights_type", "none")
    if weights_type_text not in WEIGHTS_TYPE_ALIASES:
        raise DarkspecError(f"{section.where(index, 'weights_type')} weights_type", weights_type_text,
                            ", ".join(WEIGHTS_TYPE_ALIASES),
                            code="unknown-weights-type")
    weights_type = WeightsType(WEIGHTS_TYPE_ALIASES[weights_type_text])

    if "weights_normalization" in section.options and "weights_normalizion" in section.options:
        raise DarkspecError(f"{section.where(index, 'weights_normalizion')} weights_normalizion",
                            section.options["weights_normalizion"],
                            "either weights_normalization or its 2020 spelling weights_normalizion, not both",
                            code="duplicate-key")
    key = "weights_normalizion" if "weights_normalizion" in section.options else "weights_normalization"
    normalization_text = section.options.get(key, "none")
    if normalization_text not in NORMALIZATION_ALIASES:
        raise DarkspecError(f"{section.where(index, key)} {key}", normalization_text, ", ".join(NORMALIZATION_ALIASES),
                            code="unknown-weights-normalization")
    normalization = Normalization(NORMALIZATION_ALIASES[normalization_text])
    if weights_type != WeightsType.NONE:
        if key == "weights_normalizion":
            deviations.append("normalization-2020-key")
        elif normalization == Normalization.NONE:
            deviations.append("normalization-none-with-weights")
    params = ShortcutParams(weights_type=weights_type, weights_normalization=normalization, activation=activation)
    return ShortcutSection(index, from_layers, params, tuple(deviations))
