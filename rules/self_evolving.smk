# The self-evolving chain, rule self_evolve (the paper's Self-Evolving Cleaning): the pool is cut into ROUNDS contiguous chunks;
# round t scores chunk t with the base model and model t-1 (the warm-up model for t = 1), keeps the chunk's global
# top fraction and trains model t-1 further on it. Each round makes the sft epochs over its chunk (with `steps`
# instead, the rounds share them) and restarts the learning-rate schedule (and, with LoRA, gets a fresh adapter on
# the merged model). A row `self_evolving_r<ratio>_s<seed>` is the last model of its chain; every round is
# evaluated (rounds.csv).


rule chunk_tokens:
    """Chunk `index` of `chunks` of the pool's token table (samples in file order)."""
    input:
        POOL_TOKENS,
    output:
        f"{R}/tokens/pool.c{{index}}of{{chunks}}.tokens.npz",
    params:
        tc=launch,
    priority: UNBLOCKING
    log:
        f"{R}/logs/tokenize/pool.c{{index}}of{{chunks}}.log",
    benchmark:
        f"{R}/benchmarks/tokenize/pool.c{{index}}of{{chunks}}.tsv"
    conda:
        "../envs/tokenclean.yaml"
    shell:
        "{params.tc} chunk --tokens {input} --chunks {wildcards.chunks} --index {wildcards.index} --out {output} > {log} 2>&1"


# Where the configured rows read a model's losses on the whole pool anyway (POOL_LOSSES: base and warm-up for rho
# and fixed), the chain cuts that model's losses on a chunk from them instead of scoring the chunk again.
if POOL_LOSSES:

    ruleorder: chunk_loss > token_loss

    rule chunk_loss:
        """Chunk `index` of `chunks` of a model's losses on the whole pool, as losses on that chunk."""
        input:
            tokens=POOL_TOKENS,
            loss=f"{R}/losses/{{model}}/pool.loss.npy",
        output:
            f"{R}/losses/{{model}}/pool.c{{index}}of{{chunks}}.loss.npy",
        params:
            tc=launch,
        wildcard_constraints:
            model="|".join(POOL_LOSSES),
        priority: UNBLOCKING
        log:
            f"{R}/logs/token_loss/{{model}}.pool.c{{index}}of{{chunks}}.log",
        benchmark:
            f"{R}/benchmarks/token_loss/{{model}}.pool.c{{index}}of{{chunks}}.tsv"
        conda:
            "../envs/tokenclean.yaml"
        shell:
            "{params.tc} chunk --tokens {input.tokens} --loss {input.loss} --chunks {wildcards.chunks} --index {wildcards.index}"
            " --out {output} > {log} 2>&1"

rule select_round:
    """Round t's mask: the global top fraction of chunk t by loss(base) - loss(model t-1)."""
    input:
        tokens=lambda w: chunk_tokens_path(w.t),
        base_loss=lambda w: f"{R}/losses/base/{chunk_name(w.t)}.loss.npy",
        ref_loss=lambda w: f"{R}/losses/{previous_model(w.row, w.t)}/{chunk_name(w.t)}.loss.npy",
    output:
        f"{R}/masks/rounds/{{row}}_t{{t}}.mask.npy",
    params:
        tc=launch,
        ratio=lambda w: parse_run(w.row)[1],
    wildcard_constraints:
        row="self_evolving_r[0-9.]+_s[0-9]+",
        t="[0-9]+",
    priority: UNBLOCKING
    log:
        f"{R}/logs/select/rounds/{{row}}_t{{t}}.log",
    benchmark:
        f"{R}/benchmarks/select/rounds/{{row}}_t{{t}}.tsv"
    conda:
        "../envs/tokenclean.yaml"
    shell:
        "{params.tc} select --method fixed --ratio {params.ratio} --tokens {input.tokens} --base-loss {input.base_loss}"
        " --ref-loss {input.ref_loss} --out {output} > {log} 2>&1"


rule self_evolve:
    """Round t's model: model t-1 trained further on chunk t's selected tokens."""
    input:
        model=lambda w: f"{R}/models/{previous_model(w.row, w.t)}",
        tokens=lambda w: chunk_tokens_path(w.t),
        mask=f"{R}/masks/rounds/{{row}}_t{{t}}.mask.npy",
    output:
        directory(f"{R}/models/rounds/{{row}}_t{{t}}"),
    params:
        tc=launch_training,
        train=round_flags,
    wildcard_constraints:
        row="self_evolving_r[0-9.]+_s[0-9]+",
        t="[0-9]+",
    threads: THREADS
    resources:
        gpu=TRAIN_GPUS,
    priority: UNBLOCKING
    log:
        f"{R}/logs/sft/rounds/{{row}}_t{{t}}.log",
    benchmark:
        f"{R}/benchmarks/sft/rounds/{{row}}_t{{t}}.tsv"
    conda:
        "../envs/tokenclean.yaml"
    shell:
        "{params.tc} train --threads {threads} --model {input.model} --tokens {input.tokens} --mask {input.mask}"
        " {params.train} --out {output} > {log} 2>&1"


rule rounds_report:
    """The self-evolving curve: average score and passes per round (round 0 = the warm-up model), over seeds."""
    input:
        evals=chain_evals(),
        models=chain_models(),
    output:
        f"{R}/rounds.csv",
    params:
        tc=launch,
        rounds=ROUNDS,
        metric=METRIC,
    log:
        f"{R}/logs/rounds.log",
    benchmark:
        f"{R}/benchmarks/rounds.tsv"
    conda:
        "../envs/tokenclean.yaml"
    shell:
        "{params.tc} rounds {input.evals} --models {input.models} --rounds {params.rounds} --metric {params.metric}"
        " --out {output} "
        "> {log} 2>&1"
