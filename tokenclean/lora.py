"""Which layers a LoRA adapter trains: ``lora_targets`` resolved against a model, the same way at planning (on the
base model built from its config with empty weights, :mod:`tokenclean.preflight`) and in training (on the loaded
model, :func:`tokenclean.training._wrap_lora`), so a target that trains nothing stops the plan, not a job.

``lora_targets`` (a config list, or a comma-separated string: ``tokenclean train --lora-targets a,b``):

- names: each adapts every module whose name is it or ends with ``.<name>`` (peft's rule: ``q_proj`` adapts
  ``model.layers.*.self_attn.q_proj``). Every name must match a layer LoRA can adapt (linear, GPT-2's Conv1D, an
  embedding), else one line naming the unmatched names and the model's linear layers. A list that leaves some of
  the model's linear layers out is one warning line (Llama's seven names on Phi-3, whose fused ``qkv_proj`` and
  ``gate_up_proj`` they miss).
- ``all-linear``: every linear layer but the output head (peft's shorthand).
- unset: peft's own default for the model's family (``TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING``, e.g.
  ``q_proj, v_proj`` for Llama, ``query_key_value`` for GPT-NeoX), and ``all-linear`` for a family peft has none
  for (Phi-3).

No torch at import: the config check (:mod:`tokenclean.train_config`) reads :func:`names` and :func:`problem`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

ALL_LINEAR = "all-linear"
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


def names(value: str | list[Any] | tuple[Any, ...] | None) -> list[str]:
    """The target names of a ``lora_targets`` value (list or comma-separated string); [] when unset."""
    items = value.split(",") if isinstance(value, str) else list(value or [])
    return [str(v).strip() for v in items if str(v).strip()]


def problem(value: str | list[Any] | None) -> str | None:
    """What is wrong with a ``lora_targets`` value on its own (before any model is read), or None."""
    given = names(value)
    bad = [n for n in given if not _NAME.match(n)]
    if bad:
        return f"{bad[0]!r} is no module name (letters, digits, '_', '.', '-')"
    if ALL_LINEAR in given and len(given) > 1:
        return f"{ALL_LINEAR} stands alone (it already adapts every linear layer)"
    repeated = sorted({n for n in given if given.count(n) > 1})
    if repeated:
        return f"{', '.join(repeated)} listed twice"
    return None


def flag(value: str | list[Any] | None) -> str:
    """The ``--lora-targets`` word of a config value: names joined by commas."""
    return ",".join(names(value))


def _adaptable(module: Any) -> bool:
    """A layer peft's LoRA can adapt: a linear layer, transformers' Conv1D (GPT-2's linear layers), an embedding."""
    import torch

    return isinstance(module, (torch.nn.Linear, torch.nn.Embedding)) or type(module).__name__ == "Conv1D"


def _is_linear(module: Any) -> bool:
    import torch

    return isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"


def _adapter_size(module: Any, r: int) -> int:
    """Parameters of a rank-r adapter on ``module``: A (r x in) and B (out x r)."""
    import torch

    if isinstance(module, torch.nn.Embedding):
        return r * (module.num_embeddings + module.embedding_dim)
    rows, cols = module.weight.shape
    return r * (rows + cols)


def _short(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def linear_layers(model: Any) -> dict[str, int]:
    """The model's linear layers but its output head (what ``all-linear`` adapts): short name -> how many."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    counts: dict[str, int] = {}
    for name, module in model.named_modules():
        if _is_linear(module) and module is not head:
            counts[_short(name)] = counts.get(_short(name), 0) + 1
    return counts


def family_default(model_type: str | None) -> list[str] | str | None:
    """peft's default targets for a model family (a list of names, or a regular expression), or None."""
    try:
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as mapping
    except ImportError:  # an older peft keeps it one level up
        from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as mapping
    default = mapping.get(model_type or "")
    return list(default) if isinstance(default, (list, tuple, set)) else default


@dataclass
class Plan:
    """What an adapter on a model trains: ``targets`` as peft receives them (names, ``all-linear`` or peft's
    regular expression), where they came from, the adapted modules' full names, their adapter parameters at the
    rank given, and the linear layers an explicit list leaves out (short names)."""

    targets: list[str] | str
    source: str
    modules: list[str]
    parameters: int
    uncovered: list[str] = field(default_factory=list)

    def record(self) -> dict[str, Any]:
        """The provenance entry (``tokenclean.json``, key ``lora``)."""
        by_name: dict[str, int] = {}
        for m in self.modules:
            by_name[_short(m)] = by_name.get(_short(m), 0) + 1
        return {"targets": self.targets, "source": self.source, "adapted_modules": len(self.modules),
                "adapted": dict(sorted(by_name.items())), "adapter_parameters": self.parameters,
                "modules": self.modules}

    def summary(self) -> str:
        """One log line: what is adapted, how many modules and parameters."""
        kinds = ", ".join(f"{k} x{v}" for k, v in self.record()["adapted"].items())
        return (f"LoRA ({self.source}) adapts {len(self.modules)} modules ({kinds}): {self.parameters:,} adapter "
                "parameters")

    def warning(self) -> str | None:
        """One line when an explicit list leaves linear layers of the model out."""
        if not self.uncovered:
            return None
        return (f"lora_targets leaves linear layers of this model untrained: {', '.join(self.uncovered)} "
                f"(add them, or use {ALL_LINEAR})")


def plan(model: Any, value: str | list[Any] | None, r: int) -> Plan:
    """Resolve ``lora_targets`` on ``model`` (loaded, or built with empty weights); a ValueError of one line
    names every unmatched target and the model's linear layers."""
    message = problem(value)
    if message:
        raise ValueError(f"lora_targets: {message}")
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    given = names(value)
    linear = linear_layers(model)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    named = dict(model.named_modules())
    if given == [ALL_LINEAR] or (not given and family_default(model_type) is None):
        targets: list[str] | str = ALL_LINEAR
        source = ALL_LINEAR if given else f"{ALL_LINEAR}: peft has no default for {model_type}"
        chosen = [n for n, m in named.items() if _is_linear(m) and m is not head]
    elif not given and isinstance(family_default(model_type), str):  # peft's regular expression
        targets = family_default(model_type)
        source = f"peft's default for {model_type}"
        chosen = [n for n, m in named.items() if _adaptable(m) and re.fullmatch(targets, n)]
    else:
        targets = given or family_default(model_type)
        source = "lora_targets" if given else f"peft's default for {model_type}"
        chosen = [n for n, m in named.items() if _adaptable(m) and any(n == t or n.endswith("." + t) for t in targets)]
        matched = {t for t in targets for n in chosen if n == t or n.endswith("." + t)}
        unmatched = [t for t in targets if t not in matched]
        if unmatched:
            raise ValueError(f"lora_targets: {', '.join(unmatched)} {'matches' if len(unmatched) == 1 else 'match'} "
                             f"no layer of this {model_type or type(model).__name__} model; its linear layers: "
                             f"{', '.join(linear) or 'none'} (or {ALL_LINEAR})")
    if not chosen:
        raise ValueError(f"lora_targets: {source} adapts no layer of this {model_type} model; its linear layers: "
                         f"{', '.join(linear) or 'none'}")
    covered = {_short(n) for n in chosen}
    uncovered = [n for n in linear if n not in covered] if given and given != [ALL_LINEAR] else []
    return Plan(targets, source, chosen, sum(_adapter_size(named[n], r) for n in chosen), uncovered)


def adapted(peft_model: Any) -> tuple[list[str], int]:
    """The modules a peft model really adapts (full names, as in the base model) and its adapter parameters."""
    modules = [name for name, m in peft_model.base_model.model.named_modules() if hasattr(m, "lora_A")]
    parameters = sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)
    return modules, parameters
