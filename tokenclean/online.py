"""Online token weighting: methods that decide, during training, how much each kept token of a micro-batch counts.

Each method is one plain function from a micro-batch's per-target-token quantities (1-D tensors in the order of
:func:`tokenclean.loss.target_forward`, one entry per trained token) to per-token weights (detached float32). The
trainer (:func:`tokenclean.training.train_model`) makes the step's loss the weighted mean
``sum(w * nll) / normaliser``, where the normaliser is each method's own (``ONLINE_METHODS[...].normaliser``):

- ``weights``: the sum of the weights, i.e. the mean over the kept tokens (Rho-1's L_SLM divides by the number
  of selected tokens; ssToken's released code takes the cross-entropy mean over the labels it keeps);
- ``tokens``: the number of trained tokens, i.e. the mean of the weighted per-token loss over all of them (TRL's
  ``dft_loss`` and LLaMA-Factory's ``_dft_cross_entropy`` / ``_eaft_cross_entropy`` divide the weighted sum by
  ``num_items_in_batch``, the count of label tokens).

Over which tokens that mean runs is each method's reference rule too (``OnlineMethod.loss_normalization``, what
``loss_normalization: auto`` gives; an explicit setting wins): ``step``, the whole optimizer step's tokens, for
DFT and EAFT (``num_items_in_batch`` counts the whole gradient-accumulation window on every device, in TRL and
LLaMA-Factory alike) and Rho-1 (the paper's eq. 3 divides by the selected tokens of the batch); ``micro_batch``,
each micro-batch's own mean averaged over the step, for ssToken (its released loop backpropagates
``CrossEntropyLoss(reduction='mean')`` of each per-device batch under accelerate's gradient accumulation).

The inputs a method may ask for (``OnlineMethod.inputs``): ``nll`` (the current model's loss of each token),
``ref_loss`` / ``base_loss`` (per-token arrays of the token table the workflow computed beforehand, gathered at
the trained tokens), ``logits`` (the full-vocabulary logits that predicted each token), ``prompt_attention``
(:func:`prompt_attention`), ``sample`` (the token's sample, for per-sample rules), ``occurrence`` (the token's row
of the micro-batch: a sample that appears twice in one micro-batch, as when a step wraps into the next epoch, is
two occurrences) and ``progress`` (the fraction of the run's optimizer steps done before this one). ``arrays``
names the per-token files the caller must load.

No ``import torch`` here (tensor methods only): the config check (:mod:`tokenclean.config`, config key
``method_params``) reads the defaults and checks while Snakemake plans, which never starts torch.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from tokenclean.data import is_number, is_whole
from tokenclean.selection import _ratio_fraction, keep_count

if TYPE_CHECKING:  # annotations only: the config check and the planning import this module without starting torch
    import torch


def _ceil_count(ratio: float, n: int) -> int:
    """ceil(ratio * n), exact for the decimal ratio (as :func:`tokenclean.selection.keep_count` floors)."""
    r = _ratio_fraction(ratio)
    return -((-r.numerator * n) // r.denominator)


def _top(score: torch.Tensor, k: int) -> torch.Tensor:
    """float32 0/1: the k highest of ``score``, ties to the earlier token (the project's rule, selection.py)."""
    score = score.float()
    keep = score.new_zeros(len(score))
    if k > 0:
        order = score.sort(descending=True, stable=True).indices
        keep[order[:k]] = 1.0
    return keep


def rho1(nll: torch.Tensor, ref_loss: torch.Tensor, ratio: float = 0.6) -> torch.Tensor:
    """Rho-1 / Selective Language Modeling (Lin et al., NeurIPS 2024, arXiv 2404.07965, §2.3 eq. 3-4): keep the
    top ``ratio`` of the micro-batch's tokens by excess loss ``nll - ref_loss`` (weight 1), drop the rest (0).

    The paper ranks "the tokens in a batch" and the step loss is the mean over the selected ones (eq. 3 divides
    by N * k%). We rank within each micro-batch, the batch a forward pass sees: a step-wide ranking would need
    every micro-batch's losses before the first backward (a second forward pass, or the whole step's
    activations in memory). Micro-batches are the same on any GPU count when ``micro_batch_size`` > 0 (and with
    0 the trainer makes the whole step one micro-batch for this method), so the selection never depends on the
    number of processes. Count: floor(ratio * n), as every selection rule of this project. microsoft/rho
    released no training code; default 0.6: the token selection ratio the paper reports for its 1B math runs
    (70% for 7B), and the 60% of the Token Cleaning paper's rows.
    """
    return _top((nll - ref_loss).detach().float(), keep_count(ratio, len(nll)))


def prompt_attention(attention: torch.Tensor, prompt: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """ssToken's semantic score of every target token: the attention mass its position puts on its own
    sample's prompt, in the last layer, averaged over heads.

    ``attention``: the last layer's weights [rows, heads, width, width] (query, key); ``prompt``: bool
    [rows, width], True at prompt cells (not ``loss_mask``, not padding); ``target``: bool [rows, width]. As in
    jianke0604/ssToken ``scripts/finetune.py`` (``outputs.attentions[-1].mean(1)``, then
    ``attn_b[prompt_len:, :prompt_len].sum(-1)`` in ``filter_tokens_with_attention_loss``): the row of a
    response token's own position (the query at p, not the p-1 that predicts token p), summed over the prompt
    keys, not normalised further. In a packed row the causal mask is block-diagonal, so every position attends
    only within its own sample and summing over all prompt cells of the row sums over its own prompt.
    """
    mean = attention.detach().float().mean(1)  # [rows, width, width]
    per_position = (mean * prompt[:, None, :].to(mean.dtype)).sum(-1)  # [rows, width]
    return per_position[target]


def sstoken(nll: torch.Tensor, base_loss: torch.Tensor, prompt_attention: torch.Tensor, occurrence: torch.Tensor,
            progress: float, ratio: float = 0.6, gamma: float = 0.5, attention_only: float = 0.2) -> torch.Tensor:
    """ssToken (Qin et al., ICLR 2026, arXiv 2510.18250; jianke0604/ssToken ``scripts/finetune.py``,
    ``filter_tokens_with_attention_loss``): per sample, keep the top k = ceil(``ratio`` * n) of its n response
    tokens by ``gamma * minmax(history - nll) + (1 - gamma) * prompt_attention`` (weight 1), the rest 0.

    "Per sample" is per ``occurrence``, as the released loop filters each row of its batch on its own: a sample
    that appears twice in one micro-batch is ranked twice, each copy keeping its own top k.

    History: the released code reads per-token losses of the *base model* (the model fine-tuning starts from),
    computed once before training (``bash_src/calculate_loss.sh``, the paper's fixed history model; its EMA
    variant is not released), so ``base_loss`` here. minmax is over the sample's response tokens with 1e-8 in
    the denominator. ``attention_only``: the released loop uses gamma = 0 (attention alone) until it first
    meets a sample whose index is >= 10000, reading the 50k pool in file order, i.e. for the first 20% of the
    run; here for the first ``attention_only`` of the optimizer steps (0 turns it off). Defaults:
    ``--data_prop 0.6`` and ``--ratio 0.5`` (``scripts/finetune.py`` and ``bash_src/finetune.sh``).
    """
    g = 0.0 if progress < attention_only else gamma
    rel = (base_loss - nll).detach().float()
    keep = rel.new_zeros(len(nll))
    for s in occurrence.unique().tolist():
        at = (occurrence == s).nonzero().squeeze(1)
        diff = rel[at]
        norm = (diff - diff.min()) / (diff.max() - diff.min() + 1e-8)
        keep[at] = _top(g * norm + (1 - g) * prompt_attention[at].float(), _ceil_count(ratio, len(at)))
    return keep


def dft(nll: torch.Tensor) -> torch.Tensor:
    """DFT, "On the Generalization of SFT" (Wu et al., arXiv 2508.05629; TRL ``trl/trainer/sft_trainer.py``
    ``dft_loss``, ``loss_type="dft"``): loss -sg(p) log p, i.e. weight = the detached probability of the token,
    exp(-nll). Normalised by the number of tokens (TRL divides by ``num_items_in_batch``)."""
    return nll.detach().float().neg().exp()


def eaft(logits: torch.Tensor, alpha: float = 1.0, top_k: int = 20, scale: float = 3.0) -> torch.Tensor:
    """EAFT (arXiv 2601.02151; LLaMA-Factory ``src/llamafactory/train/trainer_utils.py`` ``_eaft_cross_entropy``,
    enabled by ``use_eaft_loss``): weight = (H / ``scale``) ** ``alpha``, where H is the entropy of the softmax
    over the ``top_k`` largest logits of the prediction (renormalised among them), an approximation of the
    full predictive entropy; scale 3.0 ~ ln 20, the largest H can be. Defaults: LLaMA-Factory's (k 20 and 3.0
    hard-coded, ``eaft_alpha`` 1.0). Normalised by the number of tokens (``num_items_in_batch``)."""
    top = logits.detach().float().topk(k=min(top_k, logits.shape[-1]), dim=-1).values
    logp = top - top.logsumexp(dim=-1, keepdim=True)
    entropy = -(logp.exp() * logp).sum(-1)
    return (entropy / scale).pow(alpha)


@dataclass(frozen=True)
class OnlineMethod:
    """What the trainer needs to know to run a method: its weight function, its parameters' defaults, the
    per-token inputs it reads, the files the caller loads for it, its loss normaliser and a check of its
    parameters (a message, or None when they are fine)."""

    weigh: Callable[..., torch.Tensor]
    defaults: dict[str, Any]
    inputs: tuple[str, ...]
    arrays: tuple[str, ...] = ()
    normaliser: str = "tokens"        # tokens | weights (see the module docstring)
    loss_normalization: str = "step"   # the reference's rule: step | micro_batch (``loss_normalization: auto``)
    batch_level: bool = False          # the rule ranks across the micro-batch (micro_batch_size 0: whole step)
    check: Callable[[dict[str, Any]], str | None] = field(default=lambda p: None)


def _in_unit(name: str, closed_low: bool = False) -> Callable[[dict[str, Any]], str | None]:
    def check(p: dict[str, Any]) -> str | None:
        v = p[name]
        ok = (0 <= v <= 1) if closed_low else (0 < v <= 1)
        return None if ok else f"{name} must be in {'[0' if closed_low else '(0'}, 1], got {v}"
    return check


def _at_least(name: str, low: float, strict: bool = False) -> Callable[[dict[str, Any]], str | None]:
    def check(p: dict[str, Any]) -> str | None:
        v = p[name]
        return None if (v > low if strict else v >= low) else f"{name} must be {'>' if strict else '>='} {low}, got {v}"
    return check


def _all(*checks: Callable[[dict[str, Any]], str | None]) -> Callable[[dict[str, Any]], str | None]:
    return lambda p: next((m for m in (c(p) for c in checks) if m), None)


ONLINE_METHODS: dict[str, OnlineMethod] = {
    "rho1": OnlineMethod(rho1, {"ratio": 0.6}, ("nll", "ref_loss"), arrays=("ref_loss",), normaliser="weights",
                         batch_level=True, check=_in_unit("ratio")),
    "sstoken": OnlineMethod(sstoken, {"ratio": 0.6, "gamma": 0.5, "attention_only": 0.2},
                            ("nll", "base_loss", "prompt_attention", "occurrence", "progress"), arrays=("base_loss",),
                            normaliser="weights", loss_normalization="micro_batch",
                            check=_all(_in_unit("ratio"), _in_unit("gamma", True), _in_unit("attention_only", True))),
    "dft": OnlineMethod(dft, {}, ("nll",)),
    "eaft": OnlineMethod(eaft, {"alpha": 1.0, "top_k": 20, "scale": 3.0}, ("logits",),
                         check=_all(_at_least("alpha", 0), _at_least("top_k", 1), _at_least("scale", 0, strict=True))),
}

# The flag that provides each per-token array (for messages).
ARRAY_FLAGS = {"ref_loss": "--ref-loss", "base_loss": "--base-loss"}


class ParamError(ValueError):
    """A bad parameter of an online method. Its message names the trainer's flag (``--online-params``);
    ``key`` (the parameter to blame; None when only the combination is wrong) and ``what`` (the problem alone)
    let the config check name its own key instead (``method_params.<method>.<key>``, tokenclean/config.py)."""

    def __init__(self, message: str, key: str | None, what: str):
        super().__init__(message)
        self.key, self.what = key, what


def resolve(name: str, params: dict[str, Any] | None) -> dict[str, Any]:
    """The method's parameters: its defaults overridden by ``params``; a ValueError naming an unknown method,
    or a :class:`ParamError` naming an unknown parameter or a value of the wrong type or out of range (one line).
    The trainer calls it before loading anything and the config check while Snakemake plans (no torch here)."""
    if name not in ONLINE_METHODS:
        raise ValueError(f"--online: unknown method {name!r} ({', '.join(ONLINE_METHODS)})")
    method = ONLINE_METHODS[name]
    params = params or {}
    merged = dict(method.defaults)
    for key, value in params.items():
        if key not in method.defaults:
            known = ", ".join(method.defaults) or "none"
            raise ParamError(f"--online-params: unknown parameter {key!r} of online method {name} (known: {known})",
                             key, f"unknown parameter of online method {name} (known: {known})")
        default = method.defaults[key]
        if not is_number(value) or (
                is_whole(default) and not float(value).is_integer()):
            what = f"must be a {type(default).__name__}, got {value!r}"
            raise ParamError(f"--online-params: {key} of {name} {what}", key, what)
        merged[key] = type(default)(value)
    problem = method.check(merged)
    if problem:  # to blame: the first given parameter that fails the check on its own
        key = next((k for k in params if method.check({**method.defaults, k: merged[k]})), None)
        raise ParamError(f"--online-params: {name}: {problem}", key, problem)
    return merged


def require_arrays(name: str, given: dict[str, Any]) -> None:
    """A one-line ValueError naming the flag of the first per-token array ``name`` needs and was not given."""
    for array in ONLINE_METHODS[name].arrays:
        if given.get(array) is None:
            raise ValueError(f"--online {name} needs {ARRAY_FLAGS[array]} (per-token {array.replace('_', ' ')})")


@dataclass
class Online:
    """An online method as the trainer runs it: name, resolved parameters and the per-token arrays it reads
    (float32[N], aligned with the token table)."""

    name: str
    params: dict[str, Any]
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    weight_sum: np.ndarray | None = None  # filled by the trainer: per token, the sum of its weights ...
    seen: np.ndarray | None = None        # ... and how many times it was trained

    @property
    def method(self) -> OnlineMethod:
        return ONLINE_METHODS[self.name]

    def token_weights(self) -> np.ndarray:
        """float32[N]: each token's weight averaged over the times it was trained; NaN for a token never trained
        (outside the mask, or of a sample the schedule never reached), so that "no decision" is not confused
        with "dropped" (0), as loss arrays hold NaN outside ``loss_mask``."""
        if self.weight_sum is None or self.seen is None:
            raise ValueError("no training has run with this online method yet")
        out = np.full(len(self.seen), np.nan, dtype=np.float32)
        trained = self.seen > 0
        out[trained] = self.weight_sum[trained] / self.seen[trained]
        return out
