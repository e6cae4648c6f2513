rule evaluate:
    """lm-eval: the world's held-out tasks (embedded; local YAML, no downloads) or the configured benchmarks."""
    input:
        unpack(eval_inputs),
    output:
        json=f"{R}/eval/{{run}}.json",
        samples=f"{R}/eval/{{run}}.samples.jsonl",  # per-example scores (the report's paired bootstrap)
    params:
        tc=launch,
        model=lambda w: at(w, model_dir(w.run)),
        revision=lambda w: revision_flag(w.run),
        args=eval_args(),
        limit=lambda w: f"--limit {config['evaluation']['limit']}" if config["evaluation"].get("limit") else "",
        device=lookup(dpath="evaluation/device", within=config),
    threads: THREADS
    resources:
        gpu=ONE_GPU,
    log:
        f"{R}/logs/evaluate/{{run}}.log",
    benchmark:
        f"{R}/benchmarks/evaluate/{{run}}.tsv"
    conda:
        "../envs/tokenclean.yaml"
    shell:
        "{params.tc} evaluate --threads {threads} --model {params.model} {params.revision} {params.args}"
        " --device {params.device} {params.limit} --out {output.json} > {log} 2>&1"
