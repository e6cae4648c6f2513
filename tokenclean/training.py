"""Masked supervised fine-tuning: one trainer for every row of the table (and for pretraining the tiny base).

Loss normalisation (``loss_normalization``): ``step``, the mean NLL over the *selected* tokens of the whole
optimizer step (all micro-batches), so a micro-batch with few kept tokens is not over-weighted relative to one
with many: what the Hugging Face Trainer does since transformers 4.46 (it divides by ``num_items_in_batch``, the
label count of the whole gradient-accumulation window on every device), as TRL and LLaMA-Factory. ``micro_batch``:
each micro-batch's own mean, averaged over the step's micro-batches on every GPU, under which a token of a
sparsely kept micro-batch weighs more: open-instruct's ``reduce_loss mean``, the rule the paper's runs used (and
the Trainer's before 4.46). ``auto`` (the default): an online method's reference rule, ``step`` otherwise
(:func:`resolve_normalization`). Micro-batches are global (:func:`micro_batches`), so either rule gives the
same update on any GPU count. Samples without any selected token are dropped before batching (they would cost
compute and contribute nothing).

Interruption: with ``checkpoint_every`` the trainer writes model, optimizer and RNG state (safetensors and JSON,
no pickle) to ``<out>.resume/`` atomically; re-running the same command continues from there and ends with
the weights an uninterrupted run would have.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from tokenclean import distributed
from tokenclean.artifacts import ArtifactError, TokenTable, load_array, save_array, sha256_file, write_texts
from tokenclean.batching import collate, pack
from tokenclean.loss import target_forward, target_nll
from tokenclean.models import peak_memory
from tokenclean.online import Online
from tokenclean.train_config import MERGE_DTYPES, TrainConfig  # noqa: F401  (re-exported)

log = logging.getLogger(__name__)

class TrainingForward(torch.nn.Module):
    """The training forward of one micro-batch as a single module call: the per-token losses of its target
    tokens (:func:`tokenclean.loss.target_nll`), or, for an online method, what it reads besides them
    (:func:`tokenclean.loss.target_forward`). Wrapped in DistributedDataParallel on several processes, which
    syncs gradients only for passes through its own forward (ours reads the decoder and the head apart)."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, torch.Tensor], logits: bool = False, attention: bool = False,
                online: bool = False) -> Any:
        if online:
            return target_forward(self.model, batch["input_ids"], batch.get("attention_mask"), batch["target"],
                                  position_ids=batch.get("position_ids"), logits=logits, attention=attention)
        return target_nll(self.model, batch["input_ids"], batch.get("attention_mask"), batch["target"],
                          position_ids=batch.get("position_ids"))


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based)."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else max(0.0, 1 - progress)


def round_steps(total_steps: int, rounds: int, index: int) -> int:
    """Optimizer steps of round ``index`` (1-based) when ``rounds`` share ``total_steps``: the rounds together
    train exactly as many steps as any other row, and differ by at most one."""
    if rounds < 1 or not 1 <= index <= rounds:
        raise ValueError(f"round {index} of {rounds}: need 1 <= index <= rounds")
    return index * total_steps // rounds - (index - 1) * total_steps // rounds


def round_config(cfg: TrainConfig, rounds: int, index: int) -> TrainConfig:
    """A row's training settings for one self-evolving round: the rounds split the row's step budget (in epoch
    mode each round runs the row's epochs over its own chunk)."""
    if cfg.steps == 0:
        return cfg
    return dataclasses.replace(cfg, steps=round_steps(cfg.steps, rounds, index))


def step_schedule(n_samples: int, cfg: TrainConfig) -> list[np.ndarray]:
    """The samples of every optimizer step: seeded reshuffle each epoch (or file order), cycling as needed."""
    steps = cfg.steps or math.ceil(cfg.epochs * n_samples / cfg.batch_size)
    rng = np.random.default_rng(cfg.seed)
    stream: list[np.ndarray] = []
    needed = steps * cfg.batch_size
    while sum(len(s) for s in stream) < needed:
        stream.append(rng.permutation(n_samples) if cfg.shuffle else np.arange(n_samples))
    flat = np.concatenate(stream)
    if cfg.steps == 0:  # epoch mode: the last step may be short, never wrap into a new epoch
        flat = flat[: math.ceil(cfg.epochs * n_samples)]
    return [flat[i: i + cfg.batch_size] for i in range(0, len(flat), cfg.batch_size)][:steps]


def resolve_normalization(cfg: TrainConfig, online: Online | None = None) -> TrainConfig:
    """``cfg`` with ``loss_normalization: auto`` made concrete: an online method's reference rule
    (:attr:`tokenclean.online.OnlineMethod.loss_normalization`), ``step`` for plain masked SFT. A given rule stays."""
    if cfg.loss_normalization != "auto":
        return cfg
    rule = online.method.loss_normalization if online is not None else "step"
    return dataclasses.replace(cfg, loss_normalization=rule)


def micro_batches(samples: np.ndarray, cfg: TrainConfig, world: int = 1) -> list[np.ndarray]:
    """A step's micro-batches: consecutive slices of its samples (in schedule order) of ``micro_batch_size``.

    They are the same for any number of processes and either launcher; process r trains micro-batches r, r+W,
    r+2W, ... (how accelerate's sharded dataloader deals per-device batches), so under ``micro_batch``
    normalisation the same samples share a mean on 1 GPU or 8. With ``micro_batch_size`` 0 a step is one
    micro-batch under ``micro_batch`` normalisation; under ``step`` normalisation, where the split changes
    nothing but memory and float summation order, it is then cut into one near-equal slice per process.
    """
    size = cfg.micro_batch_size
    if size == 0:
        size = len(samples) if cfg.loss_normalization == "micro_batch" else math.ceil(len(samples) / world)
    return [samples[i: i + size] for i in range(0, len(samples), max(1, size))]


def _wrap_lora(model: Any, cfg: TrainConfig) -> tuple[Any, dict[str, Any]]:
    """``model`` with a LoRA adapter on the layers ``cfg.lora_targets`` names (:func:`tokenclean.lora.plan`: a
    target that matches nothing is a one-line error, an explicit list that misses linear layers one warning),
    and the provenance record of what it adapts (the modules peft really wrapped, and their parameters)."""
    from peft import LoraConfig, get_peft_model

    from tokenclean import lora

    plan = lora.plan(model, cfg.lora_targets, cfg.lora_r)
    if plan.warning():
        log.warning("%s", plan.warning())
    chosen = set(plan.modules)
    widths = [min(m.weight.shape) for name, m in model.named_modules() if name in chosen]
    if widths and cfg.lora_r > max(widths):  # a full-rank update at more cost (the tiny GPU-check preset's r 64)
        log.warning("lora_r %d is wider than every LoRA target layer (at most %d): the adapter is full rank",
                    cfg.lora_r, max(widths))
    config = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                        target_modules=plan.targets, task_type="CAUSAL_LM")
    wrapped = get_peft_model(model, config)
    plan.modules, plan.parameters = lora.adapted(wrapped)  # what peft did, recorded as done
    log.info("%s", plan.summary())
    return wrapped, plan.record()


def merge_adapter(model: Any, merge_dtype: str = "float32", load_start: Callable[[], Any] | None = None) -> Any:
    """The trained LoRA adapter of PEFT ``model`` merged into plain weights (see ``MERGE_DTYPES``).

    ``auto``: into the model's own training-dtype weights. ``float32``: the adapter (kept in float32 by PEFT)
    is put on a float32 copy of the starting weights and merged there, W + (alpha / r) B A in float32, on the
    CPU. ``load_start`` loads that copy from disk (``train_file`` does, so weights an earlier round saved in
    float32 keep their precision); without it, the in-memory starting weights are upcast.
    """
    if merge_dtype == "auto":
        return model.merge_and_unload()
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    adapter = {k: v.detach().to("cpu", torch.float32) for k, v in get_peft_model_state_dict(model).items()}
    config = copy.deepcopy(model.peft_config["default"])
    start = load_start() if load_start is not None else model.unload()
    start = start.to("cpu", torch.float32)
    wrapped = get_peft_model(start, config)
    loaded = set_peft_model_state_dict(wrapped, adapter)
    if loaded.unexpected_keys:
        raise ValueError(f"the trained adapter does not fit the starting model: {loaded.unexpected_keys[:3]}")
    return wrapped.merge_and_unload()


def check_packing(forward: torch.nn.Module, table: TokenTable, samples: np.ndarray, mask: np.ndarray, width: int,
                  pad_id: int) -> None:
    """Fail unless packed rows give every token the loss it has on its own (the model isolates samples).

    Packing relies on the model building a block-diagonal causal mask from restarting ``position_ids``; a model
    that ignores them would let samples attend to each other and train on the wrong context, silently.
    ``forward``: the :class:`TrainingForward` as trained (DDP- or FSDP-wrapped), on every process.
    """
    device = next(forward.parameters()).device
    with torch.no_grad():
        packed = pack(table, samples, width, pad_id, mask=mask, device=device)
        packed_nll = forward(packed)
        padded = collate(table, samples, pad_id, mask=mask, device=device)
        padded_nll = forward(padded)
    packed_index = packed["index"][packed["target"].cpu()].numpy()
    padded_index = np.concatenate([np.flatnonzero(mask[table.offsets[s]:table.offsets[s + 1]]) + table.offsets[s]
                                   for s in samples])
    by_index = dict(zip(packed_index.tolist(), packed_nll.float().cpu().numpy().tolist()))
    gap = float(np.max(np.abs(np.array([by_index[i] for i in padded_index.tolist()])
                              - padded_nll.float().cpu().numpy())))
    tolerance = 1e-3 if next(forward.parameters()).dtype == torch.float32 else 0.1
    if gap > tolerance:
        raise ValueError(f"{type(forward.model).__name__} does not keep packed samples apart (a token's loss "
                         f"changes by {gap:.3g} when packed); set pack_length: 0")


class TrainingInterrupted(RuntimeError):
    """Raised when ``stop_after`` ends a run early (the checkpoint, if any, lets a re-run continue)."""


def _run_identity(table: TokenTable, mask: np.ndarray, cfg: TrainConfig, start: str,
                  online: Online | None = None) -> str:
    """What a checkpoint must match to be resumed: the starting model, the data, the selection, the online
    method (with its arrays) and every setting but the schedule of checkpoints itself."""
    from tokenclean.artifacts import fingerprint_arrays

    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("checkpoint_every", "log_every")}
    settings["start"] = start
    if online is not None:
        settings["online"] = {"name": online.name, "params": online.params,
                              "arrays": {k: fingerprint_arrays(v) for k, v in sorted(online.arrays.items())}}
    return fingerprint_arrays(table.input_ids, table.offsets, mask,
                              np.frombuffer(json.dumps(settings, sort_keys=True).encode(), dtype=np.uint8))


def save_checkpoint(directory: Path, model: Any, optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter],
                    state: dict[str, Any], extra: dict[str, torch.Tensor] | None = None,
                    full: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]] | None = None) -> None:
    """Trainable weights (by name), AdamW moments (``<index in params>.<key>``) and the torch RNG state as
    safetensors; counters as JSON; ``extra`` tensors (an online method's per-token record) in
    ``extra.safetensors``; atomically. ``full``: the weights and moments already gathered from FSDP shards
    (:func:`tokenclean.distributed.full_training_state`), in the same layout, so either sharding resumes either."""
    from safetensors.torch import save_file

    from tokenclean.artifacts import atomic_dir

    if full is not None:
        weights, moments = full[0], {"rng": torch.get_rng_state(), **full[1]}
    else:
        weights = {name: p.detach().cpu().contiguous() for name, p in model.named_parameters() if p.requires_grad}
        moments = {"rng": torch.get_rng_state()}
        for i, p in enumerate(params):
            for key, value in optimizer.state.get(p, {}).items():
                moments[f"{i}.{key}"] = distributed.storable_moment(value.detach().cpu())
    with atomic_dir(directory) as tmp:
        save_file(weights, str(tmp / "weights.safetensors"))
        save_file(moments, str(tmp / "optimizer.safetensors"))
        if extra:
            save_file(extra, str(tmp / "extra.safetensors"))
        files = {f.name: sha256_file(f) for f in sorted(tmp.glob("*.safetensors"))}  # checked on resume
        (tmp / "state.json").write_text(json.dumps({**state, "files": files}, sort_keys=True))


def checkpoint_problem(directory: Path) -> str | None:
    """What is wrong with the checkpoint in ``directory``, or None if its files are those written: ``state.json``
    readable and every ``.safetensors`` it lists present with the sha256 it records (a checkpoint from before the
    record was kept is judged by whether its files load). Read by process 0 only (:func:`_damaged_everywhere`)."""
    from safetensors import SafetensorError, safe_open

    state_file = directory / "state.json"
    if not state_file.is_file():
        return "state.json missing"
    try:
        state = json.loads(state_file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        return f"state.json unreadable: {'empty' if not state_file.stat().st_size else e}"
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        return "state.json holds no step"
    files = state.get("files")
    if files is None:  # an older checkpoint: only its headers can be checked
        for f in sorted(directory.glob("*.safetensors")):
            try:
                with safe_open(str(f), "pt"):
                    pass
            except (SafetensorError, OSError) as e:
                return f"{f.name} unreadable: {e}"
        return None
    for name, digest in sorted(files.items()):
        if not (directory / name).is_file():
            return f"{name} missing"
        if sha256_file(directory / name) != digest:
            return f"{name} does not match the sha256 in state.json"
    return None


def _damaged_everywhere(directory: Path, device: torch.device) -> str | None:
    """:func:`checkpoint_problem` as process 0 found it, on every process (all must resume, or none)."""
    rank, world = distributed.rank_and_size()
    problem = checkpoint_problem(directory) if rank == 0 else None
    if world > 1 and distributed.sum_values(float(problem is not None), device=device)[0] and problem is None:
        problem = "found damaged by process 0"
    return problem


def set_aside(directory: Path, problem: str) -> Path:
    """Rename a damaged checkpoint to ``<name>.damaged-<n>`` (kept for a look, never resumed) and say so in one
    warning; the run then starts from the beginning (the trainer keeps one checkpoint, so no earlier good one)."""
    n = 1
    while directory.with_name(f"{directory.name}.damaged-{n}").exists():
        n += 1
    aside = directory.with_name(f"{directory.name}.damaged-{n}")
    if distributed.rank_and_size()[0] == 0:
        os.replace(directory, aside)
    log.warning("%s: checkpoint damaged (%s); set aside as %s, training restarts from the start", directory, problem,
                aside)
    return aside


def load_checkpoint(directory: Path, model: Any, optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter],
                    identity: str, sharded: torch.nn.Module | None = None) -> dict[str, Any] | None:
    """Restore a checkpoint of this very run into ``model`` and ``optimizer``; None if there is none (or it is
    from another run, which is then left alone and overwritten by this run's first checkpoint, or damaged, which is
    set aside: :func:`set_aside`). Its files are checked before anything is restored. ``sharded``:
    the FSDP-sharded training forward holding ``model``; process 0 reads the tensors and hands each process its
    shards (:func:`tokenclean.distributed.load_full_training_state`)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    if not directory.exists():
        return None
    problem = _damaged_everywhere(directory, params[0].device if params else torch.device("cpu"))
    if problem is not None:
        distributed.barrier()  # every process has decided before process 0 renames it
        set_aside(directory, problem)
        return None
    state = json.loads((directory / "state.json").read_text())
    if state.get("identity") != identity:
        log.warning("%s holds a checkpoint of another run (other data, mask or settings); starting over", directory)
        return None
    if sharded is not None:
        if distributed.rank_and_size()[0] == 0:
            weights = load_file(str(directory / "weights.safetensors"))
            moments = load_file(str(directory / "optimizer.safetensors"))
        else:  # the others receive their shards from process 0: only the RNG state is read here
            with safe_open(str(directory / "optimizer.safetensors"), "pt") as f:
                weights, moments = {}, {"rng": f.get_tensor("rng")}
        torch.set_rng_state(moments.pop("rng"))
        distributed.load_full_training_state(sharded, model, optimizer, weights, moments)
    else:
        weights = load_file(str(directory / "weights.safetensors"))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.requires_grad:
                    p.copy_(weights[name].to(p.device, p.dtype))
        moments = load_file(str(directory / "optimizer.safetensors"))
        torch.set_rng_state(moments.pop("rng"))
        for key, value in moments.items():
            index, name = key.split(".", 1)
            p = params[int(index)]
            optimizer.state[p][name] = value.reshape(()) if name == "step" else value.to(p.device)
    if (directory / "extra.safetensors").exists():
        state["extra"] = load_file(str(directory / "extra.safetensors"))
    log.info("resuming from %s at step %d", directory, state["step"])
    return state


def _log_lines_until(log_path: Path, step: int) -> list[str]:
    """The lines of a training log up to ``step``, for a resumed run to continue. A line that does not read as one
    of the log's records (the last one, cut short when the job was killed while writing it, or one damaged since)
    is dropped, with one warning: the log is a record of the run, the checkpoint holds its state."""
    kept, dropped = [], 0
    for line in log_path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
            at = record["step"] if isinstance(record, dict) else None
        except (json.JSONDecodeError, KeyError):
            at = None
        if not isinstance(at, int):
            dropped += bool(line.strip())
        elif at <= step:
            kept.append(line)
    if dropped:
        log.warning("%s: %d unreadable line(s) dropped (cut short or damaged)", log_path, dropped)
    return kept


def train_model(model: Any, table: TokenTable, mask: np.ndarray, cfg: TrainConfig, pad_id: int,
                log_path: str | os.PathLike | None = None, progress: bool = True,
                checkpoint_dir: str | os.PathLike | None = None, stop_after: int | None = None,
                start_fingerprint: str = "", load_start: Callable[[], Any] | None = None,
                merge: bool = True, online: Online | None = None) -> tuple[Any, dict[str, Any]]:
    """Train ``model`` in place on the selected tokens; returns the (merged) model and a summary.

    ``online``: weight every selected token of a micro-batch by an online method (:mod:`tokenclean.online`);
    the step's loss is then ``sum(w * nll) / D`` with the method's normaliser D (the sum of the weights or
    the number of tokens): under ``step`` normalisation D is summed over the whole step on every process and the
    gradients are divided by it once all micro-batches are done (weights are only known after each forward,
    so D is not known up front; the division is exact by linearity, on any split and process count); under
    ``micro_batch``, each micro-batch's own weighted mean, averaged over the step's micro-batches.
    ``online.weight_sum`` and ``online.seen`` receive the per-token record (:meth:`Online.token_weights`).
    Without ``online`` the computation is exactly the offline one.

    With ``checkpoint_dir`` and ``cfg.checkpoint_every``, resumes from a checkpoint of the same run found there
    (``start_fingerprint`` identifies the starting model, so a checkpoint made from another one is not resumed).
    ``stop_after`` ends the run after that many steps with :class:`TrainingInterrupted` (a time-limited job).
    A LoRA adapter is merged as ``cfg.merge_dtype`` says (:func:`merge_adapter`, ``load_start`` its starting
    weights), unless ``merge`` is False (a process that does not save the model).
    """
    if mask.shape != table.loss_mask.shape:
        raise ArtifactError("mask and token table have different lengths")
    if np.any(mask & ~table.loss_mask):
        raise ArtifactError("mask selects tokens outside loss_mask")
    cfg = resolve_normalization(cfg, online)
    torch.manual_seed(cfg.seed)
    device = next(model.parameters()).device
    sharded = distributed.check_sharding(cfg.lora_r) == "fsdp"
    rank, world = distributed.setup(device)
    per_sample = np.add.reduceat(mask.astype(np.int64), table.offsets[:-1])
    usable = np.flatnonzero(per_sample > 0)
    if len(usable) == 0:
        raise ValueError("the mask selects no token at all; nothing to train on")
    schedule = step_schedule(len(usable), cfg)
    total_steps = len(schedule)
    warmup = math.ceil(cfg.warmup_ratio * total_steps)
    attn_before = None
    if online is not None:
        online.weight_sum = np.zeros(table.n_tokens, dtype=np.float64)
        online.seen = np.zeros(table.n_tokens, dtype=np.int64)
        if "prompt_attention" in online.method.inputs:  # attention weights exist under eager attention only
            attn_before = model.config._attn_implementation
            model.set_attn_implementation("eager")
    adapter = None
    if cfg.lora_r > 0:
        model, adapter = _wrap_lora(model, cfg)
    if cfg.gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    forward = TrainingForward(model)
    if sharded:
        forward = distributed.fully_sharded(forward, model, device)
    elif world > 1:
        forward = distributed.data_parallel(forward, device)
    params = [p for p in model.parameters() if p.requires_grad]  # after sharding: FSDP replaces them
    # foreach: one multi-tensor update instead of a Python loop over the parameters. torch picks it on
    # accelerators but not on the CPU, where a tiny model's step is mostly per-tensor overhead; on the CPU the
    # result is bitwise the same and the embedded SFT step about 5% faster (measured side by side).
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                  betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon, foreach=True)
    if world > 1 and cfg.loss_normalization == "micro_batch" and math.ceil(
            cfg.batch_size / (cfg.micro_batch_size or cfg.batch_size)) % world:
        log.warning("%d processes share %d micro-batches per step: some processes idle; make batch_size / "
                    "micro_batch_size a multiple of the GPU count", world,
                    math.ceil(cfg.batch_size / (cfg.micro_batch_size or cfg.batch_size)))
    checkpoints = Path(checkpoint_dir) if checkpoint_dir is not None and cfg.checkpoint_every > 0 else None
    identity = _run_identity(table, mask, cfg, start_fingerprint, online)
    resumed = (load_checkpoint(checkpoints, model, optimizer, params, identity, forward if sharded else None)
               if checkpoints else None)
    if online is not None and resumed and "extra" in resumed and rank == 0:  # the record is summed at the end
        online.weight_sum[:] = resumed["extra"]["weight_sum"].numpy()
        online.seen[:] = resumed["extra"]["seen"].numpy()
    checkpointing = checkpoints is not None  # on every process: each joins the record's sum at a checkpoint
    first_step = resumed["step"] if resumed else 0
    seen_tokens, trained_tokens = (resumed["seen_tokens"], resumed["trained_tokens"]) if resumed else (0, 0)
    last_loss = resumed["loss"] if resumed else float("nan")
    if rank != 0:  # one process logs and checkpoints
        log_path, checkpoints, progress = None, None, False
    if resumed and log_path and Path(log_path).exists():  # forget the steps done after the checkpoint
        kept = _log_lines_until(Path(log_path), first_step)
        write_texts({log_path: "".join(line + "\n" for line in kept)})
    # closed in the `finally` below, with the progress bar: the training loop is too long for a `with` block
    log_file = open(log_path, "a" if resumed else "w") if log_path else None  # noqa: SIM115
    bar = tqdm(total=total_steps, initial=first_step, desc="training", unit="step", disable=not progress,
               mininterval=2.0)
    started, seen_at_start = time.perf_counter(), seen_tokens
    try:
        for step, batch_samples in enumerate(schedule):
            if step < first_step:
                continue
            if stop_after is not None and step >= stop_after:
                raise TrainingInterrupted(f"stopped after {stop_after} steps")
            samples = usable[batch_samples]
            n_selected = int(per_sample[samples].sum())  # over the whole step, every process
            chunks = micro_batches(samples, cfg, world)
            if online is not None and online.method.batch_level and cfg.micro_batch_size == 0:
                chunks = [samples]  # a rule that ranks across its batch: the step, on any process count
            n_micro = len(chunks)  # of the whole step, every process
            for group in optimizer.param_groups:
                group["lr"] = cfg.lr * lr_factor(step, total_steps, warmup, cfg.schedule)
            optimizer.zero_grad(set_to_none=True)
            step_loss, step_tokens = 0.0, 0
            step_weight, step_norm = 0.0, 0.0  # online: sum of weights, and the step normaliser D (this process)
            # this process's share: micro-batches r, r+W, ...; with none (fewer micro-batches than processes) a
            # pass of weight 0 over the first one, as DDP needs every process in each step's gradient sum
            share = list(range(rank, n_micro, world)) or [None]
            if sharded:  # every forward all-gathers the layers: the same number of passes on every process
                share += [None] * (math.ceil(n_micro / world) - len(share))
            for j, index in enumerate(share):
                chunk = chunks[0 if index is None else index]
                if cfg.pack_length:
                    if step == 0 and j == 0:
                        check_packing(forward, table, chunk, mask, cfg.pack_length, pad_id)
                    batch = pack(table, chunk, cfg.pack_length, pad_id, mask=mask, device=device)
                else:
                    batch = collate(table, chunk, pad_id, mask=mask, device=device)
                # gradients are summed over the processes once, in the backward of each one's last micro-batch
                sync = world == 1 or j == len(share) - 1
                with distributed.gradient_sync(forward, sync):
                    if index is None:
                        loss = forward(batch).sum() * 0.0
                    elif online is not None:
                        loss, weight, norm = _online_loss(forward, online, table, chunk, batch, cfg, n_micro,
                                                          progress=step / total_steps)
                        step_weight += weight
                        step_norm += norm
                    elif cfg.loss_normalization == "step":
                        loss = forward(batch).sum() / n_selected  # the step's mean over its selected tokens
                    else:
                        loss = forward(batch).mean() / n_micro  # each micro-batch's mean, averaged over the step's
                    loss.backward()
                if index is not None:
                    step_loss += float(loss.detach())
                    step_tokens += int(table.lengths[chunk].sum())
            if world > 1:
                step_loss, step_tokens, step_weight, step_norm = distributed.sum_values(
                    step_loss, step_tokens, step_weight, step_norm, device=device)
            if online is not None and cfg.loss_normalization == "step" and step_norm > 0:
                for p in params:  # sum(w * nll) / D: D, over the whole step, is known only now
                    if p.grad is not None:
                        p.grad.div_(step_norm)
                step_loss /= step_norm
            seen_tokens += int(step_tokens)
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            trained_tokens += n_selected
            last_loss = step_loss
            tokens_per_s = (seen_tokens - seen_at_start) / max(time.perf_counter() - started, 1e-9)
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.3f}", tok_s=f"{tokens_per_s:.0f}", refresh=False)
            if log_file and (step % cfg.log_every == 0 or step == total_steps - 1):
                line = {"step": step + 1, "loss": round(step_loss, 6), "lr": optimizer.param_groups[0]["lr"],
                        "selected_tokens": n_selected, "tokens_per_s": round(tokens_per_s, 1)}
                if online is not None:
                    line["mean_weight"] = round(step_weight / max(n_selected, 1), 6)
                log_file.write(json.dumps(line) + "\n")
                log_file.flush()
            if checkpointing and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < total_steps:
                extra = _global_record(online, world, device) if online is not None else None
                full = distributed.full_training_state(forward, model, optimizer) if sharded else None  # all gather
                if checkpoints:
                    save_checkpoint(checkpoints, model, optimizer, params, {
                        "identity": identity, "step": step + 1, "seen_tokens": seen_tokens,
                        "trained_tokens": trained_tokens, "loss": last_loss}, extra, full)
    finally:
        bar.close()
        if log_file:
            log_file.close()
    if not math.isfinite(last_loss):
        raise FloatingPointError(f"training loss is not finite after {total_steps} steps at lr {cfg.lr:g}; lower lr")
    if sharded:  # process 0 saves a plain copy with the full weights
        model = distributed.full_model(forward, model) or model
    if cfg.lora_r > 0 and merge:
        model = merge_adapter(model, cfg.merge_dtype, load_start)
    model.eval()
    summary = {"steps": total_steps, "samples_used": len(usable),
               "samples_without_selected_tokens": int(table.n_samples - len(usable)),
               "selected_tokens_trained": trained_tokens, "tokens_processed": seen_tokens,
               "final_loss": last_loss, "seconds": round(time.perf_counter() - started, 2)}
    if sharded:
        summary["sharding"] = "fsdp"
    if adapter is not None:
        summary["lora"] = adapter
    summary.update(peak_memory(device))  # CUDA: the training's peak memory (make gpu-check)
    if online is not None:
        if world > 1:
            record = _global_record(online, world, device)
            online.weight_sum, online.seen = record["weight_sum"].numpy(), record["seen"].numpy()
        if attn_before is not None:
            model.set_attn_implementation(attn_before)
        seen = online.seen > 0
        summary["online"] = {"method": online.name, "params": online.params,
                             "normaliser": online.method.normaliser,
                             "mean_weight": float(online.weight_sum.sum() / max(int(online.seen.sum()), 1)),
                             "tokens_trained": int(seen.sum())}
    return model, summary


def _cell_index(table: TokenTable, chunk: np.ndarray, batch: dict[str, torch.Tensor]) -> np.ndarray:
    """int64[rows, width]: the token-table index of every cell of a batch, -1 in padding."""
    if "index" in batch:  # packed
        return batch["index"].numpy()
    cells = np.full(tuple(batch["input_ids"].shape), -1, dtype=np.int64)
    for row, s in enumerate(chunk):
        a, b = table.offsets[s], table.offsets[s + 1]
        cells[row, : b - a] = np.arange(a, b)
    return cells


def _occurrences(table: TokenTable, cells: np.ndarray) -> np.ndarray:
    """int64[rows, width]: which sample occurrence of the micro-batch each cell belongs to, numbered in row-major
    order (-1 before the first): a new one starts at every sample's first token, so a sample placed twice (padded
    rows or packed) is two occurrences. Padding continues the occurrence before it and is never a target."""
    sample = np.searchsorted(table.offsets, np.maximum(cells, 0), side="right") - 1
    starts = (cells >= 0) & (cells == table.offsets[sample])
    return (np.cumsum(starts.ravel()) - 1).reshape(cells.shape)


def _online_loss(forward: Any, online: Online, table: TokenTable, chunk: np.ndarray, batch: dict[str, torch.Tensor],
                 cfg: TrainConfig, n_micro: int, progress: float) -> tuple[torch.Tensor, float, float]:
    """One micro-batch under an online method (``forward``: the :class:`TrainingForward`, DDP-wrapped or not):
    the loss to backpropagate (under ``step`` normalisation the unnormalised sum(w * nll), divided by the step's
    D later), the sum of its weights and its share of D. Records each token's weight in ``online.weight_sum`` /
    ``online.seen``."""
    from tokenclean.online import prompt_attention

    needs = online.method.inputs
    out = forward(batch, logits="logits" in needs, attention="prompt_attention" in needs, online=True)
    nll = out["nll"]
    cells = _cell_index(table, chunk, batch)
    index = cells[batch["target"].cpu().numpy()]  # row-major, the order of the losses
    device = nll.device
    given: dict[str, Any] = {}
    for name in needs:
        if name == "nll":
            given[name] = nll.detach()
        elif name == "logits":
            given[name] = out["logits"]
        elif name == "sample":
            given[name] = torch.from_numpy(np.searchsorted(table.offsets, index, side="right") - 1).to(device)
        elif name == "occurrence":
            given[name] = torch.from_numpy(_occurrences(table, cells)[batch["target"].cpu().numpy()]).to(device)
        elif name == "progress":
            given[name] = progress
        elif name == "prompt_attention":
            prompt = (cells >= 0) & ~table.loss_mask[np.maximum(cells, 0)]
            given[name] = prompt_attention(out["attention"], torch.from_numpy(prompt).to(device), batch["target"])
        else:  # a per-token array of the table
            given[name] = torch.from_numpy(online.arrays[name][index]).to(device, torch.float32)
    weights = online.method.weigh(**given, **online.params).detach().float()
    np.add.at(online.weight_sum, index, weights.cpu().double().numpy())  # a sample may recur within a step
    np.add.at(online.seen, index, 1)
    total = (weights * nll).sum()
    norm = float(weights.sum()) if online.method.normaliser == "weights" else float(len(weights))
    if cfg.loss_normalization == "step":
        return total, float(weights.sum()), norm
    return (total / norm if norm > 0 else total * 0.0) / n_micro, float(weights.sum()), norm


def _global_record(online: Online, world: int, device: torch.device) -> dict[str, torch.Tensor]:
    """The per-token record summed over the processes (each holds the tokens of its own micro-batches)."""
    weight_sum, seen = torch.from_numpy(online.weight_sum), torch.from_numpy(online.seen)
    if world > 1:
        weight_sum = distributed.sum_tensor(weight_sum.to(device)).cpu()
        seen = distributed.sum_tensor(seen.to(device)).cpu()
    return {"weight_sum": weight_sum.clone(), "seen": seen.clone()}


def load_online(name: str, params: dict[str, Any] | None, tokens: str | os.PathLike, tmeta: dict[str, Any],
                table: TokenTable, arrays: dict[str, str | os.PathLike | None]) -> Online:
    """An online method ready to train: parameters checked (:func:`tokenclean.online.resolve`), and the
    per-token arrays it needs (``arrays``: name -> path, e.g. ``ref_loss``) loaded as loss arrays made on
    ``tokens`` (``table``; finite on every response token). One-line errors name the flag or the file."""
    from tokenclean.online import ONLINE_METHODS, require_arrays, resolve

    resolved = resolve(name, params)
    require_arrays(name, arrays)
    loaded = {}
    for key in ONLINE_METHODS[name].arrays:
        values, _ = load_array(arrays[key], "loss", made_on=(tokens, tmeta, table))  # finite on every response token
        loaded[key] = values.astype(np.float32, copy=False)
    return Online(name, resolved, loaded)


def weights_meta(online: Online, tokens: str | os.PathLike, tmeta: dict[str, Any],
                 arrays: dict[str, str | os.PathLike | None]) -> dict[str, Any]:
    """The sidecar of an online run's per-token record (``<out>/weights.npy``)."""
    seen = online.seen if online.seen is not None else np.zeros(0)
    return {"kind": "weights", "method": online.name, "params": online.params,
            "normaliser": online.method.normaliser, "tokens": str(tokens), "tokens_fingerprint": tmeta["fingerprint"],
            "inputs": {k: str(arrays[k]) for k in online.method.arrays},
            "tokens_trained": int(np.count_nonzero(seen)), "max_passes": int(seen.max()) if len(seen) else 0,
            "value": "the weight each token received, averaged over the times it was trained; NaN: never trained"}


def train_file(model_name: str, tokens: str | os.PathLike, out: str | os.PathLike, cfg: TrainConfig,
               mask_path: str | os.PathLike | None = None, trust_remote_code: bool = False,
               revision: str | None = None, online: str | None = None,
               online_params: dict[str, Any] | None = None,
               arrays: dict[str, str | os.PathLike | None] | None = None) -> dict[str, Any]:
    """CLI entry: fine-tune ``model_name`` on a token table (optionally restricted by a mask); save an HF dir.
    ``revision`` pins a hub model; the commit loaded is recorded either way. ``online``: an online method
    (:mod:`tokenclean.online`) with ``online_params`` and its per-token ``arrays`` (name -> path); its record
    of what each token received is saved as ``<out>/weights.npy`` (kind ``weights``, see :func:`weights_meta`)."""
    from tokenclean.artifacts import atomic_dir
    from tokenclean.models import (
        hub_commit,
        load_model,
        model_fingerprint,
        pick_device,
        require_ids_fit,
        write_model_dir,
    )
    from tokenclean.tokenization import load_tokenizer, require_tokenizer_of

    table, tmeta = TokenTable.load(tokens)
    mask, mmeta = ((table.loss_mask.copy(), {}) if mask_path is None
                   else load_array(mask_path, "mask", made_on=(tokens, tmeta, table)))
    if not mask.any():
        raise ValueError(f"{mask_path}: selects no token at all; nothing to train on")
    arrays = arrays or {}
    method = load_online(online, online_params, tokens, tmeta, table, arrays) if online else None
    cfg = resolve_normalization(cfg, method)  # recorded as trained
    commit = hub_commit(model_name, revision)
    tokenizer = load_tokenizer(model_name, trust_remote_code, commit)
    require_tokenizer_of(tokens, tmeta, tokenizer, model_name)
    distributed.check_sharding(cfg.lora_r)  # before the model loads
    if cfg.lora_r > 0:  # a target that matches no layer: one line before the weights load
        from tokenclean import lora
        from tokenclean.models import empty_model

        lora.plan(empty_model(model_name, trust_remote_code, commit), cfg.lora_targets, cfg.lora_r)
    device = distributed.local_device(pick_device(cfg.device))
    model = load_model(model_name, device, cfg.dtype, trust_remote_code, commit)
    require_ids_fit(model, model_name, table.input_ids, tokens)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    resume_dir = Path(f"{out}.resume")  # survives a killed job (not an output of the rule)
    start = model_fingerprint(model_name, commit)
    if distributed.rank_and_size()[0] != 0:  # the other processes train their share; process 0 saves
        _, summary = train_model(model, table, mask, cfg, pad_id, checkpoint_dir=resume_dir / "checkpoint",
                                 start_fingerprint=start, merge=False, online=method)
        distributed.barrier()
        return summary

    def load_start() -> Any:  # the starting weights again, in float32 on the CPU, for the LoRA merge
        return load_model(model_name, torch.device("cpu"), "float32", trust_remote_code, commit)

    with atomic_dir(out) as tmp:
        log_path = resume_dir / "train_log.jsonl" if cfg.checkpoint_every else Path(tmp) / "train_log.jsonl"
        if cfg.checkpoint_every:
            resume_dir.mkdir(parents=True, exist_ok=True)
        model, summary = train_model(model, table, mask, cfg, pad_id, log_path=log_path,
                                     checkpoint_dir=resume_dir / "checkpoint", start_fingerprint=start,
                                     load_start=load_start, online=method)
        if method is not None:
            save_array(Path(tmp) / "weights.npy", method.token_weights(), weights_meta(method, tokens, tmeta, arrays))
        if cfg.checkpoint_every:
            shutil.copy(log_path, Path(tmp) / "train_log.jsonl")
        write_model_dir(model, tokenizer, tmp, {
            "kind": "model", "base_model": str(model_name), "base_model_revision": revision or None,
            "base_model_commit": commit, "base_model_fingerprint": start,
            "saved_dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "tokens": str(tokens), "tokens_fingerprint": tmeta["fingerprint"],
            "mask": str(mask_path) if mask_path else None, "mask_meta": mmeta,
            "train_config": dataclasses.asdict(cfg), **summary})
    shutil.rmtree(resume_dir, ignore_errors=True)  # the model is saved: nothing left to resume
    distributed.barrier()
    return summary
