"""The hyperparameters of one training run: the ``tokenclean train`` flags and the trainer's settings.

Apart from :mod:`tokenclean.training` so that building the command line (every job's first step) does not import
torch: the light jobs (select, report, ...) then start in a fraction of a second.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from tokenclean import lora

# How a LoRA adapter is merged and saved: float32 (the official runs' merge script loads the base in float32,
# merges and saves float32), or auto = the training dtype. float32 is the default because LoRA updates at the
# paper's learning rate are often smaller than half a bf16 step of the weight they are added to: merged into
# bf16 weights they are partly rounded away, and again in every self-evolving round. It doubles the disk size
# of a saved model (bf16 -> fp32); later jobs load it in their own dtype as before.
MERGE_DTYPES = ("float32", "auto")
LOSS_NORMALIZATIONS = ("auto", "step", "micro_batch")


@dataclass
class TrainConfig:
    """Hyperparameters of one SFT run; every field is also a ``tokenclean train`` flag."""

    steps: int = 100                       # optimizer steps (equal across rows of a table); 0 = use epochs
    epochs: float = 0.0                    # used when steps == 0: steps = ceil(epochs * samples / batch_size)
    batch_size: int = 32                   # samples per optimizer step
    micro_batch_size: int = 0              # samples per forward pass (gradient accumulation); 0 = batch_size
    pack_length: int = 0                   # > 0: pack samples into rows of this many tokens; 0 = pad each sample
    # step: mean over the step's selected tokens (the Trainer since transformers 4.46, TRL, LLaMA-Factory);
    # micro_batch: each micro-batch's mean (open-instruct, the paper's runs); auto: an online method's reference
    # rule (tokenclean.online, OnlineMethod.loss_normalization), step otherwise
    loss_normalization: str = field(default="auto", metadata={"help": "step, micro_batch or auto (default: an "
                                    "online method's reference rule, step otherwise)"})
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
    lora_targets: str = field(default="", metadata={"help": "comma-separated module names, or all-linear "
                              "(default: peft's targets for the model's family; tokenclean/lora.py)"})
    merge_dtype: str = "float32"           # LoRA: merge and save in float32 (as the official runs); auto = dtype
    device: str = "auto"
    dtype: str = "auto"
    log_every: int = 10

    def __post_init__(self) -> None:
        """Refuse, naming the field, any value no run can mean (a NaN learning rate trains to NaN weights without
        an error; a negative one ascends the loss)."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            kind = {"int": int, "float": (int, float), "bool": bool, "str": str}[str(f.type)]
            if not isinstance(value, kind) or (str(f.type) != "bool" and isinstance(value, bool)):
                raise ValueError(f"{f.name} must be {KIND_WORDS[str(f.type)]}, got {value!r}")
        if (self.steps < 0 or not math.isfinite(self.epochs) or self.epochs < 0
                or (self.steps == 0 and self.epochs == 0)):
            raise ValueError(f"set steps > 0, or steps = 0 and epochs > 0 (got steps {self.steps}, epochs "
                             f"{self.epochs})")
        if self.loss_normalization not in LOSS_NORMALIZATIONS:
            raise ValueError(f"unknown loss_normalization {self.loss_normalization!r} "
                             f"({', '.join(LOSS_NORMALIZATIONS)})")
        if lora.problem(self.lora_targets):
            raise ValueError(f"lora_targets: {lora.problem(self.lora_targets)}")
        if self.schedule not in ("cosine", "linear", "constant"):
            raise ValueError(f"unknown schedule {self.schedule!r} (cosine, linear, constant)")
        if self.merge_dtype not in MERGE_DTYPES:
            raise ValueError(f"unknown merge_dtype {self.merge_dtype!r} ({', '.join(MERGE_DTYPES)})")
        for name, low, what in (("batch_size", 1, "1"), ("log_every", 1, "1"), ("micro_batch_size", 0, "0"),
                                ("pack_length", 0, "0 (0 = no packing)"), ("seed", 0, "0"), ("lora_r", 0, "0"),
                                ("checkpoint_every", 0, "0 (0 = no checkpoints)")):
            if getattr(self, name) < low:
                raise ValueError(f"{name} must be at least {what}, got {getattr(self, name)}")
        for name, low, high, what in (("lr", 0, None, "a finite number above 0"),
                                      ("adam_epsilon", 0, None, "a finite number above 0"),
                                      ("lora_alpha", 0, None, "a finite number above 0"),
                                      ("weight_decay", None, None, "a finite number of at least 0"),
                                      ("max_grad_norm", None, None, "a finite number of at least 0 (0 = no clipping)"),
                                      ("warmup_ratio", None, 1, "in [0, 1)"), ("adam_beta1", None, 1, "in [0, 1)"),
                                      ("adam_beta2", None, 1, "in [0, 1)"), ("lora_dropout", None, 1, "in [0, 1)")):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0 and (low is None or value > low)
                    and (high is None or value < high)):
                raise ValueError(f"{name} must be {what}, got {value}")
        if self.lr * self.weight_decay >= 1:  # AdamW scales every weight by 1 - lr * weight_decay each step
            raise ValueError(f"weight_decay x lr must be below 1 (AdamW multiplies the weights by 1 - lr x "
                             f"weight_decay every step), got weight_decay {self.weight_decay:g} at lr {self.lr:g}")


KIND_WORDS = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "text"}
