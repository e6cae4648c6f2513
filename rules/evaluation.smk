def eval_inputs(wildcards) -> dict:
    """The evaluated model (unless it is a base model the workflow does not make) and, embedded, the world."""
    inputs = {"model": [] if wildcards.run == "base" and not EMBEDDED else model_dir(wildcards.run)}
    if EMBEDDED:
        inputs["world"] = f"{R}/world"
    return inputs


def eval_args() -> str:
    """The world's task families (embedded), or the configured lm-eval benchmarks with their shots and metrics."""
    ev = config["evaluation"]
    if EMBEDDED and not ev.get("benchmarks"):
        return f"--tasks-dir {R}/world/tasks --tasks {TASKS}"
    args = f"--benchmarks {as_json(ev['benchmarks'])}"
    if ev.get("model_args"):
        args += f" --model-args {as_json(ev['model_args'])}"
    if ev.get("include_path"):
        args += f" --include-path {shlex.quote(ev['include_path'])}"
    if ev.get("batch_size"):
        args += f" --batch-size {ev['batch_size']}"
    return args + f" {TRUST}"


rule evaluate:
    """lm-eval: the world's held-out tasks (embedded; local YAML, no downloads) or the configured benchmarks."""
    input:
        unpack(eval_inputs),
    output:
        json=f"{R}/eval/{{run}}.json",
        samples=f"{R}/eval/{{run}}.samples.jsonl",  # per-example scores (the report's paired bootstrap)
    params:
        model=lambda w: model_dir(w.run),
        revision=lambda w: revision_flag(w.run),
        args=eval_args(),
        limit=lambda w: f"--limit {config['evaluation']['limit']}" if config["evaluation"].get("limit") else "",
        device=config["evaluation"].get("device", "cpu"),
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
        "{GPU_TC} evaluate --threads {threads} --model {params.model} {params.revision} {params.args}"
        " --device {params.device} {params.limit} --out {output.json} > {log} 2>&1"
