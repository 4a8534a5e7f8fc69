"""Export a difflab model to diffusers' ``DDPMPipeline`` layout (``UNet2DModel`` +
``DDPMScheduler``), so that ``DDPMPipeline.from_pretrained(OUT)`` loads it.

    OUT/model_index.json                              {"unet": UNet2DModel, "scheduler": ...}
    OUT/unet/config.json                              UNet2DModel's config
    OUT/unet/diffusion_pytorch_model.safetensors      the converted weights
    OUT/scheduler/scheduler_config.json               DDPMScheduler's config

What maps, and why (difflab's ``networks/unet.py`` against diffusers' ``UNet2DModel``):

- Blocks: a ResBlock is diffusers' ``ResnetBlock2D`` (GroupNorm, SiLU, conv, time projection
  of the SiLU'd embedding, GroupNorm, SiLU, dropout, conv, 1x1-conv skip); ``time_conditioning``
  "add" is ``resnet_time_scale_shift="default"`` (h + e before norm2), "scale_shift" is
  ``"scale_shift"`` (norm2(h) (1 + scale) + shift, scale first). Levels with attention are
  ``AttnDownBlock2D`` / ``AttnUpBlock2D``, the others ``DownBlock2D`` / ``UpBlock2D``; stride-2
  conv downsampling and nearest-x2 + conv upsampling are ``downsample_type`` /
  ``upsample_type="conv"``; the middle block (ResBlock, attention, ResBlock) is
  ``UNetMidBlock2D``; the skip connections are the same (every block output, conv_in's too).
- Attention: difflab's one 1x1 ``qkv`` conv is diffusers' ``to_q``, ``to_k``, ``to_v`` (rows
  [0, C), [C, 2C), [2C, 3C), heads contiguous in each), ``proj`` is ``to_out.0``; both scale
  by 1 / sqrt(head width). diffusers fixes the head *width* (``attention_head_dim``), difflab
  the head *count* (``num_heads``): they agree when every attending width gives the same head
  width, or with one head (``attention_head_dim`` None).
- Normalisation: difflab picks each GroupNorm's group count from its width (``group_count``),
  diffusers uses one ``norm_num_groups`` everywhere (``attn_norm_num_groups`` set to it, so the
  middle attention keeps its GroupNorm under "scale_shift"); eps is 1e-5 in both.
- Time input: difflab feeds the sinusoid (cos first: ``flip_sin_to_cos``, frequencies
  10000^(-i / half): ``freq_shift`` 0) of c_noise = t 1000 / T at the DDPM step t = 1..T;
  diffusers feeds the table index k = t - 1 (its ``alphas_cumprod[k]`` is difflab's
  alpha_bar_t). For T = 1000 the difference is a shift by one step, which is a rotation of each
  (cos, sin) pair: emb(k + 1) = R emb(k), cos((k+1) f) = cos(kf) cos f - sin(kf) sin f and
  sin((k+1) f) = sin(kf) cos f + cos(kf) sin f. R is folded into the first time-MLP layer
  (W' = W R, in float64), so the exported network at step k computes difflab's network at
  t = k + 1 exactly in real arithmetic. Other T scale the frequencies, which no UNet2DModel
  config expresses: refused.
- Class labels: difflab's embedding of K classes plus the null label K (classifier-free
  guidance) is ``num_class_embeds = K + 1`` (pass ``class_labels``; K is unconditional).

The scheduler gets difflab's betas: a named ``beta_schedule`` only where diffusers (when
installed) rebuilds exactly the float32 betas of difflab's table (in diffusers 0.42, only
``cosine`` -> ``squaredcos_cap_v2``), else ``trained_betas`` (the float64 betas; diffusers
rounds them to float32 as difflab's float32 cast does). ``prediction_type``: eps -> epsilon,
v -> v_prediction, x0 -> sample; ``clip_sample`` from the data range.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from ..networks.unet import AttentionBlock, Downsample, ResBlock, UNet, UNetConfig, Upsample
from ..process import DiscreteProcess, Process
from .card import StageCard
from .diffusers_in import DIFFLAB_FILE

if TYPE_CHECKING:
    from .pipeline import Pipeline

__all__ = ["DiffusersExport", "PREDICTION_TYPES", "check_process", "convert_unet",
           "export_diffusers", "scheduler_config", "unet2d_config", "write_diffusers"]

#: difflab prediction type -> diffusers ``prediction_type``
PREDICTION_TYPES = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}
#: difflab beta schedule -> the diffusers ``beta_schedule`` of the same formula
NAMED_SCHEDULES = {"linear": "linear", "quadratic": "scaled_linear",
                   "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2",
                   "sigmoid": "sigmoid"}
#: the diffusers version written when diffusers is not installed (the oldest this targets)
MIN_DIFFUSERS_VERSION = "0.30.0"
#: the number of DDPM steps whose c_noise is the step index itself (Process.c_noise)
C_NOISE_STEPS = 1000


@dataclass
class DiffusersExport:
    """What :func:`export_diffusers` converts: the two configs, the weights and notes for the
    user (e.g. that betas went as ``trained_betas``)."""

    unet_config: dict[str, Any]
    scheduler_config: dict[str, Any]
    state_dict: dict[str, Tensor]
    notes: list[str] = field(default_factory=list)
    #: a class-conditional model's class names (label K = len(class_names) is the null label);
    #: written to ``difflab.json`` so difflab reads the folder back with guidance
    class_names: list[str] | None = None


# -- the network -------------------------------------------------------------------------------
def _group_counts(net: UNet) -> dict[int, int]:
    """GroupNorm group count -> the smallest width that has it."""
    counts: dict[int, int] = {}
    for m in net.modules():
        if isinstance(m, nn.GroupNorm):
            counts[m.num_groups] = min(m.num_channels, counts.get(m.num_groups, m.num_channels))
    return counts


def _uniform_groups(net: UNet, max_groups: int) -> int:
    """The largest group count <= ``max_groups`` that ``group_count`` gives every GroupNorm
    width of ``net`` (it divides each width and leaves >= 2 channels a group)."""
    widths = {m.num_channels for m in net.modules() if isinstance(m, nn.GroupNorm)}
    return max(g for g in range(1, max_groups + 1)
               if all(w % g == 0 and (g <= w // 2 or w == 1) for w in widths))


def _head_dim(cfg: UNetConfig) -> int | None:
    """diffusers' ``attention_head_dim`` for difflab's ``num_heads``, or a ValueError."""
    widths = [cfg.base_channels * m for m in cfg.channel_mult]
    attending = {w for w, r in zip(widths, cfg.resolutions, strict=True)
                 if r in cfg.attention_resolutions} | {widths[-1]}
    dims = sorted({w // cfg.num_heads for w in attending})
    if len(dims) == 1:
        return dims[0]
    if cfg.num_heads == 1:
        return None  # one head of the full width at every level
    raise ValueError(f"num_heads={cfg.num_heads}: the attention widths {sorted(attending)} "
                     f"give head widths {dims}; diffusers' UNet2DModel has one head width "
                     "(attention_head_dim) at every level")


def unet2d_config(net: UNet, sample_shape: list[int] | tuple[int, ...]) -> dict[str, Any]:
    """``UNet2DModel``'s config for difflab's U-Net ``net`` (samples of ``[C, H, W]``); a
    one-line ValueError naming the config field where the architecture does not map."""
    cfg = net.config
    if cfg.context_dim is not None:
        raise ValueError(f"context_dim={cfg.context_dim}: a text-conditional U-Net "
                         "(cross-attention) does not map onto UNet2DModel")
    if cfg.guidance_embedding:
        raise ValueError("guidance_embedding: UNet2DModel has no guidance-scale input")
    if cfg.channel_mult[0] != 1:
        raise ValueError(f"channel_mult[0]={cfg.channel_mult[0]}: UNet2DModel's time "
                         "embedding and conv_in have the first level's width, difflab's "
                         "base_channels")
    groups = _group_counts(net)
    if len(groups) != 1:
        desc = ", ".join(f"{g} at width {w}" for g, w in sorted(groups.items()))
        raise ValueError(f"groups={cfg.groups}: difflab's GroupNorms have different group "
                         f"counts ({desc}; networks.unet.group_count); UNet2DModel has one "
                         f"norm_num_groups (a model trained with --groups "
                         f"{_uniform_groups(net, cfg.groups)} has one count at every width)")
    (num_groups,) = groups
    attn = [r in cfg.attention_resolutions for r in cfg.resolutions]
    h, w = (int(s) for s in sample_shape[-2:])
    return {
        "_class_name": "UNet2DModel",
        "_diffusers_version": diffusers_version(),
        "sample_size": h if h == w else [h, w],
        "in_channels": cfg.in_channels,
        "out_channels": cfg.resolved_out_channels,
        "center_input_sample": False,
        "time_embedding_type": "positional",
        "flip_sin_to_cos": True,  # difflab's sinusoid is [cos, sin]
        "freq_shift": 0,
        "down_block_types": ["AttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        "mid_block_type": "UNetMidBlock2D",
        "up_block_types": ["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
        "block_out_channels": [cfg.base_channels * m for m in cfg.channel_mult],
        "layers_per_block": cfg.num_res_blocks,
        "mid_block_scale_factor": 1,
        "downsample_padding": 1,
        "downsample_type": "conv",
        "upsample_type": "conv",
        "dropout": cfg.dropout,
        "act_fn": "silu",
        "attention_head_dim": _head_dim(cfg),
        "norm_num_groups": num_groups,
        "attn_norm_num_groups": num_groups,
        "norm_eps": 1e-5,
        "resnet_time_scale_shift": ("scale_shift" if cfg.time_conditioning == "scale_shift"
                                    else "default"),
        "add_attention": True,
        "class_embed_type": None,
        "num_class_embeds": None if cfg.num_classes is None else cfg.num_classes + 1,
        "num_train_timesteps": None,
    }


def _shift_time_weight(weight: Tensor, dim: int, shift: float) -> Tensor:
    """W R for the first time-MLP layer ``weight`` [E, dim]: the layer then maps the sinusoid
    of k to what W maps the sinusoid of k + shift to (module docstring; float64)."""
    half = dim // 2
    exponent = torch.arange(half, dtype=torch.float32) / half  # as timestep_embedding
    freqs = torch.exp(-math.log(10000.0) * exponent).double()
    c, s = torch.cos(shift * freqs), torch.sin(shift * freqs)
    w = weight.double()
    out = w.clone()
    w_cos, w_sin = w[:, :half], w[:, half:2 * half]
    out[:, :half] = w_cos * c + w_sin * s          # coefficient of cos(k f)
    out[:, half:2 * half] = w_sin * c - w_cos * s  # coefficient of sin(k f)
    return out.to(weight.dtype)


def _res_keys(dst: str, src: str, block: nn.Module) -> dict[str, str]:
    names = {"norm1": "norm1", "conv1": "conv1", "emb_proj": "time_emb_proj",
             "norm2": "norm2", "conv2": "conv2"}
    if not isinstance(block.skip, nn.Identity):
        names["skip"] = "conv_shortcut"
    return {f"{dst}.{b}.{p}": f"{src}.{a}.{p}" for a, b in names.items()
            for p in ("weight", "bias")}


def _convert_attention(out: dict[str, Tensor], dst: str, src: str,
                       sd: dict[str, Tensor]) -> None:
    """qkv (1x1 conv, [3C, C, 1, 1]) -> to_q/to_k/to_v ([C, C]); proj -> to_out.0."""
    q, k, v = sd[f"{src}.qkv.weight"][:, :, 0, 0].chunk(3, dim=0)
    qb, kb, vb = sd[f"{src}.qkv.bias"].chunk(3, dim=0)
    for name, wt, b in (("to_q", q, qb), ("to_k", k, kb), ("to_v", v, vb)):  # own storage
        out[f"{dst}.{name}.weight"], out[f"{dst}.{name}.bias"] = wt.clone(), b.clone()
    out[f"{dst}.to_out.0.weight"] = sd[f"{src}.proj.weight"][:, :, 0, 0].clone()
    out[f"{dst}.to_out.0.bias"] = sd[f"{src}.proj.bias"]
    out[f"{dst}.group_norm.weight"] = sd[f"{src}.norm.weight"]
    out[f"{dst}.group_norm.bias"] = sd[f"{src}.norm.bias"]


def _convert_layer(out: dict[str, Tensor], sd: dict[str, Tensor], src: str,
                   layer: nn.Module, dst: str, j: int) -> None:
    """One layer of an EmbedSequential (state-dict path ``src``) as the ``j``-th resnet or
    attention, or the resampler, of diffusers' block ``dst``."""
    if isinstance(layer, ResBlock):
        out.update({k: sd[v] for k, v in _res_keys(f"{dst}.resnets.{j}", src, layer).items()})
    elif isinstance(layer, AttentionBlock):
        _convert_attention(out, f"{dst}.attentions.{j}", src, sd)
    elif isinstance(layer, Downsample | Upsample):
        kind = "downsamplers" if isinstance(layer, Downsample) else "upsamplers"
        for p in ("weight", "bias"):
            out[f"{dst}.{kind}.0.conv.{p}"] = sd[f"{src}.conv.{p}"]
    else:  # cross-attention: refused by unet2d_config before
        raise ValueError(f"{type(layer).__name__} has no UNet2DModel counterpart")


def _convert_block(out: dict[str, Tensor], sd: dict[str, Tensor], src: str,
                   seq: nn.Module, dst: str, j: int) -> None:
    """One EmbedSequential (ResBlock [, attention] [, Up/Downsample]) into ``dst``."""
    for i, layer in enumerate(seq):
        _convert_layer(out, sd, f"{src}.{i}", layer, dst, j)


def convert_unet(net: UNet) -> dict[str, Tensor]:
    """difflab's U-Net weights under ``UNet2DModel``'s names (contiguous float CPU tensors),
    with the one-step time shift folded into ``time_embedding.linear_1`` (module docstring).
    Call :func:`unet2d_config` first: it refuses what does not map."""
    cfg = net.config
    sd = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    out: dict[str, Tensor] = {
        "conv_in.weight": sd["conv_in.weight"], "conv_in.bias": sd["conv_in.bias"],
        "time_embedding.linear_1.weight": _shift_time_weight(
            sd["time_mlp.0.weight"], cfg.base_channels, 1.0),
        "time_embedding.linear_1.bias": sd["time_mlp.0.bias"],
        "time_embedding.linear_2.weight": sd["time_mlp.2.weight"],
        "time_embedding.linear_2.bias": sd["time_mlp.2.bias"],
        "conv_norm_out.weight": sd["out.0.weight"], "conv_norm_out.bias": sd["out.0.bias"],
        "conv_out.weight": sd["out.2.weight"], "conv_out.bias": sd["out.2.bias"],
    }
    if net.label_emb is not None:
        out["class_embedding.weight"] = sd["label_emb.weight"]
    levels = len(cfg.channel_mult)
    blocks = iter(enumerate(net.down))
    for level in range(levels):
        for j in range(cfg.num_res_blocks):
            i, seq = next(blocks)
            _convert_block(out, sd, f"down.{i}", seq, f"down_blocks.{level}", j)
        if level < levels - 1:
            i, seq = next(blocks)
            _convert_block(out, sd, f"down.{i}", seq, f"down_blocks.{level}", 0)
    res1, attn, res2 = net.middle  # cross-attention (a fourth layer) is refused before
    _convert_layer(out, sd, "middle.0", res1, "mid_block", 0)
    _convert_layer(out, sd, "middle.1", attn, "mid_block", 0)
    _convert_layer(out, sd, "middle.2", res2, "mid_block", 1)
    blocks = iter(enumerate(net.up))
    for u in range(levels):
        for j in range(cfg.num_res_blocks + 1):
            i, seq = next(blocks)
            _convert_block(out, sd, f"up.{i}", seq, f"up_blocks.{u}", j)
    return out


# -- the scheduler -----------------------------------------------------------------------------
def diffusers_version() -> str:
    """The installed diffusers' version, else :data:`MIN_DIFFUSERS_VERSION`."""
    try:
        import diffusers
    except ImportError:
        return MIN_DIFFUSERS_VERSION
    return str(diffusers.__version__)


def _named_betas(config: dict[str, Any]) -> Tensor | None:
    """The float32 betas diffusers builds from a named-schedule ``config`` (None: diffusers is
    not installed)."""
    try:
        from diffusers import DDPMScheduler
    except ImportError:
        return None
    return DDPMScheduler(**{k: v for k, v in config.items() if not k.startswith("_")}).betas


def check_process(process: Process, prediction: str | None) -> DiscreteProcess:
    """``process`` if diffusers' DDPM/DDIM schedulers express it with ``prediction``, else a
    one-line ValueError naming the process field or prediction type."""
    if prediction not in PREDICTION_TYPES:
        raise ValueError(f"prediction {prediction!r}: diffusers' schedulers take "
                         f"{sorted(PREDICTION_TYPES)} (as epsilon, v_prediction, sample)")
    if not isinstance(process, DiscreteProcess):
        raise ValueError(f"process {process.to_config().get('kind')!r} is continuous-time; "
                         "diffusers' DDPMScheduler is a chain of num_train_timesteps steps")
    if process.T != C_NOISE_STEPS:
        raise ValueError(f"process T={process.T}: difflab's network sees c_noise = t * 1000 "
                         "/ T, UNet2DModel the step index t - 1, with no scale between them; "
                         "only T = 1000 maps")
    if process.zero_terminal_snr and prediction == "eps":
        raise ValueError("zero_terminal_snr with prediction 'eps': diffusers' schedulers "
                         "divide the noise prediction by sqrt(alpha_bar_T) = 0 at the first "
                         "step (difflab sets x0_hat = 0 there); export a v or x0 model")
    return process


def scheduler_config(process: Process, prediction: str | None,
                     data_range: list[float] | None = None) -> tuple[dict[str, Any], list[str]]:
    """``DDPMScheduler``'s config for a difflab process and prediction type, and notes.

    The betas are difflab's table: a named ``beta_schedule`` where diffusers (if installed)
    rebuilds the float32 betas of difflab's float64 table bit for bit, else ``trained_betas``
    (diffusers casts them to float32: the same values). ``data_range`` [-r, r] sets
    ``clip_sample`` (difflab clips x0_hat to the data range)."""
    proc = check_process(process, prediction)
    args = dict(proc.schedule_args)
    lo, hi = args.get("beta_1"), args.get("beta_T")
    config: dict[str, Any] = {
        "_class_name": "DDPMScheduler",
        "_diffusers_version": diffusers_version(),
        "num_train_timesteps": proc.T,
        "beta_schedule": NAMED_SCHEDULES[proc.schedule],
        "beta_start": float(proc.betas[0]) if lo is None else lo,
        "beta_end": float(proc.betas[-1]) if hi is None else hi,
        "trained_betas": None,
        "variance_type": "fixed_small",  # beta_tilde, as difflab's ddpm sampler
        "clip_sample": False,
        "clip_sample_range": 1.0,
        "prediction_type": PREDICTION_TYPES[str(prediction)],
        "thresholding": False,
        "timestep_spacing": "leading",
        "steps_offset": 0,
        "rescale_betas_zero_snr": False,
    }
    notes = []
    named = None if proc.zero_terminal_snr else _named_betas(config)
    if named is None or not torch.equal(named, proc.betas.float()):
        config["trained_betas"] = proc.betas.tolist()
        notes.append(f"betas written as trained_betas: diffusers' {config['beta_schedule']!r} "
                     f"schedule does not rebuild difflab's {proc.schedule!r} table bit for bit"
                     + (" (zero terminal SNR rescaled)" if proc.zero_terminal_snr else ""))
    if data_range is not None:
        if data_range[0] == -data_range[1]:
            config["clip_sample"], config["clip_sample_range"] = True, float(data_range[1])
        else:
            notes.append(f"clip_sample off: diffusers clips to a symmetric range, the data "
                         f"range is {data_range}")
    return config, notes


# -- the pipeline ------------------------------------------------------------------------------
def _check_stages(pipe: Pipeline) -> StageCard:
    """The diffusion stage if the card exports, else a one-line ValueError naming it."""
    for s in pipe.card.stages:
        if s.kind != "diffusion":
            raise ValueError(f"stage {s.name!r} ({s.kind}): only a single diffusion stage "
                             "exports (DDPMPipeline has no autoencoder or adapters)")
    st = pipe.stage
    if st.network != "unet":
        raise ValueError(f"network {st.network!r}: only difflab's 'unet' maps onto "
                         "diffusers' UNet2DModel")
    if st.learned_variance:
        raise ValueError("learned_variance: DDIMScheduler does not split off the variance "
                         "channels and DDPMScheduler's learned_range does not clamp them to "
                         "[-1, 1] as difflab does")
    if st.guidance_input:
        raise ValueError("guidance_input: UNet2DModel has no guidance-scale input")
    return st


def export_diffusers(pipe: Pipeline) -> DiffusersExport:
    """Convert a :class:`~difflab.pipeline.Pipeline` whose diffusion stage is a U-Net on a
    1000-step DDPM chain (eps, v or x0) to diffusers' configs and weights; anything that does
    not map is a one-line ValueError naming the field (nothing is written)."""
    st = _check_stages(pipe)
    sched, notes = scheduler_config(pipe.process, st.prediction, st.data_range)
    unet = unet2d_config(pipe.net, st.sample_shape)
    if st.sampler is not None:
        notes.append(f"the model's own sampler ({st.sampler}, {st.sampler_steps} steps) is "
                     "not part of the export")
    if unet["num_class_embeds"] is not None:
        notes.append(f"class-conditional: pass class_labels to the UNet (label "
                     f"{unet['num_class_embeds'] - 1} is unconditional); DDPMPipeline "
                     "passes none")
    names = list(st.class_names) if unet["num_class_embeds"] is not None else None
    return DiffusersExport(unet, sched, convert_unet(pipe.net), notes, names)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def write_diffusers(export: DiffusersExport, out: str | os.PathLike[str],
                    overwrite: bool = False) -> Path:
    """Write ``export`` as a DDPMPipeline folder ``out``. An existing non-empty ``out`` is an
    OutputExistsError unless ``overwrite``. The folder is filled beside ``out`` and renamed
    into place, so ``out`` is never half-written (an old one is removed only after)."""
    from ..io import OutputExistsError

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise OutputExistsError(f"{out} exists and is not empty; pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        _write_json(tmp / "model_index.json", {
            "_class_name": "DDPMPipeline", "_diffusers_version": diffusers_version(),
            "scheduler": ["diffusers", "DDPMScheduler"], "unet": ["diffusers", "UNet2DModel"]})
        _write_json(tmp / "unet" / "config.json", export.unet_config)
        save_file(export.state_dict, str(tmp / "unet" / "diffusion_pytorch_model.safetensors"))
        _write_json(tmp / "scheduler" / "scheduler_config.json", export.scheduler_config)
        if export.class_names is not None:  # diffusers ignores it; difflab reads it back
            _write_json(tmp / DIFFLAB_FILE, {"class_names": export.class_names,
                                             "null_class": len(export.class_names)})
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.exists():  # set aside, put back if the rename fails
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
        out.rename(old / out.name)
    try:
        tmp.rename(out)
    except BaseException:
        if old is not None:
            (old / out.name).rename(out)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return out
