"""The hyperparameters of one training run: the ``tokenclean train`` flags and the trainer's settings.

Apart from :mod:`tokenclean.training` so that building the command line (every job's first step) does not import
torch: the light jobs (select, report, ...) then start in a fraction of a second.
"""
from __future__ import annotations

from dataclasses import dataclass

# How a LoRA adapter is merged and saved: float32 (the official runs' merge script loads the base in float32,
# merges and saves float32), or auto = the training dtype. float32 is the default because LoRA updates at the
# paper's learning rate are often smaller than half a bf16 step of the weight they are added to: merged into
# bf16 weights they are partly rounded away, and again in every self-evolving round. It doubles the disk size
# of a saved model (bf16 -> fp32); later jobs load it in their own dtype as before.
MERGE_DTYPES = ("float32", "auto")


@dataclass
class TrainConfig:
    """Hyperparameters of one SFT run; every field is also a ``tokenclean train`` flag."""

    steps: int = 100                       # optimizer steps (equal across rows of a table); 0 = use epochs
    epochs: float = 0.0                    # used when steps == 0: steps = ceil(epochs * samples / batch_size)
    batch_size: int = 32                   # samples per optimizer step
    micro_batch_size: int = 0              # samples per forward pass (gradient accumulation); 0 = batch_size
    pack_length: int = 0                   # > 0: pack samples into rows of this many tokens; 0 = pad each sample
    loss_normalization: str = "step"       # step: mean over the step's selected tokens; micro_batch: as HF Trainer
    gradient_checkpointing: bool = False   # recompute activations in the backward pass (less memory, ~30% slower)
    checkpoint_every: int = 0              # > 0: save a resumable checkpoint every this many steps
    lr: float = 1e-3
    schedule: str = "cosine"               # cosine | linear | constant
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    adam_beta1: float = 0.9                # AdamW betas and epsilon: torch's defaults, as the paper's runs
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0             # 0 = no clipping (the paper's setting)
    seed: int = 0
    shuffle: bool = True                   # False = file order, as the paper's runs
    lora_r: int = 0                        # 0 = full fine-tuning
    lora_alpha: float = 16.0
    lora_dropout: float = 0.1
    lora_targets: str = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    merge_dtype: str = "float32"           # LoRA: merge and save in float32 (as the official runs); auto = dtype
    device: str = "auto"
    dtype: str = "auto"
    log_every: int = 10

    def __post_init__(self) -> None:
        if self.steps < 0 or self.epochs < 0 or (self.steps == 0 and self.epochs == 0):
            raise ValueError("set steps > 0, or steps = 0 and epochs > 0")
        if self.loss_normalization not in ("step", "micro_batch"):
            raise ValueError(f"unknown loss_normalization {self.loss_normalization!r} (step, micro_batch)")
        if self.checkpoint_every < 0:
            raise ValueError("checkpoint_every must be >= 0 (0 = no checkpoints)")
        if self.pack_length < 0:
            raise ValueError("pack_length must be >= 0 (0 = no packing)")
        if self.batch_size < 1 or self.micro_batch_size < 0:
            raise ValueError("batch_size must be >= 1 and micro_batch_size >= 0")
        if self.schedule not in ("cosine", "linear", "constant"):
            raise ValueError(f"unknown schedule {self.schedule!r} (cosine, linear, constant)")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError("warmup_ratio must be in [0, 1)")
        if not (0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1) or self.adam_epsilon <= 0:
            raise ValueError("adam_beta1 and adam_beta2 must be in [0, 1) and adam_epsilon > 0")
        if self.merge_dtype not in MERGE_DTYPES:
            raise ValueError(f"unknown merge_dtype {self.merge_dtype!r} ({', '.join(MERGE_DTYPES)})")
