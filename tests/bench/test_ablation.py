"""The ablation's rows: which variants ``turbo bench model --ablation`` measures (no model
needed; the measurements themselves are the report's)."""

import pytest

from turbo_core.attention.config import KVQuantConfig
from turbo_core.attention.variants import get_variant
from turbo_core.bench import ablation


def test_from_off_each_lever_alone_then_all_and_int2_groups_only_where_int2_heads_are():
    int4 = ablation.configurations(get_variant("turbo-int4"))
    off = KVQuantConfig().levers()
    assert int4[0][0] == "none" and int4[0][1].kv.levers() == off
    labels = [label for label, _ in int4]
    assert "int2-groups-32" not in labels  # no INT2 head in turbo-int4
    assert labels[1:-1] == ["rotate", "sinks", "k-channel-scale", "pre-rope", "low-rank-48", "low-rank-32"]
    for label, variant in int4[1:-1]:
        on = {k: v for k, v in variant.kv.levers().items() if v != off[k]}
        assert on == ablation.LEVERS[label], label
    assert all(variant.kv.levers()[k] for k in ("rotate", "k_channel_scale", "pre_rope")
               for _, variant in int4[-1:])
    assert int4[-1][1].kv.low_rank is None  # low rank excludes rotate and pre_rope: measured alone
    mix = [label for label, _ in ablation.configurations(get_variant("turbo-mix"))]
    assert "int2-groups-32" in mix


def test_from_defaults_adds_only_levers_not_on_already():
    mix = get_variant("turbo-mix")
    rows = ablation.configurations(mix, start="defaults")
    assert rows[0] == ("defaults", mix)
    assert [label for label, _ in rows[1:]] == ["defaults+k-channel-scale", "defaults+pre-rope"]
    assert rows[2][1].kv == KVQuantConfig(**{**mix.kv.__dict__, "pre_rope": True})
    assert rows[2][1].name == "turbo-mix.pre-rope"


def test_exact_qk_diagnostic_turns_int8_qk_off_in_every_row_and_bad_names_are_refused():
    rows = ablation.configurations(get_variant("turbo-int4"), ["pre-rope"], "defaults", exact_qk=True)
    assert [v.name for _, v in rows] == ["turbo-int4.exact-qk", "turbo-int4.pre-rope.exact-qk"]
    assert not any(v.math.qk_int8 for _, v in rows) and all(v.math.sas for _, v in rows)
    with pytest.raises(ValueError, match=r"unknown levers \['nope'\]"):
        ablation.configurations(get_variant("turbo-int4"), ["nope"])
    with pytest.raises(ValueError, match="start 'half'"):
        ablation.configurations(get_variant("turbo-int4"), None, "half")
