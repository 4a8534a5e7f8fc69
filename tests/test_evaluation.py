"""Sample-set metrics against closed forms and torchmetrics; extractors; reference files; CLI."""

import json

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

from difflab.cli.main import main
from difflab.data import load_digits
from difflab.evaluation import (
    FeatureNetConfig,
    FIDInceptionV3,
    extract,
    feature_stats,
    fid,
    frechet_distance,
    inception_score,
    kid,
    load_feature_net,
    load_fid_inception,
    load_reference,
    load_sample_set,
    mmd2_unbiased,
    precision_recall,
    save_feature_net,
    save_reference,
    train_feature_net,
)
from difflab.evaluation.featurenet import feature_net_accuracy as accuracy
from difflab.evaluation.inception import FID_WEIGHTS_NAME


def rng(seed=0):
    return np.random.default_rng(seed)


def random_cov(d, r):
    a = r.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def test_frechet_distance_of_a_set_with_itself_is_zero():
    f = rng().normal(size=(500, 16)) * 3 + 1
    assert fid(f, f) == pytest.approx(0.0, abs=1e-8)


def test_frechet_distance_matches_closed_forms():
    r = rng(1)
    mu1, mu2 = r.normal(size=6), r.normal(size=6)
    # diagonal covariances: |mu1 - mu2|^2 + sum (s1 - s2)^2 (standard deviations s)
    s1, s2 = r.uniform(0.2, 2, 6), r.uniform(0.2, 2, 6)
    expected = ((mu1 - mu2) ** 2).sum() + ((s1 - s2) ** 2).sum()
    assert frechet_distance(mu1, np.diag(s1**2), mu2, np.diag(s2**2)) == pytest.approx(expected)
    # general covariances: tr(S1 + S2 - 2 (S1 S2)^(1/2)) with scipy's general sqrtm
    c1, c2 = random_cov(6, r), random_cov(6, r)
    ref = ((mu1 - mu2) ** 2).sum() + np.trace(c1 + c2 - 2 * scipy.linalg.sqrtm(c1 @ c2).real)
    assert frechet_distance(mu1, c1, mu2, c2) == pytest.approx(ref, rel=1e-8)
    # samples from two Gaussians: FID of the samples -> the closed form
    a = r.multivariate_normal(mu1, c1, size=20000)
    b = r.multivariate_normal(mu2, c2, size=20000)
    assert fid(a, b) == pytest.approx(frechet_distance(mu1, c1, mu2, c2), rel=0.05)


class RandomFeatures(nn.Module):
    """A fixed random feature extractor for images [B, 3, 8, 8] -> [B, 16]."""

    num_features = 16

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(3 * 8 * 8, 16)

    def forward(self, x):
        return torch.tanh(self.lin(x.float().flatten(1))).double()


def test_fid_and_kid_agree_with_torchmetrics():
    tm_fid_mod = pytest.importorskip("torchmetrics.image.fid")
    tm_kid_mod = pytest.importorskip("torchmetrics.image.kid")
    g = torch.Generator().manual_seed(0)
    real = torch.rand(300, 3, 8, 8, generator=g)
    fake = torch.rand(300, 3, 8, 8, generator=g) * 0.6 + 0.3
    net = RandomFeatures().eval()
    with torch.no_grad():
        fr, ff = net(real).double().numpy(), net(fake).double().numpy()
    tm_fid = tm_fid_mod.FrechetInceptionDistance(feature=net)
    tm_fid.update(real, real=True)
    tm_fid.update(fake, real=False)
    assert fid(ff, fr) == pytest.approx(float(tm_fid.compute()), rel=1e-3)
    # one subset of all samples: no randomness on either side
    tm_kid = tm_kid_mod.KernelInceptionDistance(feature=net, subsets=1, subset_size=300)
    tm_kid.update(real, real=True)
    tm_kid.update(fake, real=False)
    ours = kid(ff, fr, subsets=1, subset_size=300)[0]
    assert ours == pytest.approx(float(tm_kid.compute()[0]), rel=1e-3)


def test_kid_is_unbiased_on_identical_distributions():
    """Mean unbiased MMD^2 over many tiny independent subsets of one distribution is ~0 (within
    3 standard errors), while the biased estimator (diagonal kept) is clearly positive."""
    r = rng(2)
    vals, biased = [], []
    for _ in range(400):
        x, y = r.normal(size=(10, 8)), r.normal(size=(10, 8))
        vals.append(mmd2_unbiased(x, y))
        k = lambda a, b: (a @ b.T / 8 + 1) ** 3  # noqa: E731
        biased.append(k(x, x).mean() + k(y, y).mean() - 2 * k(x, y).mean())
    se = np.std(vals) / np.sqrt(len(vals))
    assert abs(np.mean(vals)) < 3 * se
    assert np.mean(biased) > 10 * se
    # the subset estimator over a large pool agrees, and a shift is detected
    a, b = r.normal(size=(2000, 8)), r.normal(size=(2000, 8))
    m, s = kid(a, b, subsets=200, subset_size=50)
    assert abs(m) < 3 * s / np.sqrt(200) + 1e-3
    assert kid(a, b + 0.5, subsets=50, subset_size=50)[0] > 10 * s


def test_inception_score_and_precision_recall_limits():
    k = 10
    onehot = np.eye(k)[np.arange(1000) % k]
    assert inception_score(onehot, splits=5)[0] == pytest.approx(k, rel=1e-6)
    assert inception_score(np.full((100, k), 1 / k), splits=5)[0] == pytest.approx(1.0)
    a = rng(3).normal(size=(300, 4))
    assert precision_recall(a, a) == (1.0, 1.0)
    assert precision_recall(a, a + 100.0) == (0.0, 0.0)
    # half of the generated samples collapse onto a far-away point: precision about 1/2
    fake = np.concatenate([rng(4).normal(size=(150, 4)), np.full((150, 4), 50.0)])
    p, r = precision_recall(a, fake)
    assert 0.4 < p < 0.6 and r > 0.5


def test_inception_loads_standard_fid_weight_names(tmp_path):
    model = FIDInceptionV3()
    state = model.state_dict()
    for name in ["Conv2d_1a_3x3.conv.weight", "Conv2d_4a_3x3.bn.running_var",
                 "Mixed_5b.branch5x5_2.conv.weight", "Mixed_6e.branch7x7dbl_5.bn.bias",
                 "Mixed_7a.branch7x7x3_4.conv.weight", "Mixed_7c.branch3x3dbl_3b.bn.weight",
                 "fc.weight", "fc.bias"]:
        assert name in state
    assert state["fc.weight"].shape == (1008, 2048)
    assert state["Mixed_7c.branch_pool.conv.weight"].shape == (192, 2048, 1, 1)
    g = torch.Generator().manual_seed(0)
    fake = {k: torch.rand(v.shape, generator=g) + 0.5 if "running_var" in k else
            torch.randn(v.shape, generator=g) * 0.05
            for k, v in state.items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / FID_WEIGHTS_NAME
    torch.save(fake, path)
    loaded = load_fid_inception(path)
    assert torch.equal(loaded.state_dict()["Mixed_6b.branch7x7_2.conv.weight"],
                       fake["Mixed_6b.branch7x7_2.conv.weight"])
    with torch.no_grad():
        pool, logits = loaded(torch.rand(1, 1, 8, 8) * 2 - 1)
    assert pool.shape == (1, 2048) and logits.shape == (1, 1008)
    with pytest.raises(FileNotFoundError, match=FID_WEIGHTS_NAME):
        load_fid_inception(tmp_path / "missing.pth")
    torch.save({"fc.weight": fake["fc.weight"]}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="missing"):
        load_fid_inception(tmp_path / "bad.pth")


@pytest.fixture(scope="module")
def classifier_file(tmp_path_factory):
    train = load_digits(8, split="train")
    config = FeatureNetConfig(width=8, feature_dim=32, class_names=train.class_names)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny CNN trains fastest on one thread, above all on a busy CPU
    try:
        model = train_feature_net(train, steps=100, batch_size=32, lr=5e-3, seed=0, config=config)
    finally:
        torch.set_num_threads(threads)
    acc = accuracy(model, load_digits(8, split="test"))
    path = save_feature_net(model, tmp_path_factory.mktemp("clf") / "digits_classifier",
                           {"test_accuracy": acc})
    return path, acc


def test_classifier_learns_digits_and_round_trips(classifier_file):
    path, acc = classifier_file
    assert acc > 0.6  # chance is 0.1; a short run in the test (the benchmark trains longer)
    model, meta = load_feature_net(path)
    assert meta["info"]["test_accuracy"] == acc
    assert accuracy(model, load_digits(8, split="test")) == acc
    with pytest.raises(FileNotFoundError, match="nothere.json"):
        load_feature_net(path.parent / "nothere")


def test_reference_stats_and_sample_sets_round_trip(tmp_path):
    f = rng(5).normal(size=(50, 3))
    path = save_reference(tmp_path / "ref.npz", f, "test")
    ref = load_reference(path)
    assert np.allclose(ref.stats.mu, f.mean(0)) and np.allclose(ref.stats.cov, np.cov(f.T))
    assert ref.extractor == "test" and ref.features.shape == (50, 3)
    images = rng(6).integers(0, 256, size=(5, 8, 8, 1), dtype=np.uint8)
    np.savez(tmp_path / "s.npz", images=images, labels=np.arange(5), seeds=np.arange(5))
    s = load_sample_set(str(tmp_path / "s.npz"))
    assert np.array_equal(s.images, images)
    from difflab.data import from_uint8, save_images
    save_images(from_uint8(torch.as_tensor(images)).permute(0, 3, 1, 2), tmp_path / "pngs")
    folder = load_sample_set(str(tmp_path / "pngs"))
    assert folder.images.shape == (5, 8, 8, 1)
    assert sorted(map(bytes, folder.images)) == sorted(map(bytes, images))
    digits = load_sample_set("digits:test", resolution=8)
    assert digits.images.shape == (len(load_digits(8, split="test")), 8, 8, 1)


def test_eval_command_writes_json_and_names_missing_files(tmp_path, classifier_file, capsys):
    clf, _ = classifier_file
    model, _ = load_feature_net(clf)
    test = load_digits(8, split="test")
    from difflab.data import to_uint8
    np.savez(tmp_path / "s.npz", images=to_uint8(test.images[:200]).permute(0, 2, 3, 1).numpy())
    out = tmp_path / "eval.json"
    assert main(["eval", "--samples", str(tmp_path / "s.npz"), "--reference", "digits:train",
                 "--features", f"featurenet:{clf}", "--metrics", "fid,kid,is,pr",
                 "--kid-subset-size", "100", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    for key in ("fid", "kid_mean", "kid_std", "is_mean", "precision", "recall", "extractor"):
        assert key in report
    assert "featurenet" in report["extractor"] and "| fid |" in capsys.readouterr().out
    # reference statistics saved once, then reused
    stats = tmp_path / "ref.npz"
    assert main(["eval", "--samples", "digits:train", "--resolution", "8",
                 "--features", f"featurenet:{clf}", "--save-reference", str(stats)]) == 0
    assert main(["eval", "--samples", str(tmp_path / "s.npz"), "--reference", str(stats),
                 "--features", f"featurenet:{clf}", "--metrics", "fid",
                 "--out", str(tmp_path / "e2.json")]) == 0
    assert json.loads((tmp_path / "e2.json").read_text())["fid"] == pytest.approx(report["fid"])
    capsys.readouterr()
    assert main(["eval", "--samples", str(tmp_path / "none.npz"), "--reference", "digits",
                 "--features", f"featurenet:{clf}"]) == 2
    assert "none.npz" in capsys.readouterr().err
    assert main(["eval", "--samples", str(tmp_path / "s.npz"), "--reference", "digits",
                 "--features", f"inception:{tmp_path / 'w.pth'}"]) == 2
    err = capsys.readouterr().err
    assert "w.pth" in err and FID_WEIGHTS_NAME in err


def test_extract_accepts_uint8_and_float(classifier_file):
    model, _ = load_feature_net(classifier_file[0])
    from difflab.evaluation import ModuleExtractor
    ex = ModuleExtractor(model, "clf")
    from difflab.data import from_uint8, to_uint8
    x = from_uint8(to_uint8(load_digits(8, split="test").images[:20]))
    a = extract(ex, to_uint8(x).permute(0, 2, 3, 1).numpy())
    b = extract(ex, x)
    assert a.features.shape == (20, model.config.feature_dim)
    assert np.allclose(a.features, b.features, atol=1e-4)
    assert np.allclose(a.probs.sum(1), 1.0)
    assert feature_stats(a.features).n == 20
