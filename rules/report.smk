RUNS = ["base", "warmup"] + sft_runs()


localrules: report, rounds_report  # seconds of CSV work: on the submitting machine, not a cluster job


rule report:
    """One row per method x ratio, one column per task and the average; mean and std over seeds."""
    input:
        expand(f"{R}/eval/{{run}}.json", run=RUNS),
    output:
        csv=f"{R}/table.csv",
        md=f"{R}/table.md",
    log:
        f"{R}/logs/report.log",
    benchmark:
        f"{R}/benchmarks/report.tsv",
    conda:
        "../envs/tokenclean.yaml"
    shell:
        "{TC} report {input} --metric {METRIC} --out-csv {output.csv} --out-md {output.md} > {log} 2>&1"


rule cleaning_quality:
    """Kept fraction of each ground-truth token class per mask (embedded world: the pool carries classes)."""
    input:
        tokens=f"{R}/tokens/pool.tokens.npz",
        masks=pool_masks(),
    output:
        f"{R}/cleaning_quality.csv",
    log:
        f"{R}/logs/cleaning_quality.log",
    benchmark:
        f"{R}/benchmarks/cleaning_quality.tsv",
    conda:
        "../envs/tokenclean.yaml"
    shell:
        "{TC} quality {input.masks} --tokens {input.tokens} --out {output} > {log} 2>&1"


rule score_separation:
    """How the reference's scores fall by ground-truth class: does the score separate informative from noisy?"""
    input:
        tokens=f"{R}/tokens/pool.tokens.npz",
        base_loss=f"{R}/losses/base/pool.loss.npy",
        ref_loss=f"{R}/losses/warmup/pool.loss.npy",
    output:
        f"{R}/score_separation.csv",
    log:
        f"{R}/logs/score_separation.log",
    benchmark:
        f"{R}/benchmarks/score_separation.tsv"
    conda:
        "../envs/tokenclean.yaml"
    shell:
        "{TC} separation --tokens {input.tokens} --base-loss {input.base_loss} --ref-loss {input.ref_loss}"
        " --out {output} > {log} 2>&1"
