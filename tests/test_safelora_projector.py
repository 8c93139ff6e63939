"""`--projector orthogonal` against an fp64 SVD oracle, and `--cosine-decimals` against the reference code's rule
(docs/math.md#safe-lora-orthogonal-projector, docs/math.md#safe-lora-cosine-rounding)."""
import json

import numpy
import pytest
import torch
from safetensors.torch import load_file

from safeshape import reference
from safeshape.cli import main as cli_main
from safeshape.errors import SafeshapeError
from safeshape.safelora import Checkpoint, apply_safe_lora, project_adapter, select_modules
from safeshape.safelora.example import make_example
from safeshape.safelora.projector import energy_rank, orthogonal_project, project
from tests.conftest import DEVICES
from tests.safelora_common import make_peft_setup

SMALL = dict(hidden=64, intermediate=96, layers=2, heads=4, kv_heads=2, vocab=128, r=4)


def oracle(w_aligned, w_base, lora_b, lora_a, energy):
    """fp64: U_k U_k^T B with k the fewest directions holding `energy` of ||V||^2, and its cosine."""
    v = w_aligned.double() - w_base.double()
    u, s, _ = torch.linalg.svd(v, full_matrices=False)
    cum = torch.cumsum(s**2, 0) / (s**2).sum()
    k = int((cum < energy).sum()) + 1
    p = u[:, :k] @ (u[:, :k].T @ lora_b.double())
    return p, reference.lora_cosine(lora_b, p, lora_a).item(), k


def spectrum_module(d_out, d_in, r, sigmas, seed=0):
    g = torch.Generator().manual_seed(seed)
    f64 = dict(generator=g, dtype=torch.float64)
    n = len(sigmas)
    u, _ = torch.linalg.qr(torch.randn(d_out, n, **f64))
    w, _ = torch.linalg.qr(torch.randn(d_in, n, **f64))
    base = torch.randn(d_out, d_in, **f64)
    aligned = base + (u * torch.tensor(sigmas, dtype=torch.float64)) @ w.T
    return aligned.float(), base.float(), torch.randn(d_out, r, **f64).float(), torch.randn(r, d_in, **f64).float()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,energy", [((64, 48), 0.95), ((40, 96), 0.5), ((128, 128), 0.99), ((50, 30), 0.7)])
def test_orthogonal_projector_matches_fp64_svd(shape, energy, device):
    sigmas = [2.0 ** -i for i in range(min(shape))]  # well separated: k is not a near-tie
    aligned, base, b, a = spectrum_module(*shape, 6, sigmas, seed=shape[0])
    want, want_cos, want_k = oracle(aligned, base, b, a, energy)
    got, cos, v_norm, k = project(*(t.to(device) for t in (aligned, base, a, b)), "orthogonal", energy)
    assert k == want_k
    assert ((got.cpu().double() - want).norm() / want.norm()).item() <= 1e-5
    assert abs(cos - want_cos) <= 1e-6
    assert v_norm == pytest.approx((aligned.double() - base.double()).norm().item(), rel=1e-6)
    # a projection: applying it twice changes nothing, and B' is orthogonal to B - B'
    again, _, _ = orthogonal_project(aligned.to(device), base.to(device), got, energy)
    torch.testing.assert_close(again, got, rtol=1e-4, atol=1e-5)
    assert abs(float((got.double() * (b.to(device).double() - got.double())).sum())) <= 1e-4 * float(b.norm()) ** 2


def test_energy_one_keeps_every_direction():
    aligned, base, b, a = spectrum_module(30, 50, 3, [1.0] * 30, seed=1)  # d_out <= d_in: U_k U_k^T = I
    got, cos, _, k = project(aligned, base, a, b, "orthogonal", 1.0)
    assert k == 30 and cos == pytest.approx(1.0, abs=1e-6)
    torch.testing.assert_close(got, b, rtol=1e-4, atol=1e-5)


def test_energy_rank():
    s = torch.tensor([3.0, 2.0, 1.0, 0.0])  # energies 9, 4, 1 of 14
    assert [energy_rank(s, e) for e in (0.5, 9 / 14, 0.65, 13 / 14, 0.95, 1.0)] == [1, 1, 2, 2, 3, 3]
    assert energy_rank(torch.zeros(3), 0.95) == 0


def test_orthogonal_projector_is_scale_free():
    # the paper's C scales with the weights; P does not
    aligned, base, b, a = spectrum_module(48, 40, 4, [1.0, 0.5, 0.25, 0.1], seed=3)
    p1, c1, _, _ = project(aligned, base, a, b, "orthogonal", 0.9)
    p2, c2, _, _ = project(base + 10 * (aligned - base), base, a, b, "orthogonal", 0.9)
    torch.testing.assert_close(p1, p2, rtol=1e-4, atol=1e-5)
    assert c1 == pytest.approx(c2, abs=1e-6)
    q1, _, _, _ = project(aligned, base, a, b, "paper")
    q2, _, _, _ = project(base + 10 * (aligned - base), base, a, b, "paper")
    assert q2.norm() / q1.norm() == pytest.approx(10.0, rel=1e-3)


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    root = tmp_path_factory.mktemp("ex") / "ex"
    make_example(root, **SMALL, progress=False)
    return root


def test_project_adapter_orthogonal(example, tmp_path):
    out = tmp_path / "out"
    rep = project_adapter(example / "base", example / "aligned", example / "adapter", out, select="threshold",
                          threshold=1.0, projector="orthogonal", energy=0.9, progress=False)
    assert rep["settings"]["projector"] == "orthogonal" and rep["settings"]["energy"] == 0.9
    assert json.loads((out / "safelora_report.json").read_text())["settings"]["projector"] == "orthogonal"
    ad, got = load_file(example / "adapter" / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
    base, aligned = Checkpoint(example / "base"), Checkpoint(example / "aligned")
    for m in rep["modules"]:
        key_a = f"base_model.model.{m['name']}.lora_A.weight"
        key_b = key_a.replace("lora_A", "lora_B")
        want, want_cos, want_k = oracle(aligned.get(m["name"] + ".weight"), base.get(m["name"] + ".weight"),
                                        ad[key_b], ad[key_a], 0.9)
        assert m["projected"] and m["rank_kept"] == want_k
        assert abs(m["cosine"] - want_cos) <= 1e-6
        torch.testing.assert_close(got[key_b].double(), want.to(got[key_b].dtype).double(), rtol=1e-3, atol=1e-6)
    paper = project_adapter(example / "base", example / "aligned", example / "adapter", tmp_path / "paper",
                            progress=False)
    assert paper["settings"]["projector"] == "paper" and paper["modules"][0]["rank_kept"] is None


def test_cli_projector_and_bad_energy(example, tmp_path, capsys):
    args = ["project", "--base", str(example / "base"), "--aligned", str(example / "aligned"),
            "--adapter", str(example / "adapter"), "--quiet"]
    assert cli_main(args + ["--out", str(tmp_path / "o"), "--projector", "orthogonal", "--energy", "0.8"]) == 0
    assert "projector: orthogonal" in capsys.readouterr().out
    for bad in ("0", "1.5", "nan"):
        assert cli_main(args + ["--out", str(tmp_path / f"b{bad}"), "--projector", "orthogonal", "--energy", bad]) == 2
        err = capsys.readouterr().err
        assert "--energy must be a number in (0, 1]" in err and "Traceback" not in err
        assert not (tmp_path / f"b{bad}").exists()


def reference_rule(cosines, mode, k=10, tau=0.5):
    """The reference code: numpy.round(cos, 5), then `cos <= thrs` with thrs = tau or numpy.sort(cos)[:k][-1]."""
    cos = [numpy.round(c, 5) for c in cosines]
    thrs = tau if mode == "threshold" else numpy.sort(cos)[:k][-1]
    return [bool(c <= thrs) for c in cos]


@pytest.mark.parametrize("mode,k", [("threshold", 10), ("number", 1), ("number", 2)])
def test_cosine_decimals_matches_reference_rule(mode, k):
    # near-ties and values within 5e-6 of the threshold select differently once rounded
    cosines = [0.500004, 0.4999951, 0.3000012, 0.3000049, 0.3000044, 0.7, 0.500005]
    mask, _ = select_modules(cosines, mode, k, 0.5, cosine_decimals=5)
    assert mask == reference_rule(cosines, mode, k)
    exact, _ = select_modules(cosines, mode, k, 0.5)
    assert exact != mask  # without rounding the selection differs on these inputs


def test_cosine_decimals_validated():
    for bad in (-1, 16, 2.5, True):
        with pytest.raises(SafeshapeError, match="--cosine-decimals"):
            select_modules([0.1], "threshold", 10, 0.5, cosine_decimals=bad)


def test_apply_safe_lora_orthogonal_matches_folder(tmp_path):
    model = make_peft_setup(tmp_path, layers=1, vocab=64, v_rank=3)
    kw = dict(select="threshold", threshold=1.0, projector="orthogonal", energy=0.9, progress=False)
    rep_folder = project_adapter(tmp_path / "base", tmp_path / "aligned", tmp_path / "adapter", tmp_path / "out", **kw)
    rep_mem = apply_safe_lora(model, tmp_path / "base", tmp_path / "aligned", **kw)
    assert rep_mem["settings"]["projector"] == "orthogonal"
    for m_mem, m_dir in zip(rep_mem["modules"], rep_folder["modules"]):
        assert m_mem["name"] == m_dir["name"] and m_mem["rank_kept"] == m_dir["rank_kept"] <= 3
        assert m_mem["cosine"] == pytest.approx(m_dir["cosine"], abs=1e-9)


# ---- the randomised range finder (the default --svd) against the exact SVD -------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,energy,decay", [((384, 256), 0.95, 0.9), ((256, 400), 0.8, 0.97), ((300, 300), 0.99, 0.8),
                                                ((120, 80), 0.9, 0.95)])
def test_randomized_range_finder_matches_the_exact_svd(shape, energy, decay, device, monkeypatch):
    """Slowly decaying spectra (k from a few to tens of directions, so the sketch has to grow; the last one's k is a
    large share of the rank, where the exact SVD is taken): the same k as the exact SVD and the same projection,
    to float32 rounding. The exact-SVD cut-over is a cost rule; it is set to half the rank here so that these small
    modules take the randomised path."""
    import safeshape.safelora.projector as projector_module

    monkeypatch.setattr(projector_module, "EXACT_ABOVE", 2)
    sigmas = [decay ** i for i in range(min(shape))]
    aligned, base, b, a = spectrum_module(*shape, 6, sigmas, seed=shape[1])
    want, want_cos, want_k = oracle(aligned, base, b, a, energy)
    dev = [t.to(device) for t in (aligned, base, a, b)]
    got, cos, _, k = project(*dev, "orthogonal", energy, svd="randomized")
    exact, exact_cos, _, exact_k = project(*dev, "orthogonal", energy, svd="exact")
    assert k == exact_k == want_k
    assert ((got.cpu().double() - want).norm() / want.norm()).item() <= 1e-4
    assert ((exact.cpu().double() - want).norm() / want.norm()).item() <= 1e-4
    assert abs(cos - want_cos) <= 1e-5


def test_randomized_rank_grows_past_its_first_sketch(monkeypatch):
    import safeshape.safelora.projector as projector_module
    from safeshape.safelora.projector import OVERSAMPLE, randomized_energy_basis

    monkeypatch.setattr(projector_module, "EXACT_ABOVE", 2)  # a small module on the randomised path

    sigmas = [1.0] * 90 + [1e-3] * 310  # 90 equal directions: the first sketch (4 x OVERSAMPLE wide) is too narrow
    aligned, base, _, _ = spectrum_module(600, 400, 2, sigmas, seed=2)
    v = aligned - base
    uk, k = randomized_energy_basis(v, 0.95)
    assert k == 86 and uk.shape == (600, 86) and 4 * OVERSAMPLE < k  # ceil(0.95 * 90) of the flat top
    torch.testing.assert_close(uk.T @ uk, torch.eye(k), atol=1e-4, rtol=0)
    u, _, _ = torch.linalg.svd(v.double(), full_matrices=False)
    top = u[:, :90].float()  # U_k lies in the span of the 90 equal directions
    assert (uk - top @ (top.T @ uk)).norm() <= 1e-3
    z = torch.zeros(5, 7)
    assert randomized_energy_basis(z, 0.9)[1] == 0


def test_svd_setting_is_checked_and_reported(tmp_path):
    make_peft_setup(tmp_path, layers=1, vocab=64, v_rank=3)
    with pytest.raises(SafeshapeError, match="--svd must be one of"):
        project_adapter(tmp_path / "base", tmp_path / "aligned", tmp_path / "adapter", tmp_path / "o",
                        projector="orthogonal", svd="lanczos")
    rep = project_adapter(tmp_path / "base", tmp_path / "aligned", tmp_path / "adapter", tmp_path / "o",
                          projector="orthogonal", energy=0.9, progress=False)
    exact = project_adapter(tmp_path / "base", tmp_path / "aligned", tmp_path / "adapter", tmp_path / "e",
                            projector="orthogonal", energy=0.9, progress=False, svd="exact")
    assert rep["settings"]["svd"] == "randomized" and exact["settings"]["svd"] == "exact"
    assert [m["rank_kept"] for m in rep["modules"]] == [m["rank_kept"] for m in exact["modules"]]
    assert [m["cosine"] for m in rep["modules"]] == pytest.approx([m["cosine"] for m in exact["modules"]], abs=1e-5)


def test_wide_sketches_give_way_to_the_exact_svd(monkeypatch):
    """When k is a large share of the rank the exact SVD is taken (same k, same U_k up to sign)."""
    import safeshape.safelora.projector as projector_module

    calls = []
    svd = torch.linalg.svd
    monkeypatch.setattr(projector_module.torch.linalg, "svd", lambda x, **kw: calls.append(tuple(x.shape)) or svd(x, **kw))
    aligned, base, _, _ = spectrum_module(400, 300, 2, [0.99 ** i for i in range(300)], seed=4)
    uk, k = projector_module.randomized_energy_basis(aligned - base, 0.95)
    assert (400, 300) in calls and k > 300 // projector_module.EXACT_ABOVE
    calls.clear()
    aligned, base, _, _ = spectrum_module(400, 300, 2, [0.5 ** i for i in range(300)], seed=4)
    uk, k = projector_module.randomized_energy_basis(aligned - base, 0.95)
    assert (400, 300) not in calls and k < 10  # a few directions: the sketch, never the full SVD
