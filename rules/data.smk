rule data:
    """The experiment's SFT data (non-embedded experiments): pool and warm-up set from local JSON lines or the
    hub, validated record by record, with sources and checksums in data.json."""
    input:
        data_files(),
    output:
        directory(f"{R}/data"),
    params:
        tc=launch,
        spec=as_json(config.get("data", {})),
    log:
        f"{R}/logs/data.log",
    benchmark:
        f"{R}/benchmarks/data.tsv"
    conda:
        "../envs/tokenclean.yaml"
    shell:
        "{params.tc} data --spec {params.spec} --out {output} > {log} 2>&1"
