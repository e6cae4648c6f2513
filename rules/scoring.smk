rule token_loss:
    """Per-token losses of one model on one token table. Depends only on (model, data, tokenizer): changing a
    ratio, a method or a seed never re-runs it."""
    input:
        model=lambda w: model_input(w.model),
        tokens=f"{R}/tokens/{{dataset}}.tokens.npz",
    output:
        f"{R}/losses/{{model}}/{{dataset}}.loss.npy",
    params:
        model=lambda w: model_ref(w.model),
        revision=lambda w: revision_flag(w.model),
        budget=config.get("scoring", {}).get("token_budget", 16384),
        device=config.get("scoring", {}).get("device", "auto"),
        dtype=config.get("scoring", {}).get("dtype", "auto"),
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
        "{GPU_TC} loss --threads {threads} --model {params.model} {params.revision} {TRUST} --tokens {input.tokens} --token-budget {params.budget}"
        " --device {params.device} --dtype {params.dtype} --out {output} > {log} 2>&1"
