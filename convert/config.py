"""Carry a transformers config over to what mlx-lm's ModelArgs read.

transformers 5 nests RoPE settings under ``rope_parameters`` (per attention type for Gemma 3);
mlx-lm reads ``rope_theta`` / ``rope_scaling`` / ``rope_local_base_freq`` and silently falls back
to defaults when they are missing, giving a model that talks but is wrong. Map them here.
"""

import copy


def _rope_scaling(params: dict):
    kind = params.get("rope_type", params.get("type", "default"))
    if kind in (None, "default"):
        return None
    return {k: v for k, v in params.items() if k != "rope_theta"}


def fix_config(config: dict) -> dict:
    cfg = copy.deepcopy(config)
    for key in ("quantization_config", "quantization", "ifp", "transformers_version"):
        cfg.pop(key, None)
    rope = cfg.pop("rope_parameters", None)
    if isinstance(rope, dict):
        if isinstance(rope.get("full_attention"), dict):  # per attention type (gemma3)
            full, local = rope["full_attention"], rope.get("sliding_attention") or {}
            if "rope_theta" in full:
                cfg["rope_theta"] = full["rope_theta"]
            if (scaling := _rope_scaling(full)) is not None:
                cfg["rope_scaling"] = scaling
            if "rope_theta" in local:
                cfg["rope_local_base_freq"] = local["rope_theta"]
        else:
            if "rope_theta" in rope:
                cfg["rope_theta"] = rope["rope_theta"]
            if (scaling := _rope_scaling(rope)) is not None:
                cfg["rope_scaling"] = scaling
    layer_types = cfg.get("layer_types")
    if "sliding_window_pattern" not in cfg and isinstance(layer_types, list):
        if "full_attention" in layer_types and "sliding_attention" in layer_types:
            cfg["sliding_window_pattern"] = layer_types.index("full_attention") + 1
    if cfg.get("model_type") == "gemma3_text" and cfg.get("sliding_window") is None:
        cfg.pop("sliding_window", None)
    return cfg
