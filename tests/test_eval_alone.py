"""``difflab eval`` from the command line alone (issue 16): the built-in features need no
--features and no download, a ``difflab train-classifier`` run is accepted as features, and a
bad --features value is a one-line error with exit status 2."""

import json

import numpy as np
import pytest
import torch

from difflab.cli.main import main
from difflab.data import load_digits, to_uint8
from difflab.evaluation import NoisyClassifierFeatures, builtin_feature_net, load_feature_net
from difflab.evaluation.builtin import cache_dir
from difflab.pipeline import load_classifier, load_extractor

STEPS = "40"  # built-in feature network steps: tiny, the tests check wiring and invariants


@pytest.fixture
def cache(tmp_path_factory, monkeypatch):
    """One cache folder for the module's tests (the built-in network is trained once)."""
    root = tmp_path_factory.getbasetemp() / "difflab_cache"
    monkeypatch.setenv("DIFFLAB_CACHE_DIR", str(root))
    return root


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    """200 real test digits as a '--save-npz' file (uint8 NHWC)."""
    path = tmp_path_factory.mktemp("s") / "s.npz"
    images = to_uint8(load_digits(8, split="test").images[:200]).permute(0, 2, 3, 1).numpy()
    np.savez(path, images=images)
    return path


@pytest.fixture(scope="module")
def classifier_run(tmp_path_factory):
    """A tiny 'difflab train-classifier' run folder."""
    run = tmp_path_factory.mktemp("clf") / "run"
    assert main(["train-classifier", "--out-dir", str(run), "--steps", "3", "--batch-size",
                 "16", "--base-channels", "8", "--T", "20", "--no-progress",
                 "--device", "cpu"]) == 0
    return run


def run_eval(tmp_path, *argv):
    out = tmp_path / f"e{len(list(tmp_path.glob('e*.json')))}.json"
    assert main(["eval", *map(str, argv), "--kid-subset-size", "50", "--device", "cpu",
                 "--out", str(out)]) == 0
    return json.loads(out.read_text())


def test_eval_runs_without_features_and_caches_a_reproducible_network(
        tmp_path, cache, samples, capsys):
    r1 = run_eval(tmp_path, "--samples", samples, "--reference", "digits:test",
                  "--feature-steps", STEPS)
    assert "training the built-in feature network on digits:train" in capsys.readouterr().out
    assert r1["extractor"] == f"builtin:digits (8px, 1ch, {STEPS} steps)"
    for key in ("fid", "kid_mean", "is_mean", "precision", "recall"):
        assert np.isfinite(r1[key])
    # second use: loaded from the cache, not retrained; same numbers
    r2 = run_eval(tmp_path, "--samples", samples, "--reference", "digits:test",
                  "--feature-steps", STEPS)
    assert "training" not in capsys.readouterr().out and r2 == r1
    # a set against itself: FID 0 (up to the matrix square root), precision = recall = 1
    r3 = run_eval(tmp_path, "--samples", "digits:test", "--reference", "digits:test",
                  "--resolution", "8", "--feature-steps", STEPS, "--metrics", "fid,pr")
    assert abs(r3["fid"]) < 1e-6 and r3["precision"] == r3["recall"] == 1.0
    # retrained from scratch: bit-identical weights (fixed seeds, one CPU thread)
    (stem,) = [p.with_suffix("") for p in (cache / "features").glob(f"digits-8px-1ch-{STEPS}-*"
                                                                     ".json")]
    before = load_feature_net(stem)[0].state_dict()
    for p in stem.parent.glob(stem.name + ".*"):
        p.unlink()
    state = torch.random.get_rng_state()
    after = builtin_feature_net("digits", 8, 1, int(STEPS), log=lambda _: None)[0].state_dict()
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG is untouched
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert cache_dir() == cache


def test_reference_statistics_remember_the_builtin_data_set(tmp_path, cache, samples, capsys):
    stats = tmp_path / "ref.npz"
    assert main(["eval", "--samples", "digits:test", "--resolution", "8", "--feature-steps",
                 STEPS, "--save-reference", str(stats)]) == 0
    direct = run_eval(tmp_path, "--samples", samples, "--reference", "digits:test",
                      "--feature-steps", STEPS, "--metrics", "fid")
    via_stats = run_eval(tmp_path, "--samples", samples, "--reference", stats,
                         "--feature-steps", STEPS, "--metrics", "fid")
    assert via_stats["fid"] == pytest.approx(direct["fid"], rel=1e-9)
    assert "warning" not in capsys.readouterr().out


def test_train_classifier_output_is_accepted_as_features(tmp_path, samples, classifier_run):
    ckpt = next((classifier_run / "checkpoints").glob("step_*.json"))
    reports = [run_eval(tmp_path, "--samples", samples, "--reference", "digits:test",
                        "--features", f"classifier:{path}")
               for path in (classifier_run, classifier_run / "checkpoints", ckpt,
                            ckpt.with_suffix(".safetensors"))]
    assert all(r["fid"] == reports[0]["fid"] for r in reports)
    assert reports[0]["extractor"].startswith("classifier (")
    # the features are what the classifier's linear head sees: head(features) = its logits
    clf = load_classifier(classifier_run)
    ex = load_extractor(f"classifier:{classifier_run}")
    x = load_digits(8, split="test").images[:16]
    feats, logits = ex(x)
    assert feats.shape == (16, clf.net.config.base_channels * clf.net.config.channel_mult[-1])
    assert torch.allclose(logits, clf.net(x, ex.module.c_noise.expand(16)), atol=1e-5)
    assert isinstance(ex.module, NoisyClassifierFeatures)


@pytest.mark.parametrize("spec, words", [
    ("nope", "bad --features 'nope'"),
    ("inception", "bad --features 'inception'"),
    ("classifier:", "bad --features 'classifier:'"),
    ("classifier:CKPT_FEATURENET", "is a feature network, not a noisy classifier"),
    ("featurenet:RUN_JSON", "--features classifier:PATH"),
    ("inception:missing.pth", "pt_inception-2015-12-05-6726825d.pth"),
])
def test_a_bad_features_value_is_one_line_exit_2(tmp_path, samples, classifier_run, capsys,
                                                 spec, words):
    ckpt = next((classifier_run / "checkpoints").glob("step_*.json"))
    fake = tmp_path / "fn.json"  # a feature network's files given as a classifier
    fake.write_text(json.dumps({"kind": "difflab.FeatureNet", "config": {}}))
    fake.with_suffix(".safetensors").write_bytes(ckpt.with_suffix(".safetensors").read_bytes())
    spec = spec.replace("CKPT_FEATURENET", str(fake)).replace("RUN_JSON", str(ckpt))
    capsys.readouterr()
    assert main(["eval", "--samples", str(samples), "--reference", "digits:test",
                 "--features", spec, "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1 and "Traceback" not in err


def test_no_data_set_to_train_on_is_one_line_exit_2(samples, capsys):
    assert main(["eval", "--samples", str(samples), "--reference", str(samples)]) == 2
    err = capsys.readouterr().err
    assert "--features builtin:DATASET" in err and err.count("\n") == 1
