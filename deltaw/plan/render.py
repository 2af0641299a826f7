"""Hand a plan to diffusers' GLIGEN pipeline (``--render``).

Why GLIGEN: it takes exactly what the planner produces — one phrase per box — and grounds each phrase in its
box through gated self-attention, so the attributes decided by the quotas land on the intended person.
diffusers is optional: it is imported only here, and its absence is a clear :class:`PlanError`, not an
``ImportError`` at ``deltaw --help`` time.

Limit: diffusers' GLIGEN pipeline keeps only the first 30 boxes (``max_objs = 30``) and drops the rest with a
warning. Dropping people silently would break the mix, so :func:`render_gligen` refuses plans above 30.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from deltaw.plan.errors import PlanError

if TYPE_CHECKING:
    from deltaw.plan.planner import ScenePlan

log = logging.getLogger(__name__)

#: diffusers' StableDiffusionGLIGENPipeline conditions on at most this many boxes.
GLIGEN_MAX_BOXES = 30
#: The public GLIGEN text-box checkpoint in diffusers format (used only if it is already on local disk).
DEFAULT_GLIGEN_MODEL = "masterful/gligen-1-4-generation-text-box"


def require_diffusers() -> Any:
    """Import diffusers' GLIGEN pipeline class, or raise :class:`PlanError` saying how to get it."""
    try:
        from diffusers import StableDiffusionGLIGENPipeline
    except ImportError as exc:
        raise PlanError(
            "--render needs diffusers with StableDiffusionGLIGENPipeline (pip install diffusers); "
            f"import failed: {exc}. The plan files were still written and can be rendered elsewhere."
        ) from None
    return StableDiffusionGLIGENPipeline


def load_gligen_pipeline(
    model: str = DEFAULT_GLIGEN_MODEL, *, device: str | None = None, local_files_only: bool = True
) -> Any:
    """Load a GLIGEN pipeline from a local directory or the local Hugging Face cache.

    ``local_files_only`` defaults to True: rendering must not start a multi-gigabyte download as a side effect.
    """
    pipeline_cls = require_diffusers()
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    # diffusers renamed ``torch_dtype`` to ``dtype`` (the old name warns); pass whichever this version reads.
    from diffusers.pipelines import pipeline_utils

    dtype_key = "dtype" if hasattr(pipeline_utils, "_resolve_dtype") else "torch_dtype"
    try:
        pipe = pipeline_cls.from_pretrained(model, local_files_only=local_files_only, **{dtype_key: dtype})
    except (OSError, ValueError) as exc:
        raise PlanError(f"cannot load GLIGEN pipeline {model!r} from local files: {exc}") from None
    return pipe.to(device)


def gligen_call_kwargs(
    plan: ScenePlan, *, beta: float = 0.3, steps: int = 50, guidance_scale: float = 7.5
) -> dict[str, Any]:
    """The keyword arguments :func:`render_gligen` passes to the pipeline (checked, without a generator)."""
    n = len(plan.entities)
    if n > GLIGEN_MAX_BOXES:
        raise PlanError(
            f"GLIGEN conditions on at most {GLIGEN_MAX_BOXES} boxes and would drop {n - GLIGEN_MAX_BOXES} "
            f"of the {n} planned entities; plan fewer, or use the LMD export (lmd.json)"
        )
    if not 0.0 <= beta <= 1.0:
        raise PlanError(f"gligen_scheduled_sampling_beta must be in [0, 1], not {beta}")
    if steps < 1:
        raise PlanError(f"steps must be >= 1, not {steps}")
    return {
        **plan.to_gligen(),
        "gligen_scheduled_sampling_beta": beta,
        "num_inference_steps": steps,
        "guidance_scale": guidance_scale,
    }


def render_gligen(
    plan: ScenePlan,
    pipe: Any,
    *,
    beta: float = 0.3,
    steps: int = 50,
    guidance_scale: float = 7.5,
    seed: int | None = None,
    height: int | None = None,
    width: int | None = None,
) -> Any:
    """Render ``plan`` with a loaded ``StableDiffusionGLIGENPipeline``; returns the PIL image.

    ``seed`` defaults to the plan's seed, so a plan and its picture are reproduced together.
    """
    import torch

    kwargs = gligen_call_kwargs(plan, beta=beta, steps=steps, guidance_scale=guidance_scale)
    generator = torch.Generator(device="cpu").manual_seed(plan.seed if seed is None else seed)
    log.info("rendering %d boxes with GLIGEN (%d steps, beta %.2f)", len(plan.entities), steps, beta)
    result = pipe(**kwargs, generator=generator, height=height, width=width, output_type="pil")
    return result.images[0]
