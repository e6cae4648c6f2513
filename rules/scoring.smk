rule token_loss:
    """Per-token losses of one model on one token table. Depends only on (model, data, tokenizer): changing a
    ratio, a method or a seed never re-runs it."""
    input:
        model=lambda w: model_input(w.model),
        tokens=f"{R}/tokens/{{dataset}}.tokens.npz",
    output:
        f"{R}/losses/{{model}}/{{dataset}}.loss.npy",
    params:
        tc=launch,
        model=lambda w: at(w, model_ref(w.model)),
        revision=lambda w: revision_flag(w.model),
        trust=TRUST,
        budget=lookup(dpath="scoring/token_budget", within=config),
        device=lookup(dpath="scoring/device", within=config),
        dtype=lookup(dpath="scoring/dtype", within=config),
    threads: THREADS
    resources:
        gpu=ONE_GPU,
    priority: UNBLOCKING
    log:
        f"{R}/logs/token_loss/{{model}}.{{dataset}}.log",
    benchmark:
        f"{R}/benchmarks/token_loss/{{model}}.{{dataset}}.tsv"
    conda:
        "../envs/tokenclean.yaml"
    shell:
        "{params.tc} loss --threads {threads} --model {params.model} {params.revision} {params.trust} --tokens {input.tokens} --token-budget {params.budget}"
        " --device {params.device} --dtype {params.dtype} --out {output} > {log} 2>&1"
