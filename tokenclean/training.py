"""Masked supervised fine-tuning: one trainer for every row of the table (and for pretraining the tiny base).

Loss normalisation: the mean NLL over the *selected* tokens of the whole optimizer step (all micro-batches),
so a micro-batch with few kept tokens is not over-weighted relative to one with many. ``micro_batch`` gives
the Hugging Face Trainer's rule instead (each micro-batch's own mean, averaged over the step's micro-batches
on every GPU), under which a token of a sparsely kept micro-batch weighs more: the rule the paper's runs used.
Micro-batches are global (:func:`micro_batches`), so either rule gives the same update on any GPU count. Samples without
any selected token are dropped before batching (they would cost compute and contribute nothing).

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
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from tqdm import tqdm

from tokenclean import distributed
from tokenclean.artifacts import ArtifactError, TokenTable, load_array
from tokenclean.batching import collate, pack
from tokenclean.loss import target_nll
from tokenclean.train_config import MERGE_DTYPES, TrainConfig  # noqa: F401  (re-exported)

log = logging.getLogger(__name__)

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


def _wrap_lora(model: Any, cfg: TrainConfig) -> Any:
    from peft import LoraConfig, get_peft_model

    targets = [t for t in cfg.lora_targets.split(",") if t]
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    targets = [t for t in targets if t in present]
    if not targets:
        raise ValueError(f"none of the LoRA targets {cfg.lora_targets!r} exist in this model")
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=targets, task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


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


def check_packing(model: Any, table: TokenTable, samples: np.ndarray, mask: np.ndarray, width: int,
                  pad_id: int) -> None:
    """Fail unless packed rows give every token the loss it has on its own (the model isolates samples).

    Packing relies on the model building a block-diagonal causal mask from restarting ``position_ids``; a model
    that ignores them would let samples attend to each other and train on the wrong context, silently.
    """
    device = next(model.parameters()).device
    with torch.no_grad():
        packed = pack(table, samples, width, pad_id, mask=mask, device=device)
        packed_nll = target_nll(model, packed["input_ids"], None, packed["target"],
                                position_ids=packed["position_ids"])
        padded = collate(table, samples, pad_id, mask=mask, device=device)
        padded_nll = target_nll(model, padded["input_ids"], padded["attention_mask"], padded["target"])
    packed_index = packed["index"][packed["target"].cpu()].numpy()
    padded_index = np.concatenate([np.flatnonzero(mask[table.offsets[s]:table.offsets[s + 1]]) + table.offsets[s]
                                   for s in samples])
    by_index = dict(zip(packed_index.tolist(), packed_nll.float().cpu().numpy().tolist()))
    gap = float(np.max(np.abs(np.array([by_index[i] for i in padded_index.tolist()])
                              - padded_nll.float().cpu().numpy())))
    tolerance = 1e-3 if next(model.parameters()).dtype == torch.float32 else 0.1
    if gap > tolerance:
        raise ValueError(f"{type(model).__name__} does not keep packed samples apart (a token's loss changes by "
                         f"{gap:.3g} when packed); set pack_length: 0")


class TrainingInterrupted(RuntimeError):
    """Raised when ``stop_after`` ends a run early (the checkpoint, if any, lets a re-run continue)."""


def _run_identity(table: TokenTable, mask: np.ndarray, cfg: TrainConfig, start: str) -> str:
    """What a checkpoint must match to be resumed: the starting model, the data, the selection and every
    setting but the schedule of checkpoints itself."""
    from tokenclean.artifacts import fingerprint_arrays

    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("checkpoint_every", "log_every")}
    settings["start"] = start
    return fingerprint_arrays(table.input_ids, table.offsets, mask,
                              np.frombuffer(json.dumps(settings, sort_keys=True).encode(), dtype=np.uint8))


def save_checkpoint(directory: Path, model: Any, optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter],
                    state: dict[str, Any]) -> None:
    """Trainable weights, AdamW moments and the torch RNG state as safetensors; counters as JSON; atomically."""
    from safetensors.torch import save_file

    from tokenclean.artifacts import atomic_dir

    weights = {name: p.detach().cpu().contiguous() for name, p in model.named_parameters() if p.requires_grad}
    moments: dict[str, torch.Tensor] = {"rng": torch.get_rng_state()}
    for i, p in enumerate(params):
        for key, value in optimizer.state.get(p, {}).items():
            moments[f"{i}.{key}"] = value.detach().cpu().reshape(-1).clone() if value.dim() == 0 else value.detach().cpu().contiguous()
    with atomic_dir(directory) as tmp:
        save_file(weights, str(tmp / "weights.safetensors"))
        save_file(moments, str(tmp / "optimizer.safetensors"))
        (tmp / "state.json").write_text(json.dumps(state, sort_keys=True))


def load_checkpoint(directory: Path, model: Any, optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter],
                    identity: str) -> dict[str, Any] | None:
    """Restore a checkpoint of this very run into ``model`` and ``optimizer``; None if there is none (or it is
    from another run, which is then left alone and overwritten by this run's first checkpoint)."""
    from safetensors.torch import load_file

    state_file = directory / "state.json"
    if not state_file.exists():
        return None
    state = json.loads(state_file.read_text())
    if state.get("identity") != identity:
        log.warning("%s holds a checkpoint of another run (other data, mask or settings); starting over", directory)
        return None
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
    log.info("resuming from %s at step %d", directory, state["step"])
    return state


def train_model(model: Any, table: TokenTable, mask: np.ndarray, cfg: TrainConfig, pad_id: int,
                log_path: str | os.PathLike | None = None, progress: bool = True,
                checkpoint_dir: str | os.PathLike | None = None, stop_after: int | None = None,
                start_fingerprint: str = "", load_start: Callable[[], Any] | None = None,
                merge: bool = True) -> tuple[Any, dict[str, Any]]:
    """Train ``model`` in place on the selected tokens; returns the (merged) model and a summary.

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
    torch.manual_seed(cfg.seed)
    device = next(model.parameters()).device
    rank, world = distributed.setup(device)
    per_sample = np.add.reduceat(mask.astype(np.int64), table.offsets[:-1])
    usable = np.flatnonzero(per_sample > 0)
    if len(usable) == 0:
        raise ValueError("the mask selects no token at all; nothing to train on")
    schedule = step_schedule(len(usable), cfg)
    total_steps = len(schedule)
    warmup = math.ceil(cfg.warmup_ratio * total_steps)
    if cfg.lora_r > 0:
        model = _wrap_lora(model, cfg)
    if cfg.gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
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
    identity = _run_identity(table, mask, cfg, start_fingerprint)
    resumed = load_checkpoint(checkpoints, model, optimizer, params, identity) if checkpoints else None
    first_step = resumed["step"] if resumed else 0
    seen_tokens, trained_tokens = (resumed["seen_tokens"], resumed["trained_tokens"]) if resumed else (0, 0)
    last_loss = resumed["loss"] if resumed else float("nan")
    if rank != 0:  # one process logs and checkpoints
        log_path, checkpoints, progress = None, None, False
    if resumed and log_path and Path(log_path).exists():  # forget the steps done after the checkpoint
        kept = [line for line in Path(log_path).read_text().splitlines()
                if line.strip() and json.loads(line)["step"] <= first_step]
        Path(log_path).write_text("".join(line + "\n" for line in kept))
    log_file = open(log_path, "a" if resumed else "w") if log_path else None
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
            n_micro = len(chunks)  # of the whole step, every process
            for group in optimizer.param_groups:
                group["lr"] = cfg.lr * lr_factor(step, total_steps, warmup, cfg.schedule)
            optimizer.zero_grad(set_to_none=True)
            step_loss, step_tokens = 0.0, 0
            for index in range(rank, n_micro, world):  # this process's share: micro-batches r, r+W, ...
                chunk = chunks[index]
                if cfg.pack_length:
                    if step == 0 and index == rank:
                        check_packing(model, table, chunk, mask, cfg.pack_length, pad_id)
                    batch = pack(table, chunk, cfg.pack_length, pad_id, mask=mask, device=device)
                    nll = target_nll(model, batch["input_ids"], None, batch["target"],
                                     position_ids=batch["position_ids"])
                else:
                    batch = collate(table, chunk, pad_id, mask=mask, device=device)
                    nll = target_nll(model, batch["input_ids"], batch["attention_mask"], batch["target"])
                if cfg.loss_normalization == "step":
                    loss = nll.sum() / n_selected  # the step's mean over its selected tokens
                else:
                    loss = nll.mean() / n_micro  # each micro-batch's mean, averaged over the step's
                loss.backward()
                step_loss += float(loss.detach())
                step_tokens += int(table.lengths[chunk].sum())
            if world > 1:
                distributed.sum_gradients(params)
                step_loss, step_tokens = distributed.sum_values(step_loss, step_tokens, device=device)
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
                log_file.write(json.dumps({"step": step + 1, "loss": round(step_loss, 6),
                                           "lr": optimizer.param_groups[0]["lr"], "selected_tokens": n_selected,
                                           "tokens_per_s": round(tokens_per_s, 1)}) + "\n")
                log_file.flush()
            if checkpoints and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < total_steps:
                save_checkpoint(checkpoints, model, optimizer, params, {
                    "identity": identity, "step": step + 1, "seen_tokens": seen_tokens,
                    "trained_tokens": trained_tokens, "loss": last_loss})
    finally:
        bar.close()
        if log_file:
            log_file.close()
    if not math.isfinite(last_loss):
        raise FloatingPointError("training loss is not finite; lower the learning rate")
    if cfg.lora_r > 0 and merge:
        model = merge_adapter(model, cfg.merge_dtype, load_start)
    model.eval()
    summary = {"steps": total_steps, "samples_used": int(len(usable)),
               "samples_without_selected_tokens": int(table.n_samples - len(usable)),
               "selected_tokens_trained": trained_tokens, "tokens_processed": seen_tokens,
               "final_loss": last_loss, "seconds": round(time.perf_counter() - started, 2)}
    return model, summary


def train_file(model_name: str, tokens: str | os.PathLike, out: str | os.PathLike, cfg: TrainConfig,
               mask_path: str | os.PathLike | None = None, trust_remote_code: bool = False,
               revision: str | None = None) -> dict[str, Any]:
    """CLI entry: fine-tune ``model_name`` on a token table (optionally restricted by a mask); save an HF dir.
    ``revision`` pins a hub model; the commit loaded is recorded either way."""
    from tokenclean.artifacts import atomic_dir
    from tokenclean.models import hub_commit, load_model, model_fingerprint, pick_device, write_model_dir
    from tokenclean.tokenization import load_tokenizer, tokenizer_fingerprint

    table, tmeta = TokenTable.load(tokens)
    mask, mmeta = ((table.loss_mask.copy(), {}) if mask_path is None
                   else load_array(mask_path, "mask", made_on=(tokens, tmeta)))
    commit = hub_commit(model_name, revision)
    tokenizer = load_tokenizer(model_name, trust_remote_code, commit)
    if tokenizer_fingerprint(tokenizer) != tmeta.get("tokenizer_fingerprint"):
        raise ArtifactError(f"{tokens}: tokenized with a different tokenizer than that of {model_name!r}")
    device = distributed.local_device(pick_device(cfg.device))
    model = load_model(model_name, device, cfg.dtype, trust_remote_code, commit)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    resume_dir = Path(f"{out}.resume")  # survives a killed job (not an output of the rule)
    start = model_fingerprint(model_name, commit)
    if distributed.rank_and_size()[0] != 0:  # the other processes train their share; process 0 saves
        _, summary = train_model(model, table, mask, cfg, pad_id, checkpoint_dir=resume_dir / "checkpoint",
                                 start_fingerprint=start, merge=False)
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
                                     load_start=load_start)
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
