"""Dataset adapters: tabular labels -> canonical attributes -> captions, and interventions -> edit prompts."""

from __future__ import annotations

import math
import numbers
import re
import string
import sys
from abc import ABC, abstractmethod
from bisect import bisect_right
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from itertools import pairwise
from typing import Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
    model_validator,
)

__all__ = [
    "CHEXPERT_LABELS",
    "AdapterConfig",
    "CaptionAdapter",
    "CheXpertAdapter",
    "CheXpertSettings",
    "Intervention",
    "IsicAdapter",
    "IsicSettings",
    "LabelColumn",
    "MimicAdapter",
    "MimicSettings",
    "RowRejected",
    "TemplateAdapter",
    "TemplateSettings",
    "check_interventions",
    "check_selector",
    "do",
    "edit_words",
    "get_adapter",
    "is_relative",
    "parse_intervention",
    "parse_interventions",
]

# The 14 CheXpert observations in the order of the CheXpert CSV (and of the PRISM code listing);
# captions list findings in this order, so it is part of the contract.
CHEXPERT_LABELS: tuple[str, ...] = (
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
)
NO_FINDING = "No Finding"

AttributeValue = bool | int | str
Attributes = dict[str, AttributeValue]


class RowRejected(ValueError):
    """A manifest row that cannot be captioned under the configured policy (goes to the errors table)."""

    def __init__(self, column: str, reason: str):
        self.column = column
        self.reason = reason
        super().__init__(f"column {column!r}: {reason}")


# --------------------------------------------------------------------------------------------
# Cell parsing. Rows come from pyarrow (None), pandas (NaN, pd.NA, numpy scalars) or CSV text
# (""), so every reader goes through these helpers instead of trusting Python types.
# --------------------------------------------------------------------------------------------


def _is_blank(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, str):
        return value.strip() == ""
    if isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral):
        return math.isnan(float(value))
    # pd.NA is neither None nor NaN; compare by identity only if pandas is already loaded,
    # so this module never imports pandas itself.
    pandas = sys.modules.get("pandas")
    return pandas is not None and value is getattr(pandas, "NA", None)


def _cell(row: Mapping[str, Any], column: str) -> Any:
    # A missing column is a manifest schema error, not a per-row problem: plain ValueError.
    if column not in row:
        raise ValueError(f"row has no column {column!r}")
    return row[column]


# Blank spellings of numeric and boolean cells: pyarrow's CSV reader turns these into nulls, and a
# string column (one odd cell makes pyarrow read every cell as text) must read them the same way.
_BLANK_TEXT = frozenset({"", "na", "n/a", "nan", "null", "#n/a"})
_TRUE_TEXT = frozenset({"1", "1.0", "true"})
_FALSE_TEXT = frozenset({"0", "0.0", "false"})


def _is_blank_label(value: Any) -> bool:
    return _is_blank(value) or (isinstance(value, str) and value.strip().lower() in _BLANK_TEXT)


def _not_allowed(value: Any, allowed: str) -> ValueError:
    return ValueError(f"value {str(value)!r} not in {allowed}")


FINDING_VALUES = "{1, 0, -1, blank}"
FLAG_VALUES = "{true, false, 1, 0, blank}"
COUNT_VALUES = "{0, 1, 2, ..., blank}"


def _finding_code(value: Any) -> float | None:
    """CheXpert-style cell -> 1.0, 0.0, -1.0, or None for blank; anything else is a bad value.

    Booleans are rejected: a `True` cell is not one of the dataset's codes (it would hide -1).
    """
    if _is_blank_label(value):
        return None
    number: float | None = None
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            number = None
    if number in (1.0, 0.0, -1.0):
        return number
    raise _not_allowed(value, FINDING_VALUES)


def _flag_value(value: Any) -> bool | None:
    """Boolean-column cell (ISIC artifacts) -> bool, or None for blank."""
    if _is_blank_label(value):
        return None
    if isinstance(value, bool):
        return value
    if isinstance(value, numbers.Real) and float(value) in (0.0, 1.0):
        return bool(value)
    if isinstance(value, str):
        text = value.strip().lower()
        if text in _TRUE_TEXT:
            return True
        if text in _FALSE_TEXT:
            return False
    raise _not_allowed(value, FLAG_VALUES)


def _count_value(value: Any) -> int | None:
    """Non-negative integer cell (an age) -> int, or None for blank; 63.0 is 63, 63.5 is an error."""
    if _is_blank_label(value):
        return None
    number: int | None = None
    if isinstance(value, numbers.Real) and not isinstance(value, bool) and float(value).is_integer():
        number = int(value)
    elif isinstance(value, str):
        text = value.strip()
        if re.fullmatch(r"[+-]?\d+", text):
            number = int(text)
        elif re.fullmatch(r"[+-]?\d+\.0*", text):
            number = int(float(text))
    if number is None or number < 0:
        raise _not_allowed(value, COUNT_VALUES)
    return number


def _text_value(value: Any, values: tuple[str, ...] | None) -> str | None:
    """Text cell -> stripped text (one of `values` when given), or None for blank; integer codes read as text."""
    if _is_blank(value):
        return None
    if isinstance(value, numbers.Real) and not isinstance(value, bool) and float(value).is_integer():
        text = str(int(value))
    else:
        text = str(value).strip()
    if values is not None and text not in values:
        raise _not_allowed(value, _value_set(values))
    return text


def _value_set(values: Iterable[str]) -> str:
    return "{" + ", ".join([repr(v) for v in values] + ["blank"]) + "}"


LabelKind = Literal["finding", "flag", "count", "text", "scalar"]


@dataclass(frozen=True)
class LabelColumn:
    """One manifest column an adapter reads and the cells it accepts: the manifest's label schema.

    kind "finding": 1, 0, -1 or blank -> float64 (blank = null), CheXpert's codes;
    "flag": true/false/1/0 or blank -> bool; "count": a non-negative integer or blank -> int64;
    "text": text (one of `values` when given) or blank -> string; "scalar": a number or text,
    kept as read (template placeholders). Blank cells are valid here; the adapter's policy
    decides what a blank means.
    """

    name: str
    kind: LabelKind
    values: tuple[str, ...] | None = None  # "text" only: the allowed cell values

    @property
    def allowed(self) -> str:
        """The accepted cells in words, e.g. "{1, 0, -1, blank}" (for error messages)."""
        if self.kind == "finding":
            return FINDING_VALUES
        if self.kind == "flag":
            return FLAG_VALUES
        if self.kind == "count":
            return COUNT_VALUES
        if self.kind == "text" and self.values is not None:
            return _value_set(self.values)
        return "{any value}"

    def parse(self, value: Any) -> Any:
        """One cell -> its canonical Python value (None for blank); ValueError "value 'yes' not in {...}"."""
        if self.kind == "finding":
            return _finding_code(value)
        if self.kind == "flag":
            return _flag_value(value)
        if self.kind == "count":
            return _count_value(value)
        if self.kind == "text":
            return _text_value(value, self.values)
        return None if _is_blank(value) else value


def _as_int(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError(f"expected an integer, got {value!r}")
    if isinstance(value, numbers.Integral):
        return int(value)
    # pandas turns an int column with blanks into float; 63.0 is fine, 63.5 is not an age.
    if isinstance(value, numbers.Real) and float(value).is_integer():
        return int(value)
    if isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d+\s*", value):
        return int(value)
    raise ValueError(f"expected an integer, got {value!r}")


def _as_text(value: Any) -> str:
    # Integers are accepted because the compact form "race=1" parses "1" as an int.
    if isinstance(value, bool):
        raise ValueError(f"expected text, got {value!r}")
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, str) and value.strip():
        return value.strip()
    raise ValueError(f"expected non-empty text, got {value!r}")


def _as_scalar(value: Any) -> int | str:
    """Template placeholder value: integers stay ints (so 63.0 renders "63"), other values become text."""
    if isinstance(value, bool):
        raise ValueError(f"expected a number or text, got {value!r}")
    if isinstance(value, numbers.Real) and float(value).is_integer():
        return int(value)
    if isinstance(value, numbers.Real):
        return str(float(value))
    return _as_text(value)


def _as_finding(value: Any) -> bool:
    """Intervention/attribute value for a finding: bool, or the 1/0 that "Support Devices=0" parses to."""
    if isinstance(value, bool):
        return value
    if isinstance(value, numbers.Integral) and int(value) in (0, 1):
        return bool(value)
    raise ValueError(f"expected true/false or 1/0, got {value!r}")


_COERCE = {"bool": _as_finding, "int": _as_int, "str": _as_text, "scalar": _as_scalar}
AttributeKind = Literal["bool", "int", "str", "scalar"]


# --------------------------------------------------------------------------------------------
# Interventions: do(attribute = value). Edits are data; the adapter renders them.
# --------------------------------------------------------------------------------------------


class Intervention(BaseModel):
    """do(attribute = value) on a canonical attribute, e.g. do("Support Devices", False)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    attribute: StrictStr
    # Strict types: pydantic would otherwise coerce 0 -> False or "80" -> 80 before the adapter,
    # which knows the attribute's type, gets to decide.
    value: StrictBool | StrictInt | StrictStr

    @field_validator("attribute")
    @classmethod
    def _check_attribute(cls, attribute: str) -> str:
        attribute = attribute.strip()
        if not attribute or "=" in attribute or ";" in attribute:
            raise ValueError(f"attribute must be a non-empty name without '=' or ';', got {attribute!r}")
        return attribute

    @field_validator("value")
    @classmethod
    def _check_value(cls, value: AttributeValue) -> AttributeValue:
        # Keeps str(intervention) parseable back into the same intervention.
        if isinstance(value, str) and (not value.strip() or "=" in value or ";" in value):
            raise ValueError(f"value must be non-empty text without '=' or ';', got {value!r}")
        return value.strip() if isinstance(value, str) else value

    def __str__(self) -> str:
        """Compact form, e.g. "Support Devices=false", "age=80"; round-trips through parse_intervention."""
        value = str(self.value).lower() if isinstance(self.value, bool) else str(self.value)
        return f"{self.attribute}={value}"


def do(attribute: str, value: AttributeValue) -> Intervention:
    """do(attribute = value), in the notation of the causal-inference literature."""
    return Intervention(attribute=attribute, value=value)


def parse_intervention(text: str) -> Intervention:
    """Parse the compact form used in YAML/CLI: "Support Devices=0", "age=80", "sex=male".

    Values: true/false (any case) -> bool, integers -> int, anything else -> text. The adapter
    then checks the value against the attribute (a finding accepts 0/1/true/false).
    """
    if not isinstance(text, str):
        raise ValueError(f"intervention must be a string like 'age=80', got {text!r}")
    attribute, sep, raw = text.partition("=")
    attribute, raw = attribute.strip(), raw.strip()
    if not sep:
        raise ValueError(f"intervention {text!r} has no '=': expected 'attribute=value'")
    if not attribute:
        raise ValueError(f"intervention {text!r} has no attribute name before '='")
    if not raw:
        raise ValueError(f"intervention {text!r} has no value after '='")
    if "=" in raw:
        raise ValueError(f"intervention {text!r} has more than one '='")
    value: AttributeValue
    if raw.lower() in ("true", "false"):
        value = raw.lower() == "true"
    elif re.fullmatch(r"\d+", raw):
        value = int(raw)
    else:
        # "+20" / "-10" (a signed offset) and "flip" stay text: they are relative to the row and
        # only the adapter, which knows the attribute's kind and values, can apply them.
        value = raw
    return Intervention(attribute=attribute, value=value)


RELATIVE_OFFSET = re.compile(r"[+-]\d+")
FLIP = "flip"


def is_relative(intervention: Intervention) -> bool:
    """True for do(age=+20)-style offsets and do(sex=flip): the new value depends on the row."""
    value = intervention.value
    return isinstance(value, str) and (value.lower() == FLIP or RELATIVE_OFFSET.fullmatch(value) is not None)


def parse_interventions(spec: str | Intervention | Iterable[str | Intervention]) -> list[Intervention]:
    """A list of interventions from "a=1; b=x", one compact string, an Intervention, or a list of either."""
    if isinstance(spec, Intervention):
        return [spec]
    if isinstance(spec, str):
        # ';' rather than ',' separates because ', ' is how captions join findings.
        return [parse_intervention(part) for part in spec.split(";") if part.strip()]
    if not isinstance(spec, Iterable):
        raise ValueError(f"interventions must be a string or a list, got {spec!r}")
    return [item if isinstance(item, Intervention) else parse_intervention(item) for item in spec]


_PUNCTUATION = ",.;:!?"


def edit_words(source_caption: str, edited_caption: str) -> list[str]:
    """Words of `edited_caption` whose meaning is not in `source_caption`, in order, without repeats.

    Words are compared without surrounding punctuation, so list separators do not count as edits:
    removing the last finding turns "Cardiomegaly," into "Cardiomegaly", which is not a new word
    (reweighting it x2 would exaggerate a finding the edit keeps). Each returned word is the exact
    split(" ") string of `edited_caption`, punctuation included, because prompt-to-prompt locates
    blend/reweight words in a prompt by that split. For a pure removal the list can be empty; call
    edit_words(edited, source) for the words that went away.
    """
    source_words = {word.strip(_PUNCTUATION) for word in source_caption.split(" ")}
    words: list[str] = []
    for word in edited_caption.split(" "):
        # '' comes from double spaces; it is not a word.
        if word and word.strip(_PUNCTUATION) not in source_words and word not in words:
            words.append(word)
    return words


# --------------------------------------------------------------------------------------------
# Settings (pydantic, extra="forbid", so job configs can embed them and typos fail on load)
# --------------------------------------------------------------------------------------------


class _Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _FindingSettings(_Settings):
    labels: tuple[str, ...] = CHEXPERT_LABELS
    # PRISM treats uncertain (-1) and blank as absent; "drop" rejects the row instead.
    uncertain: Literal["absent", "present", "drop"] = "absent"
    blank: Literal["absent", "drop"] = "absent"
    # "normal_caption": No Finding is never listed; no other positive -> the normal text.
    # "as_label": paper-literal, No Finding=1 is listed like any finding.
    no_finding: Literal["normal_caption", "as_label"] = "normal_caption"
    separator: str = ", "

    @field_validator("labels")
    @classmethod
    def _check_labels(cls, labels: tuple[str, ...]) -> tuple[str, ...]:
        if not labels:
            raise ValueError("labels must name at least one finding column")
        if len(set(labels)) != len(labels):
            raise ValueError(f"labels has duplicates: {list(labels)}")
        return labels


class CheXpertSettings(_FindingSettings):
    prefix: str = "Chest X-ray showing "
    normal_text: str = "Normal chest X-ray with no significant findings"


class MimicSettings(_FindingSettings):
    age_column: str = "age"
    race_column: str | None = Field(
        "race", description="None: the dataset has no race column (not captioned)"
    )
    sex_column: str = "sex"
    # Codes -> words; values not in a map are kept as given ("white", "Black", ...).
    sex_map: dict[str, str] = Field(default_factory=lambda: {"M": "male", "F": "female"})
    race_map: dict[str, str] = Field(default_factory=dict)
    # Cell values the sex/race columns may hold; other values reject the row. None: the codes and
    # words of the map (sex: M, F, male, female), or any text when the map is empty (race).
    sex_values: tuple[str, ...] | None = None
    race_values: tuple[str, ...] | None = None
    # Bin edges, e.g. [20, 40, 60, 80]: age is replaced by the lower edge of its bin
    # ([20, 40) -> 20, ..., >= 80 -> 80); ages below the first edge reject the row.
    # None keeps the integer age.
    age_bins: tuple[int, ...] | None = None
    no_findings_text: str = "no findings"

    @field_validator("age_bins")
    @classmethod
    def _check_bins(cls, bins: tuple[int, ...] | None) -> tuple[int, ...] | None:
        if bins is None:
            return None
        if not bins or any(b < 0 for b in bins) or any(a >= b for a, b in pairwise(bins)):
            raise ValueError(f"age_bins must be non-negative and strictly increasing, got {list(bins)}")
        return bins

    @model_validator(mode="after")
    def _check_names(self) -> MimicSettings:
        clash = {"age", "race", "sex"} & set(self.labels)
        if clash:
            raise ValueError(f"labels clash with demographic attributes: {sorted(clash)}")
        return self


class IsicSettings(_Settings):
    disease_column: str = "diagnosis"
    # Diagnosis code -> caption text; codes outside the map reject the row.
    disease_map: dict[str, str] = Field(default_factory=lambda: {"MEL": "melanoma", "NV": "nevus"})
    # Artifact text (attribute name, as written in the caption) -> boolean column; caption order.
    artifacts: dict[str, str] = Field(
        default_factory=lambda: {"hair": "hair", "gel bubbles": "gel_bubble", "ruler": "ruler", "ink": "ink"}
    )
    blank: Literal["absent", "drop"] = "absent"
    separator: str = ", "

    @model_validator(mode="after")
    def _check_maps(self) -> IsicSettings:
        if not self.disease_map:
            raise ValueError("disease_map must map at least one diagnosis code")
        if "disease" in self.artifacts:
            raise ValueError("artifacts cannot be named 'disease' (that is the diagnosis attribute)")
        return self


class TemplateSettings(_Settings):
    # e.g. "Chest X-ray of a {sex} patient showing {findings}"; other placeholders are scalar
    # attributes read from the column of the same name unless `columns` says otherwise.
    template: str
    findings: tuple[str, ...] = ()
    columns: dict[str, str] = Field(default_factory=dict)
    value_maps: dict[str, dict[str, str]] = Field(default_factory=dict)
    no_findings: str = "no findings"
    separator: str = ", "
    uncertain: Literal["absent", "present", "drop"] = "absent"
    blank: Literal["absent", "drop"] = "absent"

    @model_validator(mode="after")
    def _check_template(self) -> TemplateSettings:
        fields = _template_fields(self.template)
        has_findings = "findings" in fields
        if has_findings and not self.findings:
            raise ValueError("findings: the template uses {findings} but no finding columns are listed")
        if self.findings and not has_findings:
            raise ValueError("template: finding columns are listed but the template has no {findings}")
        scalars = [f for f in fields if f != "findings"]
        for name in list(self.columns) + list(self.value_maps):
            if name not in scalars:
                raise ValueError(f"columns/value_maps: {name!r} is not a placeholder of the template")
        clash = set(scalars) & set(self.findings)
        if clash:
            raise ValueError(f"findings: {sorted(clash)} are also scalar placeholders")
        return self


def _template_fields(template: str) -> list[str]:
    """Placeholder names in order, without repeats; only plain {name} fields are allowed."""
    names: list[str] = []
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as err:
        raise ValueError(f"template is not a valid format string: {err}") from None
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        # Positional or computed fields would make the template depend on call order or
        # Python objects; attributes are a flat name -> value mapping.
        if not name.strip() or name.isdigit() or "." in name or "[" in name or spec or conversion:
            raise ValueError(f"template: placeholder {{{name}}} must be a plain {{name}}")
        if name not in names:
            names.append(name)
    return names


# --------------------------------------------------------------------------------------------
# Adapters
# --------------------------------------------------------------------------------------------


class CaptionAdapter(ABC):
    """Row (column -> value) -> canonical attributes -> caption; interventions act on attributes.

    Subclasses define `Settings`, `label_schema`, `attribute_kinds`, `attributes(row)` and
    `_render(attrs)`; everything else (validation, interventions) is shared so that a caption
    and its edit always go through the same template.
    """

    name: ClassVar[str]
    Settings: ClassVar[type[_Settings]]

    def __init__(self, settings: _Settings | Mapping[str, Any] | None = None, **options: Any):
        if settings is not None and options:
            raise ValueError("pass either a settings object or keyword options, not both")
        if settings is None:
            settings = self.Settings(**options)
        elif not isinstance(settings, self.Settings):
            settings = self.Settings.model_validate(settings)
        self.settings = settings

    @property
    @abstractmethod
    def label_schema(self) -> tuple[LabelColumn, ...]:
        """Manifest columns this adapter reads and the cells each accepts (see LabelColumn)."""

    @property
    def label_columns(self) -> tuple[str, ...]:
        """Manifest columns this adapter reads (check them against a manifest's schema up front)."""
        return tuple(column.name for column in self.label_schema)

    def known_attributes(self) -> tuple[str, ...]:
        """Canonical attribute names an intervention may name, in caption order."""
        return tuple(self.attribute_kinds)

    def _unknown_attribute(self, name: str) -> ValueError:
        known = ", ".join(self.known_attributes())
        return ValueError(f"unknown attribute {name!r} for adapter {self.name!r} (known: {known})")

    @property
    @abstractmethod
    def attribute_kinds(self) -> dict[str, AttributeKind]:
        """Canonical attribute name -> kind ("bool", "int", "str" or "scalar" = int or text), in order."""

    @abstractmethod
    def attributes(self, row: Mapping[str, Any]) -> Attributes:
        """Canonical attributes of a manifest row; raises RowRejected for rows the policy drops."""

    @abstractmethod
    def _render(self, attrs: Attributes) -> str:
        """Caption from already-validated canonical attributes."""

    def _canonical(self, attribute: str, value: Any) -> AttributeValue:
        """Type-check one attribute value; subclasses add value maps and binning."""
        return _COERCE[self.attribute_kinds[attribute]](value)

    def caption(self, row: Mapping[str, Any]) -> str:
        """Caption of a manifest row."""
        return self._render(self.attributes(row))

    def render(self, attrs: Mapping[str, Any]) -> str:
        """Caption of canonical attributes (e.g. as stored in an output manifest)."""
        kinds = self.attribute_kinds
        for name in attrs:
            if name not in kinds:
                raise self._unknown_attribute(name)
        canonical: Attributes = {}
        for name in kinds:
            if name not in attrs:
                raise ValueError(f"attributes are missing {name!r}")
            try:
                canonical[name] = self._canonical(name, attrs[name])
            except ValueError as err:
                raise ValueError(f"attribute {name!r}: {err}") from None
        return self._render(canonical)

    def flip_values(self, attribute: str) -> tuple[AttributeValue, AttributeValue] | None:
        """The two values do(attribute=flip) swaps; None when the attribute is not binary."""
        return (False, True) if self.attribute_kinds.get(attribute) == "bool" else None

    def _shift(self, attribute: str, current: AttributeValue, offset: int) -> AttributeValue:
        """do(attribute=+k): the current value moved by `offset` (int attributes only)."""
        if (
            self.attribute_kinds[attribute] != "int"
            or isinstance(current, bool)
            or not isinstance(current, int)
        ):
            raise ValueError(f"a signed offset ({offset:+d}) needs an integer attribute")
        return current + offset

    def _check_relative(self, attribute: str, value: str) -> None:
        if value.lower() == FLIP and self.flip_values(attribute) is None:
            raise ValueError("'flip' needs an attribute with exactly two values")
        if value.lower() != FLIP and self.attribute_kinds[attribute] != "int":
            raise ValueError(f"a signed offset ({value}) needs an integer attribute")

    def _relative(self, attribute: str, current: AttributeValue, value: str) -> AttributeValue:
        if value.lower() == FLIP:
            pair = self.flip_values(attribute)
            if pair is None:
                raise ValueError("'flip' needs an attribute with exactly two values")
            if current not in pair:
                raise ValueError(f"'flip' of {current!r}: expected one of {list(pair)}")
            return pair[1] if current == pair[0] else pair[0]
        return self._shift(attribute, current, int(value))

    def intervene(self, attrs: Mapping[str, Any], interventions: Any) -> Attributes:
        """Attributes after do(...) interventions (Intervention objects or compact strings).

        Relative values act on the row's own value: `sex=flip` swaps a binary attribute,
        `age=+20` moves an integer one (through the adapter's binning, if any).
        """
        kinds = self.attribute_kinds
        edited = dict(attrs)
        seen: set[str] = set()
        for intervention in parse_interventions(interventions):
            name = intervention.attribute
            if name not in kinds:
                raise self._unknown_attribute(name)
            # Two values for one attribute in one edit would silently depend on list order.
            if name in seen:
                raise ValueError(f"attribute {name!r} is intervened on more than once")
            seen.add(name)
            try:
                value = intervention.value
                if is_relative(intervention):
                    self._check_relative(name, str(value))
                    if name not in edited:  # checking a config: no row to act on yet
                        continue
                    value = self._relative(name, edited[name], str(value))
                edited[name] = self._canonical(name, value)
            except ValueError as err:
                raise ValueError(f"attribute {name!r}: {err}") from None
        return edited

    def edit_caption(self, row: Mapping[str, Any], interventions: Any) -> str:
        """Edit prompt: the row's attributes with the interventions applied, through the same template."""
        return self.render(self.intervene(self.attributes(row), interventions))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.settings!r})"


def _read_findings(
    row: Mapping[str, Any], labels: Iterable[str], uncertain: str, blank: str
) -> dict[str, bool]:
    """1/0/-1/blank finding columns -> present/absent under the uncertain and blank policies."""
    findings: dict[str, bool] = {}
    for column in labels:
        value = _cell(row, column)
        try:
            code = _finding_code(value)
        except ValueError as err:
            raise RowRejected(column, str(err)) from None
        if code is None:
            if blank == "drop":
                raise RowRejected(column, "blank label and blank='drop'")
            findings[column] = False
        elif code == -1.0:
            if uncertain == "drop":
                raise RowRejected(column, "uncertain (-1) label and uncertain='drop'")
            findings[column] = uncertain == "present"
        else:
            findings[column] = code == 1.0
    return findings


def _listed_findings(attrs: Mapping[str, Any], labels: Iterable[str], no_finding: str) -> list[str]:
    # In the paper's listing No Finding is just another label; "normal_caption" keeps it out of
    # the list so an otherwise empty row falls through to the normal caption.
    return [
        label
        for label in labels
        if attrs[label] and not (label == NO_FINDING and no_finding == "normal_caption")
    ]


def _allowed_codes(values: tuple[str, ...] | None, code_map: Mapping[str, str]) -> tuple[str, ...] | None:
    """Cell values a mapped text column accepts: `values` if given, else the map's codes and words."""
    if values is not None:
        return values
    return tuple(dict.fromkeys([*code_map, *code_map.values()])) or None


def _mapped_code(text: str, values: tuple[str, ...] | None, code_map: Mapping[str, str]) -> str:
    # The map's words are accepted too, so do(sex=male) reads like do(sex=M).
    allowed = _allowed_codes(values, code_map)
    if allowed is not None and text not in allowed and text not in code_map.values():
        raise _not_allowed(text, _value_set(allowed))
    return code_map.get(text, text)


class CheXpertAdapter(CaptionAdapter):
    """CheXpert: "Chest X-ray showing A, B" or the normal caption (PRISM, MIDL 2025, code listing)."""

    name = "chexpert"
    Settings = CheXpertSettings
    settings: CheXpertSettings

    @property
    def label_schema(self) -> tuple[LabelColumn, ...]:
        return tuple(LabelColumn(label, "finding") for label in self.settings.labels)

    @property
    def attribute_kinds(self) -> dict[str, AttributeKind]:
        return {label: "bool" for label in self.settings.labels}

    def attributes(self, row: Mapping[str, Any]) -> Attributes:
        s = self.settings
        return dict(_read_findings(row, s.labels, s.uncertain, s.blank))

    def _render(self, attrs: Attributes) -> str:
        s = self.settings
        findings = _listed_findings(attrs, s.labels, s.no_finding)
        return s.prefix + s.separator.join(findings) if findings else s.normal_text


class MimicAdapter(CaptionAdapter):
    """MIMIC-CXR: "Chest X-ray of [age]-years old [race] [sex] subject with [findings]"."""

    name = "mimic"
    Settings = MimicSettings
    settings: MimicSettings

    @property
    def label_schema(self) -> tuple[LabelColumn, ...]:
        s = self.settings
        race = (
            ()
            if s.race_column is None
            else (LabelColumn(s.race_column, "text", _allowed_codes(s.race_values, s.race_map)),)
        )
        return (
            LabelColumn(s.age_column, "count"),
            *race,
            LabelColumn(s.sex_column, "text", _allowed_codes(s.sex_values, s.sex_map)),
            *(LabelColumn(label, "finding") for label in s.labels),
        )

    @property
    def attribute_kinds(self) -> dict[str, AttributeKind]:
        kinds: dict[str, AttributeKind] = {"age": "int", "race": "str", "sex": "str"}
        if self.settings.race_column is None:
            del kinds["race"]
        kinds.update({label: "bool" for label in self.settings.labels})
        return kinds

    def flip_values(self, attribute: str) -> tuple[AttributeValue, AttributeValue] | None:
        if attribute == "sex":
            words = tuple(dict.fromkeys(self.settings.sex_map.values()))
            return (words[0], words[1]) if len(words) == 2 else None
        return super().flip_values(attribute)

    def _shift(self, attribute: str, current: AttributeValue, offset: int) -> AttributeValue:
        bins = self.settings.age_bins
        if attribute != "age" or bins is None:
            return super()._shift(attribute, current, offset)
        # A binned age is its bin's lower edge; move the bin's middle, so +20 with 20-year bins
        # is the next bin. The open last bin has no middle: its edge moves.
        index = bins.index(int(current))
        middle = (bins[index] + bins[index + 1]) / 2 if index + 1 < len(bins) else bins[index]
        return max(int(middle + offset), bins[0])

    def _canonical(self, attribute: str, value: Any) -> AttributeValue:
        s = self.settings
        if attribute == "age":
            return self._bin_age(_as_int(value))
        if attribute == "sex":
            return _mapped_code(_as_text(value), s.sex_values, s.sex_map)
        if attribute == "race":
            return _mapped_code(_as_text(value), s.race_values, s.race_map)
        return super()._canonical(attribute, value)

    def _bin_age(self, age: int) -> int:
        if age < 0:
            raise ValueError(f"age must be non-negative, got {age}")
        bins = self.settings.age_bins
        if bins is None:
            return age
        index = bisect_right(bins, age) - 1
        if index < 0:
            raise ValueError(f"age {age} is below the first age bin edge {bins[0]}")
        # The lower edge keeps age an int, so do(age=80) and binned rows compare directly.
        return bins[index]

    def attributes(self, row: Mapping[str, Any]) -> Attributes:
        s = self.settings
        attrs: Attributes = {}
        # Demographics have no "absent" meaning: a blank age/race/sex always rejects the row.
        for attribute, column in (("age", s.age_column), ("race", s.race_column), ("sex", s.sex_column)):
            if column is None:
                continue
            value = _cell(row, column)
            if _is_blank(value):
                raise RowRejected(column, f"blank {attribute}")
            try:
                attrs[attribute] = self._canonical(attribute, value)
            except ValueError as err:
                raise RowRejected(column, str(err)) from None
        attrs.update(_read_findings(row, s.labels, s.uncertain, s.blank))
        return attrs

    def _render(self, attrs: Attributes) -> str:
        s = self.settings
        findings = _listed_findings(attrs, s.labels, s.no_finding)
        text = s.separator.join(findings) if findings else s.no_findings_text
        who = f"{attrs['race']} {attrs['sex']}" if "race" in attrs else str(attrs["sex"])
        return f"Chest X-ray of {attrs['age']}-years old {who} subject with {text}"


class IsicAdapter(CaptionAdapter):
    """ISIC: "a dermoscopic image with [disease] showing [artifacts]" (no artifacts: no "showing ...")."""

    name = "isic"
    Settings = IsicSettings
    settings: IsicSettings

    @property
    def label_schema(self) -> tuple[LabelColumn, ...]:
        s = self.settings
        codes = tuple(dict.fromkeys([*s.disease_map, *s.disease_map.values()]))
        return (
            LabelColumn(s.disease_column, "text", codes),
            *(LabelColumn(column, "flag") for column in s.artifacts.values()),
        )

    @property
    def attribute_kinds(self) -> dict[str, AttributeKind]:
        kinds: dict[str, AttributeKind] = {"disease": "str"}
        kinds.update({artifact: "bool" for artifact in self.settings.artifacts})
        return kinds

    def _canonical(self, attribute: str, value: Any) -> AttributeValue:
        if attribute != "disease":
            return super()._canonical(attribute, value)
        disease_map = self.settings.disease_map
        text = _as_text(value)
        # Accept the code ("MEL") or its caption text ("melanoma"), so do(disease=...) reads either way.
        if text in disease_map:
            return disease_map[text]
        if text in disease_map.values():
            return text
        raise ValueError(f"unknown diagnosis {text!r}; known: {list(disease_map)}")

    def attributes(self, row: Mapping[str, Any]) -> Attributes:
        s = self.settings
        value = _cell(row, s.disease_column)
        if _is_blank(value):
            raise RowRejected(s.disease_column, "blank diagnosis")
        try:
            attrs: Attributes = {"disease": self._canonical("disease", value)}
        except ValueError as err:
            raise RowRejected(s.disease_column, str(err)) from None
        for artifact, column in s.artifacts.items():
            try:
                flag = _flag_value(_cell(row, column))
            except ValueError as err:
                raise RowRejected(column, str(err)) from None
            if flag is None:
                if s.blank == "drop":
                    raise RowRejected(column, "blank artifact flag and blank='drop'")
                flag = False
            attrs[artifact] = flag
        return attrs

    def _render(self, attrs: Attributes) -> str:
        s = self.settings
        artifacts = [artifact for artifact in s.artifacts if attrs[artifact]]
        caption = f"a dermoscopic image with {attrs['disease']}"
        return f"{caption} showing {s.separator.join(artifacts)}" if artifacts else caption


class TemplateAdapter(CaptionAdapter):
    """User format string: {findings} from boolean finding columns, other {name}s from scalar columns."""

    name = "template"
    Settings = TemplateSettings
    settings: TemplateSettings

    def __init__(self, settings: _Settings | Mapping[str, Any] | None = None, **options: Any):
        super().__init__(settings, **options)
        self._scalars = [f for f in _template_fields(self.settings.template) if f != "findings"]

    def _column(self, placeholder: str) -> str:
        return self.settings.columns.get(placeholder, placeholder)

    @property
    def label_schema(self) -> tuple[LabelColumn, ...]:
        # Placeholders take any number or text (value_maps only rename), so they are read as given.
        return (
            *(LabelColumn(self._column(p), "scalar") for p in self._scalars),
            *(LabelColumn(column, "finding") for column in self.settings.findings),
        )

    @property
    def attribute_kinds(self) -> dict[str, AttributeKind]:
        kinds: dict[str, AttributeKind] = {p: "scalar" for p in self._scalars}
        kinds.update({column: "bool" for column in self.settings.findings})
        return kinds

    def _canonical(self, attribute: str, value: Any) -> AttributeValue:
        canonical = super()._canonical(attribute, value)
        value_map = self.settings.value_maps.get(attribute)
        if value_map is not None and str(canonical) in value_map:
            return value_map[str(canonical)]
        return canonical

    def attributes(self, row: Mapping[str, Any]) -> Attributes:
        s = self.settings
        attrs: Attributes = {}
        for placeholder in self._scalars:
            column = self._column(placeholder)
            value = _cell(row, column)
            if _is_blank(value):
                raise RowRejected(column, f"blank value for {{{placeholder}}}")
            try:
                attrs[placeholder] = self._canonical(placeholder, value)
            except ValueError as err:
                raise RowRejected(column, str(err)) from None
        attrs.update(_read_findings(row, s.findings, s.uncertain, s.blank))
        return attrs

    def _render(self, attrs: Attributes) -> str:
        s = self.settings
        values: dict[str, Any] = {p: attrs[p] for p in self._scalars}
        if s.findings:
            present = [column for column in s.findings if attrs[column]]
            values["findings"] = s.separator.join(present) if present else s.no_findings
        return s.template.format_map(values)


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------

ADAPTERS: dict[str, type[CaptionAdapter]] = {
    cls.name: cls for cls in (CheXpertAdapter, MimicAdapter, IsicAdapter, TemplateAdapter)
}


def get_adapter(name: str, **options: Any) -> CaptionAdapter:
    """Adapter by registry name ("chexpert", "mimic", "isic", "template") with its settings as keywords."""
    if name not in ADAPTERS:
        raise ValueError(f"unknown adapter name {name!r}; known: {sorted(ADAPTERS)}")
    return ADAPTERS[name](**options)


class AdapterConfig(BaseModel):
    """Embeddable adapter choice for job configs: `name` + `options` (validated against that adapter's settings)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Literal["chexpert", "mimic", "isic", "template"] = "chexpert"
    options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check_options(self) -> AdapterConfig:
        # Validate now so a bad option fails when the job config loads, not on a worker later.
        try:
            ADAPTERS[self.name].Settings.model_validate(self.options)
        except ValidationError as err:
            problems = "; ".join(
                f"{'.'.join(map(str, e['loc'])) or 'options'}: {e['msg']}" for e in err.errors()
            )
            raise ValueError(f"options for adapter {self.name!r}: {problems}") from None
        return self

    def build(self) -> CaptionAdapter:
        return get_adapter(self.name, **self.options)


# --------------------------------------------------------------------------------------------
# Config-time checks: a job config that names an unknown attribute or an impossible label value
# fails when it loads, not after the manifest is read or on a worker.
# --------------------------------------------------------------------------------------------


def check_interventions(adapter_name: str, adapter_options: Mapping[str, Any], specs: Iterable[str]) -> None:
    """Each compact intervention ("Support Devices=0; age=80") names known attributes with valid values.

    Raises ValueError naming the intervention, e.g. "intervention 'Pacemaker=0': unknown
    attribute 'Pacemaker' for adapter 'chexpert' (known: No Finding, ...)".
    """
    adapter = get_adapter(adapter_name, **dict(adapter_options))
    for spec in specs:
        try:
            adapter.intervene({}, spec)
        except ValueError as err:
            message = str(err)
            prefix = f"intervention {spec!r}"
            raise ValueError(message if message.startswith(prefix) else f"{prefix}: {message}") from None


def check_selector(
    adapter_name: str, adapter_options: Mapping[str, Any], selector: Mapping[str, Any]
) -> None:
    """Selector values on the adapter's label columns must be cells those columns can hold.

    A selector matches the manifest after its labels are read through the label schema (a
    CheXpert column is float64 1/0/-1/null), so `Edema: 2`, `Edema: true` or `sex: X` would select
    nothing, silently; they raise ValueError naming the column instead. Other columns are not
    checked here (the manifest is not read yet).
    """
    adapter = get_adapter(adapter_name, **dict(adapter_options))
    schema = {column.name: column for column in adapter.label_schema}
    for name, values in selector.items():
        column = schema.get(name)
        if column is None:
            continue
        for value in values if isinstance(values, list) else [values]:
            try:
                parsed = column.parse(value)
            except ValueError as err:
                raise ValueError(f"column {name!r}: {err}") from None
            if parsed is None:
                raise ValueError(
                    f"column {name!r}: value {value!r} is blank, and blank cells match no selector"
                )
