RUNS = ["base", "warmup"] + sft_runs()
# The embedded world reports three metrics (headline first); a benchmark suite one score per task.
TABLE_METRICS = [METRIC] if config["evaluation"].get("benchmarks") else ["answer_acc", "response_em", "answer_nll"]
PAPER_REFERENCE = config.get("paper_reference")
FIGURES = f"{R}/figures"


def report_outputs() -> list[str]:
    """Everything the report stage leaves in results/<experiment>/ (rule all asks for it)."""
    out = [f"{R}/table.csv", f"{R}/table.md", f"{R}/table.tex", f"{FIGURES}/score_distributions.png",
           f"{R}/token_view.html", f"{R}/provenance.json", f"{R}/provenance.md"]
    out += [f"{R}/table_{m}.csv" for m in TABLE_METRICS[1:]]
    if "full" in config["methods"]:
        out += [f"{R}/significance.csv", f"{R}/significance.md"]
    if len(config["ratios"]) > 1:
        out.append(f"{FIGURES}/score_vs_ratio.png")
    if EMBEDDED:  # ground-truth token classes exist only in the embedded world
        out.append(f"{R}/score_separation.csv")
        if pool_masks() or online_models():  # a chain alone selects nothing over the whole pool
            out += [f"{R}/cleaning_quality.csv", f"{FIGURES}/kept_by_class.png"]
    if set(CHAINED) & set(config["methods"]):
        out += [f"{R}/rounds.csv", f"{FIGURES}/rounds.png"]
    return out


def trained_models() -> list[str]:
    """Every model the table's rows trained (the warm-up model, each SFT row, each round of a chain): the report
    reads each one's passes over its own data from what training recorded next to it."""
    models = [model_dir("warmup")]
    for run in sft_runs():
        models += round_models(run) if run in chain_runs() else [model_dir(run)]
    return models


localrules: report, rounds_report, provenance  # seconds of work: on the submitting machine, not a cluster job


rule provenance:
    """What made the results: the data's sha256, the token tables' fingerprints, the base model's id, revision
    and the commit loaded (as the jobs recorded them), and the package versions."""
    input:
        data=DATA_DIR,
        tokens=[f"{R}/tokens/pool.tokens.npz", f"{R}/tokens/warmup.tokens.npz"],
        losses=f"{R}/losses/base/pool.loss.npy",  # the base model as the scoring job loaded it
    output:
        json=f"{R}/provenance.json",
        md=report(f"{R}/provenance.md", caption="../report/provenance.rst", category="Provenance"),
    params:
        base=model_ref("base"),
        revision=revision_flag(),
    log:
        f"{R}/logs/provenance.log",
    benchmark:
        f"{R}/benchmarks/provenance.tsv"
    conda:
        "../envs/tokenclean.yaml"
    shell:
        "{TC} provenance --data-dir {input.data} --tokens {input.tokens} --losses {input.losses}"
        " --base-model {params.base} {params.revision} --out-json {output.json} --out-md {output.md} > {log} 2>&1"


rule report:
    """One row per method x ratio, its passes over its own training data, one column per task and the average;
    mean and std over seeds. One table per metric (CSV, Markdown, LaTeX; best row in bold, the ground-truth rows
    never); the paper's numbers below ours when paper_reference is set."""
    input:
        evals=expand(f"{R}/eval/{{run}}.json", run=RUNS),
        models=trained_models(),
    output:
        csv=report(f"{R}/table.csv", caption="../report/table.rst", category="Tables", labels={"table": TABLE_METRICS[0]}),
        md=f"{R}/table.md",
        tex=f"{R}/table.tex",
        other=[report(f"{R}/table_{m}.csv", caption="../report/table_metric.rst", category="Tables",
                      labels={"table": m}) for m in TABLE_METRICS[1:]],
    params:
        metrics=",".join(TABLE_METRICS),
        paper=f"--paper-reference {PAPER_REFERENCE}" if PAPER_REFERENCE else "",
    log:
        f"{R}/logs/report.log",
    benchmark:
        f"{R}/benchmarks/report.tsv"
    conda:
        "../envs/tokenclean.yaml"
    shell:
        "{TC} report {input.evals} --models {input.models} --metric {METRIC} --metrics {params.metrics}"
        " {params.paper} --out-csv {output.csv} --out-md {output.md} --out-tex {output.tex} > {log} 2>&1"


rule significance:
    """Paired bootstrap over evaluation examples: each row minus full-token SFT, per task and on average."""
    input:
        evals=expand(f"{R}/eval/{{run}}.json", run=RUNS),
        samples=expand(f"{R}/eval/{{run}}.samples.jsonl", run=RUNS),
    output:
        csv=report(f"{R}/significance.csv", caption="../report/significance.rst", category="Tables",
                   labels={"table": "significance"}),
        md=f"{R}/significance.md",
    params:
        metrics=",".join(TABLE_METRICS),
        iters=config.get("report", {}).get("bootstrap_iters", 2000),
    log:
        f"{R}/logs/significance.log",
    benchmark:
        f"{R}/benchmarks/significance.tsv"
    conda:
        "../envs/tokenclean.yaml"
    shell:
        "{TC} significance {input.evals} --metrics {params.metrics} --iters {params.iters} --seed 0"
        " --out-csv {output.csv} --out-md {output.md} > {log} 2>&1"


rule figure_ratios:
    """Average score against the keep ratio, per method (only with more than one ratio)."""
    input:
        f"{R}/table.csv",
    output:
        report(f"{FIGURES}/score_vs_ratio.png", caption="../report/score_vs_ratio.rst", category="Figures"),
    log:
        f"{R}/logs/figures/score_vs_ratio.log",
    conda:
        "../envs/tokenclean.yaml"
    shell:
        "{TC} figure ratios --table {input} --metric {METRIC} --out {output} > {log} 2>&1"


rule figure_scores:
    """How the reference's token scores are distributed (per ground-truth class in the embedded world)."""
    input:
        tokens=f"{R}/tokens/pool.tokens.npz",
        base_loss=f"{R}/losses/base/pool.loss.npy",
        ref_loss=f"{R}/losses/warmup/pool.loss.npy",
    output:
        report(f"{FIGURES}/score_distributions.png", caption="../report/score_distributions.rst", category="Figures"),
    params:
        ratios=" ".join(ratio_tag(r) for r in config["ratios"]),
    log:
        f"{R}/logs/figures/score_distributions.log",
    conda:
        "../envs/tokenclean.yaml"
    shell:
        "{TC} figure scores --tokens {input.tokens} --base-loss {input.base_loss} --ref-loss {input.ref_loss}"
        " --ratios {params.ratios} --out {output} > {log} 2>&1"


rule figure_kept:
    """Kept fraction of each ground-truth class per selection (mask or online run), novel included (embedded world)."""
    input:
        f"{R}/cleaning_quality.csv",
    output:
        report(f"{FIGURES}/kept_by_class.png", caption="../report/kept_by_class.rst", category="Figures"),
    log:
        f"{R}/logs/figures/kept_by_class.log",
    conda:
        "../envs/tokenclean.yaml"
    shell:
        "{TC} figure kept --quality {input} --out {output} > {log} 2>&1"


rule figure_rounds:
    """The self-evolving chain per task, round 0 = the warm-up model (the paper's Matthew-effect figure)."""
    input:
        f"{R}/rounds.csv",
    output:
        report(f"{FIGURES}/rounds.png", caption="../report/rounds.rst", category="Figures"),
    log:
        f"{R}/logs/figures/rounds.log",
    conda:
        "../envs/tokenclean.yaml"
    shell:
        "{TC} figure rounds --rounds-csv {input} --metric {METRIC} --out {output} > {log} 2>&1"


rule token_view:
    """A self-contained HTML page: pool samples token by token, coloured by score, kept/dropped per selection
    (each mask and each online run)."""
    input:
        tokens=f"{R}/tokens/pool.tokens.npz",
        base_loss=f"{R}/losses/base/pool.loss.npy",
        ref_loss=f"{R}/losses/warmup/pool.loss.npy",
        masks=pool_masks(),
        online=online_models(),
        tokenizer=model_input("base"),
    output:
        report(f"{R}/token_view.html", caption="../report/token_view.rst", category="Token view"),
    params:
        selections=selection_args,
        tokenizer=model_ref("base"),
        revision=revision_flag(),
        samples=config.get("report", {}).get("token_view_samples", 12),
    log:
        f"{R}/logs/token_view.log",
    conda:
        "../envs/tokenclean.yaml"
    shell:
        "{TC} token-view --tokens {input.tokens} --base-loss {input.base_loss} --ref-loss {input.ref_loss}"
        " --masks {params.selections} --tokenizer {params.tokenizer} {params.revision} {TRUST} --samples {params.samples}"
        " --out {output} > {log} 2>&1"


rule cleaning_quality:
    """Kept fraction of each ground-truth token class per selection, a mask or an online run's record of the
    weights it gave (novel: what the reference could not know), and precision/recall against the informative
    and novel tokens (embedded world: the pool carries classes)."""
    input:
        tokens=f"{R}/tokens/pool.tokens.npz",
        masks=pool_masks(),
        online=online_models(),
    output:
        f"{R}/cleaning_quality.csv",
    params:
        selections=selection_args,
    log:
        f"{R}/logs/cleaning_quality.log",
    benchmark:
        f"{R}/benchmarks/cleaning_quality.tsv",
    conda:
        "../envs/tokenclean.yaml"
    shell:
        "{TC} quality {params.selections} --tokens {input.tokens} --out {output} > {log} 2>&1"


rule score_separation:
    """How the reference's scores fall by ground-truth class: does the score separate informative (and novel)
    from noisy tokens?"""
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
