"""A Stable Diffusion folder (UNet2DConditionModel + AutoencoderKL + CLIP text encoder and
tokenizer + scheduler) loaded as a latent, text-conditional difflab pipeline: the same prompt
embeddings, the same eps and guided eps as diffusers' own modules, and the same DDIM latents
as StableDiffusionPipeline."""

from __future__ import annotations

import json
import string
from pathlib import Path

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from difflab.io import LoadError  # noqa: E402
from difflab.pipeline import Pipeline  # noqa: E402
from difflab.samplers import ddim  # noqa: E402

PROMPT = "a red circle"


def tiny_tokenizer(folder: Path) -> transformers.CLIPTokenizer:
    """A CLIP tokenizer over single characters (no merges), 16 tokens long."""
    folder.mkdir(parents=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in string.ascii_lowercase + string.digits:
        vocab[c], vocab[c + "</w>"] = len(vocab), len(vocab) + 1
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 16}))
    return transformers.CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)


def save_sd(folder: Path, **scheduler) -> diffusers.StableDiffusionPipeline:
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
        norm_num_groups=4, attention_head_dim=4)
    vae = diffusers.AutoencoderKL(
        block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
        layers_per_block=1, sample_size=16)
    tokenizer = tiny_tokenizer(folder.parent / "tok")
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=2,
        vocab_size=2 + 2 * 36, max_position_embeddings=16, bos_token_id=0, eos_token_id=1,
        pad_token_id=1))
    sched = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                    beta_end=0.012, clip_sample=False, **scheduler)
    sd = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer,
                                           unet=unet, scheduler=sched, safety_checker=None,
                                           feature_extractor=None,
                                           requires_safety_checker=False)
    sd.set_progress_bar_config(disable=True)
    sd.save_pretrained(folder)
    return sd


def test_sd_folder_gives_diffusers_embeddings_and_eps(tmp_path):
    sd = save_sd(tmp_path / "sd", steps_offset=1, set_alpha_to_one=False)
    pipe = Pipeline.from_pretrained(tmp_path / "sd")
    assert pipe.is_latent and pipe.is_text and pipe.image_shape == (3, 16, 16)
    assert pipe.autoencoder_stage.scale_factor == sd.vae.config.scaling_factor
    cond_emb, null_emb = sd.encode_prompt(PROMPT, "cpu", 1, True)
    cond = pipe.encode_prompts([PROMPT])
    torch.testing.assert_close(cond.tokens, cond_emb)
    torch.testing.assert_close(pipe.encode_prompts([""]).tokens, null_emb)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        eps_c = sd.unet(x, 500, encoder_hidden_states=cond_emb).sample
        eps_u = sd.unet(x, 500, encoder_hidden_states=null_emb).sample
        torch.testing.assert_close(pipe.base(x, 501.0, cond).eps, eps_c, rtol=1e-5, atol=1e-5)
        guided = pipe.denoiser(guidance=4.0, clip=False)(x, 501.0, cond).eps
    torch.testing.assert_close(guided, eps_u + 4.0 * (eps_c - eps_u), rtol=1e-4, atol=1e-5)
    # negative prompt: its embedding takes the empty prompt's place
    neg_emb = sd.encode_prompt("blue", "cpu", 1, False)[0]
    with torch.no_grad():
        eps_n = sd.unet(x, 500, encoder_hidden_states=neg_emb).sample
        neg = pipe.denoiser(guidance=4.0, negative_prompt="blue", clip=False)(x, 501.0, cond)
    torch.testing.assert_close(neg.eps, eps_n + 4.0 * (eps_c - eps_n), rtol=1e-4, atol=1e-5)
    # sampling with a prompt and guidance decodes to images in [-1, 1]
    out = pipe(2, prompt=PROMPT, guidance=3.0, steps=3)
    assert out.samples.shape == (2, 3, 16, 16) and out.samples.abs().max() <= 1
    # the decoder is diffusers' with the latents unscaled by scaling_factor
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = sd.vae.decode(z / sd.vae.config.scaling_factor).sample.clamp(-1, 1)
    torch.testing.assert_close(pipe.decode(z), ref, rtol=1e-5, atol=1e-5)


def test_sd_guided_ddim_matches_stable_diffusion_pipeline(tmp_path):
    sd = save_sd(tmp_path / "sd", steps_offset=1, set_alpha_to_one=True)
    pipe = Pipeline.from_pretrained(tmp_path / "sd")
    steps, w = 6, 5.0
    want = sd(PROMPT, num_inference_steps=steps, guidance_scale=w, eta=0.0,
              generator=torch.Generator().manual_seed(7), output_type="latent").images
    x = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(7))
    ts = pipe.default_grid(steps)
    assert ts[:-1].tolist() == (sd.scheduler.timesteps + 1).tolist()  # leading, offset 1
    with torch.no_grad():
        got = ddim(pipe.denoiser(guidance=w, clip=False), x.double(), ts,
                   cond=pipe.encode_prompts([PROMPT]))
    torch.testing.assert_close(got.float(), want, rtol=1e-4, atol=1e-4)


def test_sd_layout_refusals(tmp_path):
    save_sd(tmp_path / "sd", steps_offset=1)
    index = json.loads((tmp_path / "sd" / "model_index.json").read_text())
    (tmp_path / "sd" / "model_index.json").write_text(json.dumps(
        {**index, "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"]}))
    with pytest.raises(LoadError, match="text_encoder_2="):
        Pipeline.from_pretrained(tmp_path / "sd")
    (tmp_path / "sd" / "model_index.json").write_text(json.dumps(index))
    weights = tmp_path / "sd" / "text_encoder" / "model.safetensors"
    weights.rename(weights.with_name("pytorch_model.bin"))
    pipe = Pipeline.from_pretrained(tmp_path / "sd")  # the encoder loads with the first prompt
    with pytest.raises(LoadError, match="pickled"):
        pipe.encode_prompts([PROMPT])


def test_prompt_to_prompt_refuses_a_diffusers_unet_by_its_cross_attention(tmp_path):
    from difflab.editing.prompt2prompt import prompt_to_prompt

    save_sd(tmp_path / "sd", steps_offset=1)
    pipe = Pipeline.from_pretrained(tmp_path / "sd")
    with pytest.raises(ValueError, match="difflab cross-attention.*DiffusersUNet has none"):
        prompt_to_prompt(pipe, PROMPT, "a blue circle", steps=2)


def test_cli_samples_a_stable_diffusion_folder(tmp_path):
    from difflab.cli.main import main

    save_sd(tmp_path / "sd", steps_offset=1)
    out = tmp_path / "grid.png"
    assert main(["sample", "--checkpoint", str(tmp_path / "sd"), "--prompt", PROMPT,
                 "--negative-prompt", "blue", "--guidance", "3", "--n", "2", "--steps", "2",
                 "--sampler", "dpmpp_2m", "--out", str(out), "--no-progress",
                 "--device", "cpu"]) == 0
    assert out.is_file()


def test_stable_diffusion_v1_scheduler_samples_with_plms(tmp_path):
    """SD 1.x folders ship a PNDMScheduler (PLMS, steps_offset 1): difflab's plms is the
    default sampler, on the scheduler's leading timesteps."""
    save_sd(tmp_path / "sd", steps_offset=1)
    config = {**diffusers.PNDMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, skip_prk_steps=True,
        set_alpha_to_one=False, steps_offset=1).config, "_class_name": "PNDMScheduler"}
    (tmp_path / "sd" / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    pipe = Pipeline.from_pretrained(tmp_path / "sd")
    assert pipe.default_sampler()[0] == "plms"
    assert pipe.default_grid(4).tolist() == [752, 502, 252, 2, 0]
    out = pipe(1, prompt=PROMPT, guidance=2.0, steps=4)
    assert out.samples.shape == (1, 3, 16, 16) and bool(out.samples.isfinite().all())


def test_fp16_variant_files_load(tmp_path):
    """Folders saved with variant="fp16" hold only the .fp16 safetensors: read as float32."""
    sd = save_sd(tmp_path / "ref", steps_offset=1)
    sd.to(torch.float16).save_pretrained(tmp_path / "sd", variant="fp16")
    pipe = Pipeline.from_pretrained(tmp_path / "sd")
    assert not (tmp_path / "sd" / "unet" / "diffusion_pytorch_model.safetensors").exists()
    cond = pipe.encode_prompts([PROMPT])
    want = sd.encode_prompt(PROMPT, "cpu", 1, False)[0]
    assert cond.tokens.dtype == torch.float32
    torch.testing.assert_close(cond.tokens, want.float(), rtol=1e-2, atol=1e-2)
    assert next(pipe.net.parameters()).dtype == torch.float32
