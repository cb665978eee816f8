"""What differs between causal-LM families, in one place: a random base of a given shape, the
layers LoRA adapts by default, where the new chat tokens' rows live, and whether a model can take
the 4D attention masks that shared prefixes need (and with which sliding windows).

Everything else in squadtune goes through transformers' and PEFT's own interfaces
(`AutoModelForCausalLM`, `get_input_embeddings`, `position_ids`, `Cache`), so a family works when
these few facts are right for it. The tests prove them per family on tiny random bases.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported where it is used: the CLI's config checks stay light
    import torch

# Families `model.random_init.architecture` builds, and for which shared-prefix generation and
# shared-context training are proven (tests/test_families.py); each maps to its config class.
CONFIG_CLASSES = {
    "gpt2": "GPT2Config",
    "llama": "LlamaConfig",
    "qwen2": "Qwen2Config",
    "qwen3": "Qwen3Config",
    "mistral": "MistralConfig",
    "phi3": "Phi3Config",
    "opt": "OPTConfig",
    "gpt_neox": "GPTNeoXConfig",
    "gemma": "GemmaConfig",
    "gemma2": "Gemma2Config",
}
ARCHITECTURES = tuple(CONFIG_CLASSES)
DISPLAY_NAMES = {"gpt2": "GPT-2", "llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3",
                 "mistral": "Mistral", "phi3": "Phi-3", "opt": "OPT", "gpt_neox": "GPT-NeoX",
                 "gemma": "Gemma", "gemma2": "Gemma 2", "gemma3_text": "Gemma 3",
                 "qwen3_moe": "Qwen3-MoE", "mixtral": "Mixtral", "phi": "Phi"}
SHARED_PREFIX_FAMILIES = frozenset(ARCHITECTURES)
GATED_MLP = frozenset({"llama", "qwen2", "qwen3", "mistral", "phi3", "gemma", "gemma2"})
GROUPED_QUERY = GATED_MLP  # the families whose configs take num_key_value_heads
SLIDING_WINDOW = frozenset({"qwen2", "qwen3", "mistral", "phi3", "gemma2"})
# (final norm, the blocks, each block's first norm), as attribute paths of the causal LM.
NORMS = {
    "gpt2": ("transformer.ln_f", "transformer.h", "ln_1"),
    "opt": ("model.decoder.final_layer_norm", "model.decoder.layers", "self_attn_layer_norm"),
    "gpt_neox": ("gpt_neox.final_layer_norm", "gpt_neox.layers", "input_layernorm"),
}
DECODER_NORMS = ("model.norm", "model.layers", "input_layernorm")  # every other family here
# LoRA's default targets where PEFT's per-architecture table has none or this project differs:
# GPT-2's are the recipe's attention projections (PEFT's `c_attn` alone leaves out the output
# projection; a bare `c_proj` would also hit the MLP's); Phi-3 fuses q, k and v in `qkv_proj`.
DEFAULT_TARGETS = {"gpt2": ["attn.c_attn", "attn.c_proj"], "phi3": ["qkv_proj"]}
ALL_LINEAR = "all-linear"


def display_name(model_type: str) -> str:
    """How people write the family's name: `llama` -> Llama, `gpt_neox` -> GPT-NeoX."""
    return DISPLAY_NAMES.get(model_type, model_type)


def gated_mlp_width(n_embd: int) -> int:
    """8/3 of the width, rounded up to 64: a gated MLP's three matrices then hold about as many
    parameters as GPT-2's two of 4x the width (Llama's own rule). A multiple of 64 as real
    models' widths are: bitsandbytes' 4-bit CPU kernels need in_features divisible by 64."""
    return 64 * math.ceil(8 * n_embd / 3 / 64)


def random_config(architecture: str, shape: dict[str, Any], vocab_size: int):
    """The family's config with this shape; `shape` holds `model.random_init`'s GPT-2-named
    fields (n_layer, n_head, n_embd, n_positions, n_kv_head, n_inner, sliding_window,
    tie_word_embeddings)."""
    import transformers

    n_embd, n_head = shape["n_embd"], shape["n_head"]
    n_inner = shape.get("n_inner") or (
        gated_mlp_width(n_embd) if architecture in GATED_MLP else 4 * n_embd
    )
    if architecture == "gpt2":
        kwargs = {"n_layer": shape["n_layer"], "n_head": n_head, "n_embd": n_embd,
                  "n_positions": shape["n_positions"], "n_inner": shape.get("n_inner")}
    else:
        kwargs = {"num_hidden_layers": shape["n_layer"], "num_attention_heads": n_head,
                  "hidden_size": n_embd, "max_position_embeddings": shape["n_positions"],
                  # No padding_idx row: padding is masked out, and a frozen zero row would be
                  # the one embedding a random base does not have.
                  "pad_token_id": None}
        kwargs["ffn_dim" if architecture == "opt" else "intermediate_size"] = n_inner
    if architecture in GROUPED_QUERY:
        kwargs["num_key_value_heads"] = shape.get("n_kv_head") or n_head
        kwargs["head_dim"] = n_embd // n_head  # qwen3 and gemma default to a fixed 128/256
    if architecture == "opt":
        kwargs["word_embed_proj_dim"] = n_embd
    if architecture == "gemma2":
        kwargs["query_pre_attn_scalar"] = n_embd // n_head
    window = shape.get("sliding_window")
    if architecture in ("qwen2", "qwen3"):
        # Qwen's sliding layers are those from `max_window_layers` on: the upper half here.
        kwargs.update(use_sliding_window=window is not None, sliding_window=window,
                      max_window_layers=shape["n_layer"] // 2)
    elif architecture in SLIDING_WINDOW and (window is not None or architecture != "gemma2"):
        # Mistral's config slides 4096 tokens unless told None; Gemma2's layers alternate
        # between full and sliding attention by design (4096 unless given).
        kwargs["sliding_window"] = window
    if shape.get("tie_word_embeddings") is not None:
        kwargs["tie_word_embeddings"] = shape["tie_word_embeddings"]
    config_class = getattr(transformers, CONFIG_CLASSES[architecture])
    return config_class(vocab_size=vocab_size, **kwargs)


def _module(root: torch.nn.Module, path: str) -> torch.nn.Module:
    for name in path.split("."):
        root = getattr(root, name)
    return root


def _set_gain(norm: torch.nn.Module, gain: float) -> None:
    # Gemma's RMSNorm multiplies by (1 + weight): its weight holds the gain minus one.
    offset = 1.0 if type(norm).__name__.startswith("Gemma") else 0.0
    norm.weight.fill_(gain - offset)


def realistic_scales(model, logit_cap: float, attention_logit_std: float) -> None:
    """Set the final norm's gain so the largest reachable logit is `logit_cap`, and each block's
    first norm gain (or, where q and k are normalised per head, their norms' gains) so attention
    scores start with std `attention_logit_std`. Only norm gains change, none of the weights
    LoRA or the new-token rows train (`tasks.base_model` says why random bases need it)."""
    import torch

    with torch.no_grad():
        _scale_norms(model, logit_cap, attention_logit_std)


def _scale_norms(model, logit_cap: float, attention_logit_std: float) -> None:
    config = model.config
    std = getattr(config, "initializer_range", None) or getattr(config, "init_std", 0.02)
    width = config.hidden_size
    final, blocks, first = NORMS.get(config.model_type, DECODER_NORMS)
    # A logit is a final hidden state (norm sqrt(width) x gain) dotted with an output row of
    # norm std x sqrt(width): its cap is std x width x gain.
    _set_gain(_module(model, final), logit_cap / (std * width))
    weight_var = std**2 * width
    for block in _module(model, blocks):
        attention = getattr(block, "self_attn", None)
        if attention is not None and hasattr(attention, "q_norm"):
            # q and k are RMS-normalised per head after their projections, so a score has std
            # about gain_q x gain_k whatever the input norm's gain.
            _set_gain(attention.q_norm, math.sqrt(attention_logit_std))
            _set_gain(attention.k_norm, math.sqrt(attention_logit_std))
        else:
            _set_gain(getattr(block, first), math.sqrt(attention_logit_std / weight_var))


def build_random(architecture: str, shape: dict[str, Any], vocab_size: int, seed: int,
                 logit_cap: float, attention_logit_std: float):
    """A causal LM of the family and shape with random weights at realistic scales."""
    import torch
    from transformers import AutoModelForCausalLM

    config = random_config(architecture, shape, vocab_size)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    realistic_scales(model, logit_cap, attention_logit_std)
    return model


# --- LoRA -----------------------------------------------------------------------------------


def default_targets(model_type: str) -> list[str]:
    """The family's attention projections: PEFT's per-architecture defaults, or ours."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT

    targets = DEFAULT_TARGETS.get(model_type) or PEFT.get(model_type)
    if not isinstance(targets, list):
        raise ValueError(
            f"no default LoRA targets for a {model_type!r} model; set lora.target_modules to "
            "its attention projections' names, or to all-linear"
        )
    return list(targets)


def layer_type(module: torch.nn.Module) -> str:
    """The class a layer had before bitsandbytes replaced it (`Conv1D` for GPT-2)."""
    return getattr(module, "source_cls", type(module)).__name__


def linear_layers(model) -> dict[str, torch.nn.Module]:
    """What `all-linear` adapts, as PEFT decides it: every Linear or Conv1D but the output head."""
    import torch
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings()
    return {name: module for name, module in model.named_modules()
            if isinstance(module, (torch.nn.Linear, Conv1D)) and module is not head}


def matched_layers(model, targets: list[str] | str | None) -> dict[str, list[str]]:
    """Module names each target matches (PEFT's suffix rule); `all-linear` as one entry, None
    as the family's default targets."""
    if targets is None:
        targets = default_targets(model.config.model_type)
    if targets == ALL_LINEAR:
        return {ALL_LINEAR: sorted(linear_layers(model))}
    names = [name for name, _ in model.named_modules()]
    return {p: [n for n in names if n == p or n.endswith("." + p)] for p in targets}


def fan_in_fan_out(model, matches: dict[str, list[str]]) -> bool:
    """True when the adapted layers are Conv1D (weights stored in x out, GPT-2), False for
    Linear; a target list that mixes both cannot be one LoraConfig."""
    modules = dict(model.named_modules())
    kinds = {layer_type(modules[n]) == "Conv1D" for names in matches.values() for n in names}
    if len(kinds) > 1:
        raise ValueError(
            "lora.target_modules match both Conv1D and Linear layers, which one LoRA config "
            "cannot adapt; list only one kind"
        )
    return kinds == {True}


def new_token_layers(model, token_ids: list[int]) -> list[int] | dict[str, list[int]]:
    """PEFT `trainable_token_indices` for the new chat tokens: a list where the output head is
    tied to the input embedding (PEFT keeps the tie and trains one set of rows), otherwise
    both layers by name, so the tokens' output rows train and are saved too."""
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is None or head.weight is embedding.weight:
        return list(token_ids)
    names = {id(m): n for n, m in model.named_modules()}
    return {names[id(embedding)]: list(token_ids), names[id(head)]: list(token_ids)}


# --- shared prefixes --------------------------------------------------------------------------


def shared_prefix_problem(config) -> str | None:
    """Why a model of this config cannot run shared-prefix generation or shared-context
    training (one 4D attention mask and per-token position_ids per forward), or None."""
    kind = config.model_type
    if kind not in SHARED_PREFIX_FAMILIES:
        return (f"shared prefixes are proven for {', '.join(sorted(SHARED_PREFIX_FAMILIES))}, "
                f"not for {kind}")
    attention = getattr(config, "_attn_implementation", None) or "sdpa"
    if attention not in ("sdpa", "eager"):
        return f"{kind} with {attention} attention cannot take a 4D attention mask"
    return None


def layer_windows(config) -> dict[str | None, int | None]:
    """The sliding window of each layer type (None: full attention). One key, None, when every
    layer is alike: the model then takes one mask; otherwise a mask per layer type."""
    window = getattr(config, "sliding_window", None)
    types = set(getattr(config, "layer_types", None) or ())
    if len(types) <= 1:
        sliding = not types or types == {"sliding_attention"}
        return {None: window if sliding else None}
    return {kind: (window if kind == "sliding_attention" else None) for kind in types}


def attention_masks(allowed: torch.Tensor, query_positions: torch.Tensor,
                    key_positions: torch.Tensor, windows: dict[str | None, int | None],
                    dtype: torch.dtype):
    """Additive 4D masks (batch, 1, queries, keys) from what each query may see, narrowed to
    each layer type's sliding window counted in positions (keys at most `window - 1` positions
    back, as transformers' `sliding_window_overlay` counts them in an unpadded row). Additive,
    since eager attention adds the mask to the scores; SDPA takes it too."""
    import torch

    masks = {}
    for kind, window in windows.items():
        keep = allowed
        if window is not None:
            keep = keep & (query_positions[:, :, None] - key_positions[:, None, :] < window)
        mask = torch.zeros(keep.shape, dtype=dtype, device=keep.device)
        masks[kind] = mask.masked_fill_(~keep, torch.finfo(dtype).min)[:, None]
    return masks.get(None, masks)
