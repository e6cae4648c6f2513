def data_files() -> list[str]:
    """The local files of data.pool / data.warmup: inputs of the data rule, so editing one re-runs it (hub
    sources are params: their id, split and revision)."""
    return [src["path"] for src in (config.get("data", {}).get(k, {}) for k in ("pool", "warmup")) if "path" in src]


rule data:
    """The experiment's SFT data (non-embedded experiments): pool and warm-up set from local JSON lines or the
    hub, validated record by record, with sources and checksums in data.json."""
    input:
        data_files(),
    output:
        directory(f"{R}/data"),
    params:
        spec=as_json(config.get("data", {})),
    log:
        f"{R}/logs/data.log",
    benchmark:
        f"{R}/benchmarks/data.tsv"
    conda:
        "../envs/tokenclean.yaml"
    shell:
        "{TC} data --spec {params.spec} --out {output} > {log} 2>&1"
