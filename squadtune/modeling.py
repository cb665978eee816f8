"""Settings -> library objects, and loading models for training and inference.

Settings arrive as the libraries' own keyword arguments (the pipeline's config sections are named
so), and no pipeline config type is imported: the served MLflow model imports this module too.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@contextlib.contextmanager
def peft_wrapping():
    """Around PEFT wrapping a model: PEFT 0.21 reads transformers' deprecated
    `is_gradient_checkpointing` there (a FutureWarning on every run); this code uses the current
    names, so only that one read is silenced."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated",
                                category=FutureWarning)
        yield


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def bnb_config(quantization: Mapping[str, Any]):
    """`BitsAndBytesConfig(**quantization)`, or None when neither 4- nor 8-bit is asked.

    `quantization` holds `BitsAndBytesConfig`'s own arguments (dtypes by name); a pydantic
    section works as well as the dict a served model reads from its settings.
    """
    settings = dict(quantization)
    if not (settings.get("load_in_4bit") or settings.get("load_in_8bit")):
        return None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(**settings)


def lora_config(settings: Mapping[str, Any],
                new_token_ids: list[int] | dict[str, list[int]] | None = None):
    """`peft.LoraConfig(**settings)` for a causal LM; with `train_new_tokens` in `settings`, the
    new chat tokens' rows train too: a list targets the input embedding (PEFT keeps it tied to
    the LM head), a dict names each layer (`architectures.new_token_layers`: an untied head's
    rows too)."""
    from peft import LoraConfig

    kwargs = dict(settings)
    train_new = kwargs.pop("train_new_tokens", False)
    if isinstance(new_token_ids, dict):
        tokens = {name: list(ids) for name, ids in new_token_ids.items()} or None
    else:
        tokens = list(new_token_ids) if new_token_ids else None
    return LoraConfig(
        **kwargs,
        task_type="CAUSAL_LM",
        trainable_token_indices=tokens if train_new else None,
    )


def lora_settings(model: torch.nn.Module, settings: Mapping[str, Any]) -> dict[str, Any]:
    """`settings` (`LoraSettings.peft_kwargs()`) made concrete for `model`: null targets become
    the family's attention projections, and `fan_in_fan_out` follows the adapted layers' type.
    Fails on a target that matches nothing, instead of silently adapting fewer layers."""
    from squadtune.architectures import default_targets, fan_in_fan_out

    resolved = dict(settings)
    if resolved.get("target_modules") is None:
        resolved["target_modules"] = default_targets(model.config.model_type)
    matches = check_layers(model, resolved["target_modules"])
    resolved["fan_in_fan_out"] = fan_in_fan_out(model, matches)
    return resolved


def matched_modules(model: torch.nn.Module, patterns: list[str] | str) -> dict[str, list[str]]:
    """Module names each LoRA target pattern matches (PEFT's suffix rule; `all-linear` as one
    entry: every linear layer but the output head)."""
    from squadtune.architectures import matched_layers

    return matched_layers(model, patterns)


def check_layers(model: torch.nn.Module, target_modules: list[str] | str) -> dict[str, list[str]]:
    """The modules each target matches; a target that matches nothing is an error."""
    matches = matched_modules(model, target_modules)
    empty = [p for p, m in matches.items() if not m]
    if empty:
        leaves = sorted(
            {n.split(".", 3)[-1] for n, mod in model.named_modules() if isinstance(
                mod, torch.nn.Module) and not list(mod.children()) and n}
        )
        raise ValueError(
            f"lora.target_modules {empty} match no module of this model; module names end in "
            f"one of: {', '.join(leaves[:40])}"
        )
    return matches


def check_targets(model: torch.nn.Module, target_modules: list[str] | str) -> dict[str, int]:
    """How many modules each target matches; a target that matches nothing is an error."""
    return {p: len(m) for p, m in check_layers(model, target_modules).items()}


def disable_cpu_repacking(model: torch.nn.Module) -> int:
    """Work around bitsandbytes 0.50 on CPU: an eval-mode forward repacks `Linear4bit` weights
    for inference and the next training forward then fails; turning the repacking off avoids it."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return 0
    count = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
            count += 1
    return count


def base_config(base: dict[str, Any]):
    """The base model's transformers config (no weights), as `load_base_model` would read it."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(
        base["source"], revision=base.get("revision"), trust_remote_code=False
    )


def load_base_model(
    base: dict[str, Any],
    quantization: Mapping[str, Any],
    torch_dtype: str = "float32",
    device: str | None = None,
):
    """The base causal LM described by a base-model stage manifest, resized to the tokenizer.

    Only safetensors are loaded and no remote code runs.
    """
    from transformers import AutoModelForCausalLM

    device = device or default_device()
    quant = bnb_config(quantization)
    kwargs: dict[str, Any] = {
        "revision": base.get("revision"),
        "dtype": DTYPES[torch_dtype],
        "trust_remote_code": False,
        "use_safetensors": True,
    }
    if quant is not None:
        kwargs["quantization_config"] = quant
        kwargs["device_map"] = {"": 0 if device == "cuda" else device}
    model = AutoModelForCausalLM.from_pretrained(base["source"], **kwargs)
    vocab = base["vocab_size"]
    if model.get_input_embeddings().weight.shape[0] != vocab:
        model.resize_token_embeddings(vocab, mean_resizing=True)
    if base.get("pad_token_id") is not None:
        model.config.pad_token_id = base["pad_token_id"]
        model.generation_config.pad_token_id = base["pad_token_id"]
    if quant is None:
        model.to(device)
    return model


def prepare_for_training(model, gradient_checkpointing: bool):
    """Freeze the base; for k-bit bases cast norms to fp32 (PEFT's QLoRA preparation).

    Inference keeps bitsandbytes' own CPU kernels, so a served model computes exactly what plain
    transformers + PEFT compute; only training turns the CPU repacking off.
    """
    from peft import prepare_model_for_kbit_training

    if getattr(model, "hf_quantizer", None) is not None:  # loaded in 4 or 8 bit
        if next(model.parameters()).device.type == "cpu":
            disable_cpu_repacking(model)
        # PEFT would enable it under transformers' deprecated name (a warning every run).
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        if gradient_checkpointing:
            model.activation_checkpointing_enable()  # and the input grads PEFT would set
        return model
    for param in model.parameters():
        param.requires_grad_(False)
    if gradient_checkpointing:
        model.enable_input_require_grads()
    return model


def count_parameters(model) -> dict[str, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {"trainable": trainable, "total": total}


def load_for_inference(
    base: dict[str, Any],
    adapter_dir: str | Path | None,
    quantization: Mapping[str, Any],
    torch_dtype: str = "float32",
    device: str | None = None,
):
    """Base model plus (optionally) a saved PEFT adapter, in eval mode."""
    model = load_base_model(base, quantization, torch_dtype, device)
    if adapter_dir is not None:
        from peft import PeftModel

        with peft_wrapping():
            model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
    model.eval()
    return model


def context_window(model) -> int:
    config = model.config
    for name in ("n_positions", "max_position_embeddings"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    raise ValueError(f"cannot tell the context window of {type(model).__name__}")


@dataclass(frozen=True)
class Generation:
    """How answers are generated: greedily, at most `max_new_tokens` each, `batch_size` prompts
    at a time, prompts cut to `max_prompt_tokens` (the training length).

    With `shared_prefix` the system turns are computed once and each distinct context once for
    all its questions (`squadtune.shared_prefix`); otherwise every prompt is prefilled whole,
    prompts sorted by length and left-padded in batches. Both give the same answers. A context
    too long for the context window is cut (as in training), or with `truncate=False` refused
    with `PromptTooLong`.
    """

    max_new_tokens: int = 32
    batch_size: int = 16
    max_prompt_tokens: int | None = None
    shared_prefix: bool = True
    truncate: bool = True


@torch.no_grad()
def generate_answers(
    model, tokenizer, contexts: list[str], questions: list[str], generation: Generation,
    progress: bool = False,
) -> list[str]:
    """Greedy answers, stopped at `<|end|>` (see `Generation`)."""
    from squadtune.chat_format import ChatEncoder, stop_token_ids

    g = generation
    window = context_window(model)
    limit = window - g.max_new_tokens
    if g.max_prompt_tokens is not None:
        limit = min(limit, g.max_prompt_tokens)
    if limit <= 0:
        raise ValueError(
            f"max_new_tokens={g.max_new_tokens} leaves no room for a prompt in the "
            f"{window}-token context window"
        )
    prompts = ChatEncoder(tokenizer).prompts(list(contexts), list(questions), limit, g.truncate)
    stops = stop_token_ids(tokenizer)
    if g.shared_prefix and shares_prefixes(model):
        from squadtune.shared_prefix import SharedPrefixGenerator

        generator = SharedPrefixGenerator(model, stops, g.max_new_tokens, g.batch_size)
        new = generator.generate(prompts, list(contexts), progress)
    else:
        new = batched_generate(model, prompts, stops, g, progress)
    return [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in new]


_FALLBACKS_LOGGED: set[str] = set()


def shares_prefixes(model) -> bool:
    """Whether shared-prefix generation runs on this model; if not, says why once per reason
    (and `generate_answers` prefills every prompt whole: same answers, more work)."""
    from squadtune.architectures import shared_prefix_problem

    problem = shared_prefix_problem(model.config)
    if problem is not None and problem not in _FALLBACKS_LOGGED:
        _FALLBACKS_LOGGED.add(problem)
        log.warning("generating without shared prefixes: %s", problem)
    return problem is None


def batched_generate(model, prompts, stops, generation: Generation, progress=False):
    """`model.generate` on length-sorted, left-padded batches; new ids cut before a stop id."""
    max_new_tokens, batch_size = generation.max_new_tokens, generation.batch_size
    from tqdm.auto import tqdm

    from squadtune.shared_prefix import pad_rows

    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    device = next(model.parameters()).device
    new_ids: list[list[int]] = [[] for _ in prompts]
    batches = range(0, len(order), batch_size)
    for start in tqdm(batches, desc="generating", disable=not progress):
        idx = order[start : start + batch_size]
        ids, mask = pad_rows([prompts[i] for i in idx], left=True, device=device)
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=stops,
            pad_token_id=stops[0],  # fills rows that stopped early; cut off below
        )
        new = out[:, ids.shape[1] :].tolist()
        for i, ids in zip(idx, new, strict=True):
            cut = next((k for k, t in enumerate(ids) if t in stops), len(ids))
            new_ids[i] = ids[:cut]
    return new_ids
