"""The distillation base: a student trained on the one loop saves its own stage card, loads
as an ordinary pipeline, and samples with its own sampler by default."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from conftest import train_tiny_digits

from difflab.cli.main import main
from difflab.config import option
from difflab.pipeline import Pipeline
from difflab.recipes.config import OptimConfig, RunConfig
from difflab.recipes.distill import (
    StudentLoop,
    data_source,
    distill_optim,
    distill_run,
    load_teacher,
    student_network,
    student_stage,
    teacher_data,
)


@dataclass
class CopyConfig:
    teacher: str = option("", "teacher")
    optim: OptimConfig = option(factory=distill_optim(steps=3, batch_size=8), help="optim")
    run: RunConfig = option(factory=distill_run("copy", device="cpu"), help="run")


def copy_loss(teacher):
    """A student that matches the teacher's eps at the same noisy input (a distillation in
    its simplest form: the target is the teacher's output)."""
    def loss(module, batch, ctx):
        g = ctx.generator
        x0 = batch.x
        t = teacher.process.sample_t(len(x0), g)
        a, s = teacher.process.alpha_sigma(t)
        noise = torch.randn(x0.shape, generator=g)
        xt = a.float().view(-1, 1, 1, 1) * x0 + s.float().view(-1, 1, 1, 1) * noise
        c = teacher.process.c_noise(t).float()
        with torch.no_grad():
            target = teacher.networks[0](xt, c, batch.labels)
        return ((module(xt, c, batch.labels) - target) ** 2).flatten(1).mean(1)
    return loss


def test_student_saves_its_card_and_loads_as_a_pipeline(tmp_path):
    train_tiny_digits(tmp_path, steps=2)
    config = CopyConfig(teacher=str(tmp_path / "run"),
                        run=distill_run("copy", device="cpu", out_dir=str(tmp_path / "s"))())
    teacher = load_teacher(config.teacher)
    data = teacher_data(teacher)
    assert data.x.shape[1:] == (1, 8, 8) and data.num_classes == 10
    stage = student_stage(teacher, sampler="ddpm", sampler_steps=3)
    run = StudentLoop(config, "copy", teacher, student_network(teacher), stage,
                      copy_loss(teacher), data_source(data, 8, 0))
    result = run.run(progress=False)
    pipe = Pipeline.from_pretrained(result["out_dir"])
    assert pipe.stage.sampler == "ddpm" and pipe.stage.sampler_steps == 3
    assert pipe.card.step == 3 and pipe.stage.class_names == teacher.class_names
    # the checkpoint's EMA weights are the student loop's
    for a, b in zip(pipe.networks[0].state_dict().values(),
                    run.sampling_module().state_dict().values(), strict=True):
        assert torch.equal(a, b)
    # the card's sampler is the default: the same draws as asking for it by name
    own = pipe(4, labels=3, seed=1).samples
    named = pipe(4, labels=3, seed=1, sampler="ddpm", steps=3).samples
    assert torch.equal(own, named)
    assert not torch.equal(own, pipe(4, labels=3, seed=1, sampler="ddim").samples)
    # the teacher was not touched
    assert all(not p.requires_grad for p in teacher.networks[0].parameters())


def test_sample_cli_uses_the_students_sampler(tmp_path, capsys):
    train_tiny_digits(tmp_path, steps=2)
    config = CopyConfig(teacher=str(tmp_path / "run"),
                        run=distill_run("copy", device="cpu", out_dir=str(tmp_path / "s"))())
    teacher = load_teacher(config.teacher)
    stage = student_stage(teacher, sampler="ddim", sampler_steps=2)
    StudentLoop(config, "copy", teacher, student_network(teacher), stage, copy_loss(teacher),
                data_source(teacher_data(teacher), 8, 0)).run(progress=False)
    assert main(["sample", "--checkpoint", str(tmp_path / "s"), "--n", "2", "--class", "1",
                 "--out", str(tmp_path / "g.png"), "--no-progress"]) == 0
    assert "(ddim, 2 steps)" in capsys.readouterr().out


def test_missing_teacher_is_one_line(capsys):
    assert load_teacher.__doc__
    try:
        load_teacher("")
    except ValueError as e:
        assert "--teacher is required" in str(e)
    else:
        raise AssertionError("no error")
