"""qcompile.Policy / LayerSpec: ordered rules, globs, regexes, None, op kinds, validation."""
import pytest

import qcompile
from qcompile.policy import Policy, LayerSpec, PolicyError


def test_first_match_wins_and_default_applies():
    a, b, d = LayerSpec(weight="int8"), LayerSpec(weight="int4"), LayerSpec(weight="nf4")
    p = Policy({"*.mlp.*": a, "h.0.*": b}, default=d)
    assert p.match("h.0.mlp.c_fc")[1] is a  # both match; the first rule wins
    assert p.match("h.0.attn.c_attn")[1] is b
    rule, spec = p.match("lm_head")
    assert rule is None and spec is d


def test_list_of_pairs_keeps_order():
    a, b = LayerSpec(weight="int8"), LayerSpec(weight="int4")
    assert Policy([("h.0.*", b), ("*.mlp.*", a)]).match("h.0.mlp.c_fc")[1] is b


def test_none_keeps_full_precision():
    p = Policy({"lm_head": None}, default=LayerSpec(weight="nf4"))
    rule, spec = p.match("lm_head")
    assert rule.pattern == "lm_head" and spec is None
    assert p.match("other")[1].weight.key == "nf4"


def test_glob_is_on_whole_name_and_regex_is_full_match():
    s = LayerSpec(weight="mxint8")
    p = Policy({"mlp": s, r"re:.*self_attn\.[qk]_proj": s})
    assert p.match("layers.0.mlp")[1] is None  # a glob matches the whole FQN, not a part
    assert p.match("mlp")[1] is s
    assert p.match("model.layers.1.self_attn.q_proj")[1] is s
    assert p.match("model.layers.1.self_attn.v_proj")[1] is None
    assert p.match("model.layers.1.self_attn.q_proj.extra")[1] is None


def test_op_kind_filter():
    mm = LayerSpec(weight="mxint8", act="mxint8", op="matmul")
    lin = LayerSpec(weight="int4", op="linear")
    p = Policy({"*attn*": mm, "*": lin}, default=LayerSpec(weight="nf4"))
    assert p.match("h.0.attn", "matmul")[1] is mm
    assert p.match("h.0.attn.c_attn", "linear")[1] is lin  # the matmul rule is skipped
    assert p.match("h.0.mlp", "matmul")[1] is None  # matmuls only when a rule names them
    assert p.wants("matmul") and not Policy({}, default=LayerSpec(weight="nf4")).wants("matmul")


def test_formats_accept_names_keys_and_format_objects():
    f = qcompile.formats.get("int4", block_size=32)
    s = LayerSpec(weight=f, act="mxfp8_e4m3[block_size=16]")
    assert s.weight is f and s.act.block_size == 16
    assert LayerSpec(weight=f.key) == LayerSpec(weight=f)


@pytest.mark.parametrize("make, match", [
    (lambda: LayerSpec(weight="nosuchformat"), "unknown format"),
    (lambda: LayerSpec(act="int4[block_size=0]"), "block_size"),
    (lambda: LayerSpec(), "neither weight nor act"),
    (lambda: LayerSpec(weight="int4", op="conv"), "op must be"),
    (lambda: Policy({"re:(unclosed": LayerSpec(weight="int4")}), "malformed regular expression"),
    (lambda: Policy({"": LayerSpec(weight="int4")}), "non-empty string"),
    (lambda: Policy({"x": "int4"}), "must be a qcompile.LayerSpec or None"),
    (lambda: Policy([("x",)]), "pair"),
    (lambda: Policy(42), "dict or a list"),
    (lambda: Policy({}, default="nf4"), "default must be"),
    (lambda: Policy({}, default=LayerSpec(weight="nf4", op="matmul")), "default applies"),
])
def test_validation_errors_are_clear(make, match):
    with pytest.raises(PolicyError, match=match):
        make()


def test_policy_error_is_a_value_error_and_public_names_exist():
    assert issubclass(PolicyError, ValueError)
    assert qcompile.Policy is Policy and qcompile.LayerSpec is LayerSpec


def test_unknown_op_kind_in_match():
    with pytest.raises(PolicyError):
        Policy({}).match("x", "conv")


from hypothesis import given, strategies as st  # noqa: E402
import fnmatch  # noqa: E402

_SPECS = [LayerSpec(weight="int8"), LayerSpec(weight="int4"), LayerSpec(act="mxint8"), None]
_NAME = st.lists(st.sampled_from(["h", "0", "1", "mlp", "attn", "c_fc"]), min_size=1,
                 max_size=4).map(".".join)
_GLOB = st.lists(st.sampled_from(["h", "0", "mlp", "attn", "*", "?", "[01]"]), min_size=1,
                 max_size=4).map(".".join)


@given(rules=st.lists(st.tuples(_GLOB, st.integers(0, 3)), max_size=5), name=_NAME,
       default=st.integers(0, 3))
def test_first_matching_glob_wins_against_fnmatchcase_oracle(rules, name, default):
    pairs = [(p, _SPECS[i]) for p, i in rules]
    p = Policy(pairs, default=_SPECS[default])
    expect = next((s for pat, s in pairs if fnmatch.fnmatchcase(name, pat)), _SPECS[default])
    assert p.match(name)[1] is expect


# ---- patterns and rule containers that cannot mean what they say ------------------------------

import re  # noqa: E402

_S = LayerSpec(weight="int4")
_CHOICES = r"an ordered dict or a list of \(pattern, spec\) pairs"


@pytest.mark.parametrize("rules, what", [
    ({("*.mlp.*", _S), ("h.0.*", None)}, "set"),
    (frozenset({("*.mlp.*", _S), ("h.0.*", None)}), "frozenset"),
    (frozenset(), "frozenset"),
    ({"*.mlp.*": _S, "h.0.*": None}.keys(), "dict_keys"),
])
def test_unordered_rules_are_rejected(rules, what):
    """The first matching rule wins, so the rules need an order a set does not have."""
    with pytest.raises(PolicyError, match=rf"{what}.*no order.*first matching rule wins.*"
                                          + _CHOICES):
        Policy(rules)


def test_ordered_rule_containers_keep_their_order():
    a, b = LayerSpec(weight="int8"), LayerSpec(weight="int4")
    rules = {"h.0.*": b, "*.mlp.*": a}
    for given in (rules, rules.items(), list(rules.items()), tuple(rules.items()),
                  iter(rules.items()), (p for p in rules.items())):
        p = Policy(given)
        assert [r.pattern for r in p.rules] == ["h.0.*", "*.mlp.*"]
        assert p.match("h.0.mlp.c_fc")[1] is b
    with pytest.raises(PolicyError, match=_CHOICES + r".*got str"):
        Policy("*.mlp.*")
    with pytest.raises(PolicyError, match=r"rule 0 must be a \(pattern, spec\) pair, got set"):
        Policy([{"h.0.*", a}])


_PATTERN_CHOICES = r"fnmatch glob.*'re:' followed by a regular expression"


@pytest.mark.parametrize("pattern, match", [
    ("re:", r"'re:' with an empty regular expression matches no module.*" + _PATTERN_CHOICES),
    ("", r"empty pattern.*" + _PATTERN_CHOICES),
    (5, r"must be a string, got int 5.*" + _PATTERN_CHOICES),
    (None, r"must be a string, got NoneType None.*" + _PATTERN_CHOICES),
    (("a", "b"), r"must be a string, got tuple.*" + _PATTERN_CHOICES),
    (re.compile("h.*"), r"must be a string, got Pattern.*" + _PATTERN_CHOICES),
])
def test_patterns_that_match_nothing_or_are_not_text_are_rejected(pattern, match):
    for rules in ([(pattern, _S)], {pattern: _S} if _hashable(pattern) else [(pattern, _S)]):
        with pytest.raises(PolicyError, match=match):
            Policy(rules)
    # the non-empty forms of both kinds of pattern stay valid
    p = Policy([("re:h\\.0\\..*", _S), ("?", None)])
    assert p.match("h.0.mlp")[1] is _S and p.match("x")[0].pattern == "?"


def _hashable(x):
    try:
        hash(x)
    except TypeError:
        return False
    return True



# ---- QCOMPILE_DEBUG, read strictly through qcompile.config ------------------------------------

def _tiny_graph():
    import torch

    class M(torch.nn.Module):
        def forward(self, x):
            return torch.relu(x) + 1

    return torch.fx.symbolic_trace(M())


@pytest.mark.parametrize("value, on", [
    (None, False), ("", False), ("0", False), ("false", False), ("False", False), ("no", False),
    ("off", False), ("OFF", False), (" false ", False),
    ("1", True), ("true", True), ("TRUE", True), ("yes", True), ("on", True), ("On", True),
])
def test_qcompile_debug_flag(value, on, monkeypatch, capsys):
    from qcompile.passes import debug
    if value is None:
        monkeypatch.delenv("QCOMPILE_DEBUG", raising=False)
    else:
        monkeypatch.setenv("QCOMPILE_DEBUG", value)
    gm = _tiny_graph()
    assert debug.enabled() is on
    assert debug.debug_graph(gm, "plan") is gm
    err = capsys.readouterr().err
    if on:  # the graph itself is printed: its nodes, under the stage's name
        assert "[qcompile] graph after plan:" in err
        assert str(gm.graph) in err and "relu" in err
    else:
        assert err == ""


@pytest.mark.parametrize("value", ["maybe", "2", "enabled", "tru"])
def test_qcompile_debug_garbage_is_an_error_naming_the_variable(value, monkeypatch, capsys):
    from qcompile.passes import debug
    monkeypatch.setenv("QCOMPILE_DEBUG", value)
    expect = rf"environment variable QCOMPILE_DEBUG={value!r}.*1/true/yes/on.*0/false/no/off"
    with pytest.raises(ValueError, match=expect):
        debug.debug_graph(_tiny_graph(), "plan")
    assert capsys.readouterr().err == ""
