RUNS = ["base", "warmup"] + sft_runs()


rule report:
    """One row per method x ratio, one column per task and the average; mean and std over seeds."""
    input:
        expand(f"{R}/eval/{{run}}.json", run=RUNS),
    output:
        csv=f"{R}/table.csv",
        md=f"{R}/table.md",
    log:
        f"{R}/logs/report.log",
    conda:
        "../envs/tokenclean.yaml"
    shell:
        "{TC} report {input} --out-csv {output.csv} --out-md {output.md} > {log} 2>&1"
