# tokenclean: warm-up reference -> score tokens -> select -> SFT -> lm-eval -> report.
# `snakemake --cores all` runs config.yaml; `--configfile configs/smoke.yaml` is the one-minute version.
from snakemake.utils import min_version, validate

min_version("9.0")


configfile: "config.yaml"


validate(config, "schemas/config.schema.yaml")


include: "rules/common.smk"
include: "rules/world.smk"
include: "rules/data.smk"
include: "rules/models.smk"
include: "rules/scoring.smk"
include: "rules/selection.smk"
include: "rules/training.smk"
include: "rules/self_evolving.smk"
include: "rules/evaluation.smk"
include: "rules/report.smk"


rule all:
    input:
        f"{R}/table.csv",
        f"{R}/table.md",
        # ground-truth token classes exist only in the embedded world
        [f"{R}/cleaning_quality.csv", f"{R}/score_separation.csv"] if "world" in config else [],
        [f"{R}/rounds.csv"] if set(CHAINED) & set(config["methods"]) else [],
