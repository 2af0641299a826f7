"""The --render hand-off to diffusers' StableDiffusionGLIGENPipeline.

No mocks: where diffusers is installed, a tiny randomly initialised GLIGEN pipeline is built from configs (a
byte-level CLIP tokenizer written to a temp dir, a 2-layer CLIP text encoder, a gated-attention UNet, a small
VAE) and the plan is rendered through it; a forward hook on the UNet's box-projection network checks that the
boxes and the number of phrases that reached the model are the plan's. Without diffusers those tests skip.
"""

from __future__ import annotations

import json
import sys

import pytest

from deltaw.plan import PlanError, plan_scene
from deltaw.plan.render import GLIGEN_MAX_BOXES, gligen_call_kwargs, render_gligen, require_diffusers

TEAM = "a female basketball team of five players"
THIRDS = "skin_tone=light:1,medium:1,dark:1"


def test_missing_diffusers_is_a_clear_error(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "diffusers", None)
    with pytest.raises(PlanError, match=r"--render needs diffusers .*pip install diffusers"):
        require_diffusers()


def test_call_kwargs_and_limits() -> None:
    plan = plan_scene(TEAM, THIRDS, seed=7)
    kwargs = gligen_call_kwargs(plan, beta=0.4, steps=3)
    assert kwargs["gligen_phrases"] == [e.prompt for e in plan.entities]
    assert kwargs["gligen_boxes"] == [list(e.box) for e in plan.entities]
    assert kwargs["gligen_scheduled_sampling_beta"] == 0.4 and kwargs["num_inference_steps"] == 3
    assert kwargs["prompt"] == TEAM
    with pytest.raises(PlanError, match="at most 30 boxes"):
        gligen_call_kwargs(plan_scene("31 nurses", seed=0))
    assert GLIGEN_MAX_BOXES == 30
    with pytest.raises(PlanError, match="beta"):
        gligen_call_kwargs(plan, beta=1.5)


def _byte_vocab() -> dict[str, int]:
    """CLIP's byte-to-unicode alphabet, each symbol alone and word-final, plus the two specials: a complete
    (if merge-free) byte-level BPE vocabulary."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    symbols = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    return {s: i for i, s in enumerate(symbols)}


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory):
    pytest.importorskip("diffusers")
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionGLIGENPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    tok_dir = tmp_path_factory.mktemp("clip-tokenizer")
    vocab = _byte_vocab()
    (tok_dir / "vocab.json").write_text(json.dumps(vocab))
    (tok_dir / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir), model_max_length=77)

    torch.manual_seed(0)
    eos = vocab["<|endoftext|>"]
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(vocab),
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            projection_dim=32,
            bos_token_id=vocab["<|startoftext|>"],
            eos_token_id=eos,
            pad_token_id=eos,
        )
    )
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_type="gated",
        norm_num_groups=32,
    )
    vae = AutoencoderKL(
        block_out_channels=[32, 64],
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        norm_num_groups=32,
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        sample_size=16,
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False
    )
    pipe = StableDiffusionGLIGENPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_plan_renders_through_gligen(tiny_pipeline) -> None:
    import numpy as np
    import torch

    plan = plan_scene(TEAM, THIRDS, seed=7)
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def capture(module, args, kwargs):  # what reaches GLIGEN's box/phrase projection
        seen.append((kwargs["boxes"].detach().clone(), kwargs["masks"].detach().clone()))

    handle = tiny_pipeline.unet.position_net.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        image = render_gligen(plan, tiny_pipeline, steps=1, height=16, width=16)
    finally:
        handle.remove()
    assert image.size == (16, 16)
    boxes, masks = seen[0]
    n = len(plan.entities)
    assert int(masks[-1].sum()) == n  # the conditional half of the batch sees one phrase per entity
    assert torch.allclose(boxes[-1, :n], torch.tensor([list(e.box) for e in plan.entities]))
    assert np.asarray(image).shape == (16, 16, 3)
