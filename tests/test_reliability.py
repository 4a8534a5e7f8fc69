"""Nothing lost, nothing silently wrong (issue 15, training side): each case as the failure it
guards against -- NaN checkpoints, tracebacks for a non-finite loss or a full disk, silent
overwrites of a run folder, out-of-range options, temporary files left by a killed write --
with real processes where the case is about processes (SIGKILL, a file-size limit)."""

from __future__ import annotations

import errno
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from difflab.cli.main import main
from difflab.config import ConfigError, from_dict, option
from difflab.io import WriteError, atomic_write, temp_files
from difflab.recipes import ClassifierTrainConfig, DiffusionRecipe, TrainConfig
from difflab.recipes.config import OptimConfig
from difflab.training import LoopConfig, NonFiniteLossError, TrainLoop, init_device
from difflab.training import checkpoint as ckpt_module
from difflab.training.checkpoint import list_checkpoints, load_checkpoint
from difflab.training.run_folder import RunFolderError

TINY = ["--no-progress", "--device", "cpu", "--base-channels", "16", "--channel-mult", "1", "2",
        "--num-res-blocks", "1", "--attention-resolutions", "--batch-size", "8",
        "--sample-steps", "2", "--sample-every", "0", "--dropout", "0"]


def train(out: Path, *extra: str) -> int:
    return main(["train", "--out-dir", str(out), *TINY, *extra])


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> Path:
    """A finished 2-step run (checkpoints 1 and 2, metrics, config, grid); tests copy it."""
    run = tmp_path_factory.mktemp("base") / "run"
    assert train(run, "--steps", "2", "--checkpoint-every", "1", "--keep-checkpoints", "0") == 0
    return run


def copy_run(base: Path, dest: Path) -> Path:
    shutil.copytree(base, dest, ignore=shutil.ignore_patterns(".difflab.lock"))
    return dest


def one_line_error(capsys) -> str:
    """The command's stderr, which must be a single error line (no traceback)."""
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def finite(path: Path) -> bool:
    tensors, _ = load_checkpoint(path)
    return all(bool(torch.isfinite(v).all()) for v in tensors.values() if v.is_floating_point())


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".difflab.lock"}


# -- 1, 2: non-finite values are never saved; one line, exit 2 --------------------------------

def test_huge_lr_saves_no_nan_checkpoint_and_names_the_last_good_one(tmp_path, capsys):
    run = tmp_path / "nan"
    assert train(run, "--checkpoint-every", "1", "--log-every", "10", "--lr", "1e30",
                 "--grad-clip", "0", "--warmup-steps", "0", "--steps", "12",
                 "--keep-checkpoints", "0") == 2
    err = one_line_error(capsys)
    saved = list_checkpoints(run / "checkpoints")
    # the defect: steps 2..9 were saved with NaN/Inf weights and step 9 named "last good"
    assert saved and all(finite(p) for p in saved)
    assert "loss became" in err and f"Last good checkpoint: {saved[-1]}." in err
    assert len(saved) < 9


def test_an_update_that_overflows_the_weights_is_not_saved(tmp_path):
    """A finite loss does not make the new weights finite: lr 1e39 sends them to Inf in one
    step while that step's loss (of the old weights) is finite."""
    dist, device = init_device("cpu")
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    source = type("S", (), {"batch": lambda self, step, g: torch.randn(4, 3, generator=g)})()
    loop = TrainLoop(LoopConfig(steps=3, lr=1e39, warmup_steps=0, grad_clip=0, ema_decay=None,
                                log_every=10, checkpoint_every=1, sample_every=0,
                                out_dir=str(tmp_path / "run")),
                     model, source, lambda m, b, ctx: m(b).pow(2).sum(1), dict, dist, device)
    with pytest.raises(NonFiniteLossError, match=r"model\.weight became non-finite by step 1; "
                                                 r".*Last good checkpoint: none"):
        loop.run(progress=False)
    assert not list((tmp_path / "run" / "checkpoints").glob("step_*"))


def test_the_finite_check_runs_at_every_checkpoint_and_metric_line_only(tmp_path, monkeypatch):
    """Every step that can write a checkpoint is covered, with one read-back per checkpoint
    or metric line (not per step: that would stall a GPU)."""
    from difflab.training.loop import TrainLoop as Loop
    checked = []
    original = Loop._mean_loss
    monkeypatch.setattr(Loop, "_mean_loss",
                        lambda self, losses: checked.append(self.step) or original(self, losses))
    dist, device = init_device("cpu")
    source = type("S", (), {"batch": lambda self, step, g: torch.randn(4, 3, generator=g)})()
    loop = TrainLoop(LoopConfig(steps=10, warmup_steps=0, ema_decay=None, log_every=5,
                                checkpoint_every=2, sample_every=0, keep_checkpoints=0,
                                out_dir=str(tmp_path / "run")),
                     nn.Linear(3, 1), source, lambda m, b, ctx: m(b).pow(2).sum(1), dict,
                     dist, device)
    loop.run(progress=False)
    assert checked == [2, 4, 5, 6, 8, 10]


# -- 4: a full disk during a checkpoint write ---------------------------------------------------

def _refuse(exc):
    def save_file(tensors, path):
        Path(path).write_bytes(b"partial")  # a write that got part of the way
        raise exc
    return save_file


@pytest.mark.parametrize("exc, words", [
    (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), "No space left on device (ENOSPC)"),
    # what safetensors really raises on a full disk or quota: its Rust I/O error as text
    (SafetensorError("Error while serializing: I/O error: Disk quota exceeded (os error 122)"),
     "Disk quota exceeded (EDQUOT)"),
    (OSError(errno.EROFS, os.strerror(errno.EROFS)), "Read-only file system (EROFS)"),
    (PermissionError(errno.EACCES, os.strerror(errno.EACCES)), "Permission denied (EACCES)"),
], ids=["ENOSPC", "EDQUOT", "EROFS", "EACCES"])
def test_full_disk_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, capsys, monkeypatch,
                                                                 base_run, exc, words):
    run = copy_run(base_run, tmp_path / "run")
    before = snapshot(run / "checkpoints")
    capsys.readouterr()
    monkeypatch.setattr(ckpt_module, "save_file", _refuse(exc))
    assert train(run, "--resume", "--steps", "4", "--keep-checkpoints", "1") == 2
    err = one_line_error(capsys)
    assert f"cannot write {run / 'checkpoints' / 'step_00000003.safetensors'}: {words}" in err
    assert snapshot(run / "checkpoints") == before  # intact, not pruned, no temp file


def test_a_refused_json_write_leaves_no_half_checkpoint(tmp_path, monkeypatch):
    """Tensors written, JSON refused: the tensors go too (never a checkpoint without its
    own JSON, never an old JSON beside new tensors)."""
    folder = tmp_path / "ckpts"
    ckpt_module.save_checkpoint(folder, 1, {"w": torch.ones(3)}, {"a": 1})
    write_text = Path.write_text

    def refuse(self, *args, **kw):
        if self.name.startswith(".step_"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return write_text(self, *args, **kw)
    monkeypatch.setattr(Path, "write_text", refuse)
    with pytest.raises(WriteError, match="step_00000002.json: No space left"):
        ckpt_module.save_checkpoint(folder, 2, {"w": torch.zeros(3)}, {"a": 2})
    assert sorted(p.name for p in folder.iterdir()) == ["step_00000001.json",
                                                        "step_00000001.safetensors"]


@pytest.mark.slow
def test_real_process_over_its_file_size_limit_fails_in_one_line(tmp_path, base_run):
    """A real write failure inside safetensors (not an injected one): the training process
    runs under RLIMIT_FSIZE, so the checkpoint's tensors cannot be written (EFBIG)."""
    run = copy_run(base_run, tmp_path / "run")
    size = (run / "checkpoints" / "step_00000002.safetensors").stat().st_size
    before = snapshot(run / "checkpoints")

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of death
        resource.setrlimit(resource.RLIMIT_FSIZE, (size // 4, size // 4))
    done = subprocess.run([sys.executable, "-m", "difflab", "train", "--out-dir", str(run),
                           *TINY, "--resume", "--steps", "4"], preexec_fn=limit,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    err = done.stderr.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert (f"cannot write {run / 'checkpoints' / 'step_00000003.safetensors'}: File too "
            f"large (EFBIG)") in err
    assert snapshot(run / "checkpoints") == before


# -- 5: an existing run folder is not overwritten silently --------------------------------------

def test_existing_run_folder_is_refused_then_overwritten_on_request(tmp_path, capsys,
                                                                   base_run):
    run = copy_run(base_run, tmp_path / "run")
    (run / "notes.txt").write_text("mine")
    before = snapshot(run)
    capsys.readouterr()
    # the defect: this replaced config, metrics and step 1, while the old step 2 stayed latest
    assert train(run, "--steps", "1", "--checkpoint-every", "1", "--seed", "1") == 2
    err = one_line_error(capsys)
    assert f"run folder {run} already holds a run (config.json, metrics.jsonl, 2 checkpoints " \
           f"up to step 2); pass --resume to continue it or --overwrite" in err
    assert snapshot(run) == before
    # --overwrite: the old run's files go (all of them), other files stay
    assert train(run, "--steps", "1", "--checkpoint-every", "1", "--seed", "1",
                 "--overwrite") == 0
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["step_00000001.json"]
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step_00000001.png"]
    assert (run / "notes.txt").read_text() == "mine"
    rows = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in rows] == [1]  # the old run's row (step 2) is gone
    assert json.loads((run / "config.json").read_text())["config"]["run"]["seed"] == 1
    capsys.readouterr()
    # a resume continues the new run only; --overwrite would delete what it resumes
    assert train(run, "--resume", "--steps", "2") == 0
    assert "resumed from" in capsys.readouterr().out
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["step_00000001.json",
                                                                       "step_00000002.json"]
    assert train(run, "--resume", "--steps", "3", "--overwrite") == 2
    assert "--overwrite would delete" in one_line_error(capsys)


def test_resume_from_another_folder_into_an_existing_run_is_refused(tmp_path, capsys,
                                                                   base_run):
    a, b = copy_run(base_run, tmp_path / "a"), copy_run(base_run, tmp_path / "b")
    capsys.readouterr()
    src = str(a / "checkpoints" / "step_00000002.json")
    assert train(b, "--resume", src, "--steps", "3") == 2
    assert "already holds a run" in one_line_error(capsys)
    assert train(tmp_path / "c", "--resume", src, "--steps", "3") == 0  # a new folder: fine


def test_python_api_refuses_too_and_takes_overwrite(tmp_path):
    cfg = TrainConfig.from_values(dict(out_dir=str(tmp_path / "r"), steps=1, batch_size=8,
                                       base_channels=16, channel_mult=[1, 2], num_res_blocks=1,
                                       attention_resolutions=[], sample_every=0,
                                       device="cpu"))
    DiffusionRecipe(cfg).run(progress=False)
    with pytest.raises(RunFolderError, match="already holds a run"):
        DiffusionRecipe(cfg).run(progress=False)
    assert DiffusionRecipe(cfg, overwrite=True).run(progress=False)["step"] == 1


# -- 6: out-of-range options ---------------------------------------------------------------------

@pytest.mark.parametrize("args, words", [
    (["--steps", "0"], "argument --steps: must be >= 1, got 0"),
    (["--steps", "-5"], "argument --steps: must be >= 1, got -5"),
    (["--batch-size", "0"], "argument --batch-size: must be >= 1, got 0"),
    (["--lr", "-0.001"], "argument --lr: must be > 0, got -0.001"),
    (["--log-every", "0"], "argument --log-every: must be >= 1"),
    (["--ema-decay", "1"], "argument --ema-decay: must be >= 0 and < 1"),
    (["--ema-decay", "-0.1"], "argument --ema-decay: must be >= 0 and < 1"),
    (["--p-uncond", "1.5"], "argument --p-uncond: must be >= 0 and <= 1"),
    (["--resolution", "0"], "argument --resolution: must be >= 1"),
    (["--checkpoint-every", "-1"], "argument --checkpoint-every: must be >= 0"),
    (["--warmup-steps", "-1"], "argument --warmup-steps: must be >= 0"),
    (["--T", "0"], "argument --T: must be >= 1"),
])
def test_out_of_range_train_options_are_refused_naming_the_option(tmp_path, capsys, args,
                                                                  words):
    with pytest.raises(SystemExit) as e:
        train(tmp_path / "x", *args)
    assert e.value.code == 2 and words in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_config_files_and_direct_construction_get_the_same_checks(tmp_path, capsys):
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[optim]\nbatch_size = 0\n")
    assert main(["train", "--config", str(cfg), "--out-dir", str(tmp_path / "x")]) == 2
    err = one_line_error(capsys)
    assert "bad.toml: optim.batch_size = 0: must be >= 1" in err
    with pytest.raises(ConfigError, match="steps = 0: must be >= 1"):
        OptimConfig(steps=0)
    with pytest.raises(ConfigError, match="log_every = 0: must be >= 1"):
        LoopConfig(log_every=0)
    with pytest.raises(ConfigError, match="batch_size = 0"):
        ClassifierTrainConfig(batch_size=0)
    with pytest.raises(SystemExit):
        main(["train-classifier", "--batch-size", "0"])
    assert "argument --batch-size: must be >= 1" in capsys.readouterr().err
    assert LoopConfig(ema_decay=None).ema_decay is None  # None is not a number to bound


def test_ranges_are_exact_limits_and_shown_in_help(capsys):
    @dataclass
    class C:
        a: int = option(1, "a", ge=1)
        b: float = option(0.5, "b", gt=0, lt=1)
        c: float = option(1.0, "c", le=1)

    assert from_dict(C, {"a": 1, "b": 1e-12, "c": 1.0}) == C(1, 1e-12, 1.0)
    for bad in ({"a": 0}, {"b": 0.0}, {"b": 1.0}, {"c": 1.0000001}):
        with pytest.raises(ConfigError, match=f"config: {next(iter(bad))} = "):
            from_dict(C, bad)
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "total optimisation steps (>= 1; default: 1500)" in help_text
    assert "(>= 0 and < 1; default: 0.999)" in help_text


# -- 8: a killed run's temporary files go at the next start; it resumes bitwise ---------------

@pytest.mark.slow
def test_sigkill_then_the_next_start_cleans_up_and_resumes_bitwise(tmp_path):
    run, ref = tmp_path / "run", tmp_path / "ref"
    common = ["--steps", "30", "--log-every", "5", "--keep-checkpoints", "0"]
    env = os.environ | {"OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.Popen([sys.executable, "-m", "difflab", "train", "--out-dir", str(run),
                             *TINY, *common, "--checkpoint-every", "1"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while len(list_checkpoints(run / "checkpoints")) < 3:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL  # killed mid-run, not finished
    finally:
        proc.kill()
        proc.stderr.close()
    for p in list_checkpoints(run / "checkpoints"):  # every complete checkpoint loads
        load_checkpoint(p)
    # what a kill mid-write leaves (also planted, so the test does not depend on timing),
    # and files that only look alike, which must stay
    ours = [run / ".config.json.k2j4h_x1.tmp",
            run / "checkpoints" / ".step_00000099.safetensors.ab_12cd3.tmp",
            run / "checkpoints" / ".step_00000099.json.zz9q8w7e.tmp",
            run / "checkpoints" / "step_00000098.safetensors",  # tensors, JSON never written
            run / "samples" / ".step_00000005.png.qwertyui.tmp"]
    others = [run / ".notes.tmp", run / "checkpoints" / ".step_1.json.abcdefgh.tmp",
              run / "checkpoints" / "step_00000001.json.bak", run / "samples" / "mine.png"]
    for p in ours + others:
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(b"x")
    assert train(run, *common, "--resume", "--checkpoint-every", "0") == 0
    assert not [p for p in ours if p.exists()] and all(p.exists() for p in others)
    assert not temp_files(run / "checkpoints", r"step_\d{8}\.(?:json|safetensors)")
    assert train(ref, *common, "--checkpoint-every", "0") == 0
    a = load_file(run / "checkpoints" / "step_00000030.safetensors")
    b = load_file(ref / "checkpoints" / "step_00000030.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_second_process_in_a_folder_in_use_is_refused(tmp_path, capsys):
    """While a run trains, a second start there is refused: its start-up clean-up would
    delete the first one's temporary files mid-write."""
    run = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from difflab.training.run_folder import "
         "run_lock\nwith run_lock(sys.argv[1]):\n print('locked', flush=True); time.sleep(120)",
         str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert train(run, "--steps", "1") == 2
        err = one_line_error(capsys)
        assert f"run folder {run} is in use by another process (pid {holder.pid})" in err
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    assert train(run, "--steps", "1") == 0  # the lock died with its process


def test_atomic_write_temp_names_are_the_pattern_cleaned_up(tmp_path):
    """The start-up clean-up matches exactly what atomic_write makes (a killed write's file)."""
    seen = []
    atomic_write(tmp_path / "step_00000007.safetensors", lambda tmp: seen.append(Path(tmp)))
    assert seen and seen[0].parent == tmp_path
    seen[0].write_bytes(b"x")  # as if the process had died before the rename
    assert temp_files(tmp_path, r"step_\d{8}\.safetensors") == [seen[0]]
