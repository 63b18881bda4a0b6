"""Tiny random Hugging Face models for fast tests, written as ordinary HF folders."""

import json
from pathlib import Path

import numpy as np

VOCAB = 96


def tiny_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"w{i}": i for i in range(3, VOCAB)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    # A word-level stand-in for a chat template: w3 = a user/system turn starts, w5 = an
    # answer starts, w4 = a turn ends. Like real templates, a conversation's prompt begins
    # with the previous prompt plus its answer (so a chat's KV cache can be reused).
    fast.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'assistant' %}w5 {% else %}w3 {% endif %}"
        "{{ m['content'] }} w4 {% endfor %}{% if add_generation_prompt %}w5 {% endif %}"
    )
    fast.save_pretrained(str(folder))


def tiny_config(family: str):
    from transformers import Gemma3TextConfig, LlamaConfig, Qwen2Config

    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
    )
    if family == "llama":
        return LlamaConfig(
            num_hidden_layers=2, rope_theta=50000.0, tie_word_embeddings=False, **common
        )
    if family == "qwen2":
        return Qwen2Config(
            num_hidden_layers=2, rope_theta=20000.0, tie_word_embeddings=True, **common
        )
    if family == "gemma3_text":
        return Gemma3TextConfig(
            num_hidden_layers=6, head_dim=16, sliding_window=8, query_pre_attn_scalar=16, **common
        )
    raise ValueError(family)


def make_tiny_hf(family: str, folder: Path, seed: int = 0, safe: bool = True, **config) -> Path:
    """A random tiny model of ``family`` saved with save_pretrained (safetensors or .bin);
    ``config`` overrides entries of ``tiny_config``."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_config(family)
    for key, value in config.items():
        setattr(cfg, key, value)
    model = AutoModelForCausalLM.from_config(cfg).float().eval()
    with torch.no_grad():  # non-trivial norms and biases so mapping mistakes show
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(str(folder))
    if not safe:  # transformers 5 writes safetensors only; a .bin is a plain torch.save
        sd = {k: v for k, v in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            sd.pop("lm_head.weight", None)
        torch.save(sd, Path(folder) / "pytorch_model.bin")
        (Path(folder) / "model.safetensors").unlink()
    tiny_tokenizer(folder)
    return folder


def torch_logits(folder: Path, tokens) -> np.ndarray:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].numpy()


def torch_unit_activations(folder, tokens) -> list:
    """Per layer, the (tokens × units) input of transformers' down_proj: act(gate(x)) * up(x),
    from the float source model (independent of this project's model code)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    acts = []
    hooks = [
        layer.mlp.down_proj.register_forward_pre_hook(lambda m, a: acts.append(a[0][0].numpy()))
        for layer in model.model.layers
    ]
    with torch.no_grad():
        model(torch.tensor([tokens]))
    for h in hooks:
        h.remove()
    return acts


def griffin_scores(acts: np.ndarray) -> np.ndarray:
    """GRIFFIN (arXiv 2404.01365): ℓ2 norm over tokens of each token's normalized activations."""
    z = acts / np.linalg.norm(acts, axis=1, keepdims=True)
    return np.sqrt((z**2).sum(0))


def mlx_logits(model, tokens) -> np.ndarray:
    import mlx.core as mx

    return np.array(model(mx.array(tokens)[None])[0].astype(mx.float32))


def read_config(folder: Path) -> dict:
    return json.loads((Path(folder) / "config.json").read_text())


def torch_greedy(model, ids, n: int):
    """n greedy tokens from a transformers model, never stopping at EOS (like generate_step)."""
    import torch

    out, past, x = [], None, torch.tensor([ids])
    with torch.no_grad():
        for _ in range(n):
            res = model(x, past_key_values=past, use_cache=True)
            past = res.past_key_values
            nxt = int(res.logits[0, -1].argmax())
            out.append(nxt)
            x = torch.tensor([[nxt]])
    return out


def mlx_greedy(model, ids, n: int):
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    steps = generate_step(mx.array(ids), model)
    return [int(t) for (t, _), _ in zip(steps, range(n))]


def cli_error(main, argv, capsys, prog: str) -> str:
    """Run a CLI ``main`` that must fail on user input: exit ≠ 0, one ``prog: error:`` line,
    no traceback. Returns the line."""
    import pytest

    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code != 0 and err.startswith(f"{prog}: error:") and "\n" not in err, err
    return err


def make_tiny_nas(folder: Path, seed: int = 0) -> Path:
    """A random tiny nemotron-nas model (an mlx-lm family whose FFN layers differ in size:
    256 and 512 units), saved as a Hugging Face folder (config + safetensors + tokenizer)."""
    import json

    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.utils import _get_classes

    folder.mkdir(parents=True, exist_ok=True)
    blocks = [{"attention": {"n_heads_in_group": 2}, "ffn": {"ffn_mult": m}} for m in (1.0, 7.0)]
    config = dict(model_type="nemotron-nas", architectures=["DeciLMForCausalLM"], hidden_size=64,
                  num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB,
                  block_configs=blocks, rms_norm_eps=1e-5, rope_theta=10000.0,
                  max_position_embeddings=256, tie_word_embeddings=False, bos_token_id=1,
                  eos_token_id=2, mlp_bias=True)  # fmt: skip
    model_class, args_class = _get_classes(config)
    mx.random.seed(seed)
    model = model_class(args_class.from_dict(config))
    weights = {k: v + 0.1 * mx.random.normal(v.shape) if "norm" in k else v
               for k, v in tree_flatten(model.parameters())}  # fmt: skip
    mx.save_safetensors(str(folder / "model.safetensors"), weights)
    (folder / "config.json").write_text(json.dumps(config))
    tiny_tokenizer(folder)
    return folder


def masked_logits(model, indices, tokens) -> np.ndarray:
    """Logits of the *dense* model with every FFN unit not in ``indices[l]`` switched off
    (activation × 0): what a model sliced to those units must compute. Leaves it dense."""
    import mlx.core as mx

    from ifp_mlx.model import tap_ffns

    model.dense()
    masks = []
    for idx, n in zip(indices, model.ffn_units):
        m = np.zeros(n, np.float32)
        m[np.asarray(idx)] = 1
        masks.append(mx.array(m))
    with tap_ffns(model, record=False, masks=masks):
        return mlx_logits(model, tokens)
