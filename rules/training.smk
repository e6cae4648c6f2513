rule sft:
    """Fine-tune the base model on the pool's selected tokens (one row x seed of the table)."""
    input:
        unpack(sft_inputs),
        model=model_input("base"),
    output:
        directory(f"{R}/models/sft/{{run}}"),
    params:
        tc=launch_training,
        model=base_ref,
        revision=revision_flag(),
        trust=TRUST,
        train=sft_train_flags,
        seed=lambda w: parse_run(w.run)[2],
        mask=lambda w, input: f"--mask {input.mask}" if "mask" in input.keys() else "",
        online=online_flags,
    threads: THREADS
    resources:
        gpu=TRAIN_GPUS,
    log:
        f"{R}/logs/sft/{{run}}.log",
    benchmark:
        f"{R}/benchmarks/sft/{{run}}.tsv"
    conda:
        "../envs/tokenclean.yaml"
    shell:
        "{params.tc} train --threads {threads} --model {params.model} {params.revision} {params.trust} --tokens {input.tokens} {params.mask}"
        " {params.online} {params.train} --seed {params.seed} --out {output} > {log} 2>&1"
