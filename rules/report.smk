localrules: report, rounds_report, provenance  # seconds of work: on the submitting machine, not a cluster job


rule provenance:
    """What made the results: the data's sha256, the token tables' fingerprints, the base model's id, revision
    and the commit loaded (as the jobs recorded them), and the package versions."""
    input:
        data=DATA_DIR,
        tokens=[POOL_TOKENS, f"{R}/tokens/warmup.tokens.npz"],
        losses=f"{R}/losses/base/pool.loss.npy",  # the base model as the scoring job loaded it
    output:
        json=f"{R}/provenance.json",
        md=report(f"{R}/provenance.md", caption="../report/provenance.rst", category="Provenance"),
    params:
        tc=launch,
        base=model_ref("base"),
        revision=revision_flag(),
    log:
        f"{R}/logs/provenance.log",
    benchmark:
        f"{R}/benchmarks/provenance.tsv"
    conda:
        "../envs/tokenclean.yaml"
    shell:
        "{params.tc} provenance --data-dir {input.data} --tokens {input.tokens} --losses {input.losses}"
        " --base-model {params.base} {params.revision} --out-json {output.json} --out-md {output.md} > {log} 2>&1"


rule report:
    """One row per method x ratio, its passes over its own training data, one column per task and the average;
    mean and std over seeds. One table per metric (CSV, Markdown, LaTeX; best row in bold, the ground-truth rows
    never); the paper's numbers below ours when paper_reference is set."""
    input:
        evals=all_evals(),
        models=trained_models(),
    output:
        csv=report(f"{EXPERIMENT_DIR}/table.csv", caption="../report/table.rst", category="Tables",
                   labels={"table": TABLE_METRICS[0]}),
        md=f"{EXPERIMENT_DIR}/table.md",
        tex=f"{EXPERIMENT_DIR}/table.tex",
        other=[report(f"{EXPERIMENT_DIR}/table_{m}.csv", caption="../report/table_metric.rst", category="Tables",
                      labels={"table": m}) for m in TABLE_METRICS[1:]],
    params:
        tc=launch,
        metric=METRIC,
        metrics=",".join(TABLE_METRICS),
        paper=f"--paper-reference {PAPER_REFERENCE}" if PAPER_REFERENCE else "",
    log:
        f"{EXPERIMENT_DIR}/logs/report.log",
    benchmark:
        f"{EXPERIMENT_DIR}/benchmarks/report.tsv"
    conda:
        "../envs/tokenclean.yaml"
    shell:
        "{params.tc} report {input.evals} --models {input.models} --metric {params.metric} --metrics {params.metrics}"
        " {params.paper} --out-csv {output.csv} --out-md {output.md} --out-tex {output.tex} > {log} 2>&1"


rule significance:
    """Each row minus full-token SFT (and minus full+warmup), per task and on average: a paired bootstrap over
    replicates, then seeds, then test questions, and the share of replicates in which the row is ahead."""
    input:
        evals=all_evals(),
        samples=all_evals(".samples.jsonl"),
    output:
        csv=report(f"{EXPERIMENT_DIR}/significance.csv", caption="../report/significance.rst", category="Tables",
                   labels={"table": "significance"}),
        md=f"{EXPERIMENT_DIR}/significance.md",
    params:
        tc=launch,
        metrics=",".join(TABLE_METRICS),
        baselines=",".join(BASELINES),
        iters=lookup(dpath="report/bootstrap_iters", within=config),
    log:
        f"{EXPERIMENT_DIR}/logs/significance.log",
    benchmark:
        f"{EXPERIMENT_DIR}/benchmarks/significance.tsv"
    conda:
        "../envs/tokenclean.yaml"
    shell:
        "{params.tc} significance {input.evals} --metrics {params.metrics} --baseline {params.baselines}"
        " --iters {params.iters} --seed 0"
        " --out-csv {output.csv} --out-md {output.md} > {log} 2>&1"


rule figure_ratios:
    """Average score against the keep ratio, per method (only with more than one ratio)."""
    input:
        f"{EXPERIMENT_DIR}/table.csv",
    output:
        report(f"{EXPERIMENT_DIR}/figures/score_vs_ratio.png", caption="../report/score_vs_ratio.rst",
               category="Figures"),
    params:
        tc=launch,
        metric=METRIC,
    log:
        f"{EXPERIMENT_DIR}/logs/figures/score_vs_ratio.log",
    benchmark:
        f"{EXPERIMENT_DIR}/benchmarks/figures/score_vs_ratio.tsv"
    conda:
        "../envs/tokenclean.yaml"
    shell:
        "{params.tc} figure ratios --table {input} --metric {params.metric} --out {output} > {log} 2>&1"


rule figure_scores:
    """How the reference's token scores are distributed (per ground-truth class in the embedded world)."""
    input:
        unpack(pool_scores),
    output:
        report(f"{FIGURES}/score_distributions.png", caption="../report/score_distributions.rst", category="Figures"),
    params:
        tc=launch,
        ratios=" ".join(ratio_tag(r) for r in config["ratios"]),
    log:
        f"{R}/logs/figures/score_distributions.log",
    benchmark:
        f"{R}/benchmarks/figures/score_distributions.tsv"
    conda:
        "../envs/tokenclean.yaml"
    shell:
        "{params.tc} figure scores --tokens {input.tokens} --base-loss {input.base_loss} --ref-loss {input.ref_loss}"
        " --ratios {params.ratios} --out {output} > {log} 2>&1"


rule figure_kept:
    """Kept fraction of each ground-truth class per selection (mask or online run), novel included (embedded world)."""
    input:
        f"{R}/cleaning_quality.csv",
    output:
        report(f"{FIGURES}/kept_by_class.png", caption="../report/kept_by_class.rst", category="Figures"),
    params:
        tc=launch,
    log:
        f"{R}/logs/figures/kept_by_class.log",
    benchmark:
        f"{R}/benchmarks/figures/kept_by_class.tsv"
    conda:
        "../envs/tokenclean.yaml"
    shell:
        "{params.tc} figure kept --quality {input} --out {output} > {log} 2>&1"


rule figure_rounds:
    """The self-evolving chain per task, round 0 = the warm-up model (the paper's Matthew-effect figure)."""
    input:
        f"{R}/rounds.csv",
    output:
        report(f"{FIGURES}/rounds.png", caption="../report/rounds.rst", category="Figures"),
    params:
        tc=launch,
        metric=METRIC,
    log:
        f"{R}/logs/figures/rounds.log",
    benchmark:
        f"{R}/benchmarks/figures/rounds.tsv"
    conda:
        "../envs/tokenclean.yaml"
    shell:
        "{params.tc} figure rounds --rounds-csv {input} --metric {params.metric} --out {output} > {log} 2>&1"


rule token_view:
    """A self-contained HTML page: pool samples token by token, coloured by score, kept/dropped per selection
    (each mask and each online run)."""
    input:
        unpack(pool_scores),
        masks=pool_masks(),
        online=online_models(),
        tokenizer=model_input("base"),
    output:
        report(f"{R}/token_view.html", caption="../report/token_view.rst", category="Token view"),
    params:
        tc=launch,
        selections=selection_args,
        tokenizer=base_ref,
        revision=revision_flag(),
        trust=TRUST,
        samples=lookup(dpath="report/token_view_samples", within=config),
    log:
        f"{R}/logs/token_view.log",
    benchmark:
        f"{R}/benchmarks/token_view.tsv"
    conda:
        "../envs/tokenclean.yaml"
    shell:
        "{params.tc} token-view --tokens {input.tokens} --base-loss {input.base_loss} --ref-loss {input.ref_loss}"
        " --masks {params.selections} --tokenizer {params.tokenizer} {params.revision} {params.trust}"
        " --samples {params.samples}"
        " --out {output} > {log} 2>&1"


rule cleaning_quality:
    """Kept fraction of each ground-truth token class per selection, a mask or an online run's record of the
    weights it gave (novel: what the reference could not know), and precision/recall against the informative
    and novel tokens (embedded world: the pool carries classes)."""
    input:
        tokens=POOL_TOKENS,
        masks=pool_masks(),
        online=online_models(),
    output:
        f"{R}/cleaning_quality.csv",
    params:
        tc=launch,
        selections=selection_args,
    log:
        f"{R}/logs/cleaning_quality.log",
    benchmark:
        f"{R}/benchmarks/cleaning_quality.tsv",
    conda:
        "../envs/tokenclean.yaml"
    shell:
        "{params.tc} quality {params.selections} --tokens {input.tokens} --out {output} > {log} 2>&1"


rule score_separation:
    """How the reference's scores fall by ground-truth class: does the score separate informative (and novel)
    from noisy tokens?"""
    input:
        unpack(pool_scores),
    output:
        f"{R}/score_separation.csv",
    params:
        tc=launch,
    log:
        f"{R}/logs/score_separation.log",
    benchmark:
        f"{R}/benchmarks/score_separation.tsv"
    conda:
        "../envs/tokenclean.yaml"
    shell:
        "{params.tc} separation --tokens {input.tokens} --base-loss {input.base_loss} --ref-loss {input.ref_loss}"
        " --out {output} > {log} 2>&1"
