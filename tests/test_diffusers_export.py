"""`difflab export --format diffusers`: tiny random difflab models saved, exported, loaded in
diffusers and compared with difflab's own network, schedule and DDIM."""

import json

import pytest
import torch

from difflab.cli.main import main
from difflab.config import to_dict
from difflab.networks.unet import UNet, UNetConfig
from difflab.pipeline import Pipeline
from difflab.pipeline.card import ModelCard, StageCard
from difflab.pipeline.diffusers_out import export_diffusers, scheduler_config, unet2d_config
from difflab.process import make_process
from difflab.samplers import get_sampler

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.usefixtures("one_thread")

SHAPE = [2, 8, 8]
TINY = dict(in_channels=2, image_size=8, base_channels=16, channel_mult=(1, 2), num_res_blocks=1,
            attention_resolutions=(4,), num_heads=2, groups=4)


def save_model(root, prediction="eps", schedule="linear", num_classes=None, seed=0,
               process=None, learned_variance=False, **unet):
    """A randomly initialised difflab U-Net pipeline (every weight drawn: the zero-init
    output layers would hide a wrong mapping) saved into ``root``."""
    cfg = UNetConfig(**{**TINY, "num_classes": num_classes, **unet})
    torch.manual_seed(seed)
    net = UNet(cfg).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0.0, 0.3)
    process = process or make_process(schedule)
    names = [f"c{i}" for i in range(num_classes)] if num_classes else []
    stage = StageCard(name="diffusion", network="unet", network_config=to_dict(cfg),
                      sample_shape=SHAPE, weights="diffusion.safetensors",
                      process=process.to_config(), prediction=prediction, data_range=[-1.0, 1.0],
                      conditioning="class" if num_classes else "none", class_names=names,
                      learned_variance=learned_variance)
    Pipeline(ModelCard(stages=[stage]), net).save_pretrained(root)
    return root


def export(tmp_path, *args, **kwargs):
    src = save_model(tmp_path / "model", *args, **kwargs)
    assert main(["export", "--format", "diffusers", str(src), str(tmp_path / "out")]) == 0
    return Pipeline.from_pretrained(src, channels_last=False), tmp_path / "out"


@pytest.mark.parametrize("unet", [
    dict(time_conditioning="scale_shift"),
    dict(time_conditioning="add", num_res_blocks=2),
    # one head: attention at widths 16 and 64 (attention_head_dim None), three levels
    dict(num_heads=1, channel_mult=(1, 2, 4), attention_resolutions=(8, 2)),
])
def test_exported_unet_gives_difflab_outputs(tmp_path, unet):
    pipe, out = export(tmp_path, **unet)
    unet = diffusers.UNet2DModel.from_pretrained(out / "unet").eval()
    assert (unet.config.attention_head_dim is None) == (pipe.net.config.num_heads == 1)
    x = torch.randn(3, *SHAPE, generator=torch.Generator().manual_seed(1))
    for k in (0, 1, 37, 500, 998, 999):  # diffusers' step k is difflab's t = k + 1
        with torch.no_grad():
            ours = pipe.net(x, pipe.process.c_noise(torch.full((3,), k + 1.0)).float())
            theirs = unet(x, k).sample
        assert ours.abs().max() > 0.1
        torch.testing.assert_close(theirs, ours, atol=2e-5, rtol=1e-5)


def test_class_conditional_unet_takes_the_null_label(tmp_path):
    pipe, out = export(tmp_path, num_classes=3)
    unet = diffusers.UNet2DModel.from_pretrained(out / "unet").eval()
    assert unet.config.num_class_embeds == 4
    x = torch.randn(4, *SHAPE, generator=torch.Generator().manual_seed(2))
    labels = torch.tensor([0, 1, 2, 3])  # 3 is the null label of classifier-free guidance
    with torch.no_grad():
        ours = pipe.net(x, torch.full((4,), 250.0), labels)
        theirs = unet(x, 249, class_labels=labels).sample
    torch.testing.assert_close(theirs, ours, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("schedule", ["linear", "cosine", "scaled_linear", "sigmoid"])
def test_scheduler_has_difflab_betas(tmp_path, schedule):
    pipe, out = export(tmp_path, schedule=schedule, prediction="v")
    loaded = diffusers.DDPMPipeline.from_pretrained(out)
    sched = loaded.scheduler
    assert isinstance(sched, diffusers.DDPMScheduler)
    assert isinstance(loaded.unet, diffusers.UNet2DModel)
    assert sched.config.prediction_type == "v_prediction" and sched.config.clip_sample
    # the float32 betas are difflab's table rounded once; alpha_bar to float32 cumprod error
    assert torch.equal(sched.betas, pipe.process.betas.float())
    torch.testing.assert_close(sched.alphas_cumprod.double(), pipe.process.alpha_bar,
                               rtol=2e-5, atol=0)
    config = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert (config["trained_betas"] is None) == (schedule == "cosine")  # only cosine is named


def test_ddim_on_the_export_matches_difflab_ddim(tmp_path):
    pipe, out = export(tmp_path, prediction="eps")
    unet = diffusers.UNet2DModel.from_pretrained(out / "unet").eval()
    sched = diffusers.DDIMScheduler.from_pretrained(out / "scheduler", clip_sample=False)
    sched.set_timesteps(10)  # "leading": 900, 800, ..., 0, then alpha_bar = 1
    x = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(3))
    y = x.clone()
    with torch.no_grad():
        for k in sched.timesteps:
            y = sched.step(unet(y, k).sample, k, y).prev_sample
        ts = torch.cat([sched.timesteps.double() + 1, torch.zeros(1, dtype=torch.float64)])
        ours = get_sampler("ddim")(pipe.denoiser(clip=False), x, ts)
    assert ours.abs().max() > 0.1
    torch.testing.assert_close(y, ours, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("change, field", [
    (dict(prediction="edm"), "prediction 'edm'"),
    (dict(prediction="flow", schedule="rectified_flow"), "prediction 'flow'"),
    (dict(schedule="vpsde"), "process 'vpsde' is continuous-time"),
    (dict(process=make_process("linear", T=500)), "process T=500"),
    (dict(process=make_process("linear", zero_terminal_snr=True)), "zero_terminal_snr"),
    (dict(learned_variance=True, out_channels=4), "learned_variance"),
    (dict(base_channels=32, groups=32), "groups=32"),
    (dict(channel_mult=(1, 2, 4), image_size=8, attention_resolutions=(4, 2)), "num_heads=2"),
])
def test_unmappable_models_are_refused_by_name(tmp_path, capsys, change, field):
    src = save_model(tmp_path / "model", **change)
    with pytest.raises(ValueError, match=field.replace("(", r"\(")):
        export_diffusers(Pipeline.from_pretrained(src))
    assert main(["export", "--format", "diffusers", str(src), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert field in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_text_and_guidance_nets_and_score_models_are_refused():
    with pytest.raises(ValueError, match="context_dim=8"):
        unet2d_config(UNet(UNetConfig(**{**TINY, "context_dim": 8})), SHAPE)
    with pytest.raises(ValueError, match="guidance_embedding"):
        unet2d_config(UNet(UNetConfig(**{**TINY, "guidance_embedding": True})), SHAPE)
    with pytest.raises(ValueError, match="prediction 'score'"):
        scheduler_config(make_process("linear"), "score")


def test_zero_terminal_snr_v_model_exports_its_rescaled_betas(tmp_path):
    pipe, out = export(tmp_path, prediction="v",
                       process=make_process("linear", zero_terminal_snr=True))
    sched = diffusers.DDPMScheduler.from_pretrained(out / "scheduler")
    assert torch.equal(sched.betas, pipe.process.betas.float())
    assert sched.alphas_cumprod[-1] == 0


def test_cli_refuses_to_overwrite(tmp_path, capsys):
    src = save_model(tmp_path / "model")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    argv = ["export", "--format", "diffusers", str(src), str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--force" in err and len(err.strip().splitlines()) == 1
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert main(argv + ["--force"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["model_index.json", "scheduler", "unet"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no leftovers


def test_cli_exports_a_training_run(tmp_path, capsys):
    from conftest import train_tiny_digits

    train_tiny_digits(tmp_path, 2, groups=8)  # widths 16, 32, 48 all get 8 groups
    run, out = tmp_path / "run", tmp_path / "out"
    assert main(["export", "--format", "diffusers", str(run), str(out)]) == 0
    assert "label 10 is unconditional" in capsys.readouterr().out
    pipe = Pipeline.from_pretrained(run, channels_last=False)
    loaded = diffusers.DDPMPipeline.from_pretrained(out)
    x = torch.randn(2, *pipe.sample_shape, generator=torch.Generator().manual_seed(4))
    labels = torch.tensor([7, 10])
    with torch.no_grad():
        ours = pipe.net(x, torch.full((2,), 600.0), labels)
        theirs = loaded.unet(x, 599, class_labels=labels).sample
    torch.testing.assert_close(theirs, ours, atol=2e-5, rtol=1e-5)
    sched = loaded.scheduler
    assert sched.config.beta_schedule == "squaredcos_cap_v2"  # bit-exact: no trained_betas
    assert torch.equal(sched.betas, pipe.process.betas.float())


def test_the_default_training_preset_needs_one_group_count():
    """The recipe's default U-Net (--model-size tiny: width 32 and 64 under --groups 32) has
    16 groups at width 32 and 32 elsewhere: refused with the --groups that maps."""
    from difflab.recipes import MODEL_SIZES

    tiny = dict(in_channels=1, image_size=8, attention_resolutions=(4,), **MODEL_SIZES["tiny"])
    with pytest.raises(ValueError, match=r"16 at width 32, 32 at width 64.*--groups 16 "):
        unet2d_config(UNet(UNetConfig(**tiny)), [1, 8, 8])
    assert unet2d_config(UNet(UNetConfig(**tiny, groups=16)), [1, 8, 8])["norm_num_groups"] == 16
    assert unet2d_config(UNet(UNetConfig(in_channels=3)), [3, 16, 16])["norm_num_groups"] == 32


def test_ddpm_pipeline_on_the_export_draws_difflab_ddpm_samples(tmp_path):
    """DDPMPipeline (clip_sample, beta_tilde variance, 10 "leading" steps) from one generator
    = difflab's ddpm sampler (clipped x0_hat) on the grid k + 1 from the same generator: the
    same initial noise and per-step noise draws, in the same order."""
    pipe, out = export(tmp_path, prediction="x0", schedule="cosine")
    loaded = diffusers.DDPMPipeline.from_pretrained(out)
    loaded.set_progress_bar_config(disable=True)
    images = loaded(batch_size=2, generator=torch.Generator().manual_seed(5),
                    num_inference_steps=10, output_type="np").images  # [B, H, W, C] in [0, 1]
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, *SHAPE, generator=g)
    ts = torch.cat([loaded.scheduler.timesteps.double() + 1, torch.zeros(1, dtype=torch.float64)])
    ours = get_sampler("ddpm")(pipe.denoiser(), x, ts, generator=g)
    ours = (ours / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)
    assert ours.std() > 0.05
    torch.testing.assert_close(torch.from_numpy(images), ours, atol=1e-4, rtol=1e-4)


def test_export_needs_no_diffusers(monkeypatch):
    """Without diffusers no named schedule can be checked bit for bit: trained_betas."""
    import sys

    monkeypatch.setitem(sys.modules, "diffusers", None)  # import diffusers -> ImportError
    config, notes = scheduler_config(make_process("cosine"), "eps", [-1.0, 1.0])
    assert config["trained_betas"] == make_process("cosine").betas.tolist()
    assert config["_diffusers_version"] == "0.30.0" and "trained_betas" in notes[0]


@pytest.mark.parametrize("num_classes", [None, 3])
def test_export_loads_back_into_difflab_with_the_same_samples(tmp_path, num_classes):
    """difflab -> diffusers -> difflab: the exported folder reads back as a pipeline (a
    class-conditional one with its class names and null label, from difflab.json) whose
    guided DDIM samples equal the original's."""
    pipe, out = export(tmp_path, num_classes=num_classes)
    back = Pipeline.from_pretrained(out)
    assert back.card.stage_of("diffusion").class_names == list(pipe.stage.class_names)
    kw = dict(n=2, steps=4, sampler="ddim", spacing="trailing", seed=5)
    if num_classes:
        kw.update(labels=[0, 2], guidance=2.0)
    with torch.no_grad():
        ours, theirs = pipe(**kw).samples, back(**kw).samples
    assert ours.std() > 0.05
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)
