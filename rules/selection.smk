def select_inputs(wildcards):
    inputs = {"tokens": f"{R}/tokens/pool.tokens.npz"}
    needs = registry.get(registry.parse_mask(wildcards.mask)[0]).needs
    if "base_loss" in needs or "ref_loss" in needs:
        inputs["base_loss"] = pool_loss("base")
        inputs["ref_loss"] = pool_loss("warmup")
    return inputs


def select_args(wildcards, input):
    method, ratio, seed = registry.parse_mask(wildcards.mask)
    args = f"--method {method} --ratio {ratio or 1.0} --seed {seed}"
    if "base_loss" in input.keys():
        args += f" --base-loss {input.base_loss} --ref-loss {input.ref_loss}"
    return args


rule select:
    """Score = loss(base) - loss(reference) on the pool; keep tokens by the method's rule."""
    input:
        unpack(select_inputs),
    output:
        f"{R}/masks/{{mask}}.mask.npy",
    params:
        args=select_args,
    priority: UNBLOCKING
    log:
        f"{R}/logs/select/{{mask}}.log",
    benchmark:
        f"{R}/benchmarks/select/{{mask}}.tsv",
    conda:
        "../envs/tokenclean.yaml"
    shell:
        "{TC} select {params.args} --tokens {input.tokens} --out {output} > {log} 2>&1"
