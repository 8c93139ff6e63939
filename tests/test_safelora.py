"""Safe LoRA over folders and PeftModels: streaming reader, adapter validation, selection
(docs/math.md#safe-lora-selection), atomic outputs."""
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from safeshape import reference
from safeshape.errors import CheckpointError, SafeshapeError
from safeshape.safelora import Adapter, Checkpoint, apply_safe_lora, project_adapter, select_modules
from safeshape.safelora.example import make_example
from safeshape.cli import main as cli_main
from tests.safelora_common import make_peft_setup

SMALL = dict(hidden=64, intermediate=96, layers=2, heads=4, kv_heads=2, vocab=128, r=4)


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    root = tmp_path_factory.mktemp("ex") / "ex"
    make_example(root, **SMALL, shard_bytes=40_000, progress=False)  # several shards + index
    return root


def tree_hash(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def copy_example(example, tmp_path):
    dst = tmp_path / "ex"
    shutil.copytree(example, dst)
    return dst


def brute_force(ex: Path, mode="number", k=10, tau=0.5):
    """docs/math.md#safe-lora the reference way: whole tensors, explicit C, direct fp64 cosine."""
    ad = load_file(ex / "adapter" / "adapter_model.safetensors")
    base, aligned = Checkpoint(ex / "base"), Checkpoint(ex / "aligned")
    out = {}
    for key in sorted(ad):
        if ".lora_A." not in key:
            continue
        name = key[len("base_model.model."):].replace(".lora_A.weight", "")
        kb = key.replace("lora_A", "lora_B")
        c = reference.alignment_projection_matrix(aligned.get(name + ".weight"), base.get(name + ".weight"),
                                                  compute_dtype=torch.float64)
        b = ad[kb].double()
        p = c @ b
        dw, cdw = b @ ad[key].double(), p @ ad[key].double()
        cos = ((dw * cdw).sum() / (dw.norm() * cdw.norm())).item()
        out[name] = (kb, p, cos)
    names = list(out)
    cosines = [out[n][2] for n in names]
    if mode == "number":
        cut = sorted(cosines)[min(k, len(cosines)) - 1]
    else:
        cut = tau
    return {n: (out[n][0], out[n][1], out[n][2], out[n][2] <= cut) for n in names}


# ---- selection ----

def test_select_number_ties_and_overflow():
    cos = [0.3, 0.1, 0.2, 0.2, 0.9]
    assert select_modules(cos, "number", 2)[0] == [False, True, True, True, False]  # tie at the cut: 3 projected
    assert select_modules(cos, "number", 1) == ([False, True, False, False, False], 0.1)
    assert all(select_modules(cos, "number", 99)[0])
    assert select_modules(cos, "threshold", threshold=0.2)[0] == [False, True, True, True, False]
    with pytest.raises(SafeshapeError, match="--num-layers"):
        select_modules(cos, "number", 0)
    with pytest.raises(SafeshapeError, match="mode"):
        select_modules(cos, "topk")


# ---- end to end ----

@pytest.mark.parametrize("mode", ["number", "threshold"])
def test_project_adapter_matches_brute_force(example, tmp_path, mode):
    before = tree_hash(example)
    out = tmp_path / "out"
    cosines = sorted(v[2] for v in brute_force(example).values())
    tau = (cosines[len(cosines) // 2] + cosines[len(cosines) // 2 + 1]) / 2  # a cut between two modules
    rep = project_adapter(example / "base", example / "aligned", example / "adapter", out, select=mode,
                          num_layers=5, threshold=tau, progress=False)
    assert tree_hash(example) == before  # inputs untouched
    want = brute_force(example, mode, k=5, tau=tau)
    got_mods = {m["name"]: m for m in rep["modules"]}
    assert set(got_mods) == set(want)
    orig = load_file(example / "adapter" / "adapter_model.safetensors")
    new = load_file(out / "adapter_model.safetensors")
    assert set(new) == set(orig)
    for name, (kb, p, cos, chosen) in want.items():
        assert abs(got_mods[name]["cosine"] - cos) <= 1e-6
        assert got_mods[name]["projected"] == chosen
        if chosen:
            rel = ((new[kb].double() - p).norm() / p.norm()).item()
            assert rel < 8e-3  # bf16 adapter: the result is rounded to bf16
            assert new[kb].dtype == orig[kb].dtype
    # every tensor not projected is byte-identical, and so is the config
    projected_keys = {want[n][0] for n in want if want[n][3]}
    assert projected_keys and len(projected_keys) < len(want)
    for k in orig:
        if k not in projected_keys:
            assert torch.equal(new[k].view(torch.uint8), orig[k].view(torch.uint8)), k
    assert (out / "adapter_config.json").read_bytes() == (example / "adapter" / "adapter_config.json").read_bytes()
    report = json.loads((out / "safelora_report.json").read_text())
    assert report["totals"]["num_projected"] == len(projected_keys)
    assert report["settings"]["select"] == mode
    assert {"name", "cosine", "projected", "v_norm"} <= set(report["modules"][0])


def test_output_refused_unless_overwrite_and_never_an_input(example, tmp_path):
    out = tmp_path / "out"
    args = (example / "base", example / "aligned", example / "adapter")
    project_adapter(*args, out, progress=False)
    first = tree_hash(out)
    with pytest.raises(SafeshapeError, match="already exists"):
        project_adapter(*args, out, progress=False)
    assert tree_hash(out) == first
    project_adapter(*args, out, progress=False, overwrite=True, select="threshold")
    assert json.loads((out / "safelora_report.json").read_text())["settings"]["select"] == "threshold"
    with pytest.raises(SafeshapeError, match="overlaps the input --adapter"):
        project_adapter(*args, example / "adapter", progress=False, overwrite=True)
    assert not list(tmp_path.glob(".out.tmp-*"))  # no temporary folder left behind


def test_cli(example, tmp_path, capsys):
    out = tmp_path / "cli_out"
    rc = cli_main(["project", "--base", str(example / "base"), "--aligned", str(example / "aligned"), "--adapter",
                   str(example / "adapter"), "--out", str(out), "--num-layers", "3", "--quiet",
                   "--report", str(tmp_path / "rep.json")])
    assert rc == 0
    text = capsys.readouterr().out
    assert "projected 3 of 14 modules" in text
    assert json.loads((tmp_path / "rep.json").read_text())["totals"]["num_projected"] == 3
    assert not (out / "safelora_report.json").exists()
    rc = cli_main(["project", "--base", str(example / "base"), "--aligned", str(example / "aligned"), "--adapter",
                   str(example / "adapter"), "--out", str(out), "--quiet"])
    assert rc == 2 and "already exists" in capsys.readouterr().err


# ---- bad inputs: each names the file and key ----

def _edit_adapter(ex, edit_tensors=None, edit_config=None):
    f = ex / "adapter" / "adapter_model.safetensors"
    t = load_file(f)
    if edit_tensors:
        edit_tensors(t)
    save_file(t, str(f))
    if edit_config:
        c = json.loads((ex / "adapter" / "adapter_config.json").read_text())
        edit_config(c)
        (ex / "adapter" / "adapter_config.json").write_text(json.dumps(c))


KEY_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
KEY_B = KEY_A.replace("lora_A", "lora_B")


@pytest.mark.parametrize("case,edit_t,edit_c,match", [
    ("dora-config", None, lambda c: c.update(use_dora=True), "use_dora"),
    ("dora-key", lambda t: t.update({KEY_A.replace("lora_A.weight", "lora_magnitude_vector"): torch.ones(64)}),
     None, "DoRA magnitude"),
    ("embedding", lambda t: t.update({"base_model.model.model.embed_tokens.lora_embedding_A": torch.ones(4, 128)}),
     None, "embedding LoRA"),
    ("conv", lambda t: t.update({KEY_A: torch.ones(4, 64, 1, 1), KEY_B: torch.ones(64, 4, 1, 1)}), None,
     "conv LoRA"),
    ("orphan-A", lambda t: t.pop(KEY_B), None, "has no matching lora_B"),
    ("rank-config", None, lambda c: c.update(rank_pattern={"q_proj": 16}), "rank 4 but .* gives r=16"),
    ("lora-bias", lambda t: t.update({KEY_B.replace("weight", "bias"): torch.ones(64)}), None, "bias"),
    ("not-lora", None, lambda c: c.update(peft_type="LOHA"), "peft_type"),
])
def test_adapter_errors(example, tmp_path, case, edit_t, edit_c, match):
    ex = copy_example(example, tmp_path)
    _edit_adapter(ex, edit_t, edit_c)
    with pytest.raises(CheckpointError, match=match) as err:
        project_adapter(ex / "base", ex / "aligned", ex / "adapter", tmp_path / "o", progress=False)
    assert "adapter" in str(err.value)  # names the file
    assert not (tmp_path / "o").exists()


def test_rank_and_alpha_patterns_and_regex_targets(example, tmp_path):
    ex = copy_example(example, tmp_path)

    def shrink(t):  # q_proj modules get rank 2
        for k in list(t):
            if "q_proj.lora_A" in k:
                t[k] = t[k][:2].clone()
            if "q_proj.lora_B" in k:
                t[k] = t[k][:, :2].clone()

    _edit_adapter(ex, shrink, lambda c: c.update(rank_pattern={"q_proj": 2}, alpha_pattern={"q_proj": 7},
                                                  target_modules=r".*\.(q|k|v|o|gate|up|down)_proj"))
    ad = Adapter(ex / "adapter")
    q = [m for m in ad.modules if m.name.endswith("q_proj")]
    assert q and all(m.r == 2 and m.alpha == 7 for m in q)
    assert not ad.warnings
    rep = project_adapter(ex / "base", ex / "aligned", ex / "adapter", tmp_path / "o", progress=False)
    assert {m["r"] for m in rep["modules"]} == {2, 4}


def test_fan_in_fan_out_and_bias(example, tmp_path):
    ex = copy_example(example, tmp_path)
    # store the checkpoints transposed (GPT-2 Conv1D layout) and add biases: same result as the original
    for role in ("base", "aligned"):
        ck = Checkpoint(ex / role)
        tensors = {k: ck.get(k) for k in ck.keys()}
        for p in (ex / role).glob("*.safetensors*"):
            p.unlink()
        for k in list(tensors):
            if "_proj.weight" in k:
                tensors[k] = tensors[k].T.contiguous()
                tensors[k.replace(".weight", ".bias")] = torch.ones(tensors[k].shape[1])
        save_file(tensors, str(ex / role / "model.safetensors"))
    _edit_adapter(ex, None, lambda c: c.update(fan_in_fan_out=True))
    got = project_adapter(ex / "base", ex / "aligned", ex / "adapter", tmp_path / "o", progress=False)
    want = project_adapter(example / "base", example / "aligned", example / "adapter", tmp_path / "o2",
                           progress=False)
    assert [m["cosine"] for m in got["modules"]] == pytest.approx([m["cosine"] for m in want["modules"]], abs=1e-9)


def test_checkpoint_errors(example, tmp_path):
    ex = copy_example(example, tmp_path)
    # aligned loses a key
    idx = json.loads((ex / "aligned" / "model.safetensors.index.json").read_text())
    key = "model.layers.1.mlp.up_proj.weight"
    del idx["weight_map"][key]
    (ex / "aligned" / "model.safetensors.index.json").write_text(json.dumps(idx))
    with pytest.raises(CheckpointError, match=f"aligned checkpoint .*key '{key}' not found"):
        project_adapter(ex / "base", ex / "aligned", ex / "adapter", tmp_path / "o", progress=False)
    # an index pointing at a shard that lacks the key
    idx["weight_map"][key] = idx["weight_map"]["model.embed_tokens.weight"]
    (ex / "aligned" / "model.safetensors.index.json").write_text(json.dumps(idx))
    with pytest.raises(CheckpointError, match="does not contain it"):
        Checkpoint(ex / "aligned")
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        Checkpoint(tmp_path)


def test_architecture_and_shape_mismatch(example, tmp_path):
    ex = copy_example(example, tmp_path)
    cfg = json.loads((ex / "aligned" / "config.json").read_text())
    cfg["num_hidden_layers"] = 3
    (ex / "aligned" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="different architectures: num_hidden_layers"):
        project_adapter(ex / "base", ex / "aligned", ex / "adapter", tmp_path / "o", progress=False)
    ex2 = copy_example(example, tmp_path / "b")
    _edit_adapter(ex2, lambda t: t.update({KEY_A: torch.ones(4, 32, dtype=torch.bfloat16)}))
    with pytest.raises(CheckpointError, match="expects \\[64, 32\\]"):
        project_adapter(ex2 / "base", ex2 / "aligned", ex2 / "adapter", tmp_path / "o", progress=False)


def test_several_adapters_refused(example, tmp_path):
    root = tmp_path / "multi"
    for n in ("a", "b"):
        shutil.copytree(example / "adapter", root / n)
    with pytest.raises(CheckpointError, match="several adapters below it \\(a, b\\)"):
        Adapter(root)


# ---- PeftModel in memory ----

def test_apply_safe_lora_on_peft_model(tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    model = make_peft_setup(tmp_path)
    rep_folder = project_adapter(tmp_path / "base", tmp_path / "aligned", tmp_path / "adapter", tmp_path / "out",
                                 num_layers=2, progress=False)
    rep_mem = apply_safe_lora(model, tmp_path / "base", tmp_path / "aligned", num_layers=2, progress=False)
    assert [m["name"] for m in rep_mem["modules"]] == [m["name"] for m in rep_folder["modules"]]
    assert [m["projected"] for m in rep_mem["modules"]] == [m["projected"] for m in rep_folder["modules"]]
    assert rep_mem["totals"]["num_projected"] == 2
    saved = load_file(tmp_path / "out" / "adapter_model.safetensors")
    sd = model.state_dict()
    for k, v in saved.items():
        mem_key = k.replace(".lora_B.weight", ".lora_B.default.weight").replace(".lora_A.weight",
                                                                                ".lora_A.default.weight")
        torch.testing.assert_close(sd[mem_key], v, rtol=1e-5, atol=1e-7)
    # and the projected folder loads back into PEFT
    reloaded = peft.PeftModel.from_pretrained(transformers.LlamaForCausalLM.from_pretrained(tmp_path / "aligned"),
                                              tmp_path / "out")
    back = reloaded.state_dict()
    lora_keys = [k for k in back if ".lora_A." in k or ".lora_B." in k]
    assert len(lora_keys) == len(saved) > 0
    for k, v in saved.items():  # every projected (and unprojected) LoRA tensor is what PEFT loads back
        mem_key = k.replace(".lora_B.weight", ".lora_B.default.weight").replace(".lora_A.weight",
                                                                                ".lora_A.default.weight")
        torch.testing.assert_close(back[mem_key], v, rtol=0, atol=0)
