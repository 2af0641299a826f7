"""Proportional-attribute scene planner.

Instead of fighting an image model's bias towards some attributes with ever more LoRAs, decide each person's
attributes in code, in the exact proportions asked for, and hand a layout-conditioned image model (GLIGEN,
LLM-grounded Diffusion) one prompt per bounding box::

    from deltaw.plan import plan_scene
    plan = plan_scene("a female basketball team of five players", "skin_tone=light:1,medium:1,dark:1", seed=7)
    plan.to_gligen()   # kwargs for diffusers' StableDiffusionGLIGENPipeline
    plan.to_lmd()      # LMD layout: caption, (phrase, [x, y, w, h]) on 512x512, background, negative
    plan.write("out")  # plan.json, gligen.json, lmd.json, lmd.txt, layout.png

Pieces: :mod:`~deltaw.plan.quotas` (exact apportionment), :mod:`~deltaw.plan.parsing` (text -> count, noun,
scene, activity, setting), :mod:`~deltaw.plan.grammar` (generated parse pairs and the parser evaluator),
:mod:`~deltaw.plan.llm_parser` (the learned parser, ``PARSERS["llm"]``),
:mod:`~deltaw.plan.layout` (boxes), :mod:`~deltaw.plan.planner` (the plan and its exports),
:mod:`~deltaw.plan.render` (optional diffusers hand-off).
"""

from __future__ import annotations

from deltaw.plan.axes import AxisRegistry, AxisSpec, default_axes, load_axes
from deltaw.plan.errors import PlanError
from deltaw.plan.grammar import (
    ParseExample,
    ParseReport,
    evaluate_parser,
    evaluate_parser_report,
    generate_examples,
    read_jsonl,
    write_jsonl,
)
from deltaw.plan.layout import LayoutSpec, check_boxes, grid_layout
from deltaw.plan.llm_parser import LlmParser, default_llm_parser, evaluate_llm_parser, train_parser_adapter
from deltaw.plan.mix import JointTable, load_joint_table, parse_mix, product_table
from deltaw.plan.parsing import PARSERS, ParsedScene, Parser, RuleParser, get_parser
from deltaw.plan.planner import DEFAULT_NEGATIVE, Entity, ScenePlan, plan_scene
from deltaw.plan.quotas import MAX_COUNT, assign_quotas, deal

PARSERS.setdefault("llm", default_llm_parser)  # the learned parser; `deltaw plan --no-llm` uses the rule parser

__all__ = [
    "AxisRegistry",
    "AxisSpec",
    "DEFAULT_NEGATIVE",
    "Entity",
    "JointTable",
    "LayoutSpec",
    "LlmParser",
    "MAX_COUNT",
    "PARSERS",
    "ParseExample",
    "ParseReport",
    "ParsedScene",
    "Parser",
    "PlanError",
    "RuleParser",
    "ScenePlan",
    "assign_quotas",
    "check_boxes",
    "deal",
    "default_axes",
    "evaluate_parser",
    "evaluate_llm_parser",
    "evaluate_parser_report",
    "generate_examples",
    "get_parser",
    "grid_layout",
    "load_axes",
    "load_joint_table",
    "parse_mix",
    "plan_scene",
    "product_table",
    "read_jsonl",
    "train_parser_adapter",
    "write_jsonl",
]
