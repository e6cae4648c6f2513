rule select:
    """Score = loss(base) - loss(reference) on the pool; keep tokens by the method's rule."""
    input:
        unpack(select_inputs),
    output:
        f"{R}/masks/{{mask}}.mask.npy",
    params:
        tc=launch,
        args=select_args,
    priority: UNBLOCKING
    log:
        f"{R}/logs/select/{{mask}}.log",
    benchmark:
        f"{R}/benchmarks/select/{{mask}}.tsv",
    conda:
        "../envs/tokenclean.yaml"
    shell:
        "{params.tc} select {params.args} --tokens {input.tokens} --out {output} > {log} 2>&1"
