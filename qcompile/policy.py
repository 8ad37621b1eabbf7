"""Policies: which layer gets which number formats.

A ``Policy`` is an ordered list of (pattern, spec) rules plus a default. Rules are tried in order
and the first match wins. A plain pattern is an ``fnmatch`` glob on the module's fully-qualified
name (``"transformer.h.0.mlp.c_fc"``); a pattern starting with ``re:`` is a regular expression
that must match the whole name. ``None`` as a spec keeps the layer in full precision.

Rules and the default apply to linear ops (nn.Linear, GPT-2's Conv1D). Other matmuls (attention
scores, ...) and embedding tables (nn.Embedding) are quantised only by a rule whose spec names
them: ``LayerSpec(..., op="matmul")``, ``LayerSpec(weight=..., op="embedding")``.
Everything is validated when the policy is built, before any compile work.
"""
from __future__ import annotations

import fnmatch
import json
import re
from collections.abc import ItemsView
from collections.abc import Set as AbcSet
from dataclasses import dataclass, field

from . import formats
from .formats import Format

OP_KINDS = ("linear", "matmul", "embedding")


class PolicyError(ValueError):
    """A policy that cannot be applied (unknown format, bad pattern, bad spec)."""


def _format(value, what: str) -> Format | None:
    if value is None:
        return None
    try:
        return formats.get(value)
    except (ValueError, TypeError) as e:
        raise PolicyError(f"{what}: {e}") from None


class LayerSpec:
    """Formats for one op: ``weight`` (the static operand, quantised ahead of time in blocks
    along K) and ``act`` (the activation operand, quantised dynamically per token in blocks
    along K). Either may be None (kept in full precision), not both. ``op`` restricts the spec
    to an op kind: None or "linear" for linear layers, "matmul" for other matmuls (whose second
    operand then gets the ``weight`` format, dynamically), "embedding" for embedding tables
    (``weight`` only, blocks along the hidden axis; rows are gathered and decoded on the fly)."""

    __slots__ = ("weight", "act", "op")

    def __init__(self, weight=None, act=None, op: str | None = None):
        if op is not None and op not in OP_KINDS:
            raise PolicyError(f"LayerSpec op must be None or one of {OP_KINDS}, got {op!r}")
        self.weight = _format(weight, "LayerSpec weight format")
        self.act = _format(act, "LayerSpec act format")
        self.op = op
        if self.weight is None and self.act is None:
            raise PolicyError("LayerSpec with neither weight nor act format quantises nothing; "
                              "use None as the rule's spec to keep a layer in full precision")
        if self.act is not None and self.act.proxy is not None:
            raise PolicyError(f"LayerSpec act format {self.act.key}: the proxy option keeps "
                              "weight columns chosen from the previous layer's weights; it is "
                              "a weight option, not one for activations")
        if op in ("embedding", "matmul") and self.weight is not None and \
                self.weight.proxy is not None:
            raise PolicyError(f"LayerSpec(op={op!r}) weight format {self.weight.key}: the proxy "
                              "option applies to linear layers' weights (whose input columns "
                              "a previous layer computes), not to this op")
        if op == "embedding" and (self.weight is None or self.act is not None):
            raise PolicyError("LayerSpec(op='embedding') takes a weight format and no act format "
                              "(an embedding's input is token ids, not activations), got "
                              f"weight={weight!r}, act={act!r}")

    def applies_to(self, op_kind: str) -> bool:
        if op_kind == "linear":
            return self.op in (None, "linear")
        return self.op == op_kind

    def _key(self):
        return (self.weight.key if self.weight else None, self.act.key if self.act else None,
                self.op)

    def __eq__(self, other):
        return isinstance(other, LayerSpec) and self._key() == other._key()

    def __hash__(self):
        return hash(self._key())

    def __repr__(self):
        parts = []
        if self.weight:
            parts.append(f"weight={self.weight.key!r}")
        if self.act:
            parts.append(f"act={self.act.key!r}")
        if self.op:
            parts.append(f"op={self.op!r}")
        return f"LayerSpec({', '.join(parts)})"


@dataclass(frozen=True)
class Rule:
    index: int
    pattern: str
    spec: LayerSpec | None
    regex: re.Pattern = field(repr=False, compare=False)

    def matches(self, fqn: str, op_kind: str) -> bool:
        if self.spec is not None and not self.spec.applies_to(op_kind):
            return False
        return self.regex.fullmatch(fqn) is not None

    def describe(self) -> str:
        return f"#{self.index} {self.pattern!r}"


PATTERN_CHOICES = ("an fnmatch glob on the module's name (e.g. '*.mlp.*') or 're:' followed "
                   "by a regular expression that must match the whole name (e.g. "
                   "'re:.*\\.q_proj')")
RULES_CHOICES = ("an ordered dict or a list of (pattern, spec) pairs ({pattern: spec, ...} or "
                 "[(pattern, spec), ...])")


def _compile_pattern(pattern) -> re.Pattern:
    if not isinstance(pattern, str):
        raise PolicyError(f"a rule pattern must be a string, got {type(pattern).__name__} "
                          f"{pattern!r}; a pattern is {PATTERN_CHOICES}")
    if not pattern:
        raise PolicyError(f"a rule pattern must be a non-empty string: an empty pattern matches "
                          f"no module; a pattern is {PATTERN_CHOICES}")
    if pattern.startswith("re:"):
        if not pattern[3:]:
            raise PolicyError(f"rule pattern 're:' with an empty regular expression matches no "
                              f"module; a pattern is {PATTERN_CHOICES}")
        try:
            return re.compile(pattern[3:])
        except re.error as e:
            raise PolicyError(f"malformed regular expression in rule {pattern!r}: {e}") from None
    return re.compile(fnmatch.translate(pattern))


def _rule_pairs(rules) -> list:
    """The rules as a list of pairs, in the order given; containers without an order (sets, a
    dict's keys) and text are refused, as the first matching rule wins."""
    if isinstance(rules, dict):
        return list(rules.items())
    if isinstance(rules, (str, bytes)):
        raise PolicyError(f"rules must be {RULES_CHOICES}, got {type(rules).__name__} {rules!r}")
    if isinstance(rules, AbcSet) and not isinstance(rules, ItemsView):
        raise PolicyError(f"rules given as a {type(rules).__name__} have no order, but the first "
                          f"matching rule wins: give {RULES_CHOICES}")
    try:
        items = list(rules)
    except TypeError:
        raise PolicyError(f"rules must be {RULES_CHOICES}, got {type(rules).__name__}") from None
    pairs = []
    for i, p in enumerate(items):
        if isinstance(p, (str, bytes, AbcSet)):  # no (pattern, spec) order inside
            raise PolicyError(f"rule {i} must be a (pattern, spec) pair, got "
                              f"{type(p).__name__} {p!r}; rules are {RULES_CHOICES}")
        try:
            pairs.append(tuple(p))
        except TypeError:
            raise PolicyError(f"rules must be {RULES_CHOICES}; rule {i} is "
                              f"{type(p).__name__} {p!r}") from None
    return pairs


class Policy:
    """Ordered rules (a dict, or a list of (pattern, spec) pairs) and a default spec for linear
    layers that no rule matches (None: full precision)."""

    def __init__(self, rules=(), default: LayerSpec | None = None):
        pairs = _rule_pairs(rules)
        self.rules: list[Rule] = []
        for i, pair in enumerate(pairs):
            if len(pair) != 2:
                raise PolicyError(f"rule {i} must be a (pattern, spec) pair, got {pair!r}")
            pattern, spec = pair
            if spec is not None and not isinstance(spec, LayerSpec):
                raise PolicyError(f"rule {pattern!r}: the spec must be a qcompile.LayerSpec or "
                                  f"None, got {type(spec).__name__} {spec!r}")
            self.rules.append(Rule(i, pattern, spec, _compile_pattern(pattern)))
        if default is not None and not isinstance(default, LayerSpec):
            raise PolicyError(f"default must be a qcompile.LayerSpec or None, got "
                              f"{type(default).__name__} {default!r}")
        if default is not None and default.op not in (None, "linear"):
            raise PolicyError(f"the default applies to linear layers; name {default.op} ops in "
                              f"a rule with LayerSpec(..., op={default.op!r})")
        self.default = default

    def match(self, fqn: str, op_kind: str = "linear") -> tuple[Rule | None, LayerSpec | None]:
        """The first rule that matches (None when the default applied) and the resulting spec."""
        if op_kind not in OP_KINDS:
            raise PolicyError(f"unknown op kind {op_kind!r}; known: {OP_KINDS}")
        for rule in self.rules:
            if rule.matches(fqn, op_kind):
                return rule, rule.spec
        return None, (self.default if op_kind == "linear" else None)

    def wants(self, op_kind: str) -> bool:
        """Whether any rule could quantise ops of this kind (matmuls and embeddings are found
        only if so)."""
        if op_kind == "linear":
            return True
        return any(r.spec is not None and r.spec.applies_to(op_kind) for r in self.rules)

    def op_kinds(self) -> tuple[str, ...]:
        """The op kinds this policy may quantise: what the find pass looks for."""
        return tuple(k for k in OP_KINDS if self.wants(k))

    def formats(self) -> list[Format]:
        specs = [r.spec for r in self.rules] + [self.default]
        return [f for s in specs if s is not None for f in (s.weight, s.act) if f is not None]

    def __eq__(self, other):
        return (isinstance(other, Policy) and self.default == other.default
                and [(r.pattern, r.spec) for r in self.rules]
                == [(r.pattern, r.spec) for r in other.rules])

    def __hash__(self):
        return hash((self.default, tuple((r.pattern, r.spec) for r in self.rules)))

    def __repr__(self):
        rules = ", ".join(f"{r.pattern!r}: {r.spec!r}" for r in self.rules)
        return f"Policy({{{rules}}}, default={self.default!r})"

    def to_json(self) -> str:
        """The policy as a JSON document (format keys, patterns as written, rules in order) that
        ``Policy.from_json`` turns back into an equal policy."""
        return json.dumps({"format": POLICY_JSON_FORMAT, "version": POLICY_JSON_VERSION,
                           "rules": [{"pattern": r.pattern, "spec": _spec_to_json(r.spec)}
                                     for r in self.rules],
                           "default": _spec_to_json(self.default)}, indent=1)

    @classmethod
    def from_json(cls, text) -> "Policy":
        """The policy ``to_json`` wrote. Refuses, with a PolicyError naming the problem,
        malformed JSON, unknown or missing fields, unknown format keys and newer versions."""
        if isinstance(text, (bytes, bytearray)):
            text = text.decode("utf-8", errors="replace")
        if not isinstance(text, str):
            raise PolicyError(f"Policy.from_json takes the JSON text (a str), got "
                              f"{type(text).__name__}")
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            raise PolicyError(f"policy JSON is malformed: {e}") from None
        # the format and version first: a newer version may have fields this one does not know
        _check_fields(doc, "policy JSON", ("format", "version"), POLICY_JSON_FIELDS, strict=False)
        if doc["format"] != POLICY_JSON_FORMAT:
            raise PolicyError(f"policy JSON: 'format' is {doc['format']!r}, not "
                              f"{POLICY_JSON_FORMAT!r}: not a blockquant policy")
        version = doc["version"]
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise PolicyError(f"policy JSON: 'version' must be a positive integer, got "
                              f"{version!r}")
        if version > POLICY_JSON_VERSION:
            raise PolicyError(f"policy JSON version {version} was written by a newer blockquant; "
                              f"this one reads versions up to {POLICY_JSON_VERSION}: upgrade "
                              "blockquant to read it")
        _check_fields(doc, "policy JSON", POLICY_JSON_FIELDS, POLICY_JSON_FIELDS)
        if not isinstance(doc["rules"], list):
            raise PolicyError(f"policy JSON: 'rules' must be a list of {{'pattern': ..., "
                              f"'spec': ...}} objects, got {type(doc['rules']).__name__}")
        rules = []
        for i, rule in enumerate(doc["rules"]):
            _check_fields(rule, f"policy JSON rules[{i}]", RULE_FIELDS, RULE_FIELDS)
            where = f"policy JSON rules[{i}] ({rule['pattern']!r})"
            rules.append((rule["pattern"], _spec_from_json(rule["spec"], where)))
        return cls(rules, default=_spec_from_json(doc["default"], "policy JSON default"))

    def to_python(self) -> str:
        """Python source that rebuilds the policy (binds it to ``policy``)."""
        rules = "".join(f"    ({r.pattern!r}, {r.spec!r}),\n" for r in self.rules)
        return (f"from qcompile import LayerSpec, Policy\n\npolicy = Policy([\n{rules}], "
                f"default={self.default!r})\n")


# -- JSON: {"format", "version", "rules": [{"pattern", "spec"}], "default"}; a spec is null or
# {"weight", "act", "op"} with format keys (formats.get rebuilds each) --------------------------

POLICY_JSON_FORMAT = "blockquant.policy"
POLICY_JSON_VERSION = 1
POLICY_JSON_FIELDS = ("format", "version", "rules", "default")
RULE_FIELDS = ("pattern", "spec")
SPEC_FIELDS = ("weight", "act", "op")
FORMAT_HINT = ("qcompile.formats.names() lists the presets; a key with options reads e.g. "
               "'int4[block_size=128]' (docs/formats.md)")


def _check_fields(obj, what: str, required, known, strict: bool = True):
    """``obj`` is a JSON object holding the ``required`` fields and (if ``strict``) no field
    outside ``known``."""
    if not isinstance(obj, dict):
        raise PolicyError(f"{what} must be a JSON object with fields {list(known)}, got "
                          f"{type(obj).__name__} {obj!r}")
    unknown = sorted(set(obj) - set(known)) if strict else []
    if unknown:
        raise PolicyError(f"{what}: unknown field(s) {unknown}; known: {list(known)}")
    missing = [k for k in required if k not in obj]
    if missing:
        raise PolicyError(f"{what}: missing field(s) {missing}")


def _key_of(fmt: Format | None) -> str | None:
    """A format's key, checked to rebuild the same format (a Format built by hand may not)."""
    if fmt is None:
        return None
    if not formats.key_rebuilds(fmt):
        raise PolicyError(f"format {fmt.name!r} has no key that qcompile.formats.get rebuilds "
                          f"(its key is {fmt.key!r}), so the policy cannot be written as JSON")
    return fmt.key


def _spec_to_json(spec: LayerSpec | None):
    if spec is None:
        return None
    return {"weight": _key_of(spec.weight), "act": _key_of(spec.act), "op": spec.op}


def _spec_from_json(obj, where: str) -> LayerSpec | None:
    if obj is None:
        return None
    _check_fields(obj, f"{where} spec", (), SPEC_FIELDS)
    for name in ("weight", "act"):
        value = obj.get(name)
        if value is not None and not isinstance(value, str):
            raise PolicyError(f"{where} spec {name!r} must be a format key (a string) or null, "
                              f"got {value!r}; {FORMAT_HINT}")
    try:
        return LayerSpec(weight=obj.get("weight"), act=obj.get("act"), op=obj.get("op"))
    except PolicyError as e:
        bad_format = str(e).startswith(("LayerSpec weight format", "LayerSpec act format"))
        hint = f"; {FORMAT_HINT}" if bad_format else ""
        raise PolicyError(f"{where}: {e}{hint}") from None


#: What the backend applies when no policy is given: weight-only NF4 (blocks of 64 along K,
#: absmax scale) on every linear layer, activations in full precision.
DEFAULT_POLICY_DOC = "weight-only nf4 on every linear layer"


def default_policy() -> Policy:
    return Policy({}, default=LayerSpec(weight="nf4"))
