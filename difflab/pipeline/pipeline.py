"""``Pipeline``: a saved model ready to sample, guide, edit and score.

    pipe = Pipeline.from_pretrained("runs/digits")          # a run folder or a pipeline folder
    out = pipe(16, labels=3, sampler="dpmpp_2m", steps=20, guidance=2.0, seed=0)
    out.save_grid("threes.png")

The pipeline owns the wiring that every consumer shares: rebuilding networks from a model
card, composing guidance (classifier-free, classifier, negative prompts) and clipping into one
denoiser, encoding prompts and class labels, and drawing one image per seed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..conditioning import TextCond
from ..guidance import ClassifierFreeGuidance, ClassifierGuidance, GuidanceInput
from ..parameterization import ClippedDenoiser, Denoiser, DenoiserFn
from ..process import Process, process_from_config
from ..samplers import check_sampler_options, get_sampler, load_time_grid
from ..samplers.generate import generate
from ..samplers.options import check_options, declared_options
from ..samplers.teleport import GaussianHead, GaussianMoments, skip_level
from ..training.checkpoint import write_json
from .adapters import apply_adapter
from .card import ADAPTER_KINDS, CARD_FILE, ModelCard, StageCard
from .conditions import (
    Conditions,
    LabelSpec,
    class_conditions,
    encode_prompts,
    prompt_list,
    prompt_tokenizer,
)
from .controlnet import ControlSpec, control_batch_size, set_control
from .loading import (
    LoadedClassifier,
    build_stage_network,
    load_classifier,
    read_adapters,
    read_joined,
    stage_weights,
    write_stage_weights,
)
from .lora import lora_handles
from .output import PipelineOutput


class Pipeline:
    """A model card and one network per stage, on a device.

    The constructor is cheap (it only wraps the networks; it neither copies nor moves them),
    so a trainer can sample its EMA network through it; :meth:`from_pretrained` loads one.
    """

    def __init__(self, card: ModelCard, networks: nn.Module | Sequence[nn.Module],
                 device: torch.device | str = "cpu"):
        nets = [networks] if isinstance(networks, nn.Module) else list(networks)
        if len(nets) != len(card.stages):
            raise ValueError(f"the card has {len(card.stages)} stages but {len(nets)} "
                             "networks were given")
        self.card, self.networks, self.device = card, nets, torch.device(device)
        kinds = [s.kind for s in card.stages]
        self.net = nets[kinds.index("diffusion")]
        #: the autoencoder of a latent model (None: the model works on the data itself)
        self.autoencoder: nn.Module | None = (nets[kinds.index("autoencoder")]
                                              if "autoencoder" in kinds else None)
        self.process: Process = process_from_config(self.stage.process)
        #: where :meth:`from_pretrained` loaded it from (None: built in memory)
        self.source: Path | None = None
        #: the complete model it is built on: ``source``, or the base an adapter card names
        self.base_source: Path | None = None
        self._base_stages = len(card.stages)  # the first stages are base_source's
        #: learned token embeddings that prompts are encoded with (``pipeline.embeddings``)
        self.token_embeddings: list[nn.Module] = []
        for stage, module in zip(card.stages, nets, strict=True):
            if stage.kind in ADAPTER_KINDS:
                apply_adapter(self, stage, module)
        self._build_base()

    def _build_base(self) -> None:
        """The diffusion stage's :class:`Denoiser` over ``self.net`` (rebuilt after an
        adapter replaced the network)."""
        st = self.stage
        self.base = Denoiser(self.net, self.process, st.prediction,
                             learned_variance=st.learned_variance, sigma_data=st.sigma_data,
                             base_prediction=st.base_prediction, sigma_min=st.sigma_min,
                             sigma_max=st.sigma_max)

    # -- loading and saving -------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path, device: torch.device | str = "cpu",
                        ema: bool | None = None, channels_last: bool = True) -> Pipeline:
        """Load a pipeline folder (``model_card.json`` + safetensors), a run folder, its
        ``checkpoints/`` folder or a ``step_*.json``/``.safetensors`` checkpoint.

        ``ema``: a checkpoint gives its EMA weights unless ``ema=False``; a pipeline folder
        holds one set (``card.ema``), and asking for the other is an error."""
        card, root, base, n_base = read_joined(path, ema)
        cache: dict[str, dict[str, Tensor]] = {}
        nets = [build_stage_network(s, stage_weights(s, root, cache), device, channels_last,
                                    root=root) for s in card.stages]
        pipe = cls(card, nets, device)
        pipe.source, pipe.base_source = Path(path).resolve(), base.resolve()
        pipe._base_stages = n_base
        return pipe

    def load_adapter(self, path: str | Path, scale: float | None = None,
                     ema: bool | None = None) -> list[StageCard]:
        """Apply the adapter stages saved at ``path`` (an adapter pipeline folder or a
        fine-tuning run/checkpoint) to this pipeline, with strength ``scale`` (None: each
        stage's own). Several adapters combine: each call adds its stages (renamed if a name
        is taken). Returns the stages added."""
        cache: dict[str, dict[str, Tensor]] = {}
        added = []
        for stage, root in read_adapters(path, ema):
            if scale is not None:
                stage = StageCard(**{**vars(stage), "scale": float(scale)})
            module = build_stage_network(stage, stage_weights(stage, root, cache),
                                         self.device, root=root)
            added.append(self.add_adapter(stage, module))
        return added

    def add_adapter(self, stage: StageCard, module: nn.Module) -> StageCard:
        """Apply one adapter stage built in memory (e.g. a LoRA just trained) and add it to
        the card (renamed ``name_2``, ... if its name is taken); returns the stage added.
        :meth:`save_adapters` then writes it alone."""
        if stage.kind not in ADAPTER_KINDS:
            raise ValueError(f"stage {stage.name!r} is a {stage.kind} stage, not an adapter")
        name, k = stage.name, 2
        while any(s.name == name for s in self.card.stages):
            name, k = f"{stage.name}_{k}", k + 1
        stage = StageCard(**{**vars(stage), "name": name})
        apply_adapter(self, stage, module)
        self.card.stages.append(stage)
        self.networks.append(module)
        self._build_base()
        return stage

    def save_pretrained(self, path: str | Path, overwrite: bool = False) -> Path:
        """Write ``model_card.json`` and one ``{stage}.safetensors`` per stage into the folder
        ``path`` (the card last, so a folder with a card is complete). An existing non-empty
        folder is refused unless ``overwrite``. Merged LoRAs are written unmerged (the base
        weights and the LoRA stage, so loading never applies one twice)."""
        return self._write(Path(path), list(range(len(self.card.stages))), None, overwrite)

    def save_adapters(self, path: str | Path, base: str | Path | None = None,
                      overwrite: bool = False) -> Path:
        """Write the adapter stages alone into the folder ``path``: their safetensors and a
        card whose ``base`` names the model they apply to, so that
        ``Pipeline.from_pretrained(path)`` loads base and adapters together.

        ``base`` None: :attr:`base_source` (as an absolute path), with the adapters added to
        it (by an adapter card or :meth:`load_adapter`); given (relative paths are from
        ``path``): every adapter stage of the pipeline, which that base must not hold."""
        if base is None:
            if self.base_source is None:
                raise ValueError("this pipeline was not loaded from a saved model: give "
                                 "save_adapters a base")
            base, start = str(self.base_source), self._base_stages
        else:
            base, start = str(base), 0
        which = [i for i in range(start, len(self.card.stages))
                 if self.card.stages[i].kind in ADAPTER_KINDS]
        if not which:
            raise ValueError("this pipeline has no adapter stages to save")
        # the card's step and training config are the adapters' only if it came with them
        own = self.source is not None and self.source != self.base_source
        meta = {} if own else {"step": None, "training": {}}
        return self._write(Path(path), which, base, overwrite, **meta)

    def _write(self, folder: Path, which: list[int], base: str | None, overwrite: bool,
               **card_fields: Any) -> Path:
        """Write stages ``which`` (indices) and a card with ``base`` (and ``card_fields``)
        into ``folder``."""
        if folder.exists() and (not folder.is_dir() or any(folder.iterdir())) and not overwrite:
            raise FileExistsError(f"{folder} exists and is not empty (pass overwrite=True)")
        scales = {i: h.scale for i, h in lora_handles(self)}
        merged = self.unmerge_adapters()
        try:
            stages = []
            for i in which:
                stage = self.card.stages[i]
                file = f"{stage.name}.safetensors"
                write_stage_weights(self.networks[i], folder / file)
                stages.append(StageCard(**{**vars(stage), "weights": file, "weights_prefix": "",
                                           "scale": scales.get(i, stage.scale)}))
        finally:
            self.merge_adapters(merged)
        card = ModelCard(**{**vars(self.card), "stages": stages, "base": base, **card_fields})
        write_json(folder / CARD_FILE, card.to_dict())
        return folder

    def merge_adapters(self, names: Sequence[str] | None = None) -> list[str]:
        """Fold the LoRA stages (``names``; None: all) into the diffusion network's weights
        (:meth:`LoRAHandle.merge`): the same samples, without the per-call low-rank work.
        Returns the names of the stages merged now."""
        done = []
        for i, h in lora_handles(self):
            name = self.card.stages[i].name
            if not h.merged and (names is None or name in names):
                h.merge()
                done.append(name)
        return done

    def unmerge_adapters(self) -> list[str]:
        """Undo :meth:`merge_adapters` (last merged first, restoring the base weights
        exactly); returns the names of the stages unmerged."""
        done = []
        for i, h in reversed(lora_handles(self)):
            if h.merged:
                h.unmerge()
                done.append(self.card.stages[i].name)
        return done[::-1]

    # -- what the model is --------------------------------------------------------------------
    @property
    def stage(self) -> StageCard:
        """The diffusion stage."""
        stage = self.card.stage_of("diffusion")
        assert stage is not None  # ModelCard checks it
        return stage

    @property
    def autoencoder_stage(self) -> StageCard | None:
        """The autoencoder stage of a latent model, else None."""
        return self.card.stage_of("autoencoder")

    @property
    def is_latent(self) -> bool:
        """The diffusion stage works in an autoencoder's latent space."""
        return self.autoencoder is not None

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """Shape of what the diffusion stage samples: (C, H, W) for images (a latent
        model's latents), (D,) for points."""
        return tuple(self.stage.sample_shape)

    @property
    def image_shape(self) -> tuple[int, ...]:
        """Shape of one output: the images' (C, H, W) for a latent model, else
        :attr:`sample_shape`."""
        ae = self.autoencoder_stage
        return tuple(ae.sample_shape) if ae is not None else self.sample_shape

    @property
    def data_range(self) -> list[float] | None:
        """[lo, hi] of the outputs (images), or None for 2-D points."""
        ae = self.autoencoder_stage
        return ae.data_range if ae is not None else self.stage.data_range

    # -- latent space ---------------------------------------------------------------------------
    def encode(self, images: Tensor, *, sample: bool = False,
               generator: torch.Generator | None = None, batch_size: int = 64) -> Tensor:
        """Images (in :attr:`data_range`) -> what the diffusion stage works on: the scaled
        latents (z - shift) * scale of the posterior mean (or, with ``sample``, a draw) for a
        latent model; the images themselves otherwise."""
        if self.autoencoder is None:
            return images
        ae = self.autoencoder_stage
        outs = []
        with torch.no_grad():
            for chunk in images.split(batch_size):
                post = self.autoencoder.encode(chunk.to(self.device, torch.float32))
                z = post.sample(generator) if sample else post.mode()
                outs.append((z - ae.shift_factor) * ae.scale_factor)
        return torch.cat(outs)

    def decode(self, latents: Tensor, *, batch_size: int = 64) -> Tensor:
        """Inverse of :meth:`encode` (the decoder, clamped to :attr:`data_range`; a VQ
        autoencoder's latents are first snapped to its codebook, as LDM's VQ models do); the
        identity for a model without an autoencoder."""
        if self.autoencoder is None:
            return latents
        ae = self.autoencoder_stage
        outs = []
        with torch.no_grad():
            for chunk in latents.split(batch_size):
                z = chunk.to(self.device, torch.float32) / ae.scale_factor + ae.shift_factor
                if getattr(self.autoencoder, "quantizer", None) is not None:
                    z = self.autoencoder.quantize(z)  # VQ: sampled latents snapped to codes
                outs.append(self.autoencoder.decode(z).float())
        x = torch.cat(outs)
        return x.clamp(*ae.data_range) if ae.data_range is not None else x

    @property
    def class_names(self) -> list[str]:
        return list(self.stage.class_names)

    @property
    def is_text(self) -> bool:
        return self.stage.conditioning == "text"

    # -- conditions -----------------------------------------------------------------------------
    def encode_prompts(self, prompts: list[str]) -> TextCond:
        """Token embeddings of ``prompts`` with the model's text encoder, on the device."""
        return encode_prompts(self.stage.text_encoder, prompts, self.device,
                              self.token_embeddings)

    @property
    def tokenizer(self) -> Any:
        """The tokenizer of the model's prompts: its text encoder's (shared, loaded once),
        extended by the tokens of its learned token embeddings (textual inversion) in the
        order :meth:`encode_prompts` adds them. A ValueError for a model without prompts."""
        return prompt_tokenizer(self.stage.text_encoder, self.device, self.token_embeddings)

    def load_classifier(self, classifier: str | Path | LoadedClassifier | None
                        ) -> LoadedClassifier | None:
        """A noisy classifier (path or loaded) on this pipeline's device."""
        if classifier is None or isinstance(classifier, LoadedClassifier):
            return classifier
        return load_classifier(classifier, self.device)

    def condition(self, labels: LabelSpec = "all", prompt: str | Sequence[str] | None = None,
                  n: int | None = None, classifier: str | Path | LoadedClassifier | None = None
                  ) -> Conditions:
        """One condition per image. Text models: ``prompt`` (a string or a list, ``n`` images
        in a row per prompt, 8 by default; none: the empty prompt). Class models, or any with
        a ``classifier`` (whose classes then count): ``labels`` as in
        :func:`~difflab.pipeline.conditions.class_conditions`."""
        if n is not None and n < 1:
            raise ValueError(f"n (--n) must be at least 1, got {n}")
        if self.is_text or prompt is not None:
            if labels is not None and not (isinstance(labels, str) and labels == "all"):
                raise ValueError("--class given but this model takes --prompt")
            prompts, per = prompt_list(prompt, n)
            return Conditions(n=len(prompts), nrow=per, cond=self.encode_prompts(prompts),
                              prompts=prompts)
        clf = self.load_classifier(classifier)
        names = self.class_names or (clf.class_names if clf is not None else [])
        return class_conditions(labels, n, names)

    # -- the denoiser -----------------------------------------------------------------------------
    def denoiser(self, *, guidance: float | None = None,
                 guidance_interval: tuple[float, float] | None = None,
                 guidance_rescale: float = 0.0,
                 classifier: str | Path | LoadedClassifier | None = None,
                 classifier_scale: float = 1.0, negative_prompt: str | None = None,
                 clip: bool = True) -> DenoiserFn:
        """The model's denoiser with classifier-free guidance (``guidance`` = gamma:
        eps(null) + gamma (eps(y) - eps(null)); 1 or None = the conditional model) and/or
        classifier guidance, then x0_hat clipped to the data range (``clip``; it acts on the
        guided x0_hat).

        For a text model the unconditional branch is the empty prompt (its training null)
        or ``negative_prompt``: eps(neg) + gamma (eps(prompt) - eps(neg)).

        A stage that takes the guidance scale as an input (``StageCard.guidance_input``, a
        guidance-distilled student) gets ``guidance`` (None: 1) as that input instead
        (:class:`~difflab.guidance.GuidanceInput`): one network call per step."""
        den: DenoiserFn = self.base
        names = self.class_names
        guided = guidance is not None and guidance != 1.0
        if self.stage.guidance_input:
            for value, flag in ((guidance_interval, "--guidance-interval"),
                                (guidance_rescale or None, "--guidance-rescale"),
                                (negative_prompt, "--negative-prompt")):
                if value is not None:
                    raise ValueError(f"{flag} needs classifier-free guidance's two branches; "
                                     "this model takes the guidance scale as an input")
            den = GuidanceInput(den, 1.0 if guidance is None else guidance)
            guided = False
        if negative_prompt is not None and not guided:
            raise ValueError("--negative-prompt acts through classifier-free guidance: give "
                             "--guidance other than 1")
        if self.is_text:
            if classifier is not None:
                raise ValueError("--classifier guides class labels; this model takes prompts")
            if guided:
                null = self.encode_prompts([negative_prompt or ""])
                den = ClassifierFreeGuidance(den, guidance, null_cond=null,
                                             interval=guidance_interval, rescale=guidance_rescale)
        elif negative_prompt is not None:
            raise ValueError("--negative-prompt needs a text-conditional model")
        elif guided:
            if not names:
                raise ValueError("--guidance needs a class-conditional model; this one is not")
            den = ClassifierFreeGuidance(den, guidance, null_label=len(names),
                                         interval=guidance_interval, rescale=guidance_rescale)
        clf = self.load_classifier(classifier)
        if clf is not None:
            if names and clf.class_names != names:
                raise ValueError(f"classifier classes {clf.class_names} differ from the "
                                 f"model's {names}")
            den = ClassifierGuidance(den, clf.net, classifier_scale, clf.process,
                                     condition_inner=bool(names))
        if clip and self.stage.data_range is not None:
            den = ClippedDenoiser(den, *self.stage.data_range)
        return den

    def gaussian_head(self, den: DenoiserFn, moments: str | Path | GaussianMoments,
                      skip_factor: float, cond: Conditions) -> DenoiserFn:
        """``den`` behind a :class:`~difflab.samplers.teleport.GaussianHead` of ``moments``
        (a file is loaded and its shape checked) at ``skip_level(moments, skip_factor)``."""
        if not skip_factor > 0:
            raise ValueError(f"skip_factor (--skip-factor) must be > 0, got {skip_factor}")
        if cond.cond is not None:
            raise ValueError("--gaussian-head: the moments describe the unconditional data; "
                             "this model samples with classes or prompts")
        source = "gaussian_head"
        if isinstance(moments, str | Path):
            source, moments = str(moments), GaussianMoments.load(moments)
        if tuple(moments.mean.shape) != tuple(self.sample_shape):
            raise ValueError(f"{source}: moments of samples of shape "
                             f"{tuple(moments.mean.shape)}, but this model draws "
                             f"{tuple(self.sample_shape)}")
        return GaussianHead(den, moments, skip_level(moments, skip_factor))

    # -- sampling ---------------------------------------------------------------------------------
    def default_sampler(self) -> tuple[str, int, dict[str, Any]]:
        """(sampler, steps, options) used when none are asked for: the stage's own (a
        distilled student's, e.g. ``consistency`` with 1 step), else DDIM with 50 steps."""
        st = self.stage
        return st.sampler or "ddim", st.sampler_steps or 50, dict(st.sampler_options)

    def default_grid(self, steps: int) -> Tensor | None:
        """The model's own time grid of ``steps`` steps (a diffusers scheduler's,
        ``StageCard.diffusers_timesteps``), or None: the sampler's default."""
        grid = self.stage.diffusers_timesteps
        if not grid:
            return None
        from .diffusers_in import diffusers_time_grid

        return diffusers_time_grid(grid, int(self.process.t_max), steps)

    def __call__(self, n: int | None = None, *, sampler: str | Callable | None = None,
                 steps: int | None = None, spacing: str | None = None,
                 grid: Tensor | str | Path | None = None,
                 sampler_options: Mapping[str, Any] | None = None,
                 guidance: float | None = None,
                 guidance_interval: tuple[float, float] | None = None,
                 guidance_rescale: float = 0.0,
                 classifier: str | Path | LoadedClassifier | None = None,
                 classifier_scale: float = 1.0, labels: LabelSpec = "all",
                 prompt: str | Sequence[str] | None = None,
                 negative_prompt: str | None = None, cond: Conditions | None = None,
                 seed: int = 0, seeds: Sequence[int] | None = None, batch_size: int = 256,
                 clip: bool = True, progress: bool = False,
                 control: ControlSpec | None = None,
                 gaussian_head: str | Path | GaussianMoments | None = None,
                 skip_factor: float = 32.0) -> PipelineOutput:
        """Draw ``n`` samples; image i uses seed ``seed + i`` (or ``seeds[i]``) for its noise,
        so it does not depend on ``batch_size`` or on the other images.

        ``sampler``: a name in ``samplers.SAMPLERS`` (or the function) with keyword
        ``sampler_options`` (None: :meth:`default_sampler`, with its options unless others
        are given); ``steps`` None: the default sampler's steps when ``sampler`` is None,
        else 50; ``grid``: a decreasing time grid (tensor or JSON from
        ``save_time_grid``) replacing ``steps`` and ``spacing``. Conditions come from
        ``labels``/``prompt`` (see :meth:`condition`) or ready-made as ``cond``; guidance
        options as in :meth:`denoiser`. ``control``: the control images of a model with
        ControlNets (:func:`~difflab.pipeline.controlnet.set_control`; they stay set).
        ``gaussian_head``: the data's moments (``GaussianMoments`` or a file from ``difflab
        moments``); noise levels above ``skip_factor`` times the data's largest standard
        deviation are then answered by that Gaussian's exact denoiser, at no network
        evaluation (:class:`~difflab.samplers.teleport.GaussianHead`; unconditional sampling
        only)."""
        if control is not None:
            set_control(self, control)
        own, own_steps, own_options = self.default_sampler()
        if sampler is None:
            sampler = own
            sampler_options = own_options if sampler_options is None else sampler_options
            steps = own_steps if steps is None else steps
        steps = 50 if steps is None else steps
        for name, flag, value in (("n", "--n", n), ("steps", "--steps", steps),
                                  ("batch_size", "--batch-size", batch_size)):
            if value is not None and value < 1:  # before any model call
                raise ValueError(f"{name} ({flag}) must be at least 1, got {value}")
        clf = self.load_classifier(classifier)
        den = self.denoiser(guidance=guidance, guidance_interval=guidance_interval,
                            guidance_rescale=guidance_rescale, classifier=clf,
                            classifier_scale=classifier_scale,
                            negative_prompt=negative_prompt, clip=clip)
        if seeds is not None:
            seeds = [int(s) for s in seeds]
            if n is not None and n != len(seeds):
                raise ValueError(f"n={n} disagrees with the {len(seeds)} seeds given")
            n = len(seeds)
        if cond is None:
            cond = self.condition(labels, prompt, n, clf)
        elif n is not None and n != len(cond):
            raise ValueError(f"n={n} disagrees with the {len(cond)} conditions given")
        seeds = list(range(seed, seed + len(cond))) if seeds is None else seeds
        if gaussian_head is not None:
            den = self.gaussian_head(den, gaussian_head, skip_factor, cond)
        batch_size = control_batch_size(self, batch_size, len(seeds))
        fn, options = resolve_sampler(sampler, sampler_options)
        ts = load_time_grid(grid) if isinstance(grid, str | Path) else grid
        if ts is None and spacing is None:
            ts = self.default_grid(steps)
        x = generate(den, fn, self.sample_shape, seeds, labels=cond.cond, steps=steps,
                     spacing=spacing, ts=ts, batch_size=batch_size, device=self.device,
                     progress=progress, **options)
        x = self.decode(x, batch_size=batch_size).cpu() if self.is_latent else x
        return PipelineOutput(samples=x, seeds=seeds, nrow=cond.nrow, labels=cond.labels,
                              prompts=cond.prompts)


def resolve_sampler(sampler: str | Callable, options: Mapping[str, Any] | None
                    ) -> tuple[Callable, dict[str, Any]]:
    """The sampler function and its options, validated against what it declares
    (``samplers.check_sampler_options``): an option it does not take, or a bad value, is a
    ValueError naming the sampler and its options. A function that declares no options (a
    user's own sampler) gets ``options`` as they are."""
    if isinstance(sampler, str):
        return get_sampler(sampler), check_sampler_options(sampler, options or {})
    try:
        declared = declared_options(sampler)
    except TypeError:
        return sampler, dict(options or {})
    return sampler, check_options(getattr(sampler, "__name__", "sampler"), declared,
                                  options or {})
