rule pretrain_base:
    """Train the tokenizer and pretrain the tiny base model on the world's corpus (embedded experiments)."""
    input:
        f"{R}/world",
    output:
        directory(f"{R}/models/base"),
    params:
        tc=launch,
        model=as_json(config["base_model"].get("pretrain", {}).get("model", {})),
        train=lambda w: train_flags(replicates.seeded_train(config["base_model"].get("pretrain", {}),
                                                           replicates.index(w.rep))),
    threads: SERIAL_THREADS
    log:
        f"{R}/logs/pretrain_base.log",
    benchmark:
        f"{R}/benchmarks/pretrain_base.tsv"
    conda:
        "../envs/tokenclean.yaml"
    shell:
        "{params.tc} pretrain --threads {threads} --corpus {input}/corpus.jsonl --model-params {params.model}"
        " {params.train} --out {output} > {log} 2>&1"


rule tokenize:
    """JSON lines -> flat token table with loss_mask (and ground-truth token classes in the embedded world)."""
    input:
        data=DATA_DIR,
        tokenizer=model_input("base"),
    output:
        f"{R}/tokens/{{dataset}}.tokens.npz",
    params:
        tc=launch,
        tokenizer=base_ref,
        revision=revision_flag(),
        trust=TRUST,
        max_length=lookup(dpath="max_length", within=config),
        chat=CHAT_FLAG,
    wildcard_constraints:
        dataset="warmup|pool",
    priority: UNBLOCKING
    log:
        f"{R}/logs/tokenize/{{dataset}}.log",
    benchmark:
        f"{R}/benchmarks/tokenize/{{dataset}}.tsv",
    conda:
        "../envs/tokenclean.yaml"
    shell:
        "{params.tc} tokenize --data {input.data}/{wildcards.dataset}.jsonl --tokenizer {params.tokenizer} {params.revision}"
        " {params.trust} {params.chat} --max-length {params.max_length} --out {output} > {log} 2>&1"


rule concat_tokens:
    """The pool and the warm-up set in one token table, for the full+warmup row."""
    input:
        pool=POOL_TOKENS,
        warmup=f"{R}/tokens/warmup.tokens.npz",
    output:
        f"{R}/tokens/pool+warmup.tokens.npz",
    params:
        tc=launch,
    priority: UNBLOCKING
    log:
        f"{R}/logs/tokenize/pool+warmup.log",
    benchmark:
        f"{R}/benchmarks/tokenize/pool+warmup.tsv",
    conda:
        "../envs/tokenclean.yaml"
    shell:
        "{params.tc} concat --tokens {input.pool} {input.warmup} --out {output} > {log} 2>&1"


rule warmup:
    """Full-token SFT of the base model on the clean warm-up set: the reference model (and the warm-up row)."""
    input:
        model=model_input("base"),
        tokens=f"{R}/tokens/warmup.tokens.npz",
    output:
        directory(f"{R}/models/warmup"),
    params:
        tc=launch_training,
        model=base_ref,
        revision=revision_flag(),
        trust=TRUST,
        train=lambda w: train_flags(replicates.seeded_train(config.get("warmup", {}), replicates.index(w.rep))),
    threads: THREADS
    resources:
        gpu=TRAIN_GPUS,
    priority: UNBLOCKING
    log:
        f"{R}/logs/warmup.log",
    benchmark:
        f"{R}/benchmarks/warmup.tsv"
    conda:
        "../envs/tokenclean.yaml"
    shell:
        "{params.tc} train --threads {threads} --model {params.model} {params.revision} {params.trust} --tokens {input.tokens}"
        " {params.train} --out {output} > {log} 2>&1"
