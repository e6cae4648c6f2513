def select_inputs(wildcards):
    inputs = {"tokens": f"{R}/tokens/pool.tokens.npz"}
    if wildcards.mask.split("_r")[0] in POOL_SCORED:
        inputs["base_loss"] = f"{R}/losses/base/pool.loss.npy"
        inputs["ref_loss"] = f"{R}/losses/warmup/pool.loss.npy"
    return inputs


def select_args(wildcards, input):
    method, _, rest = wildcards.mask.partition("_r")
    ratio, _, seed = rest.partition("_s")
    args = f"--method {method} --ratio {ratio or 1.0} --seed {seed or 0}"
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
