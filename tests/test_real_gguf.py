"""Real GGUFs (SmolLM2, Qwen2.5, Gemma 3): tokenizers exactly as transformers' own GGUF reader
builds them, and Gemma 3 end to end against transformers at fp32."""

import numpy as np
import pytest

import ifp_mlx
from tests.helpers import masked_logits, mlx_logits

AWKWARD = [
    "The capital of France is",
    "Hello world",
    " leading space",
    "  double  spaces  ",
    "new\nline\n\nand\ttab\r\n",
    "accents: café, naïve, Ångström, ñ",
    "CJK: 你好，世界。日本語のテキスト、한국어",
    "emoji: 🙂🚀👍🏽 👨‍👩‍👧",
    "code: def f(x):\n    return x**2  # comment\n\tpass",
    "<|im_start|>user\nhi<|im_end|> <start_of_turn>model",
    "<s> </s> <unk> <pad> <bos> <eos>",
    "trailing space ",
    "1234567890 3.14159 -42 1e-9",
    "x" * 300,
]


def _reference(gguf):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


def _ours(gguf):
    from ifp_mlx.convert.gguf_reader import _gguf_tokenizer, gguf_reader

    meta = {n: f.contents() for n, f in gguf_reader(gguf).fields.items()}
    return _gguf_tokenizer(meta, meta["general.architecture"])


@pytest.mark.real  # its real fixtures arrive through getfixturevalue, unseen by the hook
@pytest.mark.parametrize("which", ["smol_gguf", "qwen_gguf", "gemma_gguf"])
def test_gguf_tokenizer_matches_transformers(which, request):
    """add_space_prefix, BOS/EOS, pre-tokenizer, merges, special tokens, chat template. Gemma's
    is read back from its converted folder (what a user runs; reading its 262k-token GGUF
    vocabulary again would cost ~35 s)."""
    gguf = request.getfixturevalue(which)
    if which == "gemma_gguf":
        from transformers import AutoTokenizer

        ours = AutoTokenizer.from_pretrained(str(request.getfixturevalue("gemma_f32")))
    else:
        ours = _ours(gguf)
    ref = _reference(gguf)
    for text in AWKWARD:
        assert ours.encode(text) == ref.encode(text), text
        assert ours.decode(ours.encode(text)) == ref.decode(ref.encode(text)), text
    assert ours.chat_template == ref.chat_template


@pytest.fixture(scope="module")
def gemma_f32(gemma_gguf, tmp_path_factory):
    from tests.conftest import _cache_root

    out = _cache_root(tmp_path_factory) / "gemma-3-270m-f32"
    if not (out / "config.json").is_file():
        from ifp_mlx.convert import convert

        convert(gemma_gguf, out, force=True, progress=False)
    return out


def test_gemma3_matches_transformers_and_prunes(gemma_gguf, gemma_f32):
    """fp32 logits within 1e-3 of transformers' (relative to the logit scale; measured 3e-6,
    0.2 % off before the embedding scale was computed in fp32); keep 0.5 runs."""
    import torch
    from transformers import AutoModelForCausalLM

    model, tok = ifp_mlx.load(gemma_f32)
    ids = tok.encode("The capital of France is Paris, and the capital of Italy is")
    ref_model = AutoModelForCausalLM.from_pretrained(
        str(gemma_gguf.parent), gguf_file=gemma_gguf.name, dtype=torch.float32
    ).eval()
    with torch.no_grad():
        ref = ref_model(torch.tensor([ids])).logits[0].numpy()
    got = mlx_logits(model, ids)
    assert np.abs(ref - got).max() <= 1e-3 * np.abs(ref).max()
    assert (ref.argmax(-1) == got.argmax(-1)).all()
    text = ifp_mlx.generate(model, tok, ids, keep=0.5, max_tokens=6)
    sel = model.selection
    assert sel.keep == pytest.approx(0.5, abs=0.01) and text.strip()
    pruned = mlx_logits(model, ids)  # the sliced model = the dense one with those units off
    reference = masked_logits(model, sel.indices, ids)
    assert np.abs(pruned - reference).max() <= 1e-3 * np.abs(reference).max()
    assert np.abs(pruned - got).max() > 1e-2 * np.abs(got).max()  # and not the dense model
