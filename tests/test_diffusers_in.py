"""diffusers UNet2DModel folders loaded as difflab pipelines (pipeline.diffusers_in): the same
network outputs, the same DDIM trajectory as DDIMPipeline, exact process mapping, refusals."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from difflab.cli.main import main  # noqa: E402
from difflab.io import LoadError  # noqa: E402
from difflab.pipeline import Pipeline  # noqa: E402
from difflab.pipeline.diffusers_in import (  # noqa: E402
    diffusers_time_grid,
    is_diffusers_folder,
    process_from_scheduler,
    scheduler_sampler,
)
from difflab.process import process_from_config  # noqa: E402
from difflab.samplers import ddim, ddpm  # noqa: E402

TINY_UNET = dict(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                 block_out_channels=(8, 16), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                 up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4,
                 attention_head_dim=8)


def tiny_unet(seed: int = 0, **overrides) -> diffusers.UNet2DModel:
    torch.manual_seed(seed)
    return diffusers.UNet2DModel(**{**TINY_UNET, **overrides}).eval()


def save_ddim(folder: Path, **scheduler) -> tuple[diffusers.UNet2DModel, diffusers.DDIMPipeline]:
    unet = tiny_unet()
    pipe = diffusers.DDIMPipeline(unet, diffusers.DDIMScheduler(clip_sample=False, **scheduler))
    pipe.save_pretrained(folder)
    return unet, pipe


def diffusers_ddim(pipe, seed: int, steps: int) -> np.ndarray:
    g = torch.Generator().manual_seed(seed)
    return pipe(batch_size=1, generator=g, num_inference_steps=steps, eta=0.0,
                output_type="np").images


def difflab_ddim(loaded: Pipeline, seed: int, steps: int) -> np.ndarray:
    """difflab's DDIM from diffusers' initial noise (its generator, unit variance)."""
    x = torch.randn((1, 3, 8, 8), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        out = ddim(loaded.denoiser(clip=False), x.double(), loaded.default_grid(steps))
    return (out.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def test_unet_gives_diffusers_eps(tmp_path):
    unet, _ = save_ddim(tmp_path / "m")
    assert is_diffusers_folder(tmp_path / "m")
    pipe = Pipeline.from_pretrained(tmp_path / "m")
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([1000.0, 500.0, 37.0, 1.0])  # difflab step t = diffusers timestep + 1
    with torch.no_grad():
        ours = pipe.base(x, t).eps
        theirs = unet(x, torch.tensor([999, 499, 36, 0])).sample
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert pipe.net.timesteps(pipe.process.c_noise(t).float()).tolist() == [999, 499, 36, 0]
    assert pipe.stage.sampler == "ddim" and pipe.stage.prediction == "eps"


def test_ddim_matches_ddim_pipeline(tmp_path):
    _, ref = save_ddim(tmp_path / "m")
    pipe = Pipeline.from_pretrained(tmp_path / "m")
    for steps in (10, 7):
        np.testing.assert_allclose(difflab_ddim(pipe, 3, steps), diffusers_ddim(ref, 3, steps),
                                   atol=2e-5)
    # the pipeline's own call runs that DDIM on that grid (from sigma(t_0) times the noise)
    out = pipe(1, seed=3, steps=10, clip=False).samples
    ts = pipe.default_grid(10)
    x = torch.randn((1, 3, 8, 8), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = ddim(pipe.denoiser(clip=False), pipe.process.sigma(ts[0]) * x, ts)
    torch.testing.assert_close(out, want.float())


@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large"])
def test_ddpm_matches_ddpm_pipeline_with_clip_sample(tmp_path, variance_type):
    """Ancestral sampling with diffusers' noise draws: clip_sample is difflab's x0 clipping,
    variance_type the ddpm sampler's variance."""
    ref = diffusers.DDPMPipeline(tiny_unet(), diffusers.DDPMScheduler(
        clip_sample=True, variance_type=variance_type))
    ref.save_pretrained(tmp_path / "m")
    ref.set_progress_bar_config(disable=True)
    pipe = Pipeline.from_pretrained(tmp_path / "m")
    want = ref(batch_size=1, generator=torch.Generator().manual_seed(2), num_inference_steps=8,
               output_type="np").images
    g = torch.Generator().manual_seed(2)
    x = torch.randn((1, 3, 8, 8), generator=g)  # then every step's noise from g, as diffusers
    with torch.no_grad():
        out = ddpm(pipe.denoiser(), x, pipe.default_grid(8), g, **pipe.stage.sampler_options)
    got = (out / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(got, want, atol=2e-5)


def test_save_pretrained_round_trip(tmp_path):
    save_ddim(tmp_path / "m", timestep_spacing="trailing")
    pipe = Pipeline.from_pretrained(tmp_path / "m")
    pipe.save_pretrained(tmp_path / "copy")
    again = Pipeline.from_pretrained(tmp_path / "copy")
    assert again.card.to_dict()["stages"][0]["diffusers_timesteps"] == {
        "spacing": "trailing", "steps_offset": 0}
    torch.testing.assert_close(again(2, steps=3).samples, pipe(2, steps=3).samples,
                               rtol=0, atol=0)


def test_v_prediction_zero_terminal_snr(tmp_path):
    _, ref = save_ddim(tmp_path / "m", prediction_type="v_prediction",
                       beta_schedule="scaled_linear", rescale_betas_zero_snr=True,
                       timestep_spacing="trailing")
    pipe = Pipeline.from_pretrained(tmp_path / "m")
    sched = ref.scheduler
    assert pipe.stage.prediction == "v" and pipe.process.zero_terminal_snr
    ab = pipe.process.alpha(torch.arange(1, 1001, dtype=torch.float64)) ** 2
    torch.testing.assert_close(ab, sched.alphas_cumprod.double(), rtol=1e-5, atol=1e-7)
    assert float(ab[-1]) == 0.0
    # one scheduler step: the same x0_hat (alpha_T = 0: x0_hat = -v) and the same next x
    sched.set_timesteps(5)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    for k in sched.timesteps[:2].tolist():
        with torch.no_grad():
            v = ref.unet(x, k).sample
            pred = pipe.base(x, torch.tensor(k + 1.0))
        step = sched.step(v, k, x, eta=0.0)
        torch.testing.assert_close(pred.x0, step.pred_original_sample, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(difflab_ddim(pipe, 5, 5), diffusers_ddim(ref, 5, 5), atol=2e-5)
    # trailing, 5 of 1000 steps: 1000, 800, ..., 200 (diffusers' 999, ..., 199), then 0
    assert pipe.default_grid(5).tolist() == [1000, 800, 600, 400, 200, 0]


@pytest.mark.parametrize("config", [
    {"beta_schedule": "linear", "beta_start": 0.0002, "beta_end": 0.03},
    {"beta_schedule": "scaled_linear"},
    {"beta_schedule": "squaredcos_cap_v2"},
    {"beta_schedule": "sigmoid"},
    {"trained_betas": np.linspace(1e-4, 0.02, 1000).tolist()},
    {"trained_betas": (np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2).tolist()},
])
def test_schedules_match_alphas_cumprod(config):
    sched = diffusers.DDPMScheduler(**config)
    process_config, prediction = process_from_scheduler({**sched.config,
                                                         "_class_name": "DDPMScheduler"})
    process = process_from_config(process_config)
    ab = process.alpha(torch.arange(1, 1001, dtype=torch.float64)) ** 2
    torch.testing.assert_close(ab, sched.alphas_cumprod.double(), rtol=2e-5, atol=1e-8)
    assert prediction == "eps"


@pytest.mark.parametrize(("spacing", "offset", "steps"), [
    ("leading", 0, 10), ("leading", 1, 7), ("trailing", 0, 3), ("linspace", 0, 3),
    ("linspace", 0, 50)])
def test_time_grid_is_the_schedulers_timesteps(spacing, offset, steps):
    for cls in (diffusers.DDPMScheduler, diffusers.DDIMScheduler):
        sched = cls(timestep_spacing=spacing, steps_offset=offset, clip_sample=False)
        sched.set_timesteps(steps)
        _, _, grid, _ = scheduler_sampler({**sched.config, "_class_name": cls.__name__})
        ts = diffusers_time_grid(grid, 1000, steps)
        assert ts[:-1].tolist() == (sched.timesteps + 1).tolist()


def scheduler_config(cls, **kwargs) -> dict:
    """The config a saved scheduler folder holds (with its class name)."""
    return {**cls(**kwargs).config, "_class_name": cls.__name__}


@pytest.mark.parametrize(("name", "sampler"), [
    ("DDPMScheduler", "ddpm"), ("PNDMScheduler", "plms"), ("EulerDiscreteScheduler", "euler"),
    ("HeunDiscreteScheduler", "heun"), ("LMSDiscreteScheduler", "lms"),
    ("DPMSolverMultistepScheduler", "dpmpp_2m"), ("UniPCMultistepScheduler", "unipc_bh2")])
def test_default_configs_of_mapped_schedulers_load(name, sampler):
    config = scheduler_config(getattr(diffusers, name))
    assert scheduler_sampler(config)[0] == sampler
    assert process_from_scheduler(config)[0]["schedule"] == "linear"


def test_ddpm_options_map():
    config = scheduler_config(diffusers.DDPMScheduler, variance_type="fixed_large")
    assert scheduler_sampler(config)[:2] == ("ddpm", {"variance": "beta"})
    config = scheduler_config(diffusers.DDPMScheduler, variance_type="learned_range")
    assert scheduler_sampler(config)[3] is True
    config = scheduler_config(diffusers.DDIMScheduler, clip_sample=False)
    grid = scheduler_sampler(config)[2]
    assert diffusers_time_grid(grid, 1000, 4).tolist() == [751, 501, 251, 1, 0]


@pytest.mark.parametrize(("config", "key"), [
    ({"_class_name": "DDIMScheduler", "thresholding": True, "clip_sample": False},
     "thresholding"),
    ({"_class_name": "DDPMScheduler", "beta_schedule": "exp"}, "beta_schedule"),
    ({"_class_name": "DDIMScheduler", "clip_sample": True}, "clip_sample"),
    ({"_class_name": "DDPMScheduler", "clip_sample_range": 2.0}, "clip_sample_range"),
    ({"_class_name": "ScoreSdeVeScheduler"}, "_class_name"),
    ({"_class_name": "FlowMatchEulerDiscreteScheduler"}, "_class_name"),
    ({"_class_name": "DDPMScheduler", "prediction_type": "flow_prediction"},
     "prediction_type"),
    ({"_class_name": "DDPMScheduler", "variance_type": "learned"}, "variance_type"),
    ({"_class_name": "EulerDiscreteScheduler", "timestep_type": "continuous"},
     "timestep_type"),
    ({"_class_name": "DDPMScheduler", "new_option": 1}, "new_option"),
    ({"_class_name": "DPMSolverMultistepScheduler", "use_flow_sigmas": True},
     "use_flow_sigmas"),
    ({"_class_name": "DDPMScheduler", "trained_betas": [0.1, 0.3, 0.2, 0.5]
      + [0.01] * 996}, "trained_betas"),
])
def test_unmappable_scheduler_configs_are_refused_by_name(tmp_path, config, key):
    unet = tiny_unet()
    unet.save_pretrained(tmp_path / "unet")
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    with pytest.raises(LoadError, match=f"{key}="):
        Pipeline.from_pretrained(tmp_path / "unet")  # a lone unet folder


def test_lone_unet_folder_and_refusals(tmp_path):
    unet = tiny_unet()
    unet.save_pretrained(tmp_path / "unet")
    diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2").save_pretrained(
        tmp_path / "scheduler")
    pipe = Pipeline.from_pretrained(tmp_path / "unet")
    assert pipe.stage.sampler == "ddpm" and pipe.process.schedule == "cosine"
    assert pipe(2, steps=3).samples.shape == (2, 3, 8, 8)
    # a pickle instead of safetensors is refused; so is a Fourier-time (score SDE) U-Net
    (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").rename(
        tmp_path / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(LoadError, match="pickled"):
        Pipeline.from_pretrained(tmp_path / "unet")
    tiny_unet(time_embedding_type="fourier").save_pretrained(tmp_path / "unet")
    with pytest.raises(LoadError, match="time_embedding_type="):
        Pipeline.from_pretrained(tmp_path / "unet")
    # class labels without a null class (difflab.json names the classes of difflab's exports)
    tiny_unet(num_class_embeds=3).save_pretrained(tmp_path / "unet")
    with pytest.raises(LoadError, match="num_class_embeds=3"):
        Pipeline.from_pretrained(tmp_path / "unet")


def test_other_pipelines_and_raw_weights_are_refused(tmp_path):
    save_ddim(tmp_path / "m")
    index = json.loads((tmp_path / "m" / "model_index.json").read_text())
    (tmp_path / "m" / "model_index.json").write_text(json.dumps(
        {**index, "vqvae": ["diffusers", "VQModel"]}))  # LDMPipeline's latent space
    with pytest.raises(LoadError, match="vqvae="):
        Pipeline.from_pretrained(tmp_path / "m")
    (tmp_path / "m" / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="one set of weights"):
        Pipeline.from_pretrained(tmp_path / "m", ema=False)


def test_missing_extra_is_one_line(tmp_path, monkeypatch):
    save_ddim(tmp_path / "m")
    monkeypatch.setitem(sys.modules, "diffusers", None)
    with pytest.raises(LoadError, match=r"difflab\[diffusers\]"):
        Pipeline.from_pretrained(tmp_path / "m")


def test_cli_samples_a_diffusers_folder(tmp_path, capsys):
    save_ddim(tmp_path / "m")
    out = tmp_path / "grid.png"
    assert main(["sample", "--checkpoint", str(tmp_path / "m"), "--n", "2", "--steps", "4",
                 "--out", str(out), "--save-npz", str(tmp_path / "s.npz"),
                 "--no-progress", "--device", "cpu"]) == 0
    assert out.is_file()
    assert np.load(tmp_path / "s.npz")["images"].shape == (2, 8, 8, 3)
    (tmp_path / "m" / "scheduler" / "scheduler_config.json").write_text(
        json.dumps({"_class_name": "DDIMScheduler", "thresholding": True}))
    assert main(["sample", "--checkpoint", str(tmp_path / "m"), "--out",
                 str(tmp_path / "other.png")]) == 2
    assert "thresholding=True" in capsys.readouterr().err
