rule world:
    """The embedded synthetic world: corpus, warm-up set, pool, held-out eval sets and their lm-eval tasks."""
    output:
        directory(f"{R}/world"),
    params:
        tc=launch,
        world=lambda w: as_json(replicates.seeded(config.get("world", {}), replicates.index(w.rep))),
    log:
        f"{R}/logs/world.log",
    benchmark:
        f"{R}/benchmarks/world.tsv"
    conda:
        "../envs/tokenclean.yaml"
    shell:
        "{params.tc} world --params {params.world} --out {output} > {log} 2>&1"
