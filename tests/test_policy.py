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
