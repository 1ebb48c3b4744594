"""Topic filters with named captures, globs, and templates — pure functions, no I/O.

* `TopicFilter`: an MQTT subscription filter whose levels may be named captures,
  ``devices/{site}/{device}/telemetry`` (each ``{name}`` matches one level like ``+``; a final
  ``{name...}`` or ``#`` matches the rest). It renders the MQTT filter to subscribe to and
  extracts the captures from a concrete topic.
* `Template`: a string with ``{placeholder}`` fields, checked once against the placeholders a
  route provides (an unknown one is a config error), rendered per message for a *target kind*
  whose rules the inserted values must satisfy: a value that participants control can never
  turn into an MQTT wildcard, an extra topic level or an invalid Kafka topic — it is rejected
  (`TemplateValueError`) and the message counted, never published.
* `glob_match`: shell-style globs for room names, identities and LiveKit topics.
* `NamePattern`: a glob that may also hold named captures, ``plant-{site}`` (room names and
  identities): each ``{name}`` matches one or more characters of any kind; when several
  captures could split a value, the earlier ones take as few characters as possible
  (``{a}-{b}`` on ``x-y-z``: a=x, b=y-z). ``*``, ``?`` and ``[...]`` keep their glob meaning.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from functools import lru_cache

_FIELD = re.compile(r"\{([^{}]*)\}")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")
_KAFKA_TOPIC = re.compile(r"^[A-Za-z0-9._-]{1,249}$")
MAX_MQTT_TOPIC_BYTES = 65_535
# Distinct rendered values a template keeps (`Template.render`), and topics a filter keeps the
# captures of (`TopicFilter.match`).
RENDER_CACHE = 4096
MATCH_CACHE = 4096
_CONTROL = re.compile(r"[\x00-\x1f]")


class TemplateError(ValueError):
    """A template or filter is malformed, or names a placeholder the route does not provide."""


class TemplateValueError(ValueError):
    """A value cannot be inserted into a template for its target (counted, message rejected)."""


class Target(Enum):
    """What a rendered template becomes; each has its own rules for inserted values."""

    MQTT_TOPIC = "mqtt topic"
    KAFKA_TOPIC = "kafka topic"
    ROOM = "room name"
    TEXT = "text"  # keys, headers, LiveKit topics, identities, attribute values


@dataclass(frozen=True, slots=True)
class Template:
    """A parsed template: literal text and ``{placeholder}`` fields."""

    source: str
    parts: tuple[str | tuple[str], ...]  # str literal, or (field name,)
    # Rendered results by (target, the values of `names`): a route renders the same few
    # values (a fleet's device ids) over and over, and each render checks every value.
    _rendered: dict[tuple[Target, tuple[str | None, ...]], str] = field(
        default_factory=dict, init=False, repr=False, compare=False, hash=False
    )
    _names: tuple[str, ...] = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_names", tuple(p[0] for p in self.parts if isinstance(p, tuple)))

    @property
    def fields(self) -> frozenset[str]:
        """The placeholder names the template uses."""
        return frozenset(p[0] for p in self.parts if isinstance(p, tuple))

    @property
    def is_constant(self) -> bool:
        """Whether the template has no placeholder."""
        return not self.fields

    def match(self, rendered: str) -> dict[str, str] | None:
        """The values that render to `rendered`, or None when none do.

        Each value is one or more characters; the earlier fields take as few as possible, as
        `NamePattern` splits. A field used twice must take the same value both times.
        """
        regex = _template_regex(self.parts)
        found = regex.fullmatch(rendered)
        if found is None:
            return None
        values: dict[str, str] = {}
        for i, part in enumerate(p for p in self.parts if isinstance(p, tuple)):
            value = found.group(f"f{i}")
            if values.setdefault(part[0], value) != value:
                return None
        return values

    def render(self, values: Mapping[str, str], target: Target) -> str:
        """The template with `values` inserted, checked for `target`."""
        key = (target, tuple([values.get(name) for name in self._names]))
        cached = self._rendered.get(key)
        if cached is not None:
            return cached
        result = self._render(values, target)
        if len(self._rendered) >= RENDER_CACHE:
            self._rendered.clear()  # a route with ever new values: start over, stay bounded
        self._rendered[key] = result
        return result

    def _render(self, values: Mapping[str, str], target: Target) -> str:
        out = []
        for part in self.parts:
            if isinstance(part, str):
                out.append(part)
                continue
            name = part[0]
            value = values.get(name)
            if value is None:
                raise TemplateValueError(f"no value for {{{name}}} in {self.source!r}")
            _check_value(name, value, target)
            out.append(value)
        result = "".join(out)
        _check_result(result, target, self.source)
        return result


@lru_cache(maxsize=256)
def _template_regex(parts: tuple[str | tuple[str], ...]) -> re.Pattern[str]:
    out, fields = [], 0
    for part in parts:
        if isinstance(part, str):
            out.append(re.escape(part))
        else:
            out.append(f"(?P<f{fields}>.+?)")
            fields += 1
    return re.compile("".join(out), re.DOTALL)


def parse_template(text: str, known: Iterable[str], target: Target) -> Template:
    """Parse `text`; every placeholder must be in `known`. Literal text is checked for `target`."""
    known_set = set(known)
    parts: list[str | tuple[str]] = []
    pos = 0
    for match in _FIELD.finditer(text):
        if match.start() > pos:
            parts.append(text[pos : match.start()])
        name = match.group(1)
        if not _NAME.match(name):
            raise TemplateError(f"invalid placeholder {{{name}}} in {text!r}")
        if name not in known_set:
            listed = ", ".join(sorted(known_set)) or "none"
            raise TemplateError(f"unknown placeholder {{{name}}} (known: {listed})")
        parts.append((name,))
        pos = match.end()
    if pos < len(text):
        parts.append(text[pos:])
    literal = "".join(p for p in parts if isinstance(p, str))
    if "{" in literal or "}" in literal:
        raise TemplateError(f"unbalanced braces in {text!r}")
    if not text:
        raise TemplateError("empty template")
    template = Template(text, tuple(parts))
    _check_literal(template, target)
    return template


def _check_literal(template: Template, target: Target) -> None:
    literal = "".join(p for p in template.parts if isinstance(p, str))
    if target is Target.MQTT_TOPIC:
        if "+" in literal or "#" in literal:
            raise TemplateError(f"MQTT topic template {template.source!r} contains a wildcard")
        if "\x00" in literal:
            raise TemplateError(f"MQTT topic template {template.source!r} contains NUL")
    elif target is Target.KAFKA_TOPIC and not re.fullmatch(r"[A-Za-z0-9._-]*", literal):
        raise TemplateError(
            f"Kafka topic template {template.source!r}: topic names allow only "
            "letters, digits, '.', '_' and '-'"
        )


def _check_value(name: str, value: str, target: Target) -> None:
    if value == "":
        raise TemplateValueError(f"{{{name}}} is empty")
    if "\x00" in value:
        raise TemplateValueError(f"{{{name}}} contains NUL")
    if target is Target.MQTT_TOPIC:
        bad = sorted({c for c in value if c in "/+#"})
        if bad:
            raise TemplateValueError(
                f"{{{name}}}={value[:80]!r} contains {' '.join(bad)}, "
                "not allowed in an MQTT topic level"
            )
        if value.startswith("$"):
            raise TemplateValueError(f"{{{name}}}={value[:80]!r} starts with $ (reserved topics)")
    elif target is Target.KAFKA_TOPIC:
        if not re.fullmatch(r"[A-Za-z0-9._-]+", value):
            raise TemplateValueError(
                f"{{{name}}}={value[:80]!r} has characters a Kafka topic cannot hold"
            )
    elif target is Target.ROOM and _CONTROL.search(value):
        raise TemplateValueError(f"{{{name}}}={value[:80]!r} contains control characters")


def _check_result(result: str, target: Target, source: str) -> None:
    if target is Target.MQTT_TOPIC and len(result.encode()) > MAX_MQTT_TOPIC_BYTES:
        raise TemplateValueError(f"rendered MQTT topic from {source!r} is too long")
    if target is Target.KAFKA_TOPIC and (not _KAFKA_TOPIC.match(result) or result in (".", "..")):
        raise TemplateValueError(f"rendered Kafka topic {result[:80]!r} is invalid")
    if target is Target.ROOM and len(result) > 256:
        raise TemplateValueError(f"rendered room name from {source!r} is over 256 characters")


@dataclass(frozen=True, slots=True)
class TopicFilter:
    """An MQTT topic filter with named captures.

    A shared subscription (``$share/<group>/<filter>``, MQTT 5 4.8.2) keeps its prefix in
    `share`: it is subscribed with, but the topics the broker delivers do not carry it, so
    `levels` (what `match` compares) are those of the filter after it.
    """

    source: str
    levels: tuple[str, ...]  # literal level, "+", "#", or "{name}" / "{name...}"
    share: str = ""  # "$share/<group>/" or ""
    # Captures by topic (None: no match): a fleet sends on the same topics again and again.
    _matched: dict[str, dict[str, str] | None] = field(
        default_factory=dict, init=False, repr=False, compare=False, hash=False
    )

    @property
    def captures(self) -> tuple[str, ...]:
        """Names of the captures, in order."""
        return tuple(_capture_name(level) for level in self.levels if _capture_name(level))

    @property
    def mqtt_filter(self) -> str:
        """The filter to subscribe with (captures become + or #)."""
        out = []
        for level in self.levels:
            name = _capture_name(level)
            if name:
                out.append("#" if level.endswith("...}") else "+")
            else:
                out.append(level)
        return self.share + "/".join(out)

    def narrowed(self, values: Mapping[str, str]) -> str | None:
        """`mqtt_filter` with the captures in `values` as literal levels (one owner's share).

        None when a value cannot be one literal level (empty, ``/``, ``+``, ``#``, NUL), or
        a value is given for a ``{name...}`` capture that spans levels.
        """
        out = []
        for level in self.levels:
            name = _capture_name(level)
            if name and name in values:
                value = values[name]
                if level.endswith("...}"):
                    return None
                if not value or any(c in value for c in "/+#\0"):
                    return None
                out.append(value)
            elif name:
                out.append("#" if level.endswith("...}") else "+")
            else:
                out.append(level)
        return self.share + "/".join(out)

    def match(self, topic: str) -> dict[str, str] | None:
        """The captures if `topic` matches, else None (a new dict: the caller may change it)."""
        cache = self._matched
        if topic in cache:
            found = cache[topic]
        else:
            found = self._match(topic)
            if len(cache) >= MATCH_CACHE:
                cache.clear()  # ever new topics: start over, stay bounded
            cache[topic] = found
        return dict(found) if found is not None else None

    def _match(self, topic: str) -> dict[str, str] | None:
        parts = topic.split("/")
        values: dict[str, str] = {}
        for i, level in enumerate(self.levels):
            if level == "#" or level.endswith("...}"):
                if level != "#" and i >= len(parts):
                    return None
                if level != "#":
                    values[_capture_name(level)] = "/".join(parts[i:])
                return values
            if i >= len(parts):
                return None
            name = _capture_name(level)
            if name:
                values[name] = parts[i]
            elif level != "+" and level != parts[i]:
                return None
        if len(parts) != len(self.levels):
            return None
        # Topics starting with $ never match a filter starting with a wildcard (MQTT 4.7.2).
        if topic.startswith("$") and self.levels and self.levels[0] in ("+", "#"):
            return None
        return values


def _capture_name(level: str) -> str:
    if level.startswith("{") and level.endswith("}"):
        return level[1:-1].removesuffix("...")
    return ""


def parse_filter(text: str) -> TopicFilter:
    """Parse an MQTT filter whose levels may be ``{name}`` captures (``{name...}`` last)."""
    if not text:
        raise TemplateError("empty topic filter")
    share = ""
    if text.startswith("$share/"):
        group, sep, rest = text[len("$share/") :].partition("/")
        if not sep or not group or not rest or any(c in group for c in "+#{}"):
            raise TemplateError(f"a shared subscription is $share/<group>/<filter>: {text!r}")
        share = f"$share/{group}/"
        text = rest
    levels = tuple(text.split("/"))
    seen: set[str] = set()
    for i, level in enumerate(levels):
        last = i == len(levels) - 1
        name = _capture_name(level)
        if name:
            if not _NAME.match(name):
                raise TemplateError(f"invalid capture {level} in filter {text!r}")
            if name in seen:
                raise TemplateError(f"capture {{{name}}} appears twice in filter {text!r}")
            seen.add(name)
            if level.endswith("...}") and not last:
                raise TemplateError(f"{level} must be the last level of {text!r}")
        elif level == "#":
            if not last:
                raise TemplateError(f"'#' must be the last level of filter {text!r}")
        elif level != "+" and ("+" in level or "#" in level or "{" in level or "}" in level):
            raise TemplateError(f"level {level!r} of filter {text!r} mixes wildcards and text")
    return TopicFilter(share + text, levels, share)


@lru_cache(maxsize=1024)
def _glob_regex(pattern: str) -> re.Pattern[str]:
    return re.compile(fnmatch.translate(pattern))


def glob_match(pattern: str, value: str) -> bool:
    """Shell-style match (``*``, ``?``, ``[...]``), case-sensitive."""
    return _glob_regex(pattern).match(value) is not None


_CAPTURE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Stand-ins for the captures while fnmatch translates the rest of the pattern: private-use
# characters, which re.escape leaves alone and room names and identities do not contain.
_OPEN, _CLOSE = "\ue000", "\ue001"


@dataclass(frozen=True, slots=True)
class NamePattern:
    """A glob with named captures for room names and identities (see the module docstring)."""

    source: str
    regex: re.Pattern[str]
    captures: tuple[str, ...]

    def match(self, value: str) -> dict[str, str] | None:
        """The captures if `value` matches (an empty dict without captures), else None."""
        found = self.regex.match(value)
        return None if found is None else found.groupdict()

    def matches(self, value: str) -> bool:
        """Whether `value` matches."""
        return self.regex.match(value) is not None


@lru_cache(maxsize=1024)
def parse_name_pattern(text: str) -> NamePattern:
    """Parse a glob whose ``{name}`` fields are captures; raises `TemplateError`."""
    names: list[str] = []

    def stand_in(match: re.Match[str]) -> str:
        name = match.group(1)
        if not name:
            raise TemplateError(f"empty capture {{}} in {text!r}")
        if not _CAPTURE_NAME.match(name):
            raise TemplateError(
                f"invalid capture {{{name}}} in {text!r} (letters, digits and _, "
                "not starting with a digit)"
            )
        if name in names:
            raise TemplateError(f"capture {{{name}}} appears twice in {text!r}")
        names.append(name)
        return f"{_OPEN}{len(names) - 1}{_CLOSE}"

    if _OPEN in text or _CLOSE in text:
        raise TemplateError(f"{text!r} contains reserved characters U+E000/U+E001")
    marked = _FIELD.sub(stand_in, text)
    if "{" in marked or "}" in marked:
        raise TemplateError(f"unbalanced braces in {text!r}")
    translated = fnmatch.translate(marked)
    for i, name in enumerate(names):
        translated = translated.replace(f"{_OPEN}{i}{_CLOSE}", f"(?P<{name}>.+?)")
    try:
        regex = re.compile(translated)
    except re.error as exc:  # a capture inside [...]
        raise TemplateError(f"cannot use captures inside [...] in {text!r}") from exc
    if set(regex.groupindex) != set(names):
        raise TemplateError(f"cannot use captures inside [...] in {text!r}")
    return NamePattern(text, regex, tuple(names))
