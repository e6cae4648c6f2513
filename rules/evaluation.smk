rule evaluate:
    """lm-eval on the world's held-out tasks (local YAML tasks, no downloads)."""
    input:
        model=lambda w: model_dir(w.run),
        world=f"{R}/world",
    output:
        f"{R}/eval/{{run}}.json",
    params:
        limit=lambda w: f"--limit {config['evaluation']['limit']}" if config["evaluation"].get("limit") else "",
        device=config["evaluation"].get("device", "cpu"),
    threads: THREADS
    log:
        f"{R}/logs/evaluate/{{run}}.log",
    benchmark:
        f"{R}/benchmarks/evaluate/{{run}}.tsv"
    conda:
        "../envs/tokenclean.yaml"
    shell:
        "{TC} evaluate --threads {threads} --model {input.model} --tasks-dir {input.world}/tasks --tasks {TASKS}"
        " --device {params.device} {params.limit} --out {output} > {log} 2>&1"
