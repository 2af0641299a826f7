"""plan_scene end to end: the mix, determinism, joint quotas, axes files, exports and bad input."""

from __future__ import annotations

import ast
import json
from collections import Counter

import pytest

from deltaw.plan import (
    DEFAULT_NEGATIVE,
    Entity,
    JointTable,
    PlanError,
    RuleParser,
    ScenePlan,
    load_axes,
    load_joint_table,
    parse_mix,
    plan_scene,
)

TEAM = "a female basketball team of five players"
THIRDS = "skin_tone=light:1,medium:1,dark:1"
AXES = load_axes()


def test_issue_example() -> None:
    plan = plan_scene(TEAM, THIRDS, seed=7)
    assert len(plan.entities) == 5
    assert plan.parse.count == 5 and plan.parse.noun == "player"
    counts = Counter(e.attributes["skin_tone"] for e in plan.entities)
    assert sorted(counts.values()) == [1, 2, 2]  # 5 * 1/3 = 1.67: two values get 2, one gets 1
    assert dict(plan.quotas["skin_tone"]) == dict(counts)
    for entity in plan.entities:
        tone = entity.attributes["skin_tone"]
        assert entity.prompt == f"a female basketball player with {tone} skin"
        assert entity.noun == "female basketball player"
    assert plan.background == "a realistic scene" and plan.negative == DEFAULT_NEGATIVE
    assert plan.mix == {"skin_tone": pytest.approx({"light": 1 / 3, "medium": 1 / 3, "dark": 1 / 3})}


def test_same_seed_same_plan_and_seeds_differ() -> None:
    assert plan_scene(TEAM, THIRDS, seed=7).to_json() == plan_scene(TEAM, THIRDS, seed=7).to_json()
    orders = {
        tuple(e.attributes["skin_tone"] for e in plan_scene(TEAM, THIRDS, seed=s, axes=AXES).entities)
        for s in range(40)
    }
    assert len(orders) > 10  # which value is short, and who stands where, both vary with the seed


def test_adding_an_axis_keeps_the_others() -> None:
    one = plan_scene(TEAM, THIRDS, seed=3, axes=AXES)
    two = plan_scene(TEAM, THIRDS + ";hair=short,long", seed=3, axes=AXES)
    assert [e.attributes["skin_tone"] for e in one.entities] == [e.attributes["skin_tone"] for e in two.entities]


def test_excluded_value_never_appears() -> None:
    for seed in range(500):
        plan = plan_scene("seven nurses", {"skin_tone": {"light": 1, "medium": 0, "dark": 2}}, seed, axes=AXES)
        assert all(e.attributes["skin_tone"] != "medium" for e in plan.entities)
        assert plan.quotas["skin_tone"]["medium"] == 0


def test_several_independent_axes() -> None:
    plan = plan_scene(
        "twelve nurses in a hospital", ["skin_tone=light:1,dark:1", "age=young_adult:2,senior:1"], seed=0, axes=AXES
    )
    assert plan.mode == "independent"
    assert Counter(e.attributes["skin_tone"] for e in plan.entities) == {"light": 6, "dark": 6}
    assert Counter(e.attributes["age"] for e in plan.entities) == {"young_adult": 8, "senior": 4}
    elderly = [e for e in plan.entities if e.attributes["age"] == "senior"]
    assert elderly[0].prompt.startswith("an elderly nurse with ")
    assert elderly[0].prompt.endswith(" skin")
    assert plan.background == "a realistic scene in a hospital"


def test_joint_product_quotas_are_exact_per_cell() -> None:
    # 12 entities, 3 x 2 equally likely cells: exactly 2 per combination, which independent axes don't ensure
    mix = {"skin_tone": {"light": 1, "medium": 1, "dark": 1}, "gender": {"female": 1, "male": 1}}
    plan = plan_scene("twelve nurses", mix, seed=11, joint=True, axes=AXES)
    assert plan.mode == "joint"
    cells = Counter((e.attributes["skin_tone"], e.attributes["gender"]) for e in plan.entities)
    assert set(cells.values()) == {2} and len(cells) == 6
    assert {c["count"] for c in plan.joint} == {2}


def test_joint_mix_converges() -> None:
    mix = {"skin_tone": {"light": 1, "dark": 2}, "gender": {"female": 1, "male": 1}}
    totals: Counter = Counter()
    plans = 2000
    for seed in range(plans):
        plan = plan_scene("four nurses", mix, seed, joint=True, axes=AXES)
        totals.update((e.attributes["skin_tone"], e.attributes["gender"]) for e in plan.entities)
    targets = {("light", "female"): 1 / 6, ("light", "male"): 1 / 6, ("dark", "female"): 1 / 3, ("dark", "male"): 1 / 3}
    for cell, p in targets.items():
        # per plan the count is floor(4p) + Bernoulli(frac(4p)); 5 sigma over 2000 plans
        f = 4 * p - int(4 * p)
        bound = 5 * (f * (1 - f) / plans) ** 0.5 / 4
        assert abs(totals[cell] / (4 * plans) - p) <= bound, (cell, totals)


def test_joint_table_files_and_excluded_combination(tmp_path) -> None:
    csv_path = tmp_path / "joint.csv"
    csv_path.write_text("skin_tone,gender,weight\nlight,female,1\nlight,male,1\ndark,female,2\ndark,male,0\n")
    json_path = tmp_path / "joint.json"
    json_path.write_text(
        json.dumps(
            {
                "axes": ["skin_tone", "gender"],
                "cells": [
                    {"skin_tone": "light", "gender": "female", "weight": 1},
                    {"skin_tone": "light", "gender": "male", "weight": 1},
                    {"skin_tone": "dark", "gender": "female", "weight": 2},
                ],
            }
        )
    )
    for path in (csv_path, json_path):
        table = load_joint_table(path)
        assert table.axes == ("skin_tone", "gender")
        for seed in range(200):
            plan = plan_scene("eight nurses", seed=seed, joint_table=table, axes=AXES)
            assert ("dark", "male") not in {(e.attributes["skin_tone"], e.attributes["gender"]) for e in plan.entities}
        assert plan.quotas["skin_tone"]["light"] + plan.quotas["skin_tone"]["dark"] == 8
        assert plan.quotas["skin_tone"]["light"] == 4  # half the weight, exactly half of 8


def test_joint_table_errors(tmp_path) -> None:
    with pytest.raises(PlanError, match="either a mix or a joint table"):
        plan_scene("eight nurses", THIRDS, joint_table=JointTable(("skin_tone",), {("light",): 1}))
    with pytest.raises(PlanError, match="unknown value 'teal'"):
        plan_scene("eight nurses", joint_table=JointTable(("skin_tone",), {("teal",): 1}))
    with pytest.raises(PlanError, match="sum to 0"):
        JointTable(("skin_tone",), {("light",): 0})
    bad = tmp_path / "dup.csv"
    bad.write_text("skin_tone,weight\nlight,1\nlight,2\n")
    with pytest.raises(PlanError, match="listed twice"):
        load_joint_table(bad)
    with pytest.raises(PlanError, match="does not exist"):
        load_joint_table(tmp_path / "missing.csv")


def test_user_axes_file(tmp_path) -> None:
    extra = tmp_path / "axes.json"
    extra.write_text(
        json.dumps(
            {
                "axes": {
                    "jersey": {"position": "after", "values": {"red": "a red jersey", "blue": "a blue jersey"}},
                    "skin_tone": {"position": "after", "values": {"deep": "deep brown skin"}},
                }
            }
        )
    )
    plan = plan_scene(TEAM, "jersey=red:3,blue:2;skin_tone=deep:1,light:1", seed=1, axes=extra)
    assert Counter(e.attributes["jersey"] for e in plan.entities) == {"red": 3, "blue": 2}
    assert any("deep brown skin" in e.prompt for e in plan.entities)
    assert all(" and a " in e.prompt for e in plan.entities)  # "with light skin and a red jersey"
    with pytest.raises(PlanError, match="unknown axis 'jersey'"):
        plan_scene(TEAM, "jersey=red:1", seed=1)
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(PlanError, match="not valid JSON"):
        load_axes(broken)
    with pytest.raises(PlanError, match="position"):
        extra.write_text(json.dumps({"axes": {"x": {"position": "middle", "values": {"a": "a"}}}}))
        load_axes(extra)


@pytest.mark.parametrize(
    ("text", "mix", "kwargs", "message"),
    [
        ("zero nurses", None, {}, "count 0 is out of range"),
        ("65 nurses", None, {}, "count 65 is out of range"),
        ("a hundred soldiers", None, {}, "count 100 is out of range"),
        ("three nurses", None, {"count": 0}, "out of range"),
        ("the sky", None, {}, "no countable entity"),
        ("three nurses", "skin_tone=light:-1,dark:1", {}, "negative"),
        ("three nurses", "skin_tone=light:0,dark:0", {}, "sum to 0"),
        ("three nurses", "skin_tone=light:x", {}, "not a number"),
        ("three nurses", "skin=light:1", {}, "unknown axis 'skin'"),
        ("three nurses", "skin_tone=purple:1", {}, "unknown value 'purple'"),
        ("three nurses", "skin_tone", {}, "expected AXIS=VALUE"),
        ("three nurses", "skin_tone=light:1;skin_tone=dark:1", {}, "given twice"),
        ("a female team of three players", "gender=female:1,male:1", {}, "conflicts with the text"),
        ("three nurses", None, {"seed": "7"}, "seed must be an integer"),
    ],
)
def test_bad_input_is_a_named_plan_error(text: str, mix, kwargs: dict, message: str) -> None:
    assert issubclass(PlanError, ValueError)
    with pytest.raises(PlanError, match=message):
        plan_scene(text, mix, **kwargs)


def test_count_override() -> None:
    assert len(plan_scene(TEAM, THIRDS, seed=0, count=12).entities) == 12


def test_parse_mix_syntax() -> None:
    assert parse_mix("skin_tone=light,dark:2; hair=short:1/3,long:0.5") == {
        "skin_tone": {"light": 1, "dark": 2},
        "hair": {"short": pytest.approx(1 / 3), "long": 0.5},
    }


def test_gligen_export() -> None:
    plan = plan_scene(TEAM, THIRDS, seed=7)
    gligen = plan.to_gligen()
    assert gligen["prompt"] == TEAM
    assert gligen["gligen_phrases"] == [e.prompt for e in plan.entities]
    assert gligen["gligen_boxes"] == [list(e.box) for e in plan.entities]
    assert all(len(b) == 4 and all(0 <= v <= 1 for v in b) for b in gligen["gligen_boxes"])
    assert gligen["negative_prompt"] == plan.negative


def test_lmd_export_and_text_format() -> None:
    plan = plan_scene("three nurses in a hospital", THIRDS, seed=2)
    lmd = plan.to_lmd()
    assert lmd["canvas"] == [512, 512]
    assert lmd["caption"] == "three nurses in a hospital"
    assert lmd["background_prompt"] == "a realistic scene in a hospital"
    for (phrase, (x, y, w, h)), entity in zip(lmd["objects"], plan.entities):
        assert phrase == entity.prompt
        assert (x, y) == (round(entity.box[0] * 512), round(entity.box[1] * 512))
        assert (x + w, y + h) == (round(entity.box[2] * 512), round(entity.box[3] * 512))
    lines = plan.to_lmd_text().splitlines()
    assert lines[0] == "Caption: three nurses in a hospital"
    assert lines[1].startswith("Objects: ")
    objects = ast.literal_eval(lines[1].removeprefix("Objects: "))  # LMD parses this line as a Python literal
    assert [(p, list(b)) for p, b in objects] == [(p, b) for p, b in lmd["objects"]]
    assert lines[2] == "Background prompt: a realistic scene in a hospital"
    assert lines[3] == f"Negative prompt: {plan.negative}"


def test_json_round_trip_and_files(tmp_path) -> None:
    plan = plan_scene(TEAM, THIRDS, seed=7)
    data = json.loads(plan.to_json())
    assert list(data)[:3] == ["entities", "background", "negative"]
    assert set(data["entities"][0]) == {"noun", "attributes", "prompt", "box"}
    assert ScenePlan.from_json(plan.to_json()) == plan
    paths = plan.write(tmp_path / "out")
    assert {p.name for p in paths.values()} == {"plan.json", "gligen.json", "lmd.json", "lmd.txt", "layout.png"}
    assert json.loads(paths["plan"].read_text()) == data
    assert paths["layout"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    with Image.open(paths["layout"]) as image:
        assert image.size[0] >= 700 and image.size[1] >= 700


def test_plan_validation() -> None:
    plan = plan_scene("two nurses", seed=0)
    a, b = plan.entities
    overlapping = Entity(b.noun, b.attributes, b.prompt, a.box)
    with pytest.raises(PlanError, match="overlap"):
        ScenePlan(plan.text, plan.caption, (a, overlapping), plan.background, plan.negative, 0, plan.parse)
    with pytest.raises(PlanError, match="inside the canvas"):
        Entity("nurse", {}, "a nurse", (0.5, 0.5, 1.5, 0.9))
    with pytest.raises(PlanError, match="out of range"):
        ScenePlan(plan.text, plan.caption, (), plan.background, plan.negative, 0, plan.parse)


def test_no_mix_still_plans_one_prompt_per_entity() -> None:
    plan = plan_scene("a group of 12 children playing in a park", seed=0)
    assert plan.mode == "none" and len(plan.entities) == 12
    assert {e.prompt for e in plan.entities} == {"a child, playing"}


@pytest.mark.parametrize(
    "text",
    ["a team of basketball players", "a crowd of people", "nurses", "several nurses", "basketball players in a park"],
)
def test_count_override_needs_no_count_in_the_text(text: str) -> None:
    # The text used to be parsed before the override was looked at: "no count in ..." although count=5 was given.
    plan = plan_scene(text, "skin_tone=light,dark", count=5)
    assert len(plan.entities) == 5 and sum(plan.quotas["skin_tone"].values()) == 5
    with pytest.raises(PlanError, match="count|countable"):
        plan_scene(text, "skin_tone=light,dark")  # without the override the missing count is still an error


def test_count_override_keeps_the_parsed_noun() -> None:
    plan = plan_scene("a team of basketball players in a park", None, count=3)
    assert plan.entities[0].noun == "basketball player" and plan.parse.setting == "in a park"


def test_write_removes_stale_layout_and_render_only(tmp_path) -> None:
    out = tmp_path / "out"
    plan_scene(TEAM, THIRDS, seed=1).write(out)
    (out / "render.png").write_bytes(b"old render")
    (out / "notes.txt").write_text("mine")
    paths = plan_scene("three nurses", THIRDS, seed=2).write(out, layout_png=False)
    assert "layout" not in paths
    assert not (out / "layout.png").exists()  # would show the five players next to a plan of three nurses
    assert not (out / "render.png").exists()
    assert (out / "notes.txt").read_text() == "mine"  # never another file


def test_write_into_a_file_is_a_plan_error(tmp_path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(PlanError, match="not a directory"):
        plan_scene(TEAM, THIRDS).write(afile)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("list.json", '{"axes": ["skin_tone"], "cells": [["light", 1]]}', "cell 1 must be an object"),
        ("ints.json", '{"cells": [1, 2]}', "cell 1 must be an object"),
        ("strax.json", '{"axes": "skin_tone", "cells": [{"skin_tone": "light", "weight": 1}]}', "must be a list"),
        ("numval.json", '{"axes": ["skin_tone"], "cells": [{"skin_tone": 3, "weight": 1}]}', "value name"),
        ("listw.json", '{"axes": ["skin_tone"], "cells": [{"skin_tone": "light", "weight": [1]}]}', "not a number"),
        ("bad.csv", b"skin_tone,weight\n\xff\xfe,1\n", "not UTF-8"),
    ],
)
def test_malformed_joint_tables_are_plan_errors(tmp_path, name: str, content, message: str) -> None:
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(PlanError, match=message):
        load_joint_table(path)


def test_directories_and_bad_encodings_are_plan_errors(tmp_path) -> None:
    folder = tmp_path / "table.csv"
    folder.mkdir()
    with pytest.raises(PlanError, match="not a file"):
        load_joint_table(folder)
    with pytest.raises(PlanError, match="directory"):
        load_axes(folder)
    latin = tmp_path / "axes.json"
    latin.write_bytes(b'{"axes": {"x": {"values": {"a": "caf\xe9"}}}}')
    with pytest.raises(PlanError, match="not UTF-8"):
        load_axes(latin)


def test_mix_mapping_with_a_string_value_is_a_plan_error() -> None:
    with pytest.raises(PlanError, match="must map each value to a weight"):
        plan_scene("three nurses", {"skin_tone": "light"})


@pytest.mark.parametrize(
    ("text", "count"),
    [("ten thousand soldiers", 10_000), ("a thousand people", 1_000), ("two thousand fans", 2_000),
     ("one million ants", 1_000_000), ("five hundred thousand fans", 500_000), ("200 nurses", 200)],
)
def test_magnitude_counts_are_refused_as_out_of_range(text: str, count: int) -> None:
    # "thousand" used to be no count word: "ten thousand soldiers" planned 10 x "thousand soldier" and
    # "a thousand people" one "thousand people"
    assert RuleParser().parse(text).count == count
    with pytest.raises(PlanError, match=f"count {count} is out of range: a plan holds 1 to 64 entities"):
        plan_scene(text, None, 0, parser=RuleParser())


def test_runaway_magnitude_count_is_a_plan_error() -> None:
    with pytest.raises(PlanError, match="out of range"):
        plan_scene("a million million million people", None, 0, parser=RuleParser())


@pytest.mark.parametrize(
    ("text", "mix", "axis", "word"),
    [("five men", "gender=female,male", "gender", "men"),
     ("five girls", "age=child,senior", "age", "girls"),
     ("five girls", "gender=female,male", "gender", "girls"),
     ("five old nurses", "age=child,senior", "age", "old"),
     ("five dark-skinned nurses", "skin_tone=light,dark", "skin_tone", "dark-skinned"),
     ("five bald nurses", "hair=bald,long", "hair", "bald"),
     ("five muscular players", "body_type=slim,athletic", "body_type", "muscular"),
     ("a team of five women", {"gender": {"female": 1}}, "gender", "women")],
)
def test_mix_over_an_axis_the_noun_already_fixes_is_refused(text: str, mix, axis: str, word: str) -> None:
    # used to plan silently: "a female man", "an elderly girl", "a young old nurse", "nurse with light skin"
    # for dark-skinned nurses (only literal phrase words of "before" axes were compared)
    with pytest.raises(PlanError, match=rf"conflicts with the text: the text already fixes {axis} \('{word}'"):
        plan_scene(text, mix, 0, parser=RuleParser())


@pytest.mark.parametrize(
    "text",
    [TEAM, "five players", "five nurses", "a crowd of ten people", "a team of five players",
     "five nurses playing with children in a park"],
)
def test_neutral_nouns_take_every_axis(text: str) -> None:
    every = "skin_tone=light,dark;age=child,senior;gender=female,male;hair=bald,long;body_type=slim,athletic"
    mix = every if text != TEAM else "skin_tone=light,dark;age=child,senior;hair=bald,long;body_type=slim,athletic"
    assert len(plan_scene(text, mix, 0, parser=RuleParser()).entities) >= 1


def test_implied_by_is_validated_and_merged(tmp_path) -> None:
    extra = tmp_path / "extra.json"
    extra.write_text(json.dumps({"axes": {"gender": {"position": "before", "values": {"male": "male"},
                                                      "implied_by": {"male": ["lad"]}}}}))
    registry = load_axes(extra)
    assert registry["gender"].implying_words()["lad"] == "male"
    assert registry["gender"].implying_words()["men"] == "male"  # shipped words kept
    with pytest.raises(PlanError, match="conflicts with the text"):
        plan_scene("five lads", "gender=female,male", 0, parser=RuleParser(), axes=extra)
    extra.write_text(json.dumps({"axes": {"x": {"values": {"a": "a thing"}, "implied_by": {"b": ["bee"]}}}}))
    with pytest.raises(PlanError, match="unknown value 'b'"):
        load_axes(extra)
    extra.write_text(json.dumps({"axes": {"x": {"values": {"a": "a thing"}, "implied_by": {"a": "word"}}}}))
    with pytest.raises(PlanError, match="list of non-empty words"):
        load_axes(extra)
