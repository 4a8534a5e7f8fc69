"""Loading diffusers AutoencoderKL folders: outputs equal diffusers' own, and every folder the
loader cannot honour is refused in one line naming the file and the key."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from difflab.io import LoadError
from difflab.networks import Autoencoder
from difflab.networks.diffusers_vae import (
    convert_diffusers_config,
    diffusers_scaling,
    load_diffusers_autoencoder,
)

pytestmark = pytest.mark.usefixtures("one_thread")

WEIGHTS = "diffusion_pytorch_model.safetensors"
SMALL = dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
             latent_channels=4, sample_size=16)
#: three resolutions, two layers, no attention nor 1x1 convs, other channel counts
OTHER = dict(block_out_channels=(16, 32, 32), layers_per_block=2, norm_num_groups=16,
             latent_channels=3, in_channels=1, out_channels=2, mid_block_add_attention=False,
             use_quant_conv=False, use_post_quant_conv=False, sample_size=16)


def diffusers_vae(folder, **options):
    """A randomly initialised diffusers AutoencoderKL (GroupNorm affine parameters perturbed
    too, so that they are tested), saved to ``folder``."""
    diffusers = pytest.importorskip("diffusers")
    n = len(options["block_out_channels"])
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * n,
                                  up_block_types=("UpDecoderBlock2D",) * n, **options).eval()
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(0.1 * torch.randn_like(p))
    vae.save_pretrained(folder)
    return vae


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vae")
    return folder, diffusers_vae(folder, **SMALL)


def assert_parity(vae, ours: Autoencoder, in_channels: int, f: int) -> None:
    torch.manual_seed(1)
    x = torch.rand(2, in_channels, 16, 16) * 2 - 1
    z = torch.randn(2, ours.latent_channels, 16 // f, 16 // f)
    with torch.no_grad():
        theirs, post = vae.encode(x).latent_dist, ours.encode(x)
        torch.testing.assert_close(post.mean, theirs.mean, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(post.logvar, theirs.logvar, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(post.reg_loss, theirs.kl(), atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(ours.decode(z), vae.decode(z).sample, atol=1e-5, rtol=1e-5)


def load(folder) -> Autoencoder:
    config, state = load_diffusers_autoencoder(folder)
    ours = Autoencoder(config).eval()
    ours.load_state_dict(state)
    return ours


def test_outputs_equal_diffusers(small):
    folder, vae = small
    ours = load(folder)
    assert ours.downsample_factor == 2 and ours.config.block_out_channels == (32, 64)
    assert_parity(vae, ours, 3, 2)


def test_outputs_equal_diffusers_without_attention_or_quant_convs(tmp_path):
    vae = diffusers_vae(tmp_path, **OTHER)
    ours = load(tmp_path)
    assert ours.quant_conv is None and ours.decoder.mid.attn is None
    assert (ours.config.in_channels, ours.config.out_channels) == (1, 2)
    assert_parity(vae, ours, 1, 4)


def test_old_attention_names_and_conv_shaped_weights_load_the_same(small, tmp_path):
    folder, vae = small
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    state = {}
    for key, tensor in load_file(str(folder / WEIGHTS)).items():
        for new, name in old.items():
            if f".attentions.0.{new}." in key:
                key = key.replace(new, name)
                tensor = tensor[..., None, None] if tensor.ndim == 2 else tensor
        state[key] = tensor.contiguous()
    assert any(".query.weight" in k for k in state)
    save_file(state, str(tmp_path / WEIGHTS))
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    _, a = load_diffusers_autoencoder(folder)
    _, b = load_diffusers_autoencoder(tmp_path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_pipeline_folder_with_a_vae_subfolder(small, tmp_path):
    folder, _ = small
    (tmp_path / "vae").mkdir()
    for name in ("config.json", WEIGHTS):
        (tmp_path / "vae" / name).write_bytes((folder / name).read_bytes())
    config, _ = load_diffusers_autoencoder(tmp_path)
    assert config == load_diffusers_autoencoder(folder)[0]


def test_scaling_and_shift_factors(small, tmp_path):
    folder, _ = small
    assert diffusers_scaling(folder) == (pytest.approx(0.18215), 0.0)
    config = json.loads((folder / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(
        {**config, "scaling_factor": 1.5305, "shift_factor": 0.0609}))
    assert diffusers_scaling(tmp_path) == (1.5305, 0.0609)


def test_fp16_variant_loads_in_float32(small, tmp_path):
    folder, _ = small
    state = load_file(str(folder / WEIGHTS))
    save_file({k: v.half() for k, v in state.items()},
              str(tmp_path / "diffusion_pytorch_model.fp16.safetensors"))
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    _, half = load_diffusers_autoencoder(tmp_path)
    _, full = load_diffusers_autoencoder(folder)
    assert all(v.dtype == torch.float32 for v in half.values())
    assert all(torch.equal(half[k], full[k].half().float()) for k in full)


def test_missing_tensor_names_the_weights_file(small, tmp_path):
    folder, _ = small
    state = load_file(str(folder / WEIGHTS))
    del state["decoder.conv_out.bias"]
    save_file(state, str(tmp_path / WEIGHTS))
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(LoadError, match=f"{WEIGHTS}.*1 tensor missing.*decoder.conv_out.bias"):
        load_diffusers_autoencoder(tmp_path)


# ----------------------------------------------------- refusals (no diffusers needed)
BASE = {"_class_name": "AutoencoderKL", "block_out_channels": [32, 64],
        "down_block_types": ["DownEncoderBlock2D"] * 2,
        "up_block_types": ["UpDecoderBlock2D"] * 2, "norm_num_groups": 8,
        "latents_mean": None, "latents_std": None, "shift_factor": None}


def write_config(folder, **changes):
    (folder / "config.json").write_text(json.dumps({**BASE, **changes}))


def test_config_conversion_uses_diffusers_defaults():
    config = convert_diffusers_config({"_class_name": "AutoencoderKL", "norm_num_groups": 32})
    assert config.block_out_channels == (64,) and config.latent_channels == 4
    assert config.in_channels == config.out_channels == 3 and config.mid_attention


def test_stable_diffusion_and_sd3_style_configs_convert():
    sd = {"_class_name": "AutoencoderKL", "_diffusers_version": "0.4.2", "act_fn": "silu",
          "block_out_channels": [128, 256, 512, 512], "in_channels": 3, "latent_channels": 4,
          "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3, "sample_size": 256,
          "down_block_types": ["DownEncoderBlock2D"] * 4,
          "up_block_types": ["UpDecoderBlock2D"] * 4}
    config = convert_diffusers_config(sd)
    assert config.downsample_factor == 8 and config.layers_per_block == 2
    sd3 = {**sd, "latent_channels": 16, "use_quant_conv": False, "use_post_quant_conv": False,
           "shift_factor": 0.0609, "scaling_factor": 1.5305, "force_upcast": True,
           "mid_block_add_attention": True, "latents_mean": None, "latents_std": None}
    config = convert_diffusers_config(sd3)
    assert config.latent_channels == 16 and not config.use_quant_conv


@pytest.mark.parametrize("key,value,why", [
    ("down_block_types", ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"], "only DownEncoder"),
    ("up_block_types", ["UpDecoderBlock2D"], r"one per block_out_channels entry \(2\)"),
    ("latents_mean", [0.1, 0.2, 0.3, 0.4], "per-channel"),
    ("act_fn", "gelu", "SiLU"),
    ("_class_name", "VQModel", "only AutoencoderKL"),
    ("mid_block_type", "UNetMidBlock2D", "does not know"),
    ("norm_num_groups", 24, "must divide"),
])
def test_unsupported_configs_are_refused_naming_file_and_key(tmp_path, key, value, why):
    write_config(tmp_path, **{key: value})
    with pytest.raises(ValueError, match=why) as info:
        load_diffusers_autoencoder(tmp_path)
    message = str(info.value)
    assert "\n" not in message and str(tmp_path / "config.json") in message
    assert key in message


def test_pickled_weights_are_refused(tmp_path):
    write_config(tmp_path)
    (tmp_path / "diffusion_pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(LoadError, match=r"diffusion_pytorch_model\.bin: pickled"):
        load_diffusers_autoencoder(tmp_path)


def test_missing_and_corrupt_files_name_the_file(tmp_path):
    with pytest.raises(LoadError, match="no such diffusers autoencoder folder"):
        load_diffusers_autoencoder(tmp_path / "absent")
    with pytest.raises(LoadError, match=r"config\.json: missing"):
        load_diffusers_autoencoder(tmp_path)
    (tmp_path / "config.json").write_text('{"block_out_channels": [32,')
    with pytest.raises(LoadError, match=r"config\.json is not valid JSON"):
        diffusers_scaling(tmp_path)
    write_config(tmp_path)
    with pytest.raises(LoadError, match=f"{WEIGHTS}: missing"):
        load_diffusers_autoencoder(tmp_path)
    (tmp_path / WEIGHTS).write_bytes(b"\x00" * 20)
    with pytest.raises(LoadError, match="not a readable safetensors file"):
        load_diffusers_autoencoder(tmp_path)
    write_config(tmp_path, scaling_factor="0.18")
    with pytest.raises(LoadError, match="scaling_factor='0.18' must be a number"):
        diffusers_scaling(tmp_path)
