# tokenclean: warm-up reference -> score tokens -> select -> SFT -> lm-eval -> report.
# `snakemake --cores all` runs config.yaml; `--configfile configs/smoke.yaml` is the one-minute version.
from snakemake.utils import min_version, validate

min_version("9.0")


report: "report/workflow.rst"


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
        # tables, significance, figures and the token view (rules/report.smk); `snakemake --report
        # results/<experiment>/report.html` gathers them
        report_outputs(),
