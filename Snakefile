# tokenclean: warm-up reference -> score tokens -> select -> SFT -> lm-eval -> report.
# `snakemake --cores all` runs config.yaml; `--configfile configs/smoke.yaml` is the one-minute version.
import os
import sys

from snakemake.utils import min_version

min_version("9.0")

sys.path.insert(0, workflow.basedir)
from tokenclean.config import ConfigError, check_config  # noqa: E402  (pure Python: no torch at planning time)
from tokenclean.preflight import check_plan  # noqa: E402


report: "report/workflow.rst"


# `--configfile X` runs exactly X (plus the schema's defaults): config.yaml is only the default when no config
# file is named (a `configfile:` directive would be merged under the user's file).
if not workflow.overwrite_configfiles:

    configfile: os.path.join(workflow.basedir, "config.yaml")


# The schema (schemas/config.schema.yaml) and the rules it cannot state, then what planning can check cheaply of the
# data files, the benchmarks' metrics and the base model (tokenclean/preflight.py); a problem is one line, before any
# job; a warning, and a check that cannot be made here (a hub model's chat template when the model is not in the
# cache), is one line too. A check that builds the base model with empty weights (LoRA targets, attention weights)
# runs in the planning process only, not again in each cluster job that re-reads this file.
try:
    check_config(config, workflow.overwrite_configfiles or workflow.configfiles)
    for _warning in check_plan(config, workflow.overwrite_configfiles or workflow.configfiles,
                               build_model=workflow.is_main_process):
        print(f"config warning: {_warning}", file=sys.stderr)
except ConfigError as e:
    print(f"config error: {e}", file=sys.stderr)
    sys.exit(2)  # bad input, as every tokenclean command reports it


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
